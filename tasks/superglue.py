"""SuperGLUE as seqio tasks: T5's text-to-text formats with a UL2 mode token, and the metrics
exactly as the benchmark defines them (reference §4).

    superglue_<task>   boolq cb copa multirc record rte wic wsc axb axg
    superglue          a mixture of the training tasks, proportional to their sizes

Each example becomes text in T5's style, the mode token first (`[NLU]` by default):

    CB   {"premise": "It rained.", "hypothesis": "It was wet.", "label": "entailment"}
      -> inputs  "[NLU] cb hypothesis: It was wet. premise: It rained."
         targets "entailment"

Data: the official jsonl files (`<Task>/{train,val,test}.jsonl`, `AX-b/AX-b.jsonl`,
`AX-g/AX-g.jsonl`) in `data_dir` (default: the bundled CB, COPA and RTE copies in
`data/superglue/`; set `UL2_SUPERGLUE_DIR` or call `register_superglue(data_dir)` for the full
set), or a Hugging Face `super_glue` config saved with `save_to_disk` (`hf_dir`). Tasks whose
files are missing are registered anyway and fail with a message naming the file when read.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from ul2 import vocabulary

BUNDLED_DIR = os.path.join(vocabulary.DATA_DIR, 'superglue')
DIR_ENV = 'UL2_SUPERGLUE_DIR'

# Task -> (folder, file stem per split). The diagnostics only have a test set (no labels in
# the official release; AX-b/AX-g have labels).
FILES = {
    'boolq': ('BoolQ', None), 'cb': ('CB', None), 'copa': ('COPA', None),
    'multirc': ('MultiRC', None), 'record': ('ReCoRD', None), 'rte': ('RTE', None),
    'wic': ('WiC', None), 'wsc': ('WSC', None), 'axb': ('AX-b', 'AX-b'), 'axg': ('AX-g', 'AX-g'),
}
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}
# Class labels as target text, for decoding postprocessing and rank classification.
LABELS = {
    'boolq': ('False', 'True'), 'cb': ('entailment', 'contradiction', 'neutral'),
    'copa': ('choice1', 'choice2'), 'multirc': ('False', 'True'),
    'rte': ('entailment', 'not_entailment'), 'wic': ('False', 'True'),
    'wsc': ('False', 'True'), 'axb': ('entailment', 'not_entailment'),
    'axg': ('entailment', 'not_entailment'),
}


# ----------------------------------------------------------------------------------------------
# Official records -> text examples
# ----------------------------------------------------------------------------------------------

def _label(task: str, value) -> str:
  if value is None:
    return ''  # test files have no labels
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if isinstance(value, int) and not isinstance(value, bool):
    return LABELS[task][value]
  return str(value)


def _mark_word(text: str, index: int, span: str) -> str:
  """WSC: wraps the words at word offset `index` spelling `span` in asterisks."""
  words = text.split(' ')
  n = len(span.split(' '))
  if ' '.join(words[index:index + n]).strip(string.punctuation) != span.strip(
      string.punctuation):
    raise ValueError(f'WSC span {span!r} is not at word {index} of {text!r}.')
  words[index] = '*' + words[index]
  words[index + n - 1] = words[index + n - 1] + '*'
  return ' '.join(words)


def format_example(task: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One official record -> text examples (MultiRC: one per answer; ReCoRD: one per query).

  Each example: inputs (without mode token), targets, idx, group (MultiRC's question), and
  answers (ReCoRD: every correct answer text; the metric takes the max over them).
  """
  idx = record.get('idx', 0)
  label = _label(task, record.get('label'))
  if task == 'boolq':
    text = f'boolq passage: {record["passage"]} question: {record["question"]}'
  elif task in ('cb', 'rte', 'axg'):
    text = f'{task} hypothesis: {record["hypothesis"]} premise: {record["premise"]}'
  elif task == 'axb':
    text = f'axb sentence1: {record["sentence1"]} sentence2: {record["sentence2"]}'
  elif task == 'copa':
    text = (f'copa choice1: {record["choice1"]} choice2: {record["choice2"]} premise: '
            f'{record["premise"]} question: {record["question"]}')
  elif task == 'wic':
    text = (f'wic sentence1: {record["sentence1"]} sentence2: {record["sentence2"]} word: '
            f'{record["word"]}')
  elif task == 'wsc':
    target = record['target']
    marked = _mark_word(record['text'], target['span2_index'], target['span2_text'])
    text = f'wsc span1: {target["span1_text"]} text: {marked}'
  elif task == 'multirc':
    out = []
    passage = record['passage']
    for q in passage['questions']:
      for a in q['answers']:
        out.append({'inputs': f'multirc question: {q["question"]} answer: {a["text"]} '
                              f'paragraph: {passage["text"]}',
                    'targets': _label(task, a.get('label')), 'idx': a.get('idx', 0),
                    'group': idx * 10_000 + q.get('idx', 0), 'answers': []})
    return out
  elif task == 'record':
    out = []
    passage = record['passage']
    text = passage['text'].replace('@highlight\n', '- ')
    entities = sorted({passage['text'][e['start']:e['end'] + 1] for e in passage['entities']})
    for q in record['qas']:
      answers = [a['text'] for a in q.get('answers', [])]
      out.append({'inputs': f'record query: {q["query"]} entities: {", ".join(entities)} '
                            f'passage: {text}',
                  'targets': answers[0] if answers else '', 'idx': q.get('idx', 0),
                  'group': idx, 'answers': answers})
    return out
  else:
    raise ValueError(f'Unknown SuperGLUE task {task!r}; known: {sorted(FILES)}.')
  return [{'inputs': text, 'targets': label, 'idx': idx, 'group': idx, 'answers': []}]


