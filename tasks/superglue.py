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

The formats are T5's SuperGLUE tasks (`t5/data/tasks.py`): AX-b and AX-g as RTE text,
`wsc_simple` for WSC, MultiRC without HTML, ReCoRD's highlights joined; the mixture's rates
T5's example counts. `eval.py` writes the leaderboard's files (`submission_rows`).
"""

from __future__ import annotations

import collections
import dataclasses
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
# The candidates of rank classification: every task with a fixed label set but WSC, whose
# model names the referent (T5's wsc_simple) and so is decoded.
CANDIDATES = {task: labels for task, labels in LABELS.items() if task != 'wsc'}


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


def _strip_punctuation(word: str) -> tuple[str, str, str]:
  """(leading punctuation, core, trailing punctuation).

  >>> _strip_punctuation('him,"')
  ('', 'him', ',"')
  """
  core = word.strip(string.punctuation)
  if not core:
    return '', word, ''
  start = word.index(core)
  return word[:start], core, word[start + len(core):]


def wsc_simple_text(text: str, index: int, pronoun: str) -> str:
  """T5's `wsc_simple` text: the pronoun at word `index` marked `*pronoun*`.

  The official records' word offsets are not all right (one `span2_index` in WSC/val.jsonl
  points at the word before its pronoun, one pronoun carries the quote and comma after it), so
  the pronoun is looked for at `index`, then one, two, three words either side, comparing
  words without their punctuation; punctuation after it is set off by a space, as T5's special
  cases do. A record whose pronoun is nowhere near is marked at `index` (never an error).

  >>> wsc_simple_text('Some day they might want to use it , but', 6, 'it')
  'Some day they might want to use *it* , but'
  >>> wsc_simple_text('"Good for him," he said.', 2, 'him')
  '"Good for *him* ," he said.'
  """
  words = text.split(' ')
  n = len(pronoun.split(' '))
  wanted = pronoun.strip(string.punctuation).lower()
  found = None
  for offset in (0, 1, -1, 2, -2, 3, -3):
    i = index + offset
    if 0 <= i <= len(words) - n:
      if ' '.join(words[i:i + n]).strip(string.punctuation).lower() == wanted:
        found = i
        break
  if found is None:
    found = min(max(index, 0), max(len(words) - n, 0))
  lead, core, trail = _strip_punctuation(' '.join(words[found:found + n]))
  marked = f'{lead}*{core}*' + (f' {trail}' if trail else '')
  return ' '.join(words[:found] + [marked] + words[found + n:])


# Two records whose span has words in between in the text: TFDS leaves them as they are.
_WSC_UNFIXABLE = ('Kamenev and Zinoviev', 'Kamenev, Zinoviev, and Stalin')


def fix_wsc_spans(record: Mapping[str, Any]) -> dict[str, Any]:
  """The record with TFDS `super_glue/wsc.fixed`'s span corrections, the data T5 reads: a span
  that is not a substring of the text takes the case of the first letter of the text's word at
  its index, loses a trailing period and has a newline made a space; the 'theyscold' record's
  pronoun index becomes 10. Spans found in the text, and the two records that cannot be fixed,
  stay as they are.

  >>> fix_wsc_spans({'text': 'I put the cake on the table .', 'target': {
  ...     'span1_text': 'The table', 'span1_index': 5, 'span2_text': 'it', 'span2_index': 0}}
  ...     )['target']['span1_text']
  'the table'
  """
  record = dict(record)
  target = record['target'] = dict(record['target'])
  words = record['text'].split()
  for k in ('span1', 'span2'):
    text, index = target[k + '_text'], target[k + '_index']
    if text in record['text'] or text in _WSC_UNFIXABLE:
      continue
    if 'theyscold' in text:
      target['span2_index'] = 10
    first = words[index] if 0 <= index < len(words) else ''
    text = (text[0].lower() if first[:1].islower() else text[0].upper()) + text[1:]
    target[k + '_text'] = text.rstrip('.').replace('\n', ' ')
  return record


def _strip_html(text: str) -> str:
  """MultiRC's markup as T5 removes it: `<br>` -> space, `<b>`/`</b>` dropped.

  >>> _strip_html('Sent 1: <b>Bob</b> ran.<br>Sent 2: He won.')
  'Sent 1: Bob ran. Sent 2: He won.'
  """
  return re.sub(r'</?b>', '', text.replace('<br>', ' '))


def _join_highlights(passage: str) -> str:
  r"""ReCoRD's `@highlight` lines as T5 joins them: after an end-of-sentence mark a space,
  otherwise '. '.

  >>> _join_highlights('He won.\n@highlight\nBig win\n@highlight\nFans cheer')
  'He won. Big win. Fans cheer'
  """
  passage = re.sub(r'([.?!"\'])\n@highlight\n', r'\1 ', passage)
  return passage.replace('\n@highlight\n', '. ')


def format_example(task: str, record: Mapping[str, Any], split: str = 'validation'
                   ) -> list[dict[str, Any]]:
  """One official record -> text examples, as T5's SuperGLUE tasks make them.

  Each example: inputs (without mode token), targets, idx, group (MultiRC's question), answers
  (ReCoRD: every correct answer text; the metric takes the max over them) and label (the
  class index, -1 without one). T5's choices (`t5/data/tasks.py`): AX-b and AX-g are RTE
  text, so the RTE-trained model is what they test; WSC is `wsc_simple` (the pronoun marked,
  target the referent `span1_text`, training only on records whose referent is right, `split`
  'train'); MultiRC loses its HTML and gives one example per answer; ReCoRD joins its
  highlights and gives one training example per answer (evaluation: one per query).
  """
  idx = record.get('idx', 0)
  label = _label(task, record.get('label'))
  if task == 'boolq':
    text = f'boolq passage: {record["passage"]} question: {record["question"]}'
  elif task in ('cb', 'rte', 'axg'):
    text = f'{"rte" if task == "axg" else task} hypothesis: {record["hypothesis"]} premise: ' \
           f'{record["premise"]}'
  elif task == 'axb':
    text = f'rte hypothesis: {record["sentence2"]} premise: {record["sentence1"]}'
  elif task == 'copa':
    text = (f'copa choice1: {record["choice1"]} choice2: {record["choice2"]} premise: '
            f'{record["premise"]} question: {record["question"]}')
  elif task == 'wic':
    text = (f'wic sentence1: {record["sentence1"]} sentence2: {record["sentence2"]} word: '
            f'{record["word"]}')
  elif task == 'wsc':
    target = fix_wsc_spans(record)['target']
    if split == 'train' and record.get('label') is not True:
      return []  # T5 trains on the records whose span1 is the pronoun's referent
    text = 'wsc: ' + wsc_simple_text(record['text'], target['span2_index'],
                                     target['span2_text'])
    return [{'inputs': text, 'targets': target['span1_text'], 'idx': idx, 'group': idx,
             'answers': [], 'label': _class(task, label)}]
  elif task == 'multirc':
    out = []
    passage = record['passage']
    for q in passage['questions']:
      for a in q['answers']:
        answer_label = _label(task, a.get('label'))
        out.append({'inputs': _strip_html(f'multirc question: {q["question"]} answer: '
                                          f'{a["text"]} paragraph: {passage["text"]}'),
                    'targets': answer_label, 'idx': a.get('idx', 0),
                    'group': idx * 10_000 + q.get('idx', 0), 'answers': [],
                    'label': _class(task, answer_label)})
    return out
  elif task == 'record':
    out = []
    passage = record['passage']
    text = _join_highlights(passage['text'])
    entities = sorted({passage['text'][e['start']:e['end'] + 1] for e in passage['entities']})
    for q in record['qas']:
      answers = [a['text'] for a in q.get('answers', [])]
      inputs = f'record query: {q["query"]} entities: {", ".join(entities)} passage: {text}'
      for target in (answers if split == 'train' and answers else answers[:1] or ['']):
        out.append({'inputs': inputs, 'targets': target, 'idx': q.get('idx', 0),
                    'group': idx, 'answers': answers, 'label': -1})
    return out
  else:
    raise ValueError(f'Unknown SuperGLUE task {task!r}; known: {sorted(FILES)}.')
  return [{'inputs': text, 'targets': label, 'idx': idx, 'group': idx, 'answers': [],
           'label': _class(task, label)}]


def _class(task: str, label: str) -> int:
  return LABELS[task].index(label) if label in LABELS[task] else -1


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
  """Matthews correlation over every value that occurs (scikit-learn's `matthews_corrcoef`,
  which T5 applies to the postprocessed values): a prediction that is no label (-1) is a
  class of its own, not an error of the other class.

  >>> round(matthews([1, 0, 1, 0], [1, 0, 0, 1]), 3), round(matthews([1, 0, 1, 0], [1, 0, -1, 0]), 3)
  (0.0, 0.671)
  """
  t, p = np.asarray(targets), np.asarray(predictions)
  classes = np.union1d(t, p)
  confusion = (t[:, None] == classes)[:, :, None] & (p[:, None] == classes)[:, None, :]
  c = confusion.sum(0).astype(np.float64)  # [true class, predicted class]
  samples, correct = c.sum(), np.trace(c)
  true_per_class, predicted_per_class = c.sum(1), c.sum(0)
  covariance = correct * samples - true_per_class @ predicted_per_class
  denominator = np.sqrt((samples**2 - predicted_per_class @ predicted_per_class)
                        * (samples**2 - true_per_class @ true_per_class))
  return 0.0 if denominator == 0 else float(covariance / denominator)


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


def _invalid_as_wrong(labels: Sequence[int], predictions: Sequence[int]) -> list[int]:
  """Binary predictions with a non-label (-1) replaced by the wrong class, so it counts as an
  error in MultiRC's F1 (T5's `f1_score_with_invalid`).

  >>> _invalid_as_wrong([1, 0, 1], [-1, -1, 1])
  [0, 1, 1]
  """
  return [p if p in (0, 1) else 1 - t for t, p in zip(labels, predictions)]


def multirc_metrics(targets: Sequence[Mapping], predictions: Sequence[int]) -> dict[str, float]:
  """MultiRC: F1 over all answers (F1a) and exact match per question (all its answers right);
  a prediction that is neither True nor False is wrong."""
  labels = [t['label'] for t in targets]
  predictions = _invalid_as_wrong(labels, predictions)
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
    if task == 'axb':  # -1 (no label) as its own class, as T5 scores it
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
    if is_target:  # WSC's target text is the referent: its label is the record's
      label = (int(example['label']) if task == 'wsc' else
               LABELS[task].index(text) if text in LABELS[task] else -1)
      return {'label': label, 'group': int(example['group']), 'idx': int(example['idx'])}
    if task == 'wsc':  # the predicted referent against span1_text (the example's target)
      referent = example['targets_pretokenized'] if example is not None else b''
      return names_referent(text, referent.decode('utf-8') if isinstance(referent, bytes)
                            else str(referent))
    return LABELS[task].index(text) if text in LABELS[task] else -1
  return postprocess


_DETERMINERS = frozenset(
    'a an each every few her his many much my our some that the their these this those which '
    'whose your'.split())


def names_referent(prediction: str, referent: str) -> int:
  """WSC (T5's `wsc_simple` postprocessor): 1 if the predicted text names the referent, 0 if
  not, -1 for an empty prediction (never a match by accident).

  Case and determiners are ignored; one word set containing the other is a match ("fuzzy
  bunny" names "the bunny"), unless only one of them is a possessive ("Bob" is not "Bob's
  hat").

  >>> names_referent('The bunny', 'fuzzy bunny'), names_referent("Bob", "Bob's hat")
  (1, 0)
  """
  def words(text):
    return [w for w in text.strip().lower().split(' ') if w and w not in _DETERMINERS]
  predicted, wanted = words(prediction), words(referent)
  if not predicted:
    return -1
  if ("'" in ' '.join(predicted)) != ("'" in ' '.join(wanted)):
    return 0
  predicted, wanted = set(predicted), set(wanted)
  return int(predicted <= wanted or wanted <= predicted)


# ----------------------------------------------------------------------------------------------
# The prompted protocol (zero- and few-shot, as the UL2 and GPT-3 papers evaluate)
# ----------------------------------------------------------------------------------------------

# task -> (prompt, candidates): what `prompted_examples` builds, shown in docs/finetuning.md's table.
PROMPTS = {
    'boolq': ('{passage} Question: {question}? Answer:', 'no / yes'),
    'cb': ('{premise} Question: {hypothesis} True, False, or Neither? Answer:',
           'True / False / Neither'),
    'copa': ('{premise without its final period} because (cause) / so (effect)',
             '{choice1} / {choice2}, first letter lower-cased'),
    'multirc': ('{paragraph} Question: {question} Is "{answer}" a correct answer? Answer:',
                'no / yes'),
    'record': ('{passage}', 'the query with @placeholder replaced by each entity'),
    'rte': ('{premise} Question: {hypothesis} True or False? Answer:', 'True / False'),
    'wic': ('Sentence 1: {sentence1} Sentence 2: {sentence2} Question: Is the word "{word}" '
            'used in the same sense in both sentences? Answer:', 'no / yes'),
    'wsc': ('{text} Question: In the passage above, does the pronoun "{span2_text}" refer to '
            '"{span1_text}"? Answer:', 'no / yes'),
    'axb': ('{sentence1} Question: {sentence2} True or False? Answer:', 'True / False'),
    'axg': ('{premise} Question: {hypothesis} True or False? Answer:', 'True / False'),
}


@dataclasses.dataclass(frozen=True)
class Prompted:
  """One prompted example: the prompt, its candidate continuations, the index of the right
  one (-1: none or several, as ReCoRD), and the target the task's metric takes."""

  prompt: str
  candidates: tuple[str, ...]
  answer: int
  target: Mapping[str, Any]

  def answer_text(self) -> str | None:
    """The right continuation, written after the prompt in a k-shot context (ReCoRD: its
    first answer's entity); None when there is none (a test record)."""
    if self.answer >= 0:
      return self.candidates[self.answer]
    answers, entities = self.target.get('answers'), self.target.get('entities', [])
    if answers and answers[0] in entities:
      return self.candidates[entities.index(answers[0])]
    return None


def _lower_first(text: str) -> str:
  return text[:1].lower() + text[1:]


def prompted_examples(task: str, record: Mapping[str, Any]) -> list[Prompted]:
  """An official record -> prompted examples (`PROMPTS`); candidate i is label i of
  `LABELS[task]`, so a chosen index is the prediction the metrics take.

  >>> [p] = prompted_examples('copa', {'premise': 'The man fell.', 'choice1': 'He slipped.',
  ...                                  'choice2': 'He sang.', 'question': 'cause', 'label': 0,
  ...                                  'idx': 1})
  >>> p.prompt, p.candidates, p.answer
  ('The man fell because', ('he slipped.', 'he sang.'), 0)
  """
  idx = record.get('idx', 0)

  def one(prompt, candidates, label, **target):
    answer = _class(task, label) if isinstance(label, str) else label
    return Prompted(prompt, tuple(candidates), answer,
                    {'label': answer, 'group': target.get('group', idx), 'idx': idx})

  label = _label(task, record.get('label'))
  if task == 'boolq':
    return [one(f'{record["passage"]} Question: {record["question"]}? Answer:',
                ('no', 'yes'), label)]
  if task == 'cb':
    return [one(f'{record["premise"]} Question: {record["hypothesis"]} True, False, or '
                'Neither? Answer:', ('True', 'False', 'Neither'), label)]
  if task == 'copa':
    connector = 'because' if record['question'] == 'cause' else 'so'
    return [one(f'{record["premise"].rstrip(".")} {connector}',
                (_lower_first(record['choice1']), _lower_first(record['choice2'])), label)]
  if task in ('rte', 'axg', 'axb'):
    premise, hypothesis = ((record['sentence1'], record['sentence2']) if task == 'axb' else
                           (record['premise'], record['hypothesis']))
    return [one(f'{premise} Question: {hypothesis} True or False? Answer:',
                ('True', 'False'), label)]
  if task == 'wic':
    return [one(f'Sentence 1: {record["sentence1"]} Sentence 2: {record["sentence2"]} '
                f'Question: Is the word "{record["word"]}" used in the same sense in both '
                'sentences? Answer:', ('no', 'yes'), label)]
  if task == 'wsc':
    target = fix_wsc_spans(record)['target']
    return [one(f'{record["text"]} Question: In the passage above, does the pronoun '
                f'"{target["span2_text"]}" refer to "{target["span1_text"]}"? Answer:',
                ('no', 'yes'), label)]
  if task == 'multirc':
    passage = _strip_html(record['passage']['text'])
    return [one(f'{passage} Question: {_strip_html(q["question"])} Is "{a["text"]}" a correct '
                'answer? Answer:', ('no', 'yes'), _label(task, a.get('label')),
                group=idx * 10_000 + q.get('idx', 0))
            for q in record['passage']['questions'] for a in q['answers']]
  if task == 'record':
    passage = record['passage']
    entities = sorted({passage['text'][e['start']:e['end'] + 1] for e in passage['entities']})
    out = []
    for q in record['qas']:
      answers = [a['text'] for a in q.get('answers', [])]
      out.append(Prompted(_join_highlights(passage['text']),
                          tuple(q['query'].replace('@placeholder', e) for e in entities),
                          -1, {'answers': answers, 'entities': entities, 'idx': q.get('idx', 0),
                               'group': idx}))
    return out
  raise ValueError(f'Unknown SuperGLUE task {task!r}; known: {sorted(FILES)}.')


def prompted_prediction(task: str, example: Prompted, chosen: int) -> Any:
  """The chosen candidate as the metric's prediction: its label index, or ReCoRD's entity."""
  return example.target['entities'][chosen] if task == 'record' else chosen


def prompted_split(task: str, split: str, data_dir: str | None = None,
                   hf_dir: str | None = None) -> list[Prompted]:
  """Every prompted example of a split of the official files."""
  return list(_each_record(task, split, data_dir, hf_dir,
                           lambda record: prompted_examples(task, record)))


# ----------------------------------------------------------------------------------------------
# Leaderboard files (the SuperGLUE server's format, as jiant writes it)
# ----------------------------------------------------------------------------------------------

SUBMISSION_FILES = {'boolq': 'BoolQ', 'cb': 'CB', 'copa': 'COPA', 'multirc': 'MultiRC',
                    'record': 'ReCoRD', 'rte': 'RTE', 'wic': 'WiC', 'wsc': 'WSC',
                    'axb': 'AX-b', 'axg': 'AX-g'}
# The label vocabulary of the submission files: BoolQ and WiC lower-case, WSC capitalised,
# COPA the choice number, the entailment tasks their names.
SUBMISSION_LABELS = {
    'boolq': ('false', 'true'), 'wic': ('false', 'true'), 'wsc': ('False', 'True'),
    'copa': (0, 1), 'cb': LABELS['cb'], 'rte': LABELS['rte'], 'axb': LABELS['axb'],
    'axg': LABELS['axg'], 'multirc': (0, 1),
}


def prediction_text(task: str, prediction: Any) -> Any:
  """A postprocessed prediction in the task's label words (None for no label; ReCoRD's text).

  >>> prediction_text('cb', 2), prediction_text('cb', -1), prediction_text('wsc', 1)
  ('neutral', None, 'True')
  """
  if task == 'record':
    return prediction
  return LABELS[task][prediction] if 0 <= prediction < len(LABELS[task]) else None


def submission_rows(task: str, records: Sequence[Mapping[str, Any]],
                    predictions: Sequence[Any]) -> tuple[list[dict[str, Any]], int]:
  """(rows of `<Task>.jsonl` for the leaderboard, how many predictions were no label).

  A prediction outside the label set is submitted as the first label (the server takes only
  labels). MultiRC nests answers under their question and paragraph; ReCoRD gives the answer
  text per query.

  >>> submission_rows('boolq', [{'idx': 0}, {'idx': 1}], [1, -1])
  ([{'idx': 0, 'label': 'true'}, {'idx': 1, 'label': 'false'}], 1)
  >>> submission_rows('multirc', [{'idx': 0, 'group': 30001}, {'idx': 1, 'group': 30001}],
  ...                 [1, 0])[0]
  [{'idx': 3, 'passage': {'questions': [{'idx': 1, 'answers': [{'idx': 0, 'label': 1}, {'idx': 1, 'label': 0}]}]}}]
  """
  if task == 'record':
    return [{'idx': r['idx'], 'label': p} for r, p in zip(records, predictions)], 0
  labels = SUBMISSION_LABELS[task]
  invalid = sum(1 for p in predictions if not 0 <= p < len(labels))
  chosen = [labels[p] if 0 <= p < len(labels) else labels[0] for p in predictions]
  if task != 'multirc':
    return [{'idx': r['idx'], 'label': c} for r, c in zip(records, chosen)], invalid
  paragraphs = {}
  for r, c in zip(records, chosen):
    paragraph, question = divmod(r['group'], 10_000)
    questions = paragraphs.setdefault(paragraph, {})
    questions.setdefault(question, []).append({'idx': r['idx'], 'label': c})
  return [{'idx': p, 'passage': {'questions': [{'idx': q, 'answers': answers}
                                               for q, answers in questions.items()]}}
          for p, questions in paragraphs.items()], invalid


# ----------------------------------------------------------------------------------------------
# Sources and registration
# ----------------------------------------------------------------------------------------------

def _jsonl_path(data_dir: str, task: str, split: str) -> str:
  folder, stem = FILES[task]
  return os.path.join(data_dir, folder, f'{stem or SPLITS[split]}.jsonl')


def read_records(task: str, split: str, data_dir: str | None = None,
                 hf_dir: str | None = None) -> Iterable[Mapping[str, Any]]:
  """Official-format records of one split, from jsonl files or an HF `save_to_disk` dir."""
  for _, record in numbered_records(task, split, data_dir, hf_dir):
    yield record


def numbered_records(task: str, split: str, data_dir: str | None = None,
                     hf_dir: str | None = None) -> Iterable[tuple[str, Mapping[str, Any]]]:
  """(where, record) pairs: where is 'path:line' (or the HF directory and row) for messages."""
  if hf_dir:
    import datasets
    ds = datasets.load_from_disk(hf_dir)
    name = {'validation': 'validation', 'train': 'train', 'test': 'test'}[split]
    for i, row in enumerate(ds[name]):
      yield f'{hf_dir} {name} row {i}', from_hf_record(task, row)
    return
  path = check_file(task, split, data_dir)
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          yield f'{path}:{line_number}', json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'SuperGLUE data: {path}:{line_number}: not valid JSON ({e}).'
                           ) from None


def check_file(task: str, split: str, data_dir: str | None = None) -> str:
  """The jsonl file of `task`'s `split`; FileNotFoundError (one line: the file and how to
  supply it) when it is missing."""
  path = _jsonl_path(data_dir or default_dir(), task, split)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'SuperGLUE data: {task} {split}: {path} not found. Put the official jsonl files under '
        f'{data_dir or default_dir()} or point --data_dir (or {DIR_ENV}) at their folder.')
  return path


