"""Generation evaluation: the generation task type, ROUGE with Google's scorer, eval.py."""

import json

import numpy as np
import pytest
import seqio

import ul2_tasks  # noqa: F401
from ul2 import evaluation, vocabulary
from ul2_tasks import generation


def test_rouge_equals_hand_counts():
  """Hand-counted: unigram/bigram overlaps after Porter stemming and the longest common
  subsequence, F = 2PR / (P + R), averaged over examples, x100."""
  targets = ['the cat sat on the mat', 'a quick brown fox', 'nothing in common']
  predictions = ['the cats sat on a mat', 'the quick brown dog jumps', 'zebra']
  scores = evaluation.rouge(targets, predictions)
  # 1: P = R = 5/6 (the, cat(s), sat, on, mat); bigrams 3/5 each; LCS 5 -> 5/6.
  # 2: unigrams quick, brown: P 2/5, R 2/4; bigram 'quick brown': P 1/4, R 1/3; LCS 2.
  # 3: nothing shared.
  f = lambda p, r: 2 * p * r / (p + r)
  expected = {'rouge1': (5 / 6 + f(2 / 5, 2 / 4) + 0) / 3,
              'rouge2': (3 / 5 + f(1 / 4, 1 / 3) + 0) / 3,
              'rougeL': (5 / 6 + f(2 / 5, 2 / 4) + 0) / 3}
  for key, value in expected.items():
    assert scores[key] == pytest.approx(100 * value, rel=1e-12), key
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    evaluation.rouge(['a', 'b'], ['a'])


def test_gutenberg_continuation_task_reads_the_bundled_corpus():
  task = seqio.get_mixture_or_task('gen_gutenberg_continuation')
  examples = list(task.get_dataset({'inputs': 256, 'targets': 64}, split='validation',
                                   shuffle=False).take(3).as_numpy_iterator())
  first = examples[0]
  assert first['inputs_pretokenized'].decode().startswith(vocabulary.S2S + ' I trust that you')
  assert first['targets_pretokenized'].decode().startswith('Little as I know of Captain Brown')
  assert first['inputs'][-1] == 1 and first['targets'][-1] == 1  # EOS
  assert task.metric_fns == [evaluation.rouge]


def test_a_users_jsonl_pairs_and_a_bad_record(tmp_path):
  good = tmp_path / 'train.jsonl'
  good.write_text(json.dumps({'document': 'A long text.', 'summary': 'Short.'}) + '\n')
  bad = tmp_path / 'validation.jsonl'
  bad.write_text(json.dumps({'document': 'No summary here.'}) + '\n')
  name = generation.register_generation('mine', generation.jsonl_pairs_source(
      str(good), str(bad), input_key='document', target_key='summary'), mode=vocabulary.NLG)
  task = seqio.get_mixture_or_task(name)
  ex = next(task.get_dataset({'inputs': 32, 'targets': 8}, split='train',
                             shuffle=False).as_numpy_iterator())
  assert ex['inputs_pretokenized'].decode() == vocabulary.NLG + ' A long text.'
  with pytest.raises(Exception, match=r"validation\.jsonl:1: expected a JSON object with text "
                     r"fields 'document' and 'summary'"):
    list(task.get_dataset({'inputs': 32, 'targets': 8}, split='validation',
                          shuffle=False).as_numpy_iterator())


@pytest.mark.slow
def test_eval_cli_scores_generation_with_rouge(tmp_path):
  import eval as eval_script
  import train_setup

  train_setup.run(str(tmp_path / 'model'), steps=1, checkpoint_every=1)
  results, average = eval_script.main([
      '--checkpoint', str(tmp_path / 'model'), '--generation', 'gen_gutenberg_continuation',
      '--few_shot', '1', '--inputs_length', '128', '--targets_length', '12',
      '--max_examples', '5', '--batch_size', '8', '--output', str(tmp_path / 'eval')])
  (r,) = results
  assert r['examples'] == 5 and set(r['metrics']) == {'rouge1', 'rouge2', 'rougeL'}
  assert r['score'] == pytest.approx(np.mean(list(r['metrics'].values()))) == average
  # The reported ROUGE is the scorer's on the decoded texts and the references.
  samples = r['samples']
  assert len(samples) == 5 and all(s['input'].startswith(vocabulary.S2S) for s in samples)
  again = evaluation.rouge([s['target'] for s in samples], [s['prediction'] for s in samples])
  assert again == pytest.approx(r['metrics'])
  saved = json.loads((tmp_path / 'eval' / 'generation.json').read_text())
  assert saved['results'][0]['metrics'] == r['metrics']
  # generation.md shows the samples people read: each generation beside its target.
  page = (tmp_path / 'eval' / 'generation.md').read_text()
  assert '## gen_gutenberg_continuation: samples' in page and page.count('**generated**') == 5
  for s in samples:
    assert vocabulary.without_sentinels(s['target']).replace('\n', ' ') in page
  assert '<extra_id_' not in page


def test_docstring_examples():
  import doctest
  for module in (generation, evaluation):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, module.__name__