def from_hf_record(task: str, record: Mapping[str, Any]) -> Mapping[str, Any]:
  """A Hugging Face `super_glue` row (flattened, integer labels) -> the official format."""
  r = dict(record)
  if task == 'multirc':
    i = r['idx']
    return {'idx': i['paragraph'], 'passage': {'text': r['paragraph'], 'questions': [{
        'question': r['question'], 'idx': i['question'],
        'answers': [{'text': r['answer'], 'label': r['label'], 'idx': i['answer']}]}]}}
  if task == 'wsc':
    return {'idx': r['idx'], 'text': r['text'], 'label': r['label'],
            'target': {'span1_text': r['span1_text'], 'span2_text': r['span2_text'],
                       'span1_index': r['span1_index'], 'span2_index': r['span2_index']}}
  if task == 'record':
    raise ValueError('ReCoRD from Hugging Face datasets is not supported: its rows lack the '
                     'entity offsets; use the official jsonl files.')
  if task == 'axb' and 'sentence1' not in r:
    r['sentence1'], r['sentence2'] = r.pop('premise'), r.pop('hypothesis')
  if r.get('label', 0) == -1:  # HF marks missing test labels with -1
    r['label'] = None
  return r


# ----------------------------------------------------------------------------------------------
# Metrics (the benchmark's definitions)
# ----------------------------------------------------------------------------------------------

