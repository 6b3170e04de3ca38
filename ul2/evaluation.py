"""Evaluate a model on a seqio task: decode or rank-score, postprocess, compute the task's metrics.

    metrics = evaluate(model, params, 'superglue_cb', feature_lengths={'inputs': 256,
                       'targets': 8}, method='rank', candidates=('entailment', 'contradiction',
                       'neutral'))

`method='decode'` generates greedily and maps the text through the task's `postprocess_fn`;
`method='rank'` scores every candidate answer and takes the most likely (zero- and few-shot
classification). `few_shot=k` prepends k training examples ("input target" pairs, mode token
first) to each input, truncating from the left so the question itself always fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ul2 import decoding, network, vocabulary


@dataclasses.dataclass
class Result:
  task: str
  metrics: dict[str, float]
  examples: int
  method: str
  predictions: list[Any]
  mode: str = ''  # the mode token the task's inputs start with ('' for none)
  # Per evaluated example: its idx, input text, target text (for prediction files).
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def pad_rows(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
  """Token rows -> [len(rows), length] int32, zero-padded (cut at `length`)."""
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row[:length]
  return out


def few_shot_inputs(vocab, query: str, shots: Sequence[tuple[str, str]], length: int
                    ) -> list[int]:
  """Token ids of `mode shot_1_input shot_1_target ... query` (+ EOS), at most `length`: the
  oldest shots are cut first; the mode token and the query are kept whole while they fit
  (a query longer than that loses its start, and the mode token, like any truncated input).

  The texts are the task's pretokenized inputs, each starting with the mode token, which is
  written once, first.
  """
  mode, body = vocabulary.split_mode(query)
  prefix = vocab.encode(mode) if mode else []
  query_ids = vocab.encode(body) + [network.EOS_ID]
  context = []
  for shot_input, shot_target in shots:
    context += vocab.encode(f'{vocabulary.split_mode(shot_input)[1]} {shot_target}')
  room = max(length - len(prefix) - len(query_ids), 0)
  context = context[max(len(context) - room, 0):]  # the most recent `room` tokens
  return (prefix + context + query_ids)[-length:]  # cuts only a query that alone is too long


def evaluate(model: network.Model, params: Any, task_name: str, *,
             feature_lengths: Mapping[str, int], split: str = 'validation',
             method: str = 'decode', candidates: Sequence[str] | None = None,
             few_shot: int = 0, batch_size: int = 32, max_examples: int | None = None,
             seed: int = 0) -> Result:
  """Runs `task_name`'s `split` through the model and its metric functions."""
  import seqio  # TensorFlow/seqio only where a task is evaluated

  if method not in ('decode', 'rank'):
    raise ValueError(f"method must be 'decode' or 'rank', got {method!r}.")
  if method == 'rank' and not candidates:
    raise ValueError(f'Rank classification of {task_name} needs candidate answers; this task '
                     "has none (e.g. ReCoRD's free-form answers): use method='decode'.")
  task = seqio.get_mixture_or_task(task_name)
  vocab = task.output_features['targets'].vocabulary
  lengths = dict(feature_lengths)
  ds = task.get_dataset(lengths, split=split, shuffle=False, seed=seed)
  examples = list((ds.take(max_examples) if max_examples else ds).as_numpy_iterator())
  if not examples:
    raise ValueError(f'{task_name} split {split!r} has no examples.')

  shots = []
  if few_shot:
    train = task.get_dataset(lengths, split='train', shuffle=True, seed=seed)
    shots = [(_text(ex['inputs_pretokenized']), _text(ex['targets_pretokenized']))
             for ex in train.take(few_shot).as_numpy_iterator()]
  inputs = [few_shot_inputs(vocab, _text(ex['inputs_pretokenized']), shots, lengths['inputs'])
            if few_shot else list(ex['inputs']) for ex in examples]

  width = max(len(r) for r in inputs)  # one padded width for every batch
  if method == 'rank':
    cand_ids = pad_rows([vocab.encode(c) + [network.EOS_ID] for c in candidates],
                    max(len(vocab.encode(c)) + 1 for c in candidates))
    cands = jnp.asarray(np.broadcast_to(cand_ids, (batch_size,) + cand_ids.shape))
  predictions = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    rows = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - rows)  # one compiled shape for every batch
    enc = jnp.asarray(pad_rows(chunk, width))
    if method == 'decode':
      out = np.asarray(decoding.greedy(model, params, enc, lengths['targets']))[:rows]
      for row, ex in zip(out, examples[start:start + rows]):
        ids = list(row)
        ids = ids[:ids.index(network.EOS_ID)] if network.EOS_ID in ids else ids
        predictions.append(task.postprocess_fn(vocab.decode([i for i in ids if i]),
                                               example=ex, is_target=False))
    else:
      _, best = decoding.rank_classification(model, params, enc, cands)
      for b, ex in zip(np.asarray(best)[:rows], examples[start:start + rows]):
        predictions.append(task.postprocess_fn(candidates[int(b)], example=ex,
                                               is_target=False))
  targets = [task.postprocess_fn(_text(ex['targets_pretokenized']), example=ex, is_target=True)
             for ex in examples]
  metrics = {}
  for fn in task.metric_fns:
    metrics.update(fn(targets, predictions))
  mode = vocabulary.split_mode(_text(examples[0]['inputs_pretokenized']))[0]
  records = [{'idx': int(ex['idx']) if 'idx' in ex else i,
              **({'group': int(ex['group'])} if 'group' in ex else {}),
              'input': _text(ex['inputs_pretokenized']),
              'target': _text(ex['targets_pretokenized'])} for i, ex in enumerate(examples)]
  return Result(task_name, metrics, len(examples), method, predictions, mode or '', records)


