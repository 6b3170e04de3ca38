"""Corpus registration (text, jsonl, HF datasets on disk, the Gutenberg directory) and the
inspect_task script."""

import collections
import io
import json
import os

import datasets
import numpy as np
import pytest
import seqio

import inspect_task
import ul2_tasks  # noqa: F401
from ul2_tasks import pretrain
from ul2 import denoisers as D
from ul2 import vocabulary as V

LENGTHS = {'inputs': 128, 'targets': 128}
PARAGRAPHS = open(os.path.join(pretrain.BUNDLED_GUTENBERG_DIR,
                               'gutenberg_validation_00.txt')).read().splitlines()


def read(task_name, split='train', n=None):
  ds = seqio.get_mixture_or_task(task_name).get_dataset(LENGTHS, split=split, shuffle=False,
                                                        seed=0)
  return list((ds.take(n) if n else ds).as_numpy_iterator())


def raw_tokens(examples, objective='t5_span_corruption'):
  """Total raw chunk tokens behind the examples (inverse of the denoiser)."""
  config = pretrain.OBJECTIVES[objective]
  vocab = V.get_vocabulary()
  total = 0
  for ex in examples:
    d = config.denoisers[ex['denoiser']]
    prompt = len(D.mode_token_ids(d.mode, config, vocab))
    inputs, targets = ex['inputs'][prompt:-1], ex['targets'][:-1]
    sentinels = int(np.sum(inputs >= vocab.vocab_size - vocab.extra_ids))
    total += len(inputs) - sentinels + len(targets) - sentinels
  return total


def expected_tokens(paragraphs):
  return sum(len(V.get_vocabulary().encode(p)) for p in paragraphs)


def test_text_files_jsonl_and_hf_disk_corpora_register_in_one_call(tmp_path):
  train, valid = PARAGRAPHS[:200], PARAGRAPHS[200:260]
  (tmp_path / 'train-0.txt').write_text('\n'.join(train[:100]) + '\n')
  (tmp_path / 'train-1.txt').write_text('\n'.join(train[100:]) + '\n')
  (tmp_path / 'valid.txt').write_text('\n'.join(valid) + '\n')
  with open(tmp_path / 'train.jsonl', 'w') as f:
    for p in train:
      f.write(json.dumps({'body': p, 'id': 1}) + '\n')
  with open(tmp_path / 'valid.jsonl', 'w') as f:
    for p in valid:
      f.write(json.dumps({'body': p}) + '\n')
  datasets.DatasetDict({
      'train': datasets.Dataset.from_dict({'text': train}),
      'validation': datasets.Dataset.from_dict({'text': valid}),
  }).save_to_disk(str(tmp_path / 'hf'))

  names = {
      'txt': pretrain.register_corpus('test_txt', pretrain.text_files_source(
          str(tmp_path / 'train-*.txt'), str(tmp_path / 'valid.txt'))),
      'jsonl': pretrain.register_corpus('test_jsonl', pretrain.jsonl_source(
          str(tmp_path / 'train.jsonl'), str(tmp_path / 'valid.jsonl'), text_key='body')),
      'hf': pretrain.register_corpus('test_hf', pretrain.hf_disk_source(str(tmp_path / 'hf'))),
  }
  assert names['txt'] == ['ul2_mod_test_txt', 't5_span_corruption_test_txt',
                          'prefix_lm_test_txt', 'ul2r_test_txt', 'causal_lm_test_txt']
  want = {'train': expected_tokens(train), 'validation': expected_tokens(valid)}
  for kind in names:
    for split in ('train', 'validation'):
      examples = read(f't5_span_corruption_test_{kind}', split)
      # Every token of the corpus reaches an example, except a 1-token block tail at most.
      assert want[split] - 1 <= raw_tokens(examples) <= want[split], (kind, split)
    assert len(read(f'ul2_mod_test_{kind}', n=3)) == 3


