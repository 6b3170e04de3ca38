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


def user_env(**extra):
  """The environment a newcomer runs the scripts in: none of the suite's settings (8
  simulated devices, TensorFlow's log level, hidden GPUs), JAX on the CPU."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL', 'CUDA_VISIBLE_DEVICES')}
  return {**env, 'JAX_PLATFORMS': 'cpu', **extra}


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
  assert messages == ["Feature lengths {'inputs': 128, 'targets': 128} are too short for the "
                      'mean spans of X(64,0.15) (144-token chunks, spans of 22.0 tokens instead '
                      'of 64); UL2 uses 512/512.']
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


@pytest.mark.slow
def test_the_smoke_command_runs_the_pipeline_with_at_most_one_note(tmp_path):
  """scripts/smoke.sh as a newcomer runs it: pretraining, fine-tuning and evaluation end to
  end, and with the settings it ships nothing on the terminal but progress, results and at
  most one plain note (no warnings with source lines, no TensorFlow start-up lines)."""
  env = user_env(UL2_SKIP_INSTALL='1', UL2_SMOKE_DIR=str(tmp_path), UL2_VENV=sys.prefix)
  done = subprocess.run(['bash', os.path.join(SCRIPTS, 'smoke.sh')], capture_output=True,
                        text=True, timeout=1200, env=env)
  output = done.stdout + done.stderr
  assert done.returncode == 0, output[-4000:]
  for stage in ('== 1/3 pretraining', '== 2/3 fine-tuning', '== 3/3 evaluating'):
    assert stage in done.stdout
  results = __import__('json').loads((tmp_path / 'smoke_cb' / 'eval' / 'results.json')
                                     .read_text())
  assert 'cb' in str(results)
  assert (tmp_path / 'smoke' / 'metrics.png').exists()
  lines = output.splitlines()
  assert not [l for l in lines if 'Warning' in l or 'WARNING' in l or 'I0000' in l
              or 'E0000' in l or 'Traceback' in l], output[-4000:]
  assert len([l for l in lines if l.startswith('note:')]) <= 1, output[-4000:]


def test_misspelt_task_names_and_gin_parameters_get_a_did_you_mean():
  import ul2_tasks  # noqa: F401  (registers the tasks)
  import gin_cli
  with pytest.raises(ValueError, match=r"^Unknown task or mixture 'ul2_mod_gutenbreg' "
                     r"\(DataConfig.task / MIXTURE_OR_TASK_NAME\). Did you mean "
                     r"'ul2_mod_gutenberg'\?$"):
    data_lib.check_task('ul2_mod_gutenbreg')
  required = ["MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'", 'TRAIN_STEPS=1', "MODEL_DIR='/x'",
              "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}"]
  for binding, said in (
      ('train.TrainConfig.eval_batchs=2', "error: gin: Configurable 'train.TrainConfig' "
       "doesn't have a parameter named 'eval_batchs'. Did you mean eval_batches or "
       'denoiser_eval_batches?'),
      ('trian.TrainConfig.steps=3', "error: gin: No configurable matching "
       "'trian.TrainConfig'. Did you mean train.TrainConfig?")):
    with pytest.raises(SystemExit) as e:
      gin_cli.parse(['models/tiny.gin', 'runs/pretrain.gin'], [binding, *required])
    assert str(e.value) == said


def test_a_recipe_for_other_machines_says_so_first(tmp_path):
  for recipe, said in (('experiments/t5_1_1_base_8gpu.gin', 'is a recipe for hosts of 8 GPUs '
                        '(GPUS_PER_HOST) and this machine has 1 CPU device(s)'),
                       ('experiments/ul2_20b_tpu_v4.gin', 'is a recipe for a TPU v4-512 slice '
                        '(TPU_SLICE) and this machine has 1 CPU device(s)')):
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'train.py'),
                           f'--gin_file={recipe}', f"--gin.MODEL_DIR='{tmp_path}'"],
                          capture_output=True, text=True, timeout=300, env=user_env())
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().startswith(f'error: {recipe} {said}'), done.stderr[-2000:]
    assert not os.listdir(tmp_path)  # nothing written, nothing built


def test_gin_syntax_mistakes_name_the_users_file_and_line(tmp_path):
  """A user's gin file is read through a copy with the project's imports added: its syntax
  errors still name the user's file and line; an unquoted string flag says how to quote it."""
  import gin_cli
  cases = [
      ("include 'models/tiny.gin'\ntrain.TrainConfig.log_every = = 7\n", [],
       "error: gin: {path}:2: Unable to parse value. in 'train.TrainConfig.log_every = = 7'"),
      ("include 'models/tiny.gin'\nnetwork.Config.emb_dim = (\n", [],
       'error: gin: {path}: a bracket or string opened and never closed.'),
      ("include 'models/tiny.gin'\n", ['MODEL_DIR=/ckpt/run'],
       'error: gin: --gin.MODEL_DIR=/ckpt/run: \'/ckpt/run\' is not a gin value; a string is '
       'quoted inside the flag: --gin.MODEL_DIR="\'/ckpt/run\'"'),
  ]
  for text, bindings, said in cases:
    path = tmp_path / 'mine.gin'
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
      gin_cli.parse([str(path)], bindings)
    assert str(e.value) == said.format(path=path)


def test_a_task_module_with_a_syntax_error_is_one_line(tmp_path, monkeypatch):
  import gin_cli
  (tmp_path / 'broken_tasks.py').write_text('import seqio\ndef f(:\n  pass\n')
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    gin_cli.import_modules(['broken_tasks'])
  assert str(e.value) == (f'error: --module broken_tasks: invalid syntax at '
                          f'{tmp_path / "broken_tasks.py"}:2.')