def evaluate_during_training(model: network.Model, params: Any, name: str, *,
                             feature_lengths: Mapping[str, int], split: str = 'validation',
                             max_examples: int | None = None) -> tuple[dict[str, float], str]:
  """(metrics, mode) of a task or a mixture by greedy decoding, one finite pass each.

  A task's metrics keep their names, plus 'average' (`task_score`). A mixture evaluates every
  sub-task that has metric functions and the split, names each metric '<task>/<metric>', and
  adds 'average': the mean of the sub-tasks' scores (the SuperGLUE score for `superglue`).
  For example (numbers from a CPU quickstart model):

      evaluate_during_training(model, params, 'superglue_cb', feature_lengths=lengths)
      -> ({'accuracy': 66.1, 'f1_macro': 45.9, 'average': 56.0}, '[NLU]')
      evaluate_during_training(model, params, 'superglue', feature_lengths=lengths)
      -> ({'superglue_cb/accuracy': 66.1, ..., 'superglue_rte/accuracy': 52.7,
           'average': 55.4}, '[NLU]')
  """
  import seqio

  target = seqio.get_mixture_or_task(name)
  if isinstance(target, seqio.Mixture):
    subtasks = [t for t in target.tasks if t.metric_fns and split in t.splits]
    if not subtasks:
      raise ValueError(f'Mixture {name} has no task with metrics and a {split!r} split.')
  else:
    subtasks = [target]
  metrics, scores, mode = {}, [], ''
  for task in subtasks:
    result = evaluate(model, params, task.name, feature_lengths=feature_lengths, split=split,
                      method='decode', max_examples=max_examples)
    mode = mode or result.mode
    scores.append(task_score(result.metrics))
    if task is target:
      metrics.update(result.metrics)
    else:
      metrics.update({f'{task.name}/{k}': v for k, v in result.metrics.items()})
  metrics['average'] = float(np.mean(scores))
  return metrics, mode


ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (x100), averaged over examples, with Google's
  `rouge-score` (Porter stemming, its tokenizer): a seqio metric function for generation
  tasks.

  >>> rouge(['the cat sat on the mat'], ['the cats sat on a mat'])  # 5/6 words, 3/5 bigrams
  {'rouge1': 83.33333333333334, 'rouge2': 60.0, 'rougeL': 83.33333333333334}
  """
  from rouge_score import rouge_scorer

  if len(targets) != len(predictions):
    raise ValueError(f'rouge: {len(targets)} targets but {len(predictions)} predictions.')
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(t, p) for t, p in zip(targets, predictions)]
  return {k: 100.0 * float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0
          for k in ROUGE_TYPES}


def task_score(metrics: Mapping[str, float]) -> float:
  """One number per task, as the SuperGLUE leaderboard averages it: the mean of the task's
  metrics (CB: accuracy and macro-F1; MultiRC: F1a and EM; ReCoRD: F1 and EM)."""
  return float(np.mean(list(metrics.values())))


def rank_continuations(model: network.Model, params: Any, prompts: Sequence[str],
                       candidates: Sequence[Sequence[str]], *, inputs_length: int,
                       shots: Sequence[tuple[str, str]] = (), mode: str = '',
                       batch_size: int = 32, length_normalized: bool = False) -> list[int]:
  """For each prompt, the index of its most likely candidate continuation (the prompted
  protocol: zero-shot, or k-shot with `shots`, (prompt, answer) pairs written before it).

  Each input is `mode shot_1 answer_1 ... prompt` (`few_shot_inputs`: the oldest shots are
  cut first when it is too long); each candidate is scored as the target, EOS included, by
  its summed log-likelihood, or its mean per token with `length_normalized`. Examples may have
  different numbers of candidates (ReCoRD's entities).
  """
  vocab = vocabulary.get_vocabulary()
  inputs = [few_shot_inputs(vocab, vocabulary.with_mode(p, mode), shots, inputs_length)
            for p in prompts]
  encoded = [[vocab.encode(c) + [network.EOS_ID] for c in cands] for cands in candidates]
  count = max(len(c) for c in encoded)  # one compiled shape for the whole task
  length = max(len(ids) for cands in encoded for ids in cands)
  width = max(len(r) for r in inputs)
  chosen = []
  for start in range(0, len(inputs), batch_size):
    rows = list(range(start, min(start + batch_size, len(inputs))))
    padded = rows + [rows[-1]] * (batch_size - len(rows))
    cands = np.stack([pad_rows(encoded[i] + [encoded[i][0]] * (count - len(encoded[i])), length)
                      for i in padded])  # [batch, C, Lt]; padding candidates are masked below
    scores, _ = decoding.rank_classification(model, params, jnp.asarray(pad_rows(
        [inputs[i] for i in padded], width)), jnp.asarray(cands))
    scores = np.asarray(scores)
    if length_normalized:
      scores = scores / np.maximum((cands > 0).sum(-1), 1)
    for row, i in enumerate(rows):
      chosen.append(int(np.argmax(scores[row, :len(encoded[i])])))
  return chosen
