"""SuperGLUE: official records -> text, metrics against scikit-learn and hand counts,
fine-tuning through the real pipeline, and the eval and infer CLIs."""

import glob
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import sklearn.metrics

import eval as eval_script
import infer as infer_script
import train_setup
from ul2_tasks import superglue as sg
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
            # T5's wsc_simple: 'wsc:', the pronoun marked, the target is span1 (the referent)
            'wsc: Mark told Pete many lies about himself, which Pete included in *his* book.',
            'Mark'),
    # T5 casts the diagnostics as RTE (t5/data/tasks.py rekeys AX-b's sentence1 -> premise,
    # sentence2 -> hypothesis; glue_utils names both 'rte'; glue sorts the keys).
    'axb': ({'sentence1': 'The cat sat.', 'sentence2': 'A cat sat.', 'label': 'entailment',
             'idx': 6},
            'rte hypothesis: A cat sat. premise: The cat sat.', 'entailment'),
    'axg': ({'premise': 'The nurse said she was tired.', 'hypothesis': 'The nurse was tired.',
             'label': 'entailment', 'idx': 7},
            'rte hypothesis: The nurse was tired. premise: The nurse said she was tired.',
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


def test_multirc_loses_its_html_as_in_t5():
  # t5.data.preprocessors.glue for multirc: '<br>' -> ' ', '<b>' and '</b>' removed.
  record = {'idx': 0, 'passage': {
      'text': 'Sent 1: <b>Ann</b> has a hat.<br>Sent 2: It is red.<br>', 'questions': [
          {'question': 'What color is <b>it</b>?', 'idx': 0,
           'answers': [{'text': 'red', 'label': 1, 'idx': 0}]}]}}
  [example] = sg.format_example('multirc', record)
  assert example['inputs'] == ('multirc question: What color is it? answer: red paragraph: '
                               'Sent 1: Ann has a hat. Sent 2: It is red. ')


def test_record_joins_highlights_as_t5_and_trains_on_every_answer():
  # t5.data.preprocessors.record: '<mark>\n@highlight\n' -> '<mark> ', '\n@highlight\n' ->
  # '. '; entities sorted and deduplicated; one example per answer (training).
  text = ('Paris is in France.\n@highlight\nFrance is big\n@highlight\n"Paris!"\n@highlight\n'
          'Big city')
  record = {'idx': 9, 'passage': {'text': text, 'entities': [
      {'start': 0, 'end': 4}, {'start': 12, 'end': 17}, {'start': 31, 'end': 36}]},
            'qas': [{'query': '@placeholder is a country.', 'idx': 0,
                     'answers': [{'start': 12, 'end': 17, 'text': 'France'},
                                 {'start': 31, 'end': 36, 'text': 'France'}]}]}
  train = sg.format_example('record', record, 'train')
  assert [e['inputs'] for e in train] == 2 * [
      'record query: @placeholder is a country. entities: France, Paris passage: Paris is in '
      'France. France is big. "Paris!" Big city']
  assert [e['targets'] for e in train] == ['France', 'France']
  [evaluated] = sg.format_example('record', record, 'validation')  # one per query, all answers
  assert evaluated['answers'] == ['France', 'France'] and evaluated['group'] == 9


def test_hf_rows_map_to_the_official_format():
  row = {'premise': 'p', 'hypothesis': 'h', 'idx': 0, 'label': 2}
  [example] = sg.format_example('cb', sg.from_hf_record('cb', row))
  assert example['targets'] == 'neutral'
  test_row = {'premise': 'p', 'hypothesis': 'h', 'idx': 1, 'label': -1}
  assert sg.format_example('rte', sg.from_hf_record('rte', test_row))[0]['targets'] == ''


# The two WSC records T5's `_wsc_inputs` special-cases (their text verbatim from T5's source):
# one official span2_index points at 'use', the word before its pronoun 'it'; the other's
# pronoun carries the quote and comma after it. T5's outputs, with ' X ' -> ' *it* '.
WSC_ODD = [
    ('When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the '
     'magic pebble in an iron safe . Some day they might want to use it , but really for now, '
     'what more could they wish for?', 'use', 'it',
     'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the '
     'magic pebble in an iron safe . Some day they might want to use *it* , but really for now, '
     'what more could they wish for?'),
    ('The boy continued to whip the pony , and eventually the pony threw him over. John laughed '
     'out quite loud. "Good for him," he said. ', 'him,"', 'him',
     'The boy continued to whip the pony , and eventually the pony threw him over. John laughed '
     'out quite loud. "Good for *him* ," he said.'),
]


@pytest.mark.parametrize('text,indexed_word,pronoun,t5', WSC_ODD, ids=['off_by_one', 'quote'])
def test_wsc_records_t5_special_cases_become_t5s_text(text, indexed_word, pronoun, t5):
  index = text.split(' ').index(indexed_word)
  record = {'text': text, 'idx': 0, 'label': True,
            'target': {'span1_text': 'the pony', 'span1_index': 0, 'span2_text': pronoun,
                       'span2_index': index}}
  [example] = sg.format_example('wsc', record, 'validation')
  assert example['inputs'].rstrip() == 'wsc: ' + t5


def wsc_record(text, span1, index1, span2, index2, idx=0):
  return {'idx': idx, 'text': text, 'label': True, 'target': {
      'span1_text': span1, 'span1_index': index1, 'span2_text': span2, 'span2_index': index2}}


# Records that need each of TFDS wsc.fixed's corrections (each modelled on an official one:
# a span capitalised at the start of a sentence, a trailing period, a newline inside a span,
# the 'theyscold' record, an unfixable one), and one that needs none.
WSC_FIXES = {
    'lower_case': wsc_record('I could not put the pot on the shelf because it was too tall .',
                             'The pot', 5, 'it', 10),
    'upper_case': wsc_record('Mark told Pete many lies about himself .', 'mark', 0, 'himself', 6),
    'trailing_period': wsc_record('The dog chased the cat because it was hungry.',
                                  'The dog.', 0, 'it', 6),
    'newline': wsc_record('Jane knocked on Susan \'s door but she did not answer .',
                          'Susan\n\'s door', 4, 'she', 8),
    'theyscold': wsc_record('The parents are annoyed with the children because when '
                            'theyscold them they laugh .', 'The parents', 0, 'theyscold.', 8),
    'unfixable': wsc_record('Kamenev , Zinoviev , and Stalin met and they agreed .',
                            'Kamenev, Zinoviev, and Stalin', 0, 'they', 8),
    'as_is': wsc_record('The table would not fit because it was too wide .', 'The table', 0,
                        'it', 6),
}


@pytest.mark.parametrize('name', list(WSC_FIXES))
def test_wsc_spans_are_corrected_as_tfds_wsc_fixed_corrects_them(name):
  """T5 reads TFDS `super_glue/wsc.fixed`: our corrections equal TFDS's own function's (run
  here on the same record), and the example's target is the corrected span."""
  import copy
  from tensorflow_datasets.text import super_glue as tfds_super_glue
  record = WSC_FIXES[name]
  flat = {'text': record['text'], **copy.deepcopy(record['target'])}
  want = tfds_super_glue._fix_wst(flat)
  ours = sg.fix_wsc_spans(record)
  assert ours['target'] == {k: want[k] for k in record['target']}
  assert ours['text'] == want['text']
  [example] = sg.format_example('wsc', record, 'validation')
  assert example['targets'] == ours['target']['span1_text']
  assert record['target']['span1_text'] == WSC_FIXES[name]['target']['span1_text']  # not mutated


def test_wsc_fixes_change_only_what_tfds_changes():
  fixed = {name: sg.fix_wsc_spans(r)['target'] for name, r in WSC_FIXES.items()}
  assert fixed['lower_case']['span1_text'] == 'the pot'
  assert fixed['upper_case']['span1_text'] == 'Mark'
  assert fixed['trailing_period']['span1_text'] == 'The dog'
  assert fixed['newline']['span1_text'] == "Susan 's door"
  assert fixed['theyscold']['span2_index'] == 10 and fixed['theyscold']['span2_text'] == 'theyscold'
  assert fixed['unfixable'] == WSC_FIXES['unfixable']['target']
  assert fixed['as_is'] == WSC_FIXES['as_is']['target']


def test_wsc_trains_on_correct_referents_and_scores_the_named_referent():
  record = dict(RECORDS['wsc'][0])  # label False: Mark is not 'his'
  assert sg.format_example('wsc', record, 'train') == []
  assert len(sg.format_example('wsc', dict(record, label=True), 'train')) == 1
  [example] = sg.format_example('wsc', record, 'validation')
  assert example['label'] == 0
  postprocess = sg.postprocess_for('wsc')
  ex = {'targets_pretokenized': b'Mark', 'label': 0, 'group': 5, 'idx': 5}
  # T5's wsc_simple postprocessor: 1 when the prediction names span1, else 0; empty -1.
  assert [postprocess(p, example=ex) for p in (b'Mark', b'the mark', b'Pete', b'', b"Mark's")
          ] == [1, 1, 0, -1, 0]
  assert postprocess(b'Mark', example=ex, is_target=True)['label'] == 0
  assert sg.names_referent('fuzzy bunny', 'the bunny') == 1


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


def test_a_prediction_outside_the_labels_is_scored_as_t5_scores_it():
  """T5's postprocessor maps a prediction that is no label to -1, and each metric treats -1 its
  own way (T5's metric functions, which call scikit-learn): MultiRC's F1 over answers
  (`f1_score_with_invalid`) makes it the opposite of its target; AX-b's Matthews correlation
  (`matthews_corrcoef` on the raw values) counts it as a third class; CB's macro-F1
  (`fbeta_score(labels=range(3))`) as no class; accuracy and MultiRC's exact match as wrong."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 300)
  predictions = rng.integers(0, 2, 300)
  predictions[rng.random(300) < 0.1] = -1  # 10% invalid, as a weak model decodes them
  as_t5 = np.where(predictions == -1, 1 - labels, predictions)
  targets = [{'label': int(t), 'group': i // 3, 'idx': i} for i, t in enumerate(labels)]
  multirc = sg.multirc_metrics(targets, list(predictions))
  assert multirc['f1a'] == pytest.approx(100 * sklearn.metrics.f1_score(labels, as_t5))
  as_false = np.where(predictions == -1, 0, predictions)
  assert multirc['f1a'] < 100 * sklearn.metrics.f1_score(labels, as_false)
  assert multirc['em'] == pytest.approx(100 * np.mean(
      [all(labels[g:g + 3] == predictions[g:g + 3]) for g in range(0, 300, 3)]))

  axb = sg.metrics_for('axb')(targets, list(predictions))
  assert axb['matthews_corr'] == pytest.approx(
      100 * sklearn.metrics.matthews_corrcoef(labels, predictions))
  assert axb['matthews_corr'] != pytest.approx(
      100 * sklearn.metrics.matthews_corrcoef(labels, as_t5))  # not "invalid = wrong"
  # A weak model's predictions, every tenth no label.
  weak_labels = np.array([0, 1] * 50)
  weak = np.where(np.arange(100) % 10 == 0, -1, (np.arange(100) // 7) % 2)
  assert sg.metrics_for('axb')([{'label': int(t)} for t in weak_labels], list(weak))[
      'matthews_corr'] == pytest.approx(100 * sklearn.metrics.matthews_corrcoef(weak_labels, weak))

  t3 = rng.integers(0, 3, 200)
  p3 = np.where(rng.random(200) < 0.15, -1, rng.integers(0, 3, 200))
  cb = sg.metrics_for('cb')([{'label': int(t)} for t in t3], list(p3))
  assert cb['f1_macro'] == pytest.approx(100 * sklearn.metrics.fbeta_score(
      t3, p3, beta=1, labels=range(3), average='macro'))
  assert cb['accuracy'] == pytest.approx(100 * np.mean(t3 == p3))
  assert sg.multirc_metrics([{'label': 1, 'group': 0}, {'label': 0, 'group': 0}],
                            [-1, -1]) == {'f1a': 0.0, 'em': 0.0}


def test_matthews_equals_scikit_learn_for_any_classes():
  rng = np.random.default_rng(2)
  for classes, invalid in ((2, 0.0), (2, 0.3), (3, 0.1)):
    t = rng.integers(0, classes, 150)
    p = np.where(rng.random(150) < invalid, -1, rng.integers(0, classes, 150))
    assert sg.matthews(t, p) == pytest.approx(sklearn.metrics.matthews_corrcoef(t, p))
  assert sg.matthews([1, 1, 1], [1, 1, 1]) == sklearn.metrics.matthews_corrcoef([1, 1, 1],
                                                                                [1, 1, 1])


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
def one_step_model(tmp_path_factory):
  """A model_dir after one training step, which the CLI tests only read."""
  path = tmp_path_factory.mktemp('one_step') / 'model'
  train_setup.run(str(path), steps=1, checkpoint_every=1)
  return path


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


@pytest.mark.slow
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


def test_eval_cli_writes_a_well_formed_table(tmp_path, one_step_model):
  results, average = eval_script.main([
      '--checkpoint', str(one_step_model), '--tasks', 'cb,copa', '--split', 'validation',
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
  assert (tmp_path / 'eval' / 'results.png').read_bytes()[:4] == b'\x89PNG'
  assert '| task | split | examples | method | metrics | score |' in table
  assert '| cb | validation | 20 | rank |' in table and '**average** (2 tasks)' in table
  # Few-shot and decoding run through the same path.
  results, _ = eval_script.main([
      '--checkpoint', str(one_step_model), '--tasks', 'rte', '--method', 'decode',
      '--few_shot', '2', '--inputs_length', '512', '--targets_length', '8',
      '--max_examples', '8', '--batch_size', '8'])
  assert results[0]['few_shot'] == 2 and results[0]['examples'] == 8


def test_few_shot_inputs_keep_mode_and_query():
  vocab = vocabulary.get_vocabulary()
  ids = evaluation.few_shot_inputs(vocab, '[NLU] cb hypothesis: a premise: b',
                                   [('[NLU] cb hypothesis: x premise: y', 'neutral')] * 50, 64)
  assert len(ids) == 64 and ids[:4] == vocab.encode('[NLU]')
  assert ids[-1] == 1 and ids[-9:-1] == vocab.encode('cb hypothesis: a premise: b')[-8:]


def test_infer_cli_generates_and_scores(tmp_path, one_step_model):
  out = io.StringIO()
  text = infer_script.main(['--checkpoint', str(one_step_model), '--input', 'Hello there',
                            '--mode', '[S2S]', '--max_length', '5'], out=out)
  assert out.getvalue().strip() == text
  said = io.StringIO()
  value = infer_script.main(['--checkpoint', str(one_step_model), '--input', 'Hello there',
                             '--score', 'General Kenobi'], out=said)
  vocab = vocabulary.get_vocabulary()
  params, _ = checkpoints.load(str(one_step_model), TINY)
  expected = decoding.score(network.Transformer(TINY), params,
                            jnp.asarray([vocab.encode('Hello there') + [1]]),
                            jnp.asarray([vocab.encode('General Kenobi') + [1]]))
  assert value == pytest.approx(float(expected[0]), rel=1e-5) and value < 0
  for method in ('beam', 'sample'):
    infer_script.main(['--checkpoint', str(one_step_model), '--input', 'Hi',
                       '--decode', method, '--max_length', '4'], out=io.StringIO())
  n = len(vocab.encode('General Kenobi')) + 1
  assert said.getvalue() == (f'log p(target | input) = {value:.4f} nats (natural log, summed '
                             f'over the {n} target tokens, EOS included)\n')


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


# ---------------------------------------------------------------------------------------------
# The training mixture
# ---------------------------------------------------------------------------------------------

def test_mixture_rates_are_t5s_example_counts_of_the_registered_data(tmp_path):
  """T5's SUPER_GLUE_WEIGHT_MAPPING counts training examples after preprocessing: MultiRC
  answers, ReCoRD one per answer, WSC only the records whose referent is right; read from the
  data given to register_superglue, not from the default directory."""
  import shutil
  for folder in ('CB', 'COPA', 'RTE'):
    shutil.copytree(os.path.join(sg.BUNDLED_DIR, folder), tmp_path / folder)
  def write(folder, records):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  answers = lambda k: [{'text': f'a{i}', 'label': i % 2, 'idx': i} for i in range(k)]
  write('MultiRC', [{'idx': p, 'passage': {'text': 'P.', 'questions': [
      {'question': 'Q?', 'idx': q, 'answers': answers(2 + p)} for q in range(2)]}}
      for p in range(2)])  # 2 + 2 + 3 + 3 answers
  wsc = RECORDS['wsc'][0]
  write('WSC', [dict(wsc, label=True), dict(wsc, label=False), dict(wsc, label=True)])
  write('ReCoRD', [{'idx': 0, 'passage': {'text': 'Ann met Bob.', 'entities': [
      {'start': 0, 'end': 2}, {'start': 8, 'end': 10}]}, 'qas': [
      {'query': '@placeholder met Bob.', 'idx': 0, 'answers': [
          {'start': 0, 'end': 2, 'text': 'Ann'}, {'start': 0, 'end': 2, 'text': 'Ann'}]},
      {'query': 'Ann met @placeholder.', 'idx': 1, 'answers': [
          {'start': 8, 'end': 10, 'text': 'Bob'}]}]}])
  sg.register_superglue(str(tmp_path), prefix='sg_rates', exclude=('boolq', 'wic'))
  mixture = seqio.get_mixture_or_task('sg_rates')
  rates = {t.name.split('_', 2)[2]: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {'cb': 250, 'copa': 400, 'multirc': 10, 'record': 3, 'rte': 500, 'wsc': 2}

  # Without the exclusion, BoolQ's missing file is named, with how to supply or drop it.
  sg.register_superglue(str(tmp_path), prefix='sg_missing')
  mixture = seqio.get_mixture_or_task('sg_missing')
  with pytest.raises(FileNotFoundError, match=r'boolq has no training file .*BoolQ/train.jsonl'
                     r'.*UL2_SUPERGLUE_DIR.*exclude=\(\'boolq\',\)'):
    [mixture.get_rate(t) for t in mixture.tasks]
  for name in ('sg_rates', 'sg_missing'):
    seqio.MixtureRegistry.remove(name)
    for task in sg.FILES:
      seqio.TaskRegistry.remove(f'{name}_{task}')


def test_superglue_docstring_examples():
  import doctest
  result = doctest.testmod(sg)
  assert result.attempted >= 8 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# Evaluation: failures, prediction and leaderboard files
# ---------------------------------------------------------------------------------------------

def official_copy(tmp_path, tasks=('CB', 'COPA', 'RTE'), rows=12):
  """The bundled official files, cut to `rows` lines per split."""
  for folder in tasks:
    os.makedirs(tmp_path / folder)
    for name in os.listdir(os.path.join(sg.BUNDLED_DIR, folder)):
      lines = open(os.path.join(sg.BUNDLED_DIR, folder, name)).read().splitlines()[:rows]
      (tmp_path / folder / name).write_text('\n'.join(lines) + '\n')
  return tmp_path


@pytest.mark.slow
def test_one_failing_task_keeps_the_others_results(tmp_path, one_step_model):
  data_dir = official_copy(tmp_path / 'data')
  broken = [json.loads(line) for line in (data_dir / 'RTE' / 'val.jsonl').read_text().splitlines()]
  del broken[3]['premise']
  (data_dir / 'RTE' / 'val.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in broken))
  with pytest.raises(SystemExit) as exit_info:
    eval_script.main(['--checkpoint', str(one_step_model), '--tasks', 'cb,rte,boolq',
                      '--data_dir', str(data_dir), '--inputs_length', '256',
                      '--targets_length', '8', '--batch_size', '12',
                      '--output', str(tmp_path / 'eval')])
  message = str(exit_info.value)
  assert message.startswith('error: 2 task(s) failed')
  assert f"rte: SuperGLUE data: {data_dir / 'RTE' / 'val.jsonl'}:4: this rte record has no " \
         "field 'premise'" in message
  assert f"boolq: SuperGLUE data: boolq validation: {data_dir / 'BoolQ' / 'val.jsonl'} not " \
         'found' in message and '--data_dir' in message
  report = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert [r['task'] for r in report['results']] == ['cb'] and report['results'][0]['examples'] == 12
  assert set(report['failed']) == {'rte', 'boolq'}
  table = (tmp_path / 'eval' / 'results.md').read_text()
  assert 'split validation' in table and '| rte | failed |' in table
  assert '| cb | validation | 12 | rank |' in table


@pytest.mark.slow
def test_test_split_writes_leaderboard_files_and_predictions(tmp_path, one_step_model):
  data_dir = official_copy(tmp_path / 'data')
  for folder in ('CB', 'COPA', 'RTE'):  # test files as released: the records without labels
    records = [json.loads(line) for line in (data_dir / folder / 'val.jsonl').read_text()
               .splitlines()]
    (data_dir / folder / 'test.jsonl').write_text(''.join(
        json.dumps({k: v for k, v in r.items() if k != 'label'}) + '\n' for r in records))
  for folder, record in (('AX-b', {'sentence1': 'The cat sat.', 'sentence2': 'A cat sat.'}),
                         ('AX-g', {'premise': 'The nurse said she was tired.',
                                   'hypothesis': 'The nurse was tired.'})):
    os.makedirs(data_dir / folder)
    (data_dir / folder / f'{folder}.jsonl').write_text(''.join(
        json.dumps({**record, 'idx': i, 'label': 'entailment'}) + '\n' for i in range(4)))
  eval_script.main(['--checkpoint', str(one_step_model), '--tasks', 'cb,copa,rte',
                    '--split', 'test', '--data_dir', str(data_dir), '--inputs_length', '256',
                    '--targets_length', '8', '--batch_size', '12', '--predictions',
                    '--output', str(tmp_path / 'eval'),
                    '--submission', str(tmp_path / 'submission')])
  # The server's files: <Task>.jsonl, one row per test record, its idx and a label word.
  expected = {'CB.jsonl': sg.LABELS['cb'], 'COPA.jsonl': (0, 1), 'RTE.jsonl': sg.LABELS['rte'],
              'AX-b.jsonl': sg.LABELS['axb'], 'AX-g.jsonl': sg.LABELS['axg']}
  assert sorted(os.listdir(tmp_path / 'submission')) == sorted(expected)
  import zipfile
  assert sorted(zipfile.ZipFile(tmp_path / 'submission.zip').namelist()) == sorted(expected)
  for name, labels in expected.items():
    rows = [json.loads(line) for line in (tmp_path / 'submission' / name).read_text().splitlines()]
    folder = name[:-len('.jsonl')]
    source = (data_dir / folder / ('test.jsonl' if folder not in ('AX-b', 'AX-g') else name))
    assert [r['idx'] for r in rows] == [json.loads(line)['idx']
                                        for line in source.read_text().splitlines()], name
    assert all(set(r) == {'idx', 'label'} and r['label'] in labels for r in rows), name
  predictions = [json.loads(line) for line in
                 (tmp_path / 'eval' / 'predictions' / 'cb.jsonl').read_text().splitlines()]
  assert len(predictions) == 12 and set(predictions[0]) == {'idx', 'input', 'prediction',
                                                             'target'}
  assert predictions[0]['input'].startswith('[NLU] cb hypothesis:')
  assert all(p['prediction'] in sg.LABELS['cb'] for p in predictions)  # rank: always a label


@pytest.mark.slow
def test_the_mixture_fine_tunes_with_per_task_metrics_and_eval_follows_its_selection(tmp_path):
  """Fine-tuning on a SuperGLUE mixture ([S2S] mode token): each task evaluated on one pass of
  its validation split, per-task TensorBoard tags apart from the token accuracy, the best kept
  by the average; eval.py --best and infer.py then use the run's mode and method."""
  import tensorflow as tf
  data_dir = official_copy(tmp_path / 'data', rows=16)
  sg.register_superglue(str(data_dir), mode='[S2S]', prefix='mix',
                        exclude=('boolq', 'multirc', 'record', 'wic', 'wsc'))
  train_setup.run(str(tmp_path / 'pretrained'), steps=2, checkpoint_every=2)
  result = T.train(
      model=TINY, data=data_lib.DataConfig('mix', {'inputs': 256, 'targets': 8}, batch_size=16),
      run=T.TrainConfig(str(tmp_path / 'finetuned'), steps=6, log_every=3, progress_bar=False,
                        eval_every=3, eval_batches=1, metrics_every=3, keep_best='average',
                        init_from=str(tmp_path / 'pretrained')),
      optimizer=T.OptimizerConfig(schedule='constant', learning_rate=0.01, warmup_steps=0),
      log=lambda _: None)
  last = result.metrics_history[-1]
  assert set(last) == {'step', 'mix_cb/accuracy', 'mix_cb/f1_macro', 'mix_copa/accuracy',
                       'mix_rte/accuracy', 'average'}
  assert last['average'] == pytest.approx(np.mean([
      (last['mix_cb/accuracy'] + last['mix_cb/f1_macro']) / 2, last['mix_copa/accuracy'],
      last['mix_rte/accuracy']]))
  best = json.loads((tmp_path / 'finetuned' / 'best.json').read_text())
  assert best['metric'] == 'average' and best['selection'] == {'method': 'decode',
                                                               'mode': '[S2S]'}
  tags = {}
  for path in glob.glob(str(tmp_path / 'finetuned' / 'validation' / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  assert tags['accuracy'] == [3, 6]  # token accuracy (0-1) of the validation loss
  assert tags['mix_cb/accuracy'] == [3, 6] and tags['mix/average'] == [3, 6]

  results, _ = eval_script.main([
      '--checkpoint', str(tmp_path / 'finetuned'), '--best', '--tasks', 'cb',
      '--data_dir', str(data_dir), '--inputs_length', '256', '--targets_length', '8',
      '--max_examples', '4', '--batch_size', '4', '--output', str(tmp_path / 'eval')])
  report = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert results[0]['method'] == 'decode' and report['mode'] == '[S2S]'
  best_dir = str(tmp_path / 'finetuned' / 'best')
  score = lambda *mode: infer_script.main(['--checkpoint', best_dir, '--input', 'Hi',
                                           '--score', 'entailment', *mode], out=io.StringIO())
  assert score() == score('--mode', '[S2S]') != score('--mode', '')


# ---------------------------------------------------------------------------------------------
# The prompted protocol
# ---------------------------------------------------------------------------------------------

def test_prompted_candidates_line_up_with_the_labels():
  """Candidate i is label i of the task, so a chosen index is the metric's prediction."""
  for task, (record, _, _) in RECORDS.items():
    [p] = sg.prompted_examples(task, record)
    label = sg._label(task, record['label'])
    assert p.target['label'] == p.answer == sg.LABELS[task].index(label), task
    assert p.prompt.endswith(('Answer:', 'because', 'so')), task
  [cb] = sg.prompted_examples('cb', RECORDS['cb'][0])
  assert cb.prompt == 'It rained. Question: It was wet. True, False, or Neither? Answer:'
  assert cb.candidates == ('True', 'False', 'Neither') and cb.answer_text() == 'True'
  record = {'idx': 9, 'passage': {'text': 'Ann met Bob.\n@highlight\nA meeting', 'entities': [
      {'start': 0, 'end': 2}, {'start': 8, 'end': 10}]}, 'qas': [
      {'query': '@placeholder was happy.', 'idx': 4, 'answers': [
          {'start': 8, 'end': 10, 'text': 'Bob'}]}]}
  [rec] = sg.prompted_examples('record', record)
  assert rec.prompt == 'Ann met Bob. A meeting'
  assert rec.candidates == ('Ann was happy.', 'Bob was happy.')
  assert rec.answer_text() == 'Bob was happy.'
  assert sg.prompted_prediction('record', rec, 1) == 'Bob'


def test_rank_continuations_picks_the_most_likely_candidate(tmp_path):
  """Against `decoding.score` on every (input, candidate) pair separately: different numbers
  of candidates per example, summed or per-token log-likelihood, a shot and a mode token."""
  params = network.init_params(TINY, jax.random.key(1))
  model = network.Transformer(TINY)
  vocab = vocabulary.get_vocabulary()
  prompts = ['The sky is', 'Two plus two is', 'Paris is in']
  candidates = [('blue', 'green today', 'a very long and unlikely answer'), ('four', 'five'),
                ('France', 'Spain', 'Italy', 'the middle of nowhere')]
  shots = [('Grass is', 'green')]
  for normalized in (False, True):
    chosen = evaluation.rank_continuations(
        model, params, prompts, candidates, inputs_length=32, shots=shots, mode='[S2S]',
        batch_size=2, length_normalized=normalized)
    for prompt, cands, picked in zip(prompts, candidates, chosen):
      inputs = evaluation.few_shot_inputs(vocab, f'[S2S] {prompt}', shots, 32)
      expected = []
      for c in cands:
        target = vocab.encode(c) + [1]
        value = float(decoding.score(model, params, jnp.asarray([inputs]),
                                     jnp.asarray([target]))[0])
        expected.append(value / len(target) if normalized else value)
      assert picked == int(np.argmax(expected)), (prompt, normalized, expected)


@pytest.mark.slow
def test_eval_cli_runs_the_prompted_protocol_zero_and_few_shot(tmp_path, one_step_model):
  for shots in ('0', '2'):
    results, average = eval_script.main([
        '--checkpoint', str(one_step_model), '--tasks', 'cb,copa', '--protocol',
        'prompted', '--few_shot', shots, '--length_normalized', '--inputs_length', '256',
        '--max_examples', '8', '--batch_size', '8', '--output', str(tmp_path / f'e{shots}'),
        '--predictions'])
    assert [r['method'] for r in results] == ['prompted, per token'] * 2
    assert results[0]['examples'] == 8 and set(results[0]['metrics']) == {'accuracy',
                                                                          'f1_macro'}
    report = json.loads((tmp_path / f'e{shots}' / 'results.json').read_text())
    assert report['mode'] == '[S2S]'
    rows = [json.loads(line) for line in
            (tmp_path / f'e{shots}' / 'predictions' / 'copa.jsonl').read_text().splitlines()]
    assert rows[0]['input'].endswith(('because', 'so'))
    assert all(r['prediction'] in ('choice1', 'choice2') for r in rows)


def test_infer_sharded_over_a_mesh_equals_one_device(tmp_path, one_step_model):
  """The same file decoded and scored over 8 devices with model parallelism (2-D
  activations and parameters, runs/infer.gin's macros) and on the default mesh (8-way data,
  3 inputs padded to 8 rows) gives the same text and scores; bfloat16 parameters run too;
  a bad decoding setting is one line naming it."""
  checkpoint = str(one_step_model)
  texts = ['It was a dark and', 'Hello there', 'The cat sat on the']
  (tmp_path / 'in.txt').write_text('\n'.join(texts) + '\n')
  pairs = [{'input': t, 'target': 'stormy night.'} for t in texts]
  (tmp_path / 'pairs.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in pairs))
  sharded = ['--gin_file=runs/infer.gin', '--gin.MODEL_PARALLEL=2',
             '--gin.ACTIVATION_PARTITIONING_DIMS=2', '--gin.PARAMETER_PARTITIONING_DIMS=2']

  def run(*flags, score=False):
    out = io.StringIO()
    source = (['--input_file', str(tmp_path / 'pairs.jsonl'), '--score_file'] if score
              else ['--input_file', str(tmp_path / 'in.txt')])
    rows = infer_script.main(['--checkpoint', checkpoint, *source, '--output_file',
                              str(tmp_path / 'out.jsonl'), '--batch_size', '3',
                              '--max_length', '6', *flags], out=out)
    return rows, out.getvalue()

  plain, said = run()
  assert "mesh {'data': 8, 'model': 1}" in said
  on_mesh, said = run(*sharded)
  assert "mesh {'data': 4, 'model': 2}" in said
  assert on_mesh == plain
  scores, scores_on_mesh = run(score=True)[0], run(*sharded, score=True)[0]
  for a, b in zip(scores, scores_on_mesh):
    assert b['log_likelihood'] == pytest.approx(a['log_likelihood'], abs=1e-4)
  half, _ = run(*sharded, "--gin.decoding.DecodeConfig.params_dtype='bfloat16'", score=True)
  for a, b in zip(scores, half):
    assert b['log_likelihood'] == pytest.approx(a['log_likelihood'], rel=0.02)
  for flags in ([], ['--gin_file=runs/infer.gin']):
    with pytest.raises(SystemExit):
      run(*flags, "--gin.decoding.DecodeConfig.method='beem'")


def test_the_docs_list_every_prompt():
  readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'docs', 'finetuning.md')).read()
  for task, (prompt, candidates) in sg.PROMPTS.items():
    assert f'| {task} | `{prompt}` | {candidates} |' in readme, task


@pytest.mark.slow
def test_infer_cli_over_files_equals_one_input_at_a_time(tmp_path, one_step_model):
  """A batched file run (a last batch padded with copies) gives each input what a one-input
  run gives it; scoring a jsonl file likewise; bad files are one-line errors."""
  checkpoint = str(one_step_model)
  texts = ['It was a dark and', 'Hello there', 'The cat sat on the', 'Once upon a time',
           'A B C']
  (tmp_path / 'in.txt').write_text('\n'.join(texts) + '\n')
  out = io.StringIO()
  rows = infer_script.main(['--checkpoint', checkpoint, '--input_file', str(tmp_path / 'in.txt'),
                            '--output_file', str(tmp_path / 'out.jsonl'), '--batch_size', '2',
                            '--max_length', '6', '--mode', '[S2S]'], out=out)
  written = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
  assert written == rows and [r['input'] for r in rows] == texts
  assert 'tokens/s after the first batch' in out.getvalue() and '5 inputs' in out.getvalue()
  for row in rows:
    single = infer_script.main(['--checkpoint', checkpoint, '--input', row['input'],
                                '--max_length', '6', '--mode', '[S2S]'], out=io.StringIO())
    assert row['output'] == single
  pairs = [{'input': 'Hello there', 'target': 'General Kenobi'},
           {'input': 'It was a dark and', 'target': 'stormy night.'}]
  (tmp_path / 'pairs.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in pairs))
  scored = infer_script.main(['--checkpoint', checkpoint, '--input_file',
                              str(tmp_path / 'pairs.jsonl'), '--score_file', '--output_file',
                              str(tmp_path / 'scores.jsonl')], out=io.StringIO())
  for pair, row in zip(pairs, scored):
    single = infer_script.main(['--checkpoint', checkpoint, '--input', pair['input'],
                                '--score', pair['target']], out=io.StringIO())
    assert row['log_likelihood'] == pytest.approx(single, abs=1e-3)
  (tmp_path / 'bad.jsonl').write_text('{"input": "a"}\n{"text": "b"}\n')
  with pytest.raises(SystemExit, match=r"bad.jsonl:2: no field 'input' \(set --input_key"):
    infer_script.main(['--checkpoint', checkpoint, '--input_file', str(tmp_path / 'bad.jsonl'),
                       '--output_file', str(tmp_path / 'x.jsonl')], out=io.StringIO())
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
  with pytest.raises(SystemExit, match=r'latin1.txt: not UTF-8 text'):
    infer_script.main(['--checkpoint', checkpoint, '--input_file',
                       str(tmp_path / 'latin1.txt'), '--output_file', str(tmp_path / 'x.jsonl')],
                      out=io.StringIO())


def test_eval_counts_decoded_predictions_that_are_no_label():
  import doctest
  import eval as eval_script
  assert eval_script.no_label_share('rte', 'decode', [1, -1, -1, -1]) == 0.75
  assert eval_script.no_label_share('rte', 'rank', [1, 0]) is None  # ranking picks a label
  assert eval_script.no_label_share('record', 'decode', ['Paris']) is None
  result = doctest.testmod(eval_script)
  assert result.attempted > 0 and result.failed == 0


def test_infer_cuts_one_long_input_as_it_cuts_a_files(one_step_model, capsys):
  """A 100 KB --input is cut to --max_input_length tokens (keeping its start), as file inputs
  are: it gives what its first tokens give."""
  long_text = 'It was a dark and stormy night; ' * 3200
  run = lambda text: infer_script.main(['--checkpoint', str(one_step_model), '--input', text,
                                        '--max_input_length', '16', '--max_length', '4'],
                                       out=io.StringIO())
  vocab = vocabulary.get_vocabulary()
  assert run(long_text) == run(vocab.decode(vocab.encode(long_text)[:15]))
  assert capsys.readouterr().err.count('note: --input is ') == 1  # the long one says so
