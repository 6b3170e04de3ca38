"""A newcomer's mistakes: each gives one line naming the file, field or setting and the fix
(real files, real TFDS, real subprocesses of the scripts)."""

import os
import subprocess
import sys

import pytest
import seqio

import train_setup
from ul2 import data as data_lib
from ul2 import denoisers, vocabulary
from ul2_tasks import pretrain

TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(TESTS), 'scripts')
BOOK = os.path.join(vocabulary.DATA_DIR, 'gutenberg_sample', 'gutenberg_validation_00.txt')


def test_c4_that_is_not_prepared_says_how_to_prepare_it(tmp_path, monkeypatch):
  """seqio would try to download and build C4 (Apache Beam, the network)."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'Task ul2_mod_c4 reads the TFDS dataset '
                     rf'c4/en:3.1.0, which is not prepared in {tmp_path}: .*tfds build c4/en'
                     r'.*TFDS_DATA_DIR=DIR'):
    data_lib.check_task('ul2_mod_c4')


def run_script(name, *args, block=(), cwd=None):
  """scripts/<name>.py in a subprocess -> (the completed process, the modules it imported of
  jax and tensorflow); `block`: modules made unimportable, as if not installed."""
  code = ('import runpy, sys\n'
          f'for m in {list(block)!r}: sys.modules[m] = None\n'
          f'sys.argv = [{name + ".py"!r}, *{list(args)!r}]\n'
          'try:\n'
          f'  runpy.run_path({os.path.join(SCRIPTS, name + ".py")!r}, run_name="__main__")\n'
          'finally:\n'
          '  print("heavy:", sorted(m for m in ("jax", "tensorflow") if m in sys.modules))\n')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': SCRIPTS}
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, env=env, cwd=cwd)
  heavy = [line for line in done.stdout.splitlines() if line.startswith('heavy:')]
  return done, heavy[-1] if heavy else None


def test_a_checkpoint_that_does_not_exist_is_one_line_before_jax_loads(tmp_path):
  (tmp_path / 'runs' / 'quickstart').mkdir(parents=True)
  for script, args in (('infer', ['--input', 'Hi']), ('eval', []),
                       ('export_hf', ['--output', 'x']), ('export_t5x', ['--output', 'x'])):
    done, heavy = run_script(script, '--checkpoint', 'runs/quickstrat', *args, cwd=tmp_path)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip() == ('error: No checkpoint at runs/quickstrat (--checkpoint): no '
                                   'such file or directory. Did you mean runs/quickstart?')
    assert heavy == 'heavy: []', (script, heavy)
  done, _ = run_script('infer', '--checkpoint', '/no/such/run', '--input', 'Hi')
  assert done.stderr.strip().startswith(
      'error: No checkpoint at /no/such/run (--checkpoint): no such file or directory. Give a '
      'model_dir')


@pytest.mark.parametrize('script', sorted(
    os.path.basename(p)[:-3] for p in __import__('glob').glob(os.path.join(SCRIPTS, '*.py'))
    if not p.endswith('gin_cli.py')))
def test_every_scripts_help_answers_before_jax_or_tensorflow_load(script):
  done, heavy = run_script(script, '--help')
  assert done.returncode == 0 and 'usage:' in done.stdout, done.stderr[-2000:]
  assert heavy == 'heavy: []', heavy


def test_a_missing_optional_dependency_is_one_line_naming_its_extra(tmp_path):
  done, heavy = run_script('export_hf', '--checkpoint', str(tmp_path), '--output', 'x',
                           block=('safetensors',))
  assert done.returncode == 1 and heavy == 'heavy: []'
  assert done.stderr.strip() == ("error: scripts/export_hf.py needs safetensors (the hf extra): "
                                 "pip install -e '.[hf]'")
  # Reading an HF directory (config.json beside *.safetensors) without it, from eval.py.
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'model.safetensors').write_bytes(b'')
  done, _ = run_script('eval', '--checkpoint', str(tmp_path), '--tasks', 'cb',
                       block=('safetensors',))
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == (
      f"error: Reading the HF checkpoint {tmp_path} needs safetensors (the hf extra): pip "
      "install -e '.[hf]'")


def test_text_key_given_to_register_corpus_instead_of_the_source(tmp_path):
  (tmp_path / 'train.jsonl').write_text('{"body": "A document."}\n')
  source = pretrain.jsonl_source(str(tmp_path / 'train.jsonl'))
  with pytest.raises(ValueError, match=r"register_corpus\('news', text_key='body'\): the source "
                     r"gives \['text'\], no 'body'.*jsonl_source\(\.\.\., text_key='body'\)"):
    pretrain.register_corpus('news', source, text_key='body')


def test_an_empty_corpus_stops_training_with_its_name(tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  pretrain.register_corpus('empty_books', pretrain.text_files_source(str(tmp_path / 'empty.txt')))
  with pytest.raises(ValueError, match=r"The training input ended before step 1: "
                     r"ul2_mod_empty_books's train split gave no full batch of 8"):
    train_setup.run(str(tmp_path / 'run'), steps=2, task='ul2_mod_empty_books', eval_split=None)


def test_a_corpus_that_is_not_utf8_names_its_file_and_line(tmp_path):
  good = open(BOOK, encoding='utf-8').read().splitlines()[:40]
  lines = good[:3] + ['caf\xe9 au lait'] + good[3:]
  (tmp_path / 'latin1.txt').write_bytes('\n'.join(lines).encode('latin-1', 'replace'))
  with pytest.raises(ValueError, match=rf"{tmp_path / 'latin1.txt'}:4: not UTF-8 .*iconv.*"
                     r"errors='replace'"):
    pretrain.text_files_source(str(tmp_path / 'latin1.txt'))
  # errors='replace': the bad byte becomes U+FFFD, the rest of the line is kept.
  pretrain.register_corpus('latin_books', pretrain.text_files_source(
      str(tmp_path / 'latin1.txt'), errors='replace'))
  task = seqio.get_mixture_or_task('ul2_mod_latin_books')
  texts = [ex['text'] for ex in task.source.get_dataset('train', shuffle=False)
           .map(lambda line: {'text': line}).as_numpy_iterator()]
  assert b'caf\xe9 au lait' in texts  # the raw line; the preprocessor transcodes it
  import tensorflow as tf
  converted = pretrain._lines_as_documents(tf.data.Dataset.from_tensor_slices([texts[3]]))
  assert next(converted.as_numpy_iterator())['text'].decode() == 'caf\ufffd au lait'

  (tmp_path / 'docs.jsonl').write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  source = pretrain.jsonl_source(str(tmp_path / 'docs.jsonl'))
  with pytest.raises(Exception, match=rf"{tmp_path / 'docs.jsonl'}:2: not UTF-8"):
    list(source.get_dataset('train', shuffle=False).as_numpy_iterator())
  replaced = pretrain.jsonl_source(str(tmp_path / 'docs.jsonl'), errors='replace')
  assert [ex['text'] for ex in replaced.get_dataset('train', shuffle=False)
          .as_numpy_iterator()] == [b'ok', 'caf\ufffd'.encode()]


def test_lengths_too_short_for_a_denoisers_mean_span_are_said(recwarn):
  mixture = denoisers.MixtureConfig((denoisers.R(3, 0.15), denoisers.X(64, 0.15)),
                                    rates=(0.5, 0.5))
  vocab = vocabulary.get_vocabulary()
  denoisers.plan_chunks(mixture, {'inputs': 128, 'targets': 128}, vocab)
  messages = [str(w.message) for w in recwarn.list if w.category is UserWarning]
  assert any(m.startswith("Feature lengths {'inputs': 128, 'targets': 128} are too short for "
                          'denoiser X(64,0.15) to keep its mean span of 64') for m in messages)
  assert not any('R(3,0.15)' in m for m in messages)  # R keeps its 3-token spans


def test_train_script_reports_a_user_error_in_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, os.path.join(SCRIPTS, 'train.py'), '--gin_file=models/tiny.gin',
       '--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='no_such_task'",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", '--gin.TRAIN_STEPS=1',
       f"--gin.MODEL_DIR='{tmp_path}'"], capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert done.stderr.strip().splitlines()[-1].startswith(
      "error: Unknown task or mixture 'no_such_task' (DataConfig.task / MIXTURE_OR_TASK_NAME)")
