"""The input pipeline: a seqio task or mixture -> this process's rows of each global batch,
with a position that a checkpoint saves and a restarted run restores exactly.

    data = DataConfig('ul2_mod_gutenberg', {'inputs': 128, 'targets': 128}, batch_size=16)
    batches = HostBatches(make_datasets(data, 'train', seed=0, repeat=True, shuffle=True),
                          input_layout(data, seed=0))
    next(batches)  # {'encoder_input_tokens': [16 / processes, 128] int32, ...}

Each process reads `DataConfig.input_shards / processes` logical shards (`seqio.ShardInfo`), so
the global batches do not depend on how many processes read them. Rows keep the names of
seqio's feature converter for the model's architecture: `EncDecFeatureConverter` for an
encoder-decoder (`encoder_input_tokens`, `decoder_target_tokens`, `decoder_input_tokens`,
`decoder_loss_weights`, and segment ids and positions when packed); `DecoderFeatureConverter`
for a decoder-only model, which concatenates inputs and targets into one row with the loss on
the targets only and `decoder_causal_attention` marking the inputs (`PrefixLMFeatureConverter`),
or, for a task with targets only, makes a plain causal LM row (`LMFeatureConverter`); lengths
{'inputs': 128, 'targets': 128} then give rows of 256.

A saved position only means something in the pipeline that produced it, so it is saved with
the pipeline's `input_layout`: the task, lengths, batch, shards, seed, processes and the
`stream_definition` of the task (its source files, preprocessors with their settings, output
features; for a mixture, each task's definition and rate). A resumed run compares the two and
names what changed (`HostBatches.layout_changes`).

TensorFlow and seqio are imported only where a pipeline is built, so a synthetic-data benchmark
runs on machines without them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import types
from typing import Any, Mapping, Sequence

import jax
import numpy as np


def _not_for_resumable_pipelines(record: logging.LogRecord) -> bool:
  """Drops seqio's warning that shuffling an uncached task (any text, jsonl or SuperGLUE
  source) repeats itself on restarts: ul2's pipelines save their position and resume it
  exactly (`HostBatches`), and evaluation's shuffles are seeded."""
  return not record.getMessage().startswith('Using an uncached FunctionDataset for training')


logging.getLogger('absl').addFilter(_not_for_resumable_pipelines)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which seqio task, at what lengths, in what batches."""

  task: str  # a registered seqio task or mixture, e.g. 'ul2_mod_gutenberg'
  feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {'inputs': 512, 'targets': 512})  # UL2: 512/512
  batch_size: int = 128  # global: all processes together (UL2 20B: 1024)
  # Logical input shards (seqio.ShardInfo); each process reads num/processes of them. Fixing
  # it makes the global batches independent of how many processes read them. None: one per
  # process.
  input_shards: int | None = None
  shuffle: bool = True
  pack: bool = True  # seqio.EncDecFeatureConverter(pack=True)
  use_cached: bool = False  # read a cache made by seqio's cache_tasks_main
  eval_split: str | None = 'validation'  # None: no validation


def hide_accelerators_from_tensorflow() -> None:
  """TensorFlow only feeds data: keep it off the accelerators JAX uses.

  TensorFlow is imported here first, with the process's stderr muted for the import alone:
  its C++ runtime prints INFO lines while loading (oneDNN, CUDA stubs), before
  TF_CPP_MIN_LOG_LEVEL or any other setting can apply. A failed import still raises.
  """
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow as tf
  except ImportError:
    return
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # GPUs already initialised by an earlier TF op: nothing to hide now
    pass


def check_task(name: str):
  """The registered seqio task or mixture `name`, or one line listing what is registered; a
  TFDS source that is not prepared is one line saying how to prepare it (seqio would try to
  download and build it, which for C4 needs Apache Beam and the network)."""
  import seqio

  try:
    task = seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    near = difflib.get_close_matches(name, known, n=1)
    hint = (f'Did you mean {near[0]!r}? ' if near else
            f'Registered: {", ".join(known)}. Import the module that registers it '
            '(--module=NAME, or gin: `import NAME`).')
    raise ValueError(f'Unknown task or mixture {name!r} (DataConfig.task / '
                     f'MIXTURE_OR_TASK_NAME). {hint}'.rstrip()) from None
  for sub in (task.tasks if isinstance(task, seqio.Mixture) else [task]):
    if isinstance(sub.source, seqio.TfdsDataSource):
      _check_tfds_prepared(sub.name, sub.source)
  return task


def _check_tfds_prepared(task: str, source) -> None:
  import tensorflow as tf

  loader = source.tfds_dataset
  data_dir = loader.data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')
  name, _, version = loader.name.partition(':')
  prepared = tf.io.gfile.glob(os.path.join(data_dir, name, version or '*', 'dataset_info.json'))
  if not prepared:
    raise FileNotFoundError(
        f'Task {task} reads the TFDS dataset {loader.name}, which is not prepared in '
        f'{data_dir}: prepare it once (`tfds build {name} --data_dir=DIR`; C4 needs Apache '
        'Beam and about 800 GB) and set TFDS_DATA_DIR=DIR (or register_c4(data_dir=DIR)).')


# ----------------------------------------------------------------------------------------------
# Shards and the input layout
# ----------------------------------------------------------------------------------------------

def total_input_shards(data: DataConfig) -> int:
  """The logical input shards of all processes together (default: one per process)."""
  return data.input_shards or jax.process_count()


def input_shards(data: DataConfig) -> list[int]:
  """The logical input shards this process reads."""
  processes = jax.process_count()
  total = total_input_shards(data)
  if total % processes:
    raise ValueError(f'DataConfig.input_shards={total} must be a multiple of the '
                     f'{processes} processes.')
  per_process = total // processes
  first = jax.process_index() * per_process
  return list(range(first, first + per_process))


def input_layout(data: DataConfig, seed: int,
                 architecture: str = 'encoder_decoder') -> dict[str, Any]:
  """Everything that decides which examples this process's training pipelines yield, in order."""
  layout = {'task': data.task, 'task_definition': stream_definition(data.task),
            'feature_lengths': dict(data.feature_lengths),
            'batch_size': data.batch_size, 'pack': data.pack, 'shuffle': data.shuffle,
            'use_cached': data.use_cached, 'seed': seed, 'processes': jax.process_count(),
            'input_shards': total_input_shards(data),
            'shards_of_this_process': input_shards(data)}
  if architecture != 'encoder_decoder':  # absent for encoder-decoders, as in older runs
    layout['feature_converter'] = FEATURE_CONVERTERS[architecture]
  return layout


