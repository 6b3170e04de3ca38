"""SuperGLUE: official records -> text, metrics against scikit-learn and hand counts,
fine-tuning through the real pipeline, and the eval and infer CLIs."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import sklearn.metrics

import eval as eval_script
import infer as infer_script
import train_setup
from tasks import superglue as sg
from train_setup import T, TINY
from ul2 import checkpoints, decoding, evaluation, network, vocabulary
from ul2 import data as data_lib

# One hand-written record per task, in the official jsonl format, and the text it becomes.
RECORDS = {
    'boolq': ({'question': 'is the sky blue', 'passage': 'The sky is blue.', 'label': True,
               'idx': 3},
              'boolq passage: The sky is blue. question: is the sky blue', 'True'),
    'cb': ({'premise': 'It rained.', 'hypothesis': 'It was wet.', 'label': 'entailment',
            'idx': 0},
           'cb hypothesis: It was wet. premise: It rained.', 'entailment'),
    'copa': ({'premise': 'The man fell.', 'choice1': 'He slipped.', 'choice2': 'He sang.',
              'question': 'cause', 'label': 0, 'idx': 1},
             'copa choice1: He slipped. choice2: He sang. premise: The man fell. question: '
             'cause', 'choice1'),
    'rte': ({'premise': 'A dog barks.', 'hypothesis': 'A cat barks.',
             'label': 'not_entailment', 'idx': 2},
            'rte hypothesis: A cat barks. premise: A dog barks.', 'not_entailment'),
    'wic': ({'word': 'bank', 'sentence1': 'He sat on the bank.',
             'sentence2': 'The bank was closed.', 'start1': 14, 'end1': 18, 'start2': 4,
             'end2': 8, 'label': False, 'idx': 4},
            'wic sentence1: He sat on the bank. sentence2: The bank was closed. word: bank',
            'False'),
    'wsc': ({'text': 'Mark told Pete many lies about himself, which Pete included in his book.',
             'target': {'span1_text': 'Mark', 'span1_index': 0, 'span2_text': 'his',
                        'span2_index': 11}, 'label': False, 'idx': 5},
            'wsc span1: Mark text: Mark told Pete many lies about himself, which Pete included '
            'in *his* book.', 'False'),
    'axb': ({'sentence1': 'The cat sat.', 'sentence2': 'A cat sat.', 'label': 'entailment',
             'idx': 6},
            'axb sentence1: The cat sat. sentence2: A cat sat.', 'entailment'),
    'axg': ({'premise': 'The nurse said she was tired.', 'hypothesis': 'The nurse was tired.',
             'label': 'entailment', 'idx': 7},
            'axg hypothesis: The nurse was tired. premise: The nurse said she was tired.',
            'entailment'),
}


@pytest.mark.parametrize('task', list(RECORDS))
def test_official_records_become_t5_style_text(task):
  record, inputs, targets = RECORDS[task]
  [example] = sg.format_example(task, record)
  assert example['inputs'] == inputs and example['targets'] == targets
  assert example['idx'] == record['idx']


def test_multirc_is_one_example_per_answer_grouped_by_question():
  record = {'idx': 2, 'passage': {'text': 'Ann has a red hat.', 'questions': [
      {'question': 'What color?', 'idx': 0, 'answers': [
          {'text': 'red', 'label': 1, 'idx': 0}, {'text': 'blue', 'label': 0, 'idx': 1}]},
      {'question': 'Who?', 'idx': 1, 'answers': [{'text': 'Ann', 'label': 1, 'idx': 2}]}]}}
  examples = sg.format_example('multirc', record)
  assert [e['inputs'] for e in examples] == [
      'multirc question: What color? answer: red paragraph: Ann has a red hat.',
      'multirc question: What color? answer: blue paragraph: Ann has a red hat.',
      'multirc question: Who? answer: Ann paragraph: Ann has a red hat.']
  assert [e['targets'] for e in examples] == ['True', 'False', 'True']
  assert [e['group'] for e in examples] == [20000, 20000, 20001]


def test_record_lists_entities_and_keeps_every_answer():
  text = 'Paris is in France.\n@highlight\nFrance is big'
  record = {'idx': 9, 'passage': {'text': text, 'entities': [
      {'start': 0, 'end': 4}, {'start': 12, 'end': 17}]},
            'qas': [{'query': '@placeholder is a city.', 'idx': 0,
                     'answers': [{'start': 0, 'end': 4, 'text': 'Paris'}]}]}
  [example] = sg.format_example('record', record)
  assert example['inputs'] == ('record query: @placeholder is a city. entities: France, Paris '
                               'passage: Paris is in France.\n- France is big')
  assert example['targets'] == 'Paris' and example['answers'] == ['Paris']


def test_hf_rows_map_to_the_official_format():
  row = {'premise': 'p', 'hypothesis': 'h', 'idx': 0, 'label': 2}
  [example] = sg.format_example('cb', sg.from_hf_record('cb', row))
  assert example['targets'] == 'neutral'
  test_row = {'premise': 'p', 'hypothesis': 'h', 'idx': 1, 'label': -1}
  assert sg.format_example('rte', sg.from_hf_record('rte', test_row))[0]['targets'] == ''


def test_wsc_span_must_be_where_the_record_says():
  record = dict(RECORDS['wsc'][0], target={'span1_text': 'Mark', 'span1_index': 0,
                                           'span2_text': 'his', 'span2_index': 3})
  with pytest.raises(ValueError, match="WSC span 'his' is not at word 3"):
    sg.format_example('wsc', record)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def test_classification_metrics_match_scikit_learn():
  rng = np.random.default_rng(0)
  t3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
  assert sg.macro_f1(t3, p3, 3) == pytest.approx(
      sklearn.metrics.f1_score(t3, p3, average='macro'))
  t2, p2 = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  assert sg.f1_binary(t2, p2) == pytest.approx(sklearn.metrics.f1_score(t2, p2))
  assert sg.matthews(t2, p2) == pytest.approx(sklearn.metrics.matthews_corrcoef(t2, p2))
  targets = [{'label': int(x), 'group': 0, 'idx': i} for i, x in enumerate(t3)]
  cb = sg.metrics_for('cb')(targets, list(p3))
  assert cb['accuracy'] == pytest.approx(100 * sklearn.metrics.accuracy_score(t3, p3))
  assert cb['f1_macro'] == pytest.approx(100 * sklearn.metrics.f1_score(t3, p3,
                                                                        average='macro'))
  # A prediction that is no label (-1) counts as wrong, never as a class.
  assert sg.metrics_for('rte')([{'label': 0}], [-1])['accuracy'] == 0.0


def test_multirc_exact_match_groups_answers_by_question():
  targets = [{'label': 1, 'group': 1}, {'label': 0, 'group': 1}, {'label': 1, 'group': 2}]
  # Question 1 fully right, question 2 wrong: EM 50; answers: tp 1, fp 0, fn 1 -> F1a 2/3.
  metrics = sg.multirc_metrics(targets, [1, 0, 0])
  assert metrics['em'] == pytest.approx(50.0)
  assert metrics['f1a'] == pytest.approx(100 * 2 / 3)


def test_record_takes_the_max_over_answers():
  targets = [{'answers': ['Barack Obama', 'Obama']}, {'answers': ['New York']}]
  metrics = sg.record_metrics(targets, ['obama', 'the York city'])
  # 1: EM with 'Obama' (normalised) -> 1, F1 1. 2: tokens {york, city} vs {new, york}:
  # precision 1/2, recall 1/2 -> F1 0.5, EM 0.
  assert metrics['em'] == pytest.approx(50.0)
  assert metrics['f1'] == pytest.approx(75.0)


def test_gender_parity_compares_minimal_pairs():
  targets = [{'idx': i, 'label': 0} for i in range(4)]
  assert sg.gender_parity(targets, [0, 0, 1, 0]) == pytest.approx(50.0)


def test_postprocessing_maps_text_to_labels():
  post = sg.postprocess_for('cb')
  example = {'group': 3, 'idx': 3}
  assert post(b'neutral') == 2 and post('entailment ') == 0 and post('maybe') == -1
  assert post(b'contradiction', example=example, is_target=True) == {
      'label': 1, 'group': 3, 'idx': 3}


# ---------------------------------------------------------------------------------------------
# Fine-tuning, evaluation and inference through the real pipeline
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def sixteen_cb(tmp_path_factory):
  """16 CB training records with all three labels, as both train and validation split."""
  root = tmp_path_factory.mktemp('cb16')
  rows = [json.loads(line) for line in open(os.path.join(sg.BUNDLED_DIR, 'CB', 'train.jsonl'))]
  chosen = []
  for label, count in (('entailment', 6), ('contradiction', 6), ('neutral', 4)):
    chosen += [r for r in rows if r['label'] == label][:count]
  os.makedirs(root / 'CB')
  for split in ('train', 'val'):
    with open(root / 'CB' / f'{split}.jsonl', 'w') as f:
      f.write(''.join(json.dumps(r) + '\n' for r in chosen))
  sg.register_superglue(str(root), prefix='cb16')
  return root


def test_fine_tuning_reaches_full_training_accuracy(sixteen_cb, tmp_path):
  """Restore a pretrained checkpoint, fine-tune with the [NLU] mode token, decode,
  postprocess, score: 100% on the 16 training examples."""
  train_setup.run(str(tmp_path / 'pretrained'), steps=2, checkpoint_every=2)
  task = seqio.get_mixture_or_task('cb16_cb')
  first = next(task.get_dataset({'inputs': 256, 'targets': 8}, split='train',
                                shuffle=False).as_numpy_iterator())
  assert first['inputs_pretokenized'].startswith(b'[NLU] cb hypothesis:')
  result = T.train(
      model=TINY, data=data_lib.DataConfig('cb16_cb', {'inputs': 256, 'targets': 8},
                                           batch_size=16),
      run=T.TrainConfig(str(tmp_path / 'finetuned'), steps=120, log_every=20,
                        progress_bar=False, eval_every=1000, metrics_every=60,
                        keep_best='accuracy', init_from=str(tmp_path / 'pretrained')),
      optimizer=T.OptimizerConfig(schedule='constant', learning_rate=0.01, warmup_steps=0),
      log=lambda _: None)
  assert result.metrics_history[-1]['accuracy'] == 100.0
  assert result.metrics_history[-1]['f1_macro'] == 100.0
  best = json.loads((tmp_path / 'finetuned' / 'best.json').read_text())
  assert best['metric'] == 'accuracy' and best['value'] == 100.0
  # The best parameters reload and reproduce the score with rank classification too.
  model = network.Transformer(TINY)
  params, _ = checkpoints.load(str(tmp_path / 'finetuned' / 'best'), TINY)
  ranked = evaluation.evaluate(model, params, 'cb16_cb', feature_lengths={'inputs': 256,
                                                                          'targets': 8},
                               method='rank', candidates=sg.LABELS['cb'])
  assert ranked.metrics['accuracy'] == 100.0 and ranked.examples == 16


def test_eval_cli_writes_a_well_formed_table(tmp_path):
  train_setup.run(str(tmp_path / 'model'), steps=1, checkpoint_every=1)
  results, average = eval_script.main([
      '--checkpoint', str(tmp_path / 'model'), '--tasks', 'cb,copa', '--split', 'validation',
      '--inputs_length', '256', '--targets_length', '8', '--batch_size', '16',
      '--max_examples', '20', '--output', str(tmp_path / 'eval')])
  report = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert [r['task'] for r in report['results']] == ['cb', 'copa']
  cb = report['results'][0]
  assert set(cb['metrics']) == {'accuracy', 'f1_macro'} and cb['examples'] == 20
  assert cb['method'] == 'rank' and 0 <= cb['metrics']['accuracy'] <= 100
  assert report['superglue_average'] == pytest.approx(
      np.mean([r['score'] for r in report['results']]))
  table = (tmp_path / 'eval' / 'results.md').read_text()
  assert '| task | examples | method | metrics | score |' in table
  assert '| cb | 20 | rank |' in table and '**average** (2 tasks)' in table
  # Few-shot and decoding run through the same path.
  results, _ = eval_script.main([
      '--checkpoint', str(tmp_path / 'model'), '--tasks', 'rte', '--method', 'decode',
      '--few_shot', '2', '--inputs_length', '512', '--targets_length', '8',
      '--max_examples', '8', '--batch_size', '8'])
  assert results[0]['few_shot'] == 2 and results[0]['examples'] == 8


def test_few_shot_inputs_keep_mode_and_query():
  vocab = vocabulary.get_vocabulary()
  ids = evaluation.few_shot_inputs(vocab, '[NLU] cb hypothesis: a premise: b',
                                   [('[NLU] cb hypothesis: x premise: y', 'neutral')] * 50, 64)
  assert len(ids) == 64 and ids[:4] == vocab.encode('[NLU]')
  assert ids[-1] == 1 and ids[-9:-1] == vocab.encode('cb hypothesis: a premise: b')[-8:]


def test_infer_cli_generates_and_scores(tmp_path):
  train_setup.run(str(tmp_path / 'model'), steps=1, checkpoint_every=1)
  out = io.StringIO()
  text = infer_script.main(['--checkpoint', str(tmp_path / 'model'), '--input', 'Hello there',
                            '--mode', '[S2S]', '--max_length', '5'], out=out)
  assert out.getvalue().strip() == text
  value = infer_script.main(['--checkpoint', str(tmp_path / 'model'), '--input', 'Hello there',
                             '--score', 'General Kenobi'], out=io.StringIO())
  vocab = vocabulary.get_vocabulary()
  params, _ = checkpoints.load(str(tmp_path / 'model'), TINY)
  expected = decoding.score(network.Transformer(TINY), params,
                            jnp.asarray([vocab.encode('Hello there') + [1]]),
                            jnp.asarray([vocab.encode('General Kenobi') + [1]]))
  assert value == pytest.approx(float(expected[0]), rel=1e-5) and value < 0
  for method in ('beam', 'sample'):
    infer_script.main(['--checkpoint', str(tmp_path / 'model'), '--input', 'Hi',
                       '--decode', method, '--max_length', '4'], out=io.StringIO())


def test_eval_and_infer_leave_the_accelerators_to_jax():
  """Only TensorFlow (the data) is kept off GPUs; JAX must still see them to run the model."""
  import subprocess
  import sys
  scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')
  env = {k: v for k, v in os.environ.items() if k != 'CUDA_VISIBLE_DEVICES'}
  env['PYTHONPATH'] = scripts
  code = ('import os, eval, infer\n'
          'from ul2 import data\n'
          'data.hide_accelerators_from_tensorflow()\n'
          'import tensorflow as tf\n'
          'assert "CUDA_VISIBLE_DEVICES" not in os.environ, os.environ["CUDA_VISIBLE_DEVICES"]\n'
          'assert tf.config.get_visible_devices("GPU") == []\n')
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