def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  return {'accuracy': 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def f1_binary(targets: Sequence[int], predictions: Sequence[int]) -> float:
  tp = sum(t == 1 and p == 1 for t, p in zip(targets, predictions))
  fp = sum(t != 1 and p == 1 for t, p in zip(targets, predictions))
  fn = sum(t == 1 and p != 1 for t, p in zip(targets, predictions))
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(targets: Sequence[int], predictions: Sequence[int], classes: int) -> float:
  """Unweighted mean of per-class F1 (CB's F1 over 3 classes)."""
  return float(np.mean([f1_binary([int(t == c) for t in targets],
                                  [int(p == c) for p in predictions]) for c in range(classes)]))


def matthews(targets: Sequence[int], predictions: Sequence[int]) -> float:
  t, p = np.asarray(targets), np.asarray(predictions)
  tp, tn = np.sum((t == 1) & (p == 1)), np.sum((t == 0) & (p == 0))
  fp, fn = np.sum((t == 0) & (p == 1)), np.sum((t == 1) & (p == 0))
  denominator = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  return 0.0 if denominator == 0 else float((tp * tn - fp * fn) / denominator)


def _normalize_answer(text: str) -> str:
  """SQuAD/ReCoRD normalisation: lower case, no punctuation, articles or extra spaces."""
  text = ''.join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def token_f1(prediction: str, answer: str) -> float:
  pred, gold = _normalize_answer(prediction).split(), _normalize_answer(answer).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def record_metrics(targets: Sequence[Mapping], predictions: Sequence[str]) -> dict[str, float]:
  """ReCoRD: for each query the max over its correct answers of token F1 and exact match."""
  f1s, ems = [], []
  for target, prediction in zip(targets, predictions):
    answers = target['answers'] or ['']
    f1s.append(max(token_f1(prediction, a) for a in answers))
    ems.append(max(float(_normalize_answer(prediction) == _normalize_answer(a))
                   for a in answers))
  return {'f1': 100.0 * float(np.mean(f1s)), 'em': 100.0 * float(np.mean(ems))}


def multirc_metrics(targets: Sequence[Mapping], predictions: Sequence[int]) -> dict[str, float]:
  """MultiRC: F1 over all answers (F1a) and exact match per question (all its answers right)."""
  labels = [t['label'] for t in targets]
  by_question = collections.defaultdict(list)
  for t, p in zip(targets, predictions):
    by_question[t['group']].append(t['label'] == p)
  return {'f1a': 100.0 * f1_binary(labels, predictions),
          'em': 100.0 * float(np.mean([all(v) for v in by_question.values()]))}


def gender_parity(targets: Sequence[Mapping], predictions: Sequence[int]) -> float:
  """AX-g: % of minimal pairs (consecutive idx 2k, 2k+1: same sentence, other gender) whose
  two predictions agree."""
  by_idx = {t['idx']: p for t, p in zip(targets, predictions)}
  pairs = [(by_idx[i], by_idx[i + 1]) for i in sorted(by_idx) if i % 2 == 0 and i + 1 in by_idx]
  return 100.0 * float(np.mean([a == b for a, b in pairs])) if pairs else 0.0


def metrics_for(task: str) -> Callable[[Sequence, Sequence], dict[str, float]]:
  """`metric_fn(targets, predictions)` over postprocessed values (dicts with 'label')."""
  if task == 'multirc':
    return multirc_metrics
  if task == 'record':
    return record_metrics

  def metric(targets, predictions):
    labels = [t['label'] for t in targets]
    if task == 'cb':
      return {**accuracy(labels, predictions),
              'f1_macro': 100.0 * macro_f1(labels, predictions, 3)}
    if task == 'axb':
      return {'matthews_corr': 100.0 * matthews(labels, predictions)}
    if task == 'axg':
      return {**accuracy(labels, predictions),
              'gender_parity': gender_parity(targets, predictions)}
    return accuracy(labels, predictions)
  return metric


def postprocess_for(task: str) -> Callable:
  """Generated text -> class index (-1 when it is no label); targets -> dicts with the label
  and what the metric needs (MultiRC's question, ReCoRD's answers, AX-g's idx)."""
  def postprocess(output, example=None, is_target=False):
    text = output.decode('utf-8') if isinstance(output, bytes) else str(output)
    text = text.strip()
    if task == 'record':
      if is_target:
        return {'answers': [a.decode('utf-8') if isinstance(a, bytes) else a
                            for a in example['answers']]}
      return text
    label = LABELS[task].index(text) if text in LABELS[task] else -1
    if not is_target:
      return label
    return {'label': label, 'group': int(example['group']), 'idx': int(example['idx'])}
  return postprocess


# ----------------------------------------------------------------------------------------------
# Sources and registration
# ----------------------------------------------------------------------------------------------

def _jsonl_path(data_dir: str, task: str, split: str) -> str:
  folder, stem = FILES[task]
  return os.path.join(data_dir, folder, f'{stem or SPLITS[split]}.jsonl')


def read_records(task: str, split: str, data_dir: str | None = None,
                 hf_dir: str | None = None) -> Iterable[Mapping[str, Any]]:
  """Official-format records of one split, from jsonl files or an HF `save_to_disk` dir."""
  if hf_dir:
    import datasets
    ds = datasets.load_from_disk(hf_dir)
    name = {'validation': 'validation', 'train': 'train', 'test': 'test'}[split]
    for row in ds[name]:
      yield from_hf_record(task, row)
    return
  path = _jsonl_path(data_dir or default_dir(), task, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f'SuperGLUE {task} {split}: {path} not found. Put the official '
                            f'jsonl files under {data_dir or default_dir()} (or set '
                            f'{DIR_ENV}).')
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{line_number}: not valid JSON ({e}).') from None


def default_dir() -> str:
  return os.environ.get(DIR_ENV) or BUNDLED_DIR


def _source(task: str, data_dir: str | None, hf_dir: str | None) -> seqio.DataSource:
  splits = ['test'] if task in ('axb', 'axg') else ['train', 'validation', 'test']

  def read(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    def rows():
      for record in read_records(task, split, data_dir, hf_dir):
        for ex in format_example(task, record):
          yield {**ex, 'answers': ex['answers'] or ['']}
    return tf.data.Dataset.from_generator(rows, output_signature={
        'inputs': tf.TensorSpec([], tf.string), 'targets': tf.TensorSpec([], tf.string),
        'idx': tf.TensorSpec([], tf.int64), 'group': tf.TensorSpec([], tf.int64),
        'answers': tf.TensorSpec([None], tf.string)})
  return seqio.FunctionDataSource(read, splits=splits)


def _prepend_mode(mode: str):
  def prepend(dataset):
    if not mode:
      return dataset
    return dataset.map(lambda ex: {**ex, 'inputs': tf.strings.join([mode, ex['inputs']], ' ')},
                       num_parallel_calls=tf.data.AUTOTUNE)
  return prepend


def register_superglue(data_dir: str | None = None, mode: str = vocabulary.NLU,
                       hf_dir: Mapping[str, str] | None = None, prefix: str = 'superglue'
                       ) -> list[str]:
  """Registers `<prefix>_<task>` for every task and the `<prefix>` training mixture.

  `mode`: the mode token prepended to every input ('[NLU]', '[S2S]', '[NLG]' or '' for none).
  `hf_dir`: {task: directory} of Hugging Face `super_glue` configs saved to disk, used instead
  of jsonl files for those tasks.
  """
  mode = vocabulary.check_mode(mode, 'register_superglue(mode=...)')
  vocab = vocabulary.get_vocabulary()
  features = {'inputs': seqio.Feature(vocab, add_eos=True),
              'targets': seqio.Feature(vocab, add_eos=True)}
  names = []
  for task in FILES:
    name = f'{prefix}_{task}'
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=_source(task, data_dir, (hf_dir or {}).get(task)),
        preprocessors=[_prepend_mode(mode), seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features, postprocess_fn=postprocess_for(task),
        metric_fns=[metrics_for(task)])
    names.append(name)
  seqio.MixtureRegistry.remove(prefix)
  training = [f'{prefix}_{t}' for t in FILES if t not in ('axb', 'axg')]
  seqio.MixtureRegistry.add(prefix, [(n, _rate(n)) for n in training])
  return names


def _rate(task_name: str) -> Callable[[seqio.Task], float]:
  """Proportional mixing: each task by its number of training examples (0 if absent)."""
  def rate(task: seqio.Task) -> float:
    name = task_name.split('_', 1)[1]
    path = _jsonl_path(default_dir(), name, 'train')
    if not os.path.exists(path):
      return 0.0
    with open(path, encoding='utf-8') as f:
      return float(sum(1 for line in f if line.strip()))
  return rate


register_superglue()