def stream_definition(name: str) -> dict[str, Any]:
  """What defines the examples of a registered task or mixture, as JSON-ready data.

  A task: its source (files by name and size, not directory, so a moved checkout is the same
  stream), its preprocessors with their settings (a `MixtureOfDenoisers` shows its denoisers
  and rates) and its output features (the vocabulary by content). A mixture: each task's
  definition and mixing rate.

  >>> import seqio
  >>> from ul2 import denoisers, vocabulary
  >>> ul2r = denoisers.MixtureConfig(denoisers.UL2R_DENOISERS, denoisers.UL2R_RATES)
  >>> feature = seqio.Feature(vocabulary.get_vocabulary())
  >>> books = os.path.join(vocabulary.DATA_DIR, 'gutenberg_sample', 'gutenberg_validation_*')
  >>> _ = seqio.TaskRegistry.remove('doc_ul2r')
  >>> _ = seqio.TaskRegistry.add(
  ...     'doc_ul2r', seqio.TextLineDataSource({'validation': books}),
  ...     preprocessors=[denoisers.MixtureOfDenoisers(ul2r)],
  ...     output_features={'inputs': feature, 'targets': feature})
  >>> definition = stream_definition('doc_ul2r')
  >>> definition['source']['files']
  {'validation': [['gutenberg_validation_00.txt', 231780]]}
  >>> definition['preprocessors'][0]['config']['rates']
  [0.25, 0.25, 0.5]
  >>> [d['family'] for d in definition['preprocessors'][0]['config']['denoisers']]
  ['R', 'X', 'S']
  """
  import seqio

  provider = check_task(name)
  if isinstance(provider, seqio.Mixture):
    return {'mixture': {task.name: {'rate': float(provider.get_rate(task)),
                                    **stream_definition(task.name)}
                        for task in provider.tasks}}
  return _json({'source': _describe(provider.source),
                'preprocessors': [_describe(p) for p in provider.preprocessors],
                'output_features': {k: _describe(f)
                                    for k, f in sorted(provider.output_features.items())}})


def _json(value: Any) -> Any:
  """As JSON reads it back (tuples as lists), so a fresh copy compares equal to a saved one."""
  return json.loads(json.dumps(value))