def _examples(task: str, split: str, data_dir: str | None, hf_dir: str | None
              ) -> Iterable[dict[str, Any]]:
  """The text examples of a split (`format_example`)."""
  return _each_record(task, split, data_dir, hf_dir,
                      lambda record: format_example(task, record, split))


def _each_record(task: str, split: str, data_dir: str | None, hf_dir: str | None,
                 make: Callable[[Mapping[str, Any]], list]) -> Iterable[Any]:
  """`make(record)` for every record of a split, flattened; a record missing a field is one
  line naming the file, the line and the field."""
  for where, record in numbered_records(task, split, data_dir, hf_dir):
    try:
      made = make(record)
    except (KeyError, TypeError) as e:
      field = e.args[0] if isinstance(e, KeyError) else e
      raise ValueError(f'SuperGLUE data: {where}: this {task} record has no field {field!r} '
                       f'(fields: {sorted(record)}); is it the official {task} file?') from None
    yield from made


def default_dir() -> str:
  return os.environ.get(DIR_ENV) or BUNDLED_DIR


def _source(task: str, data_dir: str | None, hf_dir: str | None) -> seqio.DataSource:
  splits = ['test'] if task in ('axb', 'axg') else ['train', 'validation', 'test']

  def read(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    if not hf_dir:
      check_file(task, split, data_dir)  # here, not as a TensorFlow iterator error

    def rows():
      for ex in _examples(task, split, data_dir, hf_dir):
        yield {**ex, 'answers': ex['answers'] or ['']}
    return tf.data.Dataset.from_generator(rows, output_signature={
        'inputs': tf.TensorSpec([], tf.string), 'targets': tf.TensorSpec([], tf.string),
        'idx': tf.TensorSpec([], tf.int64), 'group': tf.TensorSpec([], tf.int64),
        'answers': tf.TensorSpec([None], tf.string), 'label': tf.TensorSpec([], tf.int64)})
  return seqio.FunctionDataSource(read, splits=splits)


def prepend_mode(mode: str):
  """A preprocessor putting the mode token before each example's `inputs` text ('' : none)."""
  def prepend(dataset):
    if not mode:
      return dataset
    return dataset.map(lambda ex: {**ex, 'inputs': tf.strings.join([mode, ex['inputs']], ' ')},
                       num_parallel_calls=tf.data.AUTOTUNE)
  return prepend


def register_superglue(data_dir: str | None = None, mode: str = vocabulary.NLU,
                       hf_dir: Mapping[str, str] | None = None, prefix: str = 'superglue',
                       exclude: Sequence[str] = ()) -> list[str]:
  """Registers `<prefix>_<task>` for every task and the `<prefix>` training mixture.

  `mode`: the mode token prepended to every input ('[NLU]', '[S2S]', '[NLG]' or '' for none).
  `hf_dir`: {task: directory} of Hugging Face `super_glue` configs saved to disk, used instead
  of jsonl files for those tasks. `exclude`: training tasks left out of the mixture (say so
  when their files are missing: a mixture task without its files is an error when read).
  The mixture's rates are T5's: each task's number of training examples in the data given
  here (MultiRC: answers; ReCoRD: one per answer; WSC: the records whose referent is right).
  """
  mode = vocabulary.check_mode(mode, 'register_superglue(mode=...)')
  unknown = set(exclude) - set(TRAINING)
  if unknown:
    raise ValueError(f'register_superglue(exclude=...): {sorted(unknown)} are not SuperGLUE '
                     f'training tasks; choose from {list(TRAINING)}.')
  vocab = vocabulary.get_vocabulary()
  features = {'inputs': seqio.Feature(vocab, add_eos=True),
              'targets': seqio.Feature(vocab, add_eos=True)}
  names = []
  for task in FILES:
    name = f'{prefix}_{task}'
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=_source(task, data_dir, (hf_dir or {}).get(task)),
        preprocessors=[prepend_mode(mode), seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features, postprocess_fn=postprocess_for(task),
        metric_fns=[metrics_for(task)])
    names.append(name)
  seqio.MixtureRegistry.remove(prefix)
  included = [t for t in TRAINING if t not in exclude]
  if exclude:
    print(f'SuperGLUE mixture {prefix!r}: left out {", ".join(exclude)} (exclude=...).')
  seqio.MixtureRegistry.add(prefix, [
      (f'{prefix}_{t}', _rate(t, data_dir, (hf_dir or {}).get(t))) for t in included])
  return names


# The tasks of the training mixture (the diagnostics have only a test set).
TRAINING = tuple(t for t in FILES if t not in ('axb', 'axg'))


def _rate(task: str, data_dir: str | None, hf_dir: str | None) -> Callable[[seqio.Task], float]:
  """T5's proportional mixing: the task's number of training examples, counted once."""
  counted = []

  def rate(_: seqio.Task) -> float:
    if not counted:
      if not hf_dir and not os.path.exists(_jsonl_path(data_dir or default_dir(), task,
                                                       'train')):
        raise FileNotFoundError(
            f'SuperGLUE mixture: {task} has no training file '
            f'{_jsonl_path(data_dir or default_dir(), task, "train")}; put the official files '
            f'there (--data_dir or {DIR_ENV}) or leave it out with '
            f'register_superglue(exclude=({task!r},)).')
      counted.append(float(sum(1 for _ in _examples(task, 'train', data_dir, hf_dir))))
    return counted[0]
  return rate


register_superglue()
