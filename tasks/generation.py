"""Prompted generation over your data, scored with ROUGE-1/2/L (Google's `rouge-score`).

A generation task reads jsonl records with an input and a reference text, puts the mode token
before the input (default `[S2S]`, the mode UL2 generates in), and scores greedy decodes with
`ul2.evaluation.rouge`. `scripts/eval.py --generation gen_<name> --few_shot K` runs it,
K-shot: K training records ("input reference" pairs) before each input.

The paper's one-shot XSum protocol, with XSum saved as jsonl ({"document", "summary"}):

    from ul2_tasks import generation
    generation.register_generation('xsum', generation.jsonl_pairs_source(
        train='/data/xsum/train.jsonl', validation='/data/xsum/validation.jsonl',
        input_key='document', target_key='summary'))
    # python scripts/eval.py --checkpoint ... --module my_tasks --generation gen_xsum \
    #     --few_shot 1 --inputs_length 1024 --targets_length 64

Registered on import, from the bundled Gutenberg sample (nothing to download):
`gen_gutenberg_continuation`: a paragraph's first two sentences -> its third.
"""

from __future__ import annotations

import json
import os
import re

import seqio
import tensorflow as tf

from ul2 import evaluation, vocabulary
from ul2_tasks import pretrain
from ul2_tasks.superglue import prepend_mode

PREFIX = 'gen_'


def jsonl_pairs_source(train: str, validation: str, input_key: str = 'input',
                       target_key: str = 'target') -> seqio.DataSource:
  """jsonl files (one JSON object a line) -> {'inputs', 'targets'} text pairs; a record
  without either field, or not JSON, is one error naming the file and line."""
  files = {'train': train, 'validation': validation}
  for split, path in files.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(f'jsonl_pairs_source({split}={path!r}): no such file.')

  def read(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    def rows():
      with open(files[split], encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
            yield {'inputs': str(record[input_key]), 'targets': str(record[target_key])}
          except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{files[split]}:{number}: expected a JSON object with text '
                             f'fields {input_key!r} and {target_key!r} ({e!r}); set '
                             'input_key/target_key to its field names.') from None
    return tf.data.Dataset.from_generator(rows, output_signature={
        'inputs': tf.TensorSpec([], tf.string), 'targets': tf.TensorSpec([], tf.string)})
  return seqio.FunctionDataSource(read, splits=list(files))


def register_generation(name: str, source: seqio.DataSource, mode: str = vocabulary.S2S,
                        vocab: seqio.Vocabulary | None = None) -> str:
  """Registers `gen_<name>` (replacing an earlier one) and returns its name."""
  mode = vocabulary.check_mode(mode, 'register_generation(mode=...)')
  vocab = vocab or vocabulary.get_vocabulary()
  task_name = PREFIX + name
  seqio.TaskRegistry.remove(task_name)
  seqio.TaskRegistry.add(
      task_name, source=source,
      preprocessors=[prepend_mode(mode), seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim],
      output_features={'inputs': seqio.Feature(vocab, add_eos=True),
                       'targets': seqio.Feature(vocab, add_eos=True)},
      metric_fns=[evaluation.rouge])
  return task_name


_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"\'])')


def continuation(paragraph: str, context_sentences: int = 2) -> dict[str, str] | None:
  """A paragraph's first sentences -> its next one; None for a paragraph too short.

  >>> continuation('It rained. We stayed in. Then the sun came out. We left.')
  {'input': 'It rained. We stayed in.', 'target': 'Then the sun came out.'}
  """
  sentences = _SENTENCE_END.split(paragraph.strip())
  if len(sentences) < context_sentences + 1 or any(len(s) < 3 for s in sentences):
    return None
  return {'input': ' '.join(sentences[:context_sentences]),
          'target': sentences[context_sentences]}


def gutenberg_continuation_source(data_dir: str | None = None, limit: int = 2000
                                  ) -> seqio.DataSource:
  """Continuation pairs from the Gutenberg files (bundled sample by default), at most
  `limit` per split, in file order."""
  data_dir = data_dir or os.environ.get(pretrain.GUTENBERG_DIR_ENV) or \
      pretrain.BUNDLED_GUTENBERG_DIR

  def read(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    paths = sorted(tf.io.gfile.glob(os.path.join(data_dir, f'gutenberg_{split}_*.txt')))
    if not paths:
      raise FileNotFoundError(f'No gutenberg_{split}_*.txt files in {data_dir}.')

    def rows():
      count = 0
      for path in paths:
        with open(path, encoding='utf-8', errors='replace') as f:
          for line in f:
            pair = continuation(line)
            if pair is None:
              continue
            yield {'inputs': pair['input'], 'targets': pair['target']}
            count += 1
            if count == limit:
              return
    return tf.data.Dataset.from_generator(rows, output_signature={
        'inputs': tf.TensorSpec([], tf.string), 'targets': tf.TensorSpec([], tf.string)})
  return seqio.FunctionDataSource(read, splits=['train', 'validation'])


register_generation('gutenberg_continuation', gutenberg_continuation_source())