def _describe(obj: Any, depth: int = 0) -> Any:
  """A stable, JSON-ready description of a pipeline component: never a memory address."""
  import seqio

  if depth > 8:
    return _type_name(obj)
  describe = functools.partial(_describe, depth=depth + 1)
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, (np.integer, np.floating)):
    return obj.item()
  if isinstance(obj, bytes):
    return obj.decode('utf-8', 'replace')
  if isinstance(obj, Mapping):
    return {str(k): describe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [describe(v) for v in obj]
  if isinstance(obj, functools.partial):
    return {'function': describe(obj.func), 'args': describe(obj.args),
            'keywords': describe(obj.keywords)}
  if isinstance(obj, types.FunctionType):
    name = _qualified(obj.__module__, obj.__qualname__)
    if not obj.__closure__:
      return name
    # Closures carry the settings of factory-made preprocessors and sources (a mode token,
    # a data directory, a text key).
    cells = {var: cell.cell_contents for var, cell in zip(obj.__code__.co_freevars,
                                                          obj.__closure__)}
    return {'function': name, 'closure': describe(cells)}
  if isinstance(obj, seqio.Feature):
    return {'vocabulary': describe(obj.vocabulary), 'add_eos': obj.add_eos,
            'dtype': obj.dtype.name, 'rank': obj.rank}
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {'type': _type_name(obj), **{f.name: describe(getattr(obj, f.name))
                                        for f in dataclasses.fields(obj)}}
  if isinstance(obj, seqio.SentencePieceVocabulary):
    return {'type': _type_name(obj), 'extra_ids': obj.extra_ids,
            'model_sha256': hashlib.sha256(obj.sp_model).hexdigest()}
  if isinstance(obj, seqio.FileDataSource):
    return {'type': _type_name(obj), 'files': {
        split: _files(obj._split_to_filepattern[split])  # pylint: disable=protected-access
        for split in obj.splits}}
  if isinstance(obj, seqio.FunctionDataSource):
    return {'type': _type_name(obj), 'splits': list(obj.splits),
            'dataset_fn': describe(obj._dataset_fn)}  # pylint: disable=protected-access
  if isinstance(obj, seqio.TfdsDataSource):
    return {'type': _type_name(obj), 'tfds_name': obj.tfds_dataset.name,
            'splits': list(obj.splits)}
  if type(obj).__module__.split('.')[0] in ('ul2', 'ul2_tasks'):  # our preprocessor classes
    return {'type': _type_name(obj), **describe(vars(obj))}
  return _type_name(obj)


def _type_name(obj: Any) -> str:
  return _qualified(type(obj).__module__, type(obj).__qualname__)


def _qualified(module: str, qualname: str) -> str:
  """'module.QualifiedName'; the project's task package under the name layouts were first
  written with, so runs saved before `tasks` became `ul2_tasks` still resume.

  >>> _qualified('ul2_tasks.pretrain', 'register_corpus.<locals>.read')
  'tasks.pretrain.register_corpus.<locals>.read'
  """
  if module.split('.')[0] == 'ul2_tasks':
    module = 'tasks' + module[len('ul2_tasks'):]
  return f'{module}.{qualname}'


def _files(patterns: str | Sequence[str]) -> list[list]:
  """[[name, bytes], ...] of the files a pattern matches (bytes None where not local)."""
  import tensorflow as tf

  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  paths = sorted({p for pattern in patterns for p in tf.io.gfile.glob(pattern)})
  return [[os.path.basename(p), os.path.getsize(p) if os.path.exists(p) else None]
          for p in paths]


# ----------------------------------------------------------------------------------------------
# Pipelines and batches
# ----------------------------------------------------------------------------------------------

# The seqio feature converter of each network.Config.architecture.
FEATURE_CONVERTERS = {'encoder_decoder': 'EncDecFeatureConverter',
                      'decoder_only': 'DecoderFeatureConverter'}


def feature_converter(data: DataConfig, architecture: str = 'encoder_decoder'):
  """seqio's converter of task features into the model's features, packing as `data.pack`."""
  import seqio

  if architecture == 'encoder_decoder' and 'inputs' not in data.feature_lengths:
    raise ValueError(f'DataConfig.feature_lengths {dict(data.feature_lengths)} has no '
                     "'inputs': an encoder-decoder needs inputs (a causal-LM task such as "
                     "'lm_gutenberg' is for decoder-only models: MODEL_ARCH = 'decoder_only').")
  return getattr(seqio, FEATURE_CONVERTERS[architecture])(pack=data.pack)


def make_datasets(data: DataConfig, split: str, seed: int, repeat: bool,
                  shuffle: bool, architecture: str = 'encoder_decoder', task=None) -> list:
  """One tf.data pipeline per input shard of this process, each batched to its rows (of
  `task`, a seqio Task object, instead of `data.task` when given)."""
  import seqio

  task = task or check_task(data.task)
  shards = input_shards(data)
  total = total_input_shards(data)
  rows = data.batch_size // total
  if data.batch_size % total:
    raise ValueError(f'Batch size {data.batch_size} must be divisible by the {total} input '
                     'shards.')
  converter = feature_converter(data, architecture)
  features = [k for k in ('inputs', 'targets') if k in data.feature_lengths]
  out = []
  for shard in shards:
    ds = task.get_dataset(dict(data.feature_lengths), split=split, shuffle=shuffle, seed=seed,
                          shard_info=seqio.ShardInfo(index=shard, num_shards=total),
                          num_epochs=None if repeat else 1, use_cached=data.use_cached)
    # Only the model's features: the converter would drop (and warn about) e.g. `denoiser`.
    ds = ds.map(lambda ex: {k: ex[k] for k in features})
    ds = converter(ds, dict(data.feature_lengths))
    out.append(ds.batch(rows, drop_remainder=True).prefetch(2))
  return out


def denoiser_tasks(name: str, denoisers: Sequence[Any]) -> dict[str, Any]:
  """{denoiser name: seqio Task}: task `name`'s corpus and text processing with one denoiser
  each instead of its objective (a Mixture-of-Denoisers, a causal LM): fixed streams on which
  any model of that corpus can be compared per denoiser, whatever it was trained on. The
  mixture settings (sentinel overflow, mode token ids) are the task's own when it has a
  mixture. {} for a task without an objective step (SuperGLUE) and for a mixture of tasks.

  >>> import ul2_tasks
  >>> from ul2 import denoisers as D
  >>> sorted(denoiser_tasks('t5_span_corruption_gutenberg', [D.R(3, 0.15), D.S()]))
  ['R(3,0.15)', 'S(uniform)']
  """
  import seqio

  from ul2 import denoisers as denoisers_lib

  task = check_task(name)
  if not isinstance(task, seqio.Task):
    return {}
  steps = list(task.preprocessors)
  at = [i for i, p in enumerate(steps) if isinstance(p, denoisers_lib.MixtureOfDenoisers)
        or p is denoisers_lib.causal_lm_chunks]
  if not at:
    return {}
  own = steps[at[0]].config if hasattr(steps[at[0]], 'config') else denoisers_lib.MixtureConfig()
  out = {}
  for d in denoisers:
    one = dataclasses.replace(own, denoisers=(d,), rates=None)
    out[d.name] = seqio.Task(
        f'{name}.' + re.sub(r'[^\w.]', '_', d.name), source=task.source,
        output_features=task.output_features,
        preprocessors=steps[:at[0]] + [denoisers_lib.MixtureOfDenoisers(one)] + steps[at[0] + 1:],
        metric_fns=[])
  return out


def denoiser_validation_batches(data: DataConfig, batches: int,
                                denoisers: Sequence[Any] | None = None,
                                architecture: str = 'encoder_decoder', log=print
                                ) -> dict[str, tuple[str, list[dict[str, np.ndarray]]]]:
  """{denoiser name: (its mode token, `batches` fixed host batches)} of `data.task`'s corpus
  on its `data.eval_split` split, one stream per denoiser (the paper's seven by default):
  what training validates per denoiser and `eval.py --by_denoiser` reports. {} for a task
  without a denoising or LM objective (SuperGLUE)."""
  import warnings

  from ul2 import denoisers as denoisers_lib

  chosen = denoisers or denoisers_lib.UL2_DENOISERS
  modes = {d.name: d.mode for d in chosen}
  lengths = dict(data.feature_lengths)
  if architecture == 'decoder_only' and 'inputs' not in lengths:
    # A causal-LM run: the denoisers' examples are inputs + targets in one row of its length.
    lengths = {'inputs': lengths['targets'] // 2, 'targets': lengths['targets'] // 2}
  data = dataclasses.replace(data, feature_lengths=lengths)
  out = {}
  with warnings.catch_warnings():  # short lengths: the training task already warned
    warnings.simplefilter('ignore', UserWarning)
    for name, task in denoiser_tasks(data.task, chosen).items():
      sets = make_datasets(data, data.eval_split, seed=0, repeat=False, shuffle=False,
                           architecture=architecture, task=task)
      got = [b for _, b in zip(range(batches), HostBatches(sets))]
      if got:
        out[name] = (modes[name], got)
      else:
        log(f'Validation split {data.eval_split!r} gave no full batch for denoiser {name}.')
  return out


class HostBatches:
  """Zips this process's shard pipelines into its rows of each global batch; checkpointable.

  The position is saved as tf.data iterator state. Pipelines that tf.data cannot serialise
  (a Python-generator source: jsonl, HF datasets, SuperGLUE) save the number of batches
  consumed instead and are replayed to it on restore: slower to resume, equally exact.
  """

  def __init__(self, datasets: Sequence, layout: Mapping[str, Any] | None = None):
    self.iterators = [iter(ds) for ds in datasets]
    self.consumed = 0
    # What the pipelines were built from (`input_layout`); saved beside the position.
    self.layout = _json(dict(layout or {}))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [{k: v.numpy() for k, v in next(it).items()} for it in self.iterators]
    self.consumed += 1
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def save(self, path: str) -> None:
    """Writes the position to `path`.* (a local path or a URL: TensorFlow's gfile)."""
    import tensorflow as tf
    tf.io.gfile.makedirs(path.rsplit('/', 1)[0] if '/' in path else '.')
    with tf.io.gfile.GFile(path + '.layout.json', 'w') as f:
      f.write(json.dumps(self.layout, indent=1))
    try:
      tf.train.Checkpoint(**self._named()).write(path)
    except tf.errors.FailedPreconditionError:  # e.g. "PyFunc is stateful"
      with tf.io.gfile.GFile(path + '.json', 'w') as f:
        f.write(json.dumps({'batches_consumed': self.consumed}))

  @staticmethod
  def saved(path: str) -> bool:
    import tensorflow as tf
    return tf.io.gfile.exists(path + '.index') or tf.io.gfile.exists(path + '.json')

  def layout_changes(self, path: str) -> list[str]:
    """The layout fields that differ from those the position at `path` was saved with."""
    import tensorflow as tf
    if not tf.io.gfile.exists(path + '.layout.json'):
      return []  # written before layouts were saved: nothing to compare
    with tf.io.gfile.GFile(path + '.layout.json') as f:
      return self._describe_changes(json.load(f))

  def _describe_changes(self, saved: Mapping[str, Any], most: int = 8) -> list[str]:
    """One 'field: saved -> now' per difference, nested fields by their dotted path.

    A field the saved layout lacks was added to layouts after it was written: not compared.
    A changed task implies a changed definition, so only the task is named.

    >>> batches = HostBatches([], {'task': 'c4', 'batch_size': 128,
    ...                            'task_definition': {'mixture': {'a': {'rate': 2.0}}}})
    >>> batches._describe_changes({'task': 'c4', 'batch_size': 64,
    ...                            'task_definition': {'mixture': {'a': {'rate': 1.0}}}})
    ['batch_size: 64 -> 128', 'task_definition.mixture.a.rate: 1.0 -> 2.0']
    """
    now = {k: v for k, v in self.layout.items() if k in saved}
    if saved.get('task') != now.get('task'):
      now.pop('task_definition', None)
      saved = {k: v for k, v in saved.items() if k != 'task_definition'}
    before, after = _flatten(saved), _flatten(now)
    changes = [f'{k}: {before.get(k)} -> {after.get(k)}'
               for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if len(changes) > most:
      changes = changes[:most] + [f'and {len(changes) - most} more']
    return changes

  def restore(self, path: str) -> None:
    import tensorflow as tf
    if tf.io.gfile.exists(path + '.index'):
      tf.train.Checkpoint(**self._named()).read(path).assert_consumed()
      return
    with tf.io.gfile.GFile(path + '.json') as f:
      target = json.load(f)['batches_consumed']
    while self.consumed < target:
      next(self)

  def _named(self):
    return {f'shard_{i}': it for i, it in enumerate(self.iterators)}


def _flatten(value: Any, prefix: str = '') -> dict[str, Any]:
  """Nested dicts and lists of them -> {'a.b.0.c': leaf}; scalars and lists of scalars are
  leaves.

  >>> _flatten({'a': {'b': 1, 'c': [2, 3]}, 'd': [{'e': 4}]})
  {'a.b': 1, 'a.c': [2, 3], 'd.0.e': 4}
  """
  if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
    value = {str(i): v for i, v in enumerate(value)}
  if not isinstance(value, dict) or not value:
    return {prefix: value}
  out = {}
  for k, v in value.items():
    out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
  return out
