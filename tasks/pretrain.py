"""Pretraining tasks: the UL2 Mixture-of-Denoisers and its ablation baselines, per corpus.

Every corpus is registered under four objectives, through the same code path, and as the
paper's causal-LM baseline:

    ul2_mod_<corpus>             the paper's 7 denoisers, uniform per example
    t5_span_corruption_<corpus>  T5's span corruption only, R(3, 0.15)
    prefix_lm_<corpus>           the S-denoiser only (prefix LM)
    ul2r_<corpus>                UL2R / U-PaLM: 50% S, 25% R(3, 0.15), 25% X(32, 0.5)
    causal_lm_<corpus>           plain text in `targets` only, for decoder-only models
                                 (feature lengths {'targets': N}: seqio's LMFeatureConverter)

Corpora registered on import:
  * `gutenberg`: plain text, one paragraph per line, `gutenberg_{train,validation}_*.txt`.
    By default a small sample bundled in `data/gutenberg_sample/`; set `UL2_GUTENBERG_DIR` (or
    call `register_gutenberg(data_dir)`) to use the full 12M-token corpus or any directory with
    files of that naming.
  * `c4`: C4 English through TFDS (`c4/en:3.1.0`) for real runs. Nothing is downloaded on
    import; the data must be prepared in `TFDS_DATA_DIR` (or `register_c4(data_dir=...)`).

Registering your own corpus takes one call (documents are concatenated, so short ones are fine):

    from ul2_tasks import pretrain
    pretrain.register_corpus('mybooks', pretrain.text_files_source(
        train='/data/books/train-*.txt', validation='/data/books/valid-*.txt'))
    pretrain.register_corpus('mynews', pretrain.jsonl_source(
        train='/data/news/train.jsonl', validation='/data/news/valid.jsonl', text_key='body'))
    pretrain.register_corpus('mywiki', pretrain.hf_disk_source('/data/wiki_saved_to_disk'))
    # -> tasks 'ul2_mod_mybooks', 't5_span_corruption_mybooks', ..., 'causal_lm_mybooks'

Every denoiser keeps its (mu, r): at inputs length 512, X(3, 0.5) would make up to 127 spans
but the T5 vocabulary has 100 sentinels (the reference code then silently uses ordinary word
pieces as sentinels). By default (`MixtureConfig(sentinel_overflow='shrink')`) it takes fewer
raw tokens, 602 instead of 815, so its spans fit; `'cap'` keeps the longer chunk and caps the
span count (mean span ~4 instead of 3), `'error'` refuses (`register_corpus(...,
objectives=...)`). Likewise X(64, 0.15) takes 449 tokens (one span of 67) rather than ~600
(one span of ~89): `MixtureConfig.exact_mean_span`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Mapping

import seqio
import tensorflow as tf

from ul2 import denoisers, vocabulary

BUNDLED_GUTENBERG_DIR = os.path.join(vocabulary.DATA_DIR, 'gutenberg_sample')
GUTENBERG_DIR_ENV = 'UL2_GUTENBERG_DIR'

OBJECTIVES: dict[str, denoisers.MixtureConfig] = {
    'ul2_mod': denoisers.MixtureConfig(denoisers.UL2_DENOISERS),
    't5_span_corruption': denoisers.MixtureConfig(denoisers.T5_SPAN_CORRUPTION),
    'prefix_lm': denoisers.MixtureConfig(denoisers.PREFIX_LM),
    'ul2r': denoisers.MixtureConfig(denoisers.UL2R_DENOISERS, denoisers.UL2R_RATES),
}


def output_features(vocab: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
  vocab = vocab or vocabulary.get_vocabulary()
  return {
      'inputs': seqio.Feature(vocab, add_eos=True, required=False),
      'targets': seqio.Feature(vocab, add_eos=True),
  }


def preprocessors(mixture: denoisers.MixtureConfig, text_key: str = 'text') -> list:
  """rekey -> tokenize into blocks of 128 documents -> (cache) -> Mixture-of-Denoisers -> EOS."""
  return [
      _lines_as_documents,
      functools.partial(seqio.preprocessors.rekey, key_map={'targets': text_key}),
      denoisers.tokenize_blocks,
      seqio.CacheDatasetPlaceholder(),
      denoisers.MixtureOfDenoisers(mixture),
      # Never trims: every denoiser's chunk was sized to leave room for the EOS.
      seqio.preprocessors.append_eos_after_trim,
  ]


def causal_lm_preprocessors(text_key: str = 'text') -> list:
  """rekey -> tokenize into blocks -> (cache) -> chunks of the targets length -> EOS."""
  return [
      _lines_as_documents,
      functools.partial(seqio.preprocessors.rekey, key_map={'targets': text_key}),
      denoisers.tokenize_blocks,
      seqio.CacheDatasetPlaceholder(),
      denoisers.causal_lm_chunks,
      seqio.preprocessors.append_eos_after_trim,
  ]


CAUSAL_LM = 'causal_lm'


def _lines_as_documents(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """TextLineDataSource yields bare lines; every other source yields feature dicts. Lines
  that are not UTF-8 (allowed by `text_files_source(errors='replace')`) get U+FFFD."""
  if isinstance(dataset.element_spec, dict):
    return dataset
  return dataset.map(
      lambda line: {'text': tf.strings.unicode_transcode(line, 'UTF-8', 'UTF-8',
                                                        errors='replace')},
      num_parallel_calls=tf.data.AUTOTUNE)


def _check_text_key(name: str, source: seqio.DataSource, text_key: str) -> None:
  """The source must give `text_key`: one line naming the features it has otherwise (a
  TFDS source is not opened here: it may not be prepared yet)."""
  if isinstance(source, seqio.TfdsDataSource):
    return
  if isinstance(source, seqio.TextLineDataSource):
    features = ['text']
  else:
    spec = source.get_dataset(split=source.splits[0], shuffle=False).element_spec
    features = sorted(spec) if isinstance(spec, dict) else ['text']
  if text_key not in features:
    raise ValueError(
        f'register_corpus({name!r}, text_key={text_key!r}): the source gives {features}, no '
        f'{text_key!r}. jsonl_source and hf_disk_source take the field name themselves: '
        f'jsonl_source(..., text_key={text_key!r}) and register_corpus without text_key.')


def register_corpus(name: str, source: seqio.DataSource, text_key: str = 'text',
                    objectives: Mapping[str, denoisers.MixtureConfig] | None = None,
                    vocab: seqio.Vocabulary | None = None, causal_lm: bool = True) -> list[str]:
  """Registers `<objective>_<name>` for each objective, and `causal_lm_<name>` unless
  `causal_lm=False`; replaces earlier registrations.

  Returns the task names. `text_key`: the feature of `source` that holds the document text
  ('text' for `text_files_source`, `jsonl_source` and `hf_disk_source`, which take the
  field or column name themselves).
  """
  _check_text_key(name, source, text_key)
  steps = {objective: preprocessors(mixture, text_key)
           for objective, mixture in (objectives or OBJECTIVES).items()}
  if causal_lm:
    steps[CAUSAL_LM] = causal_lm_preprocessors(text_key)
  names = []
  for objective, task_preprocessors in steps.items():
    task_name = f'{objective}_{name}'
    seqio.TaskRegistry.remove(task_name)
    seqio.TaskRegistry.add(task_name, source=source, preprocessors=task_preprocessors,
                           output_features=output_features(vocab), metric_fns=[])
    names.append(task_name)
  return names


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def _check_pattern(pattern: str, what: str) -> str:
  if not glob.glob(pattern):
    raise FileNotFoundError(f'No {what} files match {pattern!r}; check the directory or '
                            'pattern you configured.')
  return pattern


def text_files_source(train: str, validation: str | None = None,
                      errors: str = 'strict') -> seqio.DataSource:
  """Plain text files, one document per line (`text` feature). Patterns may be globs.

  `errors='strict'`: every file is checked to be UTF-8 here (a file that is not is one error
  naming it and the line); 'replace': bytes that are not UTF-8 become U+FFFD.
  """
  splits = {'train': _check_pattern(train, 'train')}
  if validation:
    splits['validation'] = _check_pattern(validation, 'validation')
  if errors not in ('strict', 'replace'):
    raise ValueError(f"text_files_source(errors={errors!r}): 'strict' or 'replace'.")
  if errors == 'strict':
    for pattern in splits.values():
      for path in sorted(glob.glob(pattern)):
        _check_utf8(path)
  return seqio.TextLineDataSource(splits)


def _check_utf8(path: str) -> None:
  with open(path, 'rb') as f:
    for line_number, line in enumerate(f, 1):
      try:
        line.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ValueError(f'{path}:{line_number}: not UTF-8 ({e.reason} at byte {e.start} of '
                         "the line). Convert the file (e.g. iconv -f latin1 -t utf-8) or pass "
                         "errors='replace' to the source.") from None


def jsonl_source(train: str, validation: str | None = None,
                 text_key: str = 'text', errors: str = 'strict') -> seqio.DataSource:
  """JSON-lines files, one document per line with its text under `text_key`; `errors` as
  `text_files_source`'s (a line that is not UTF-8 is an error naming it, or 'replace')."""
  splits = {'train': _check_pattern(train, 'train')}
  if validation:
    splits['validation'] = _check_pattern(validation, 'validation')

  def read(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    files = sorted(glob.glob(splits[split]))

    def rows():
      for path in files:
        with open(path, 'rb') as f:
          for line_number, raw in enumerate(f, 1):
            try:
              line = raw.decode('utf-8', errors)
            except UnicodeDecodeError as e:
              raise ValueError(f'{path}:{line_number}: not UTF-8 ({e.reason}); convert the '
                               "file or pass errors='replace' to jsonl_source.") from None
            if not line.strip():
              continue
            try:
              text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
              raise ValueError(f'{path}:{line_number}: expected a JSON object with a string '
                               f'field {text_key!r} ({e!r}); set text_key to the field that '
                               'holds the document text.') from None
            yield {'text': text}

    return tf.data.Dataset.from_generator(
        rows, output_signature={'text': tf.TensorSpec([], tf.string)})

  return seqio.FunctionDataSource(read, splits=list(splits))


def hf_disk_source(path: str, text_key: str = 'text') -> seqio.DataSource:
  """A Hugging Face `datasets` DatasetDict saved with `save_to_disk` (no hub access)."""
  import datasets  # only needed for this source

  if not os.path.isdir(path):
    raise FileNotFoundError(f'No Hugging Face dataset directory at {path!r} (expected the '
                            'output of DatasetDict.save_to_disk).')
  dataset_dict = datasets.load_from_disk(path)
  if isinstance(dataset_dict, datasets.Dataset):
    dataset_dict = datasets.DatasetDict({'train': dataset_dict})
  for split, ds in dataset_dict.items():
    if text_key not in ds.column_names:
      raise ValueError(f'{path} split {split!r} has columns {ds.column_names}, no '
                       f'{text_key!r}; pass text_key=<the text column>.')

  def read(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    column = dataset_dict[split]
    return tf.data.Dataset.from_generator(
        lambda: ({'text': row[text_key]} for row in column),
        output_signature={'text': tf.TensorSpec([], tf.string)})

  return seqio.FunctionDataSource(read, splits=list(dataset_dict))


# ----------------------------------------------------------------------------------------------
# Built-in corpora
# ----------------------------------------------------------------------------------------------

def register_gutenberg(data_dir: str | None = None) -> list[str]:
  """The Gutenberg tasks over `data_dir` ($UL2_GUTENBERG_DIR, else the bundled sample)."""
  data_dir = data_dir or os.environ.get(GUTENBERG_DIR_ENV) or BUNDLED_GUTENBERG_DIR
  return register_corpus('gutenberg', text_files_source(
      train=os.path.join(data_dir, 'gutenberg_train_*.txt'),
      validation=os.path.join(data_dir, 'gutenberg_validation_*.txt')))


def register_c4(tfds_name: str = 'c4/en:3.1.0', data_dir: str | None = None) -> list[str]:
  """C4 through TFDS. Building the task is offline; reading it needs the prepared dataset."""
  source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir,
                                splits={'train': 'train', 'validation': 'validation'})
  return register_corpus('c4', source)


register_gutenberg()
register_c4()