def test_jsonl_errors_name_the_file_line_and_field(tmp_path):
  (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  pretrain.register_corpus('test_bad', pretrain.jsonl_source(str(tmp_path / 'bad.jsonl')))
  with pytest.raises(Exception, match=r"bad.jsonl:2: expected a JSON object with a string "
                                      r"field 'text'"):
    read('ul2_mod_test_bad')


def test_missing_files_are_reported_with_the_pattern(tmp_path):
  with pytest.raises(FileNotFoundError, match='No train files match'):
    pretrain.text_files_source(str(tmp_path / 'nothing-*.txt'))
  with pytest.raises(FileNotFoundError, match='No Hugging Face dataset directory'):
    pretrain.hf_disk_source(str(tmp_path / 'absent'))


def test_gutenberg_directory_is_configurable(tmp_path, monkeypatch):
  (tmp_path / 'gutenberg_train_00.txt').write_text('\n'.join(PARAGRAPHS[:50]) + '\n')
  (tmp_path / 'gutenberg_validation_00.txt').write_text('\n'.join(PARAGRAPHS[50:70]) + '\n')
  try:
    monkeypatch.setenv(pretrain.GUTENBERG_DIR_ENV, str(tmp_path))
    pretrain.register_gutenberg()
    examples = read('t5_span_corruption_gutenberg', 'validation')
    assert raw_tokens(examples) in (expected_tokens(PARAGRAPHS[50:70]) - 1,
                                    expected_tokens(PARAGRAPHS[50:70]))
  finally:
    monkeypatch.delenv(pretrain.GUTENBERG_DIR_ENV)
    pretrain.register_gutenberg()  # back to the bundled sample for the other tests
  # The bundled validation books (~60k tokens) give far more than the 20 paragraphs above.
  assert len(read('t5_span_corruption_gutenberg', 'validation')) > 50


def test_inspect_task_json_lines():
  out, err = io.StringIO(), io.StringIO()
  inspect_task.main(['--task', 'ul2_mod_gutenberg', '--split', 'validation',
                     '--num_examples', '30', '--json'], out=out, err=err)
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert len(records) == 30
  vocab = V.get_vocabulary()
  config = pretrain.OBJECTIVES['ul2_mod']
  names = {d.name: d for d in config.denoisers}
  for r in records:
    assert set(r) == {'denoiser', 'mode', 'inputs', 'targets', 'inputs_text', 'targets_text'}
    d = names[r['denoiser']]
    assert r['mode'] == d.mode and r['inputs_text'].startswith(d.mode)
    assert r['inputs'][:len(D.mode_token_ids(d.mode, config, vocab))] == D.mode_token_ids(
        d.mode, config, vocab)
    assert r['inputs'][-1] == 1 and r['targets'][-1] == 1  # EOS, no padding
    assert r['inputs_text'].endswith('<EOS>')
    if d.family != 'S':
      assert '<extra_id_0>' in r['inputs_text'] and r['targets_text'].startswith('<extra_id_0>')
  assert 'R(3,0.15)' in err.getvalue() and 'corrupt' in err.getvalue()


def test_inspect_task_statistics_keep_every_denoisers_mean_span():
  """The registered MoD at 512/512, 1,400 examples: each R and X denoiser's mean noise-span
  length, from inspect_task's --json records, is within 5% of its mu: X(3, 0.5) too (~4 with
  capped spans) and X(64, 0.15) (~89 with the reference's ~600-token chunk and one span)."""
  out = io.StringIO()
  inspect_task.main(['--task', 'ul2_mod_gutenberg', '--split', 'train', '--num_examples',
                     '1400', '--json'], out=out, err=io.StringIO())
  vocab = V.get_vocabulary()
  config = pretrain.OBJECTIVES['ul2_mod']
  noise, spans = collections.Counter(), collections.Counter()
  for line in out.getvalue().splitlines():
    r = json.loads(line)
    count = sum(vocab.vocab_size - vocab.extra_ids <= t < vocab.vocab_size for t in r['inputs'])
    noise[r['denoiser']] += len(r['targets']) - 1 - count  # minus EOS and sentinels
    spans[r['denoiser']] += count
  for d in config.denoisers:
    if d.family == 'S':
      continue
    assert spans[d.name] >= 50, d.name  # X(64, 0.15): one span per example
    mean = noise[d.name] / spans[d.name]
    assert mean == pytest.approx(d.mean_span_length, rel=0.05), (d.name, mean)


def test_inspect_task_text_output_and_unknown_task():
  out = io.StringIO()
  inspect_task.main(['--task', 'prefix_lm_gutenberg', '--num_examples', '3'], out=out)
  text = out.getvalue()
  assert text.count('--- example') == 3 and '[S2S]' in text and 'S(uniform)' in text
  with pytest.raises(SystemExit, match="Unknown task or mixture 'nope'.*ul2_mod_gutenberg"):
    inspect_task.main(['--task', 'nope'])
