"""The model directory: its layout, saving and restoring a run, and reading any model back.

A training run writes everything into one `model_dir`:

    config.gin, operative_config.gin   the gin config as given / as used (scripts/train.py)
    model_config.json                  the network.Config, so eval and export need no gin
    checkpoint_<step>/state/           T5X's train state, as T5X's Orbax manager writes it:
                                       {'target': parameters, 'state': {'step',
                                       'param_states'}} (`interop.t5x_state_dict`), the last N;
                                       its _CHECKPOINT_METADATA says {"writer": "ul2"}
    data/<step>/process_<i>.*          each process's input position at that step, with the
                                       input layout it belongs to (`ul2.data.HostBatches`)
    data/<step>/process_<i>.manifest.json  checksums of the step's arrays and of that
                                       process's position files, written before orbax commits
                                       the step; a restore verifies them
    data/MANIFESTS                     says the steps have manifests: one missing is damage
    LEASE.json                         the run writing here (`Lease`): one writer at a time
    quarantine/<step>[.<n>]/           a checkpoint that failed to restore or to match its
                                       manifest, moved aside (never deleted)
    best/, best.json                   the parameters with the best task metric (fine-tuning)
    train/, validation/                TensorBoard event files

`model_dir` is a local path or a URL (`gs://bucket/run`, or any scheme TensorFlow's gfile
knows): URLs reach orbax, the position files, the config files and TensorBoard unchanged. A
scheme orbax does not write itself (ram://, hdfs://) has its checkpoints written to a local
copy first (`Checkpoints`), and models are read from a local copy of their folder (`load`).

Parameters (and Adafactor statistics) are saved per layer with T5X's names even when the model
scans its layers, so a model_dir is a T5X model directory: `python -m t5x.train` resumes it at
its step with its optimizer state, and a step T5X wrote there resumes here (unverified: T5X
writes no manifest; the input starts over). A model_dir of the earlier layout
(`checkpoints/<step>/`: {'step', 'params', 'opt_state'}) keeps it; one holding both layouts is
an error naming both (`checkpoint_kinds`), never a silent choice.

`load(path)` reads any of these back, and the exported formats too, as `(params, config)`:

    params, config = load('runs/quickstart')               # latest checkpoint_<step>
    params, config = load('runs/quickstart_cb/best')       # the best fine-tuned parameters
    params, config = load('runs/quickstart/checkpoint_300')
    params, config = load('/models/ul2_hf')                # HF config.json + safetensors
    params, config = load('/t5x/checkpoint_1000', config)  # T5X: no config inside, pass one

Nothing else opens a model directory: the trainer (`init_from`), `eval.py`, `infer.py` and the
export scripts all come here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ul2 import data as data_lib
from ul2 import adafactor, interop, network

MODEL_CONFIG = 'model_config.json'
CONFIG_GIN = 'config.gin'
OPERATIVE_CONFIG_GIN = 'operative_config.gin'
CHECKPOINTS = 'checkpoints'  # model_dir/checkpoints/<step>/: the layout before T5X's
WRITER = 'ul2'  # a step's custom metadata {'writer': 'ul2'}: written by a ul2 run
DATA = 'data'
BEST = 'best'
BEST_JSON = 'best.json'
QUARANTINE = 'quarantine'
MANIFEST_SUFFIX = '.manifest.json'  # data/<step>/process_<i>.manifest.json
# data/MANIFESTS: this model_dir's checkpoints are written with manifests, so a step without
# one (or with a malformed one) is damage; without it a step is from before manifests.
MANIFESTS_MARKER = 'MANIFESTS'


# ----------------------------------------------------------------------------------------------
# Paths: local, or URLs through TensorFlow's gfile (gs://, ram://, ...)
# ----------------------------------------------------------------------------------------------

def is_url(path: str) -> bool:
  """Whether `path` is a URL (scheme://...) rather than a local path.

  >>> is_url('gs://bucket/run'), is_url('runs/quickstart')
  (True, False)
  """
  return '://' in str(path)


def join(path: str, *parts: str) -> str:
  """`os.path.join` that leaves a URL a URL.

  >>> join('gs://bucket/run', 'checkpoints', '300')
  'gs://bucket/run/checkpoints/300'
  """
  return posixpath.join(str(path), *parts) if is_url(path) else os.path.join(path, *parts)


def parent(path: str) -> str:
  """`os.path.dirname` that leaves a URL a URL.

  >>> parent('gs://bucket/run/data/3/process_0')
  'gs://bucket/run/data/3'
  """
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL unchanged (`os.path.abspath('gs://b/r')` would make it
  the local folder './gs:/b/r').

  >>> absolute('gs://bucket/run')
  'gs://bucket/run'
  """
  return str(path) if is_url(path) else os.path.abspath(path)


def _gfile():
  import tensorflow as tf  # only for URLs: local files need no TensorFlow
  return tf.io.gfile


def scheme(path: str) -> str | None:
  """'gs' for 'gs://bucket/run'; None for a local path.

  >>> scheme('ram://bucket/run'), scheme('runs/quickstart')
  ('ram', None)
  """
  return str(path).split('://', 1)[0] if is_url(path) else None


# A bucket answers in well under a second; TensorFlow's client retries for minutes.
REACH_TIMEOUT_S = float(os.environ.get('UL2_REACH_TIMEOUT_S', 5))
BUCKET_SCHEMES = ('gs', 's3')


def check_reachable(path: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
  """Stops at once, in one line (`CheckpointError`), when `path` is a URL that cannot be
  reached: no answer within `timeout_s` (TensorFlow's GCS client retries the metadata server
  for credentials for minutes), an error (no network, no credentials), or (gs://, s3://) no
  bucket. A local path, or a URL that answers, returns at once ($UL2_REACH_TIMEOUT_S: the
  wait, 5 s by default).

  >>> check_reachable('runs/quickstart')  # local: nothing to check
  """
  if not is_url(path):
    return
  bucket = scheme(path) in BUCKET_SCHEMES
  root = ('://'.join((scheme(path), str(path).split('://', 1)[1].split('/', 1)[0]))
          if bucket else str(path))
  answer: dict[str, Any] = {}

  def probe():
    try:
      answer['exists'] = exists(root)
    except BaseException as e:  # reported by the caller's thread
      answer['error'] = e

  # A daemon thread: if the client never answers, the run still exits.
  thread = threading.Thread(target=probe, name='ul2-reach', daemon=True)
  thread.start()
  thread.join(timeout_s)
  what = f'model_dir or checkpoint {path}'
  if thread.is_alive():
    raise CheckpointError(
        f'{what}: {root} did not answer within {timeout_s:.0f} s; most likely there are no '
        'credentials (the client is still waiting for a token from the metadata server: set '
        'GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`) or '
        'no network.')
  if 'error' in answer:
    text = ' '.join(str(answer['error']).split())
    cause = ('no network (its host name does not resolve)' if 'resolve host' in text else
             'no credentials or no permission' if re.search(
                 r'\b40[13]\b|credential|permission|unauthori[sz]ed', text, re.I) else
             f'{type(answer["error"]).__name__}: {text[:200]}')
    raise CheckpointError(f'{what}: {root} cannot be reached: {cause}.')
  if bucket and not answer['exists']:
    raise CheckpointError(f'{what}: there is no bucket {root} (or no permission to see it); '
                          'create it or fix the URL.')


def orbax_writes(path: str) -> bool:
  """Whether orbax (tensorstore) reads and writes `path` itself: a local path, gs:// or
  s3://. A model_dir of another scheme gfile knows (ram://, hdfs://, ...) has its checkpoints
  written to a local folder by orbax and copied there (`Checkpoints`).

  >>> orbax_writes('gs://bucket/run'), orbax_writes('ram://bucket/run'), orbax_writes('runs/x')
  (True, False, True)
  """
  return scheme(path) in (None, 'gs', 's3')


def open_file(path: str, mode: str = 'r'):
  if not is_url(path):
    return open(path, mode)
  if 'w' in mode and scheme(path) == 'ram' and _gfile().exists(path):
    _gfile().remove(path)  # ram:// appends to a file opened for writing instead of replacing it
  return _gfile().GFile(path, mode)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def remove(path: str) -> None:
  """Deletes one file (local or URL); a file already gone is fine."""
  try:
    _gfile().remove(path) if is_url(path) else os.remove(path)
  except Exception:  # FileNotFoundError, or gfile's NotFoundError
    pass


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if not is_url(path):
    return os.listdir(path)
  names = [name.rstrip('/') for name in _gfile().listdir(path)]
  if scheme(path) == 'ram':  # ram:// lists the siblings its name prefixes: best/ has '.json'
    names = [name for name in names if _gfile().exists(join(path, name))]
  return names


def makedirs(path: str) -> None:
  """Creates the folder `path` and its parents; a URL whose scheme no filesystem here knows
  is a `CheckpointError` naming it."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    return
  import tensorflow as tf
  try:
    _gfile().makedirs(path)
  except tf.errors.UnimplementedError:
    raise CheckpointError(
        f'{path}: no filesystem for {scheme(path)}:// here (TensorFlow\'s gfile knows local '
        'paths, gs://, ram:// and the schemes of installed plugins); use a local path or '
        'gs://.') from None


def copy_tree(source: str, target: str) -> None:
  """Copies the folder `source` into `target` file by file, between any two filesystems
  (local, gs://, ram://, ...); every folder is created explicitly, which filesystems without
  real folders (ram://) need to list them."""
  makedirs(target)
  for name in listdir(source):
    here, there = join(source, name), join(target, name)
    if isdir(here):
      copy_tree(here, there)
    elif is_url(here) or is_url(there):
      with open_file(here, 'rb') as f, open_file(there, 'wb') as g:
        shutil.copyfileobj(f, g, 1 << 24)
    else:
      shutil.copyfile(here, there)


def move_tree(source: str, target: str) -> None:
  """Moves the folder `source` to `target`: a rename on a local disk; a copy, then the
  source removed, between URLs (gfile renames folders on ram:// without their files, and a
  folder rename is a copy on object stores anyway)."""
  if not is_url(source) and not is_url(target):
    os.rename(source, target)
  else:
    copy_tree(source, target)
    rmtree(source)


def rmtree(path: str) -> None:
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
  elif scheme(path) == 'ram':  # its own rmtree stops at the names `listdir` leaves out
    import tensorflow as tf
    for name in listdir(path) if isdir(path) else []:
      rmtree(join(path, name))
    try:
      _gfile().remove(path)  # a file or an emptied folder
    except tf.errors.NotFoundError:
      pass
  elif _gfile().exists(path):
    _gfile().rmtree(path)


def _orbax_path(path: str):
  """What orbax takes: an `epath.Path` for gs:// and s3:// (its own drivers), a local path
  made absolute."""
  if is_url(path):
    from etils import epath
    return epath.Path(path)
  return os.path.abspath(path)


# ----------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------

def _write_text(path: str, text: str) -> None:
  makedirs(parent(path))
  with open_file(path, 'w') as f:
    f.write(text)


def write_model_config(model_dir: str, config: network.Config) -> None:
  if jax.process_index() == 0:
    _write_text(join(model_dir, MODEL_CONFIG), json.dumps(dataclasses.asdict(config), indent=1))


def write_gin_config(model_dir: str, text: str, operative: bool = False) -> str:
  """Writes config.gin (as given) or operative_config.gin (as used); returns the path."""
  path = join(model_dir, OPERATIVE_CONFIG_GIN if operative else CONFIG_GIN)
  if jax.process_index() == 0:
    _write_text(path, text)
  return path


def read_model_config(path: str) -> network.Config:
  """The `model_config.json` of the model_dir that `path` is (or is inside of)."""
  path = absolute(path).rstrip('/')
  while True:
    candidate = join(path, MODEL_CONFIG)
    if exists(candidate):
      with open_file(candidate) as f:
        return network.Config(**json.load(f))
    above = parent(path)
    if above == path or above.endswith(':/'):
      raise FileNotFoundError(f'No {MODEL_CONFIG} in the checkpoint folder or above it; pass '
                              'the model with --gin_file=models/<size>.gin instead.')
    path = above


# ----------------------------------------------------------------------------------------------
# Reading a model back
# ----------------------------------------------------------------------------------------------

def _step_of(name: str, t5x_layout: bool) -> int | None:
  """The step a folder name stands for in a layout (T5X's `checkpoint_<step>`, or the
  earlier `<step>`), else None.

  >>> _step_of('checkpoint_300', True), _step_of('300', False), _step_of('best', True)
  (300, 300, None)
  """
  if t5x_layout:
    return interop.t5x_step(name)
  return int(name) if re.fullmatch(r'\d+', name) else None


def checkpoint_kinds(model_dir: str) -> tuple[list[int], list[int]]:
  """(steps in T5X's layout, model_dir/checkpoint_<step>/; steps in ul2's earlier layout,
  model_dir/checkpoints/<step>/), each sorted; ([], []) for a folder that is neither."""
  if not isdir(model_dir):
    return [], []
  names = listdir(model_dir)
  t5x = sorted(s for s in (_step_of(n, True) for n in names) if s is not None)
  earlier = []
  if CHECKPOINTS in names and isdir(join(model_dir, CHECKPOINTS)):
    earlier = sorted(s for s in (_step_of(n, False) for n in listdir(join(model_dir,
                                                                          CHECKPOINTS)))
                     if s is not None)
  return t5x, earlier


def _one_kind(model_dir: str) -> tuple[list[int], list[int]]:
  """`checkpoint_kinds`, of which at most one is non-empty: both at once is a
  `CheckpointError` naming them, so nothing picks silently between two runs' checkpoints
  (T5X pointed at a model_dir of the earlier layout starts from scratch beside it)."""
  t5x, earlier = checkpoint_kinds(model_dir)
  if t5x and earlier:
    raise CheckpointError(
        f'{model_dir} holds two kinds of checkpoints: {join(model_dir, CHECKPOINTS)}/'
        f'{earlier[-1]} (ul2\'s earlier layout, steps {earlier}) and '
        f'{join(model_dir, f"{interop.T5X_STEP_PREFIX}_{t5x[-1]}")} (T5X\'s layout, steps '
        f'{t5x}, which T5X writes when it trains in a model_dir it cannot read); name the one '
        'to use (its step folder), or move the other kind out of the model_dir.')
  return t5x, earlier


def _t5x_layout(model_dir: str) -> bool:
  """Whether `model_dir`'s checkpoints are (to be) in T5X's layout: yes, unless it holds
  steps in the earlier one (`_one_kind`)."""
  return not _one_kind(model_dir)[1]


def resolve_checkpoint(path: str) -> str:
  """model_dir | model_dir/checkpoints | a step folder -> the latest step folder."""
  check_reachable(path)
  t5x, _ = _one_kind(path)
  if t5x:
    return join(path, f'{interop.T5X_STEP_PREFIX}_{t5x[-1]}')
  for candidate in (path, join(path, CHECKPOINTS)):
    if not isdir(candidate):
      continue
    steps = [d for d in listdir(candidate) if re.fullmatch(r'\d+', d)]
    if steps:
      return join(candidate, max(steps, key=int))
  if isdir(path):
    return path
  raise FileNotFoundError(f'No checkpoint at {path}.')


def load(path: str, config: network.Config | None = None, ignore_extra: bool = False
         ) -> tuple[Any, network.Config]:
  """(parameters, config) from any model we read, parameters laid out as `config` says
  (scanned or per-layer), checked against it.

  `path`: one of our model_dirs (its latest step), a step folder (checkpoint_<step>/) or
  `best/`; an HF T5/UL2 directory (config.json + safetensors); a T5X model directory, its
  `checkpoint_<step>` or that folder's `state/` (tensorstore or orbax layout). `config`: the
  network to read into; None takes the directory's own (model_config.json, config.json),
  which a T5X folder does not have. `ignore_extra`: drop parameters the config lacks instead
  of refusing.
  """
  if not exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}: no such file or directory. Give a '
                            'model_dir, its checkpoint_<step> or best/, an HF or a T5X '
                            'checkpoint directory.')
  if is_url(path):  # resolve_checkpoint refuses two kinds of checkpoint
    with _local_copy(resolve_checkpoint(path)) as local:
      if config is None and not interop.is_hf_directory(local):
        config = read_model_config(path)  # above the step folder the copy holds
      return load(local, config, ignore_extra)
  _one_kind(path)
  if interop.is_hf_directory(path):
    params, hf_config = interop.load_hf(path)
    config = config or hf_config
    params = interop.match_params(params, config, path, ignore_extra)
  else:
    if config is None:
      config = read_model_config(path)
    if interop.find_t5x_checkpoint(path) is not None:
      params = interop.load_t5x(path, config, ignore_extra)  # matched against config there
    else:
      params = interop.match_params(interop.read_orbax_params(resolve_checkpoint(path)),
                                    config, path, ignore_extra)
  if config.scan_layers:
    params = network.stack_layers(params, config)
  return params, config


def read_optimizer_state(path: str) -> tuple[Any, int] | tuple[None, None]:
  """(Adafactor state, step) of one of our run checkpoints (`path` as `resolve_checkpoint`
  takes it), as host arrays; (None, None) for anything else (`best/`, exported models)."""
  if is_url(path):
    with _local_copy(resolve_checkpoint(path)) as local:
      return read_optimizer_state(local)
  if interop.is_hf_directory(path):
    return None, None
  _one_kind(path)
  found = interop.find_t5x_checkpoint(path)
  if found is not None:  # T5X's layout: ul2's runs now, or T5X's own orbax checkpoints
    if os.path.isfile(os.path.join(found, 'checkpoint')):
      return None, None  # T5X's tensorstore layout: its parameters are what we read
    state = interop.read_orbax_tree(found).get('state', {})
    if 'param_states' not in state:
      return None, None
    return interop.adafactor_from_t5x(state), int(state['step'])
  tree = interop.read_orbax_tree(resolve_checkpoint(path))
  if 'opt_state' not in tree:
    return None, None
  return adafactor.AdafactorState(**tree['opt_state']), int(tree['step'])


@contextlib.contextmanager
def _local_copy(url: str) -> Iterator[str]:
  """`with _local_copy(url) as local:` the folder `url` copied into a temporary local folder,
  removed after: what reads models (orbax's handlers, safetensors, T5X's tensorstore specs)
  then reads local files, whatever filesystem the model is on."""
  with tempfile.TemporaryDirectory(prefix='ul2-model-') as folder:
    local = os.path.join(folder, posixpath.basename(url.rstrip('/')) or 'model')
    copy_tree(url, local)
    yield local


def load_model(path: str, config: network.Config | None = None, ignore_extra: bool = False
               ) -> tuple[network.Model, Any]:
  """(model, params) for inference from `path` (as `load` reads it): dropout off."""
  params, config = load(path, config, ignore_extra)
  return network.build(dataclasses.replace(config, dropout_rate=0.0)), params


# ----------------------------------------------------------------------------------------------
# A run's checkpoints and input positions
# ----------------------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
  """A checkpoint cannot be saved or restored; the message is one line for the user."""


class Checkpoints:
  """Orbax checkpoints of the train state plus each process's input position, per step.

  A step exists only once orbax has finalised it (it writes to a temporary directory and
  renames it). Before that, each process writes its input position and a manifest: 64-bit
  checksums of every array of the state and sha256 of its position files. `restore_latest`
  verifies both and moves a step that fails aside, to the newest intact one.

  A state with a non-finite parameter or optimizer statistic is never saved (`save` raises
  `CheckpointError` naming the step and the last good checkpoint), and the step a run resumed
  from (verified) is kept by the rotation until `keep` newer steps exist.

  A model_dir orbax cannot write itself (`orbax_writes`: ram://, hdfs://, ...) is served by
  a local copy of its step folders (one process): orbax works on the copy, each save is
  committed there and then copied to model_dir/checkpoint_<step>, the steps the rotation
  removes are removed there too; a new run starts by copying model_dir's steps to a fresh
  local folder. Saves are then synchronous.
  """

  def __init__(self, model_dir: str, model_cfg: network.Config, keep: int,
               async_checkpointing: bool = True):
    self.model_cfg = model_cfg
    self.model_dir = str(model_dir)
    self.data_dir = join(model_dir, DATA)
    # T5X's layout, unless model_dir already holds checkpoints in the earlier one.
    self.t5x_layout = _t5x_layout(self.model_dir)
    self.directory = absolute(model_dir if self.t5x_layout else join(model_dir, CHECKPOINTS))
    self._stage = None if orbax_writes(model_dir) else self._stage_from(self.directory)
    self.keep = keep
    self.verified: int | None = None  # the step restored and verified, kept by the rotation
    self._saving: int | None = None  # the step of the save in flight
    self._checksums = jax.jit(_checksums_and_finite)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(n=keep), _KeepVerified(self, keep)])
    if self.t5x_layout:  # T5X's OrbaxCheckpointManagerInterface: the same names and handler
      handlers = {interop.T5X_STATE: ocp.PyTreeCheckpointHandler(use_ocdbt=True)}
      prefix = interop.T5X_STEP_PREFIX
    else:
      handlers, prefix = ocp.StandardCheckpointHandler(), None  # item_metadata reads shapes
    self.manager = ocp.CheckpointManager(
        _orbax_path(self.directory) if self._stage is None else self._stage,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_checkpointing,
            cleanup_tmp_directories=True, step_prefix=prefix))
    self._background = _BackgroundErrors()
    self._background.install()

  def _stage_from(self, remote: str) -> str:
    """A new local folder holding a copy of the steps in `remote` (a URL)."""
    if jax.process_count() > 1:
      raise CheckpointError(
          f'model_dir {self.model_dir}: orbax cannot write {scheme(remote)}:// itself, and '
          'the local copy that stands in for it serves one process; for a multi-process run '
          'use gs://, s3:// or a filesystem every process mounts.')
    makedirs(remote)
    stage = tempfile.mkdtemp(prefix='ul2-checkpoints-')
    for name in listdir(remote):
      if _step_of(name, self.t5x_layout) is not None:
        copy_tree(join(remote, name), os.path.join(stage, name))
    return stage

  def _upload(self) -> None:
    """Makes model_dir hold the local copy's steps: new ones copied (from the
    oldest), the ones the rotation removed removed."""
    steps = lambda names: {n for n in names if _step_of(n, self.t5x_layout) is not None}
    local, remote = steps(os.listdir(self._stage)), steps(listdir(self.directory))
    for name in sorted(local - remote, key=lambda n: _step_of(n, self.t5x_layout)):
      copy_tree(os.path.join(self._stage, name), join(self.directory, name))
    for name in remote - local:
      rmtree(join(self.directory, name))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _step_name(self, step: int) -> str:
    return f'{interop.T5X_STEP_PREFIX}_{step}' if self.t5x_layout else str(step)

  def step_dir(self, step: int) -> str:
    """The folder of `step`: model_dir/checkpoint_<step> (model_dir/checkpoints/<step> in a
    model_dir of the earlier layout)."""
    return join(self.directory, self._step_name(step))

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _data_path(self, step: int) -> str:
    return join(self.data_dir, str(step), f'process_{jax.process_index()}')

  def check_finite_loss(self, entries: list[dict[str, float]]) -> None:
    """Stops the run at the first step whose loss is NaN or infinite: the parameters after it
    are not worth saving over the good checkpoints."""
    for entry in entries:
      if not np.isfinite(entry['loss']):
        raise CheckpointError(
            f'Step {entry["step"]}: the loss is {entry["loss"]}, so nothing after step '
            f'{self.latest_step()} is saved; {self.describe_last_good()}. Resume from it with '
            'a lower learning rate or a different seed.')

  def describe_last_good(self) -> str:
    """'the last good checkpoint is step <n> in <dir>' (or that there is none)."""
    last = self.latest_step()
    return ('no checkpoint was saved before it' if last is None else
            f'the last good checkpoint is step {last} in {self.directory}')

  def save(self, step: int, state: Any, batches: data_lib.HostBatches) -> None:
    """Saves `state` (a `train.TrainState`) and the input position of `batches` as `step`.

    Raises `CheckpointError` (one line: the step, the path, the cause) when the state is not
    finite or a file cannot be written; the checkpoints already saved stay as they were.
    """
    self.wait()  # the previous save's outcome first (orbax would wait for it anyway)
    item = {'step': state.step, 'params': network.unstack_layers(state.params, self.model_cfg),
            'opt_state': state.opt_state}
    checksums, finite = jax.device_get(self._checksums(item))
    if not finite:
      raise CheckpointError(
          f'Step {step}: the parameters or optimizer state are not finite (NaN or inf), so '
          f'step {step} was not saved; {self.describe_last_good()}. Resume from it with a '
          'lower learning rate or a different seed.')
    path = self._data_path(step)
    try:
      marker = join(self.data_dir, MANIFESTS_MARKER)
      if jax.process_index() == 0 and not exists(marker):
        _write_text(marker, 'Every checkpoint of this model_dir has a manifest per process.\n')
      batches.save(path)
      _write_text(path + MANIFEST_SUFFIX, json.dumps(
          {'step': step, 'arrays': _flat_checksums(checksums),
           'files': _file_digests(path)}, indent=0))
      self._saving = step
      if self.t5x_layout:
        args = ocp.args.Composite(**{interop.T5X_STATE: ocp.args.PyTreeSave(
            interop.t5x_state_dict(item['params'], self.model_cfg, item['step'],
                                   item['opt_state']))})
      else:
        args = ocp.args.StandardSave(item)
      self.manager.save(step, args=args, force=True, custom_metadata={'writer': WRITER})
    except Exception as e:  # disk full, permissions, a vanished bucket...
      raise self._save_failed(step, e) from e
    if self._stage is not None:
      self.wait()  # committed locally, then copied to model_dir
    self._remove_stale_data()

  def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
    self._saving = None
    self._background.quiet_asyncio()
    try:  # its input position is no checkpoint's; orbax removes its partial step on restart
      folder, mine = join(self.data_dir, str(step)), f'process_{jax.process_index()}'
      for name in listdir(folder):
        if name == mine or name.startswith(mine + '.'):
          remove(join(folder, name))
      if not listdir(folder):
        rmtree(folder)
      self.manager.reload()  # the steps on disk, for describe_last_good
    except Exception:  # the error to report is the save's
      pass
    return CheckpointError(
        f'Saving checkpoint step {step} to {self.model_dir} failed{_write_cause(error)}. '
        f'Nothing after it was saved; {self.describe_last_good()} and intact. Fix the cause '
        '(free space, quota, permissions) and rerun the same command to resume.')

  def check(self) -> None:
    """Raises `CheckpointError` if the save in flight (async) has failed; cheap enough to call
    after every step, so that a failed save stops the run at the next step boundary.

    Orbax's background threads log their error and its manager's finalize thread consumes it
    (`check_for_errors` then says nothing): the error comes from `_BackgroundErrors`, and a
    save that ended without its step directory is a failure even without one. With several
    processes each verdict is agreed (one small collective per step while a save is in
    flight), so that all stop at the same step.
    """
    if self._saving is None:
      return
    error = self._background.take()
    if error is None:
      try:
        self.manager.check_for_errors()
      except Exception as e:
        error = e
    done = error is None and not self.manager.is_saving_in_progress()
    if done and self._stage is None and not isdir(self.step_dir(self._saving)):
      error = RuntimeError('orbax ended the save without its step directory')
    if jax.process_count() > 1:
      failed = _any_process(error is not None)
      error = error or (RuntimeError('it failed on another process') if failed else None)
      done = not _any_process(not done)
    if error is not None:
      raise self._save_failed(self._saving, error) from error
    if done and self._stage is None:
      self._saving = None

  def _remove_stale_data(self) -> None:
    if jax.process_index() != 0 or not isdir(self.data_dir):
      return
    kept = set(self.manager.all_steps())
    oldest = min(kept) if kept else None
    for name in listdir(self.data_dir):
      if name.isdigit() and oldest is not None and int(name) < oldest:
        rmtree(join(self.data_dir, name))

  def restore(self, step: int, abstract: Any, per_layer_shardings: Any,
              verify: bool = True) -> dict[str, Any]:
    """{'step', 'params', 'opt_state'} of `step`, sharded as `abstract` (a `TrainState` of
    `jax.ShapeDtypeStruct`s) and `per_layer_shardings` (the parameters' in the saved layout)
    say; the parameters in the run's layout (scanned or not). `verify=False` for a step
    another program wrote (`written_by_ul2`): there is no manifest to check it against.

    Raises `DamagedCheckpoint` when the step cannot be read or does not match its manifest,
    and `CheckpointError` when it is intact but holds another model.
    """
    params_abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        network.unstack_layers(abstract.params, self.model_cfg),
        per_layer_shardings)
    item = {'step': abstract.step, 'params': params_abstract, 'opt_state': abstract.opt_state}
    self._check_shapes(step, item)
    manifest = self._read_manifest(step) if verify else None
    try:
      restored = (self._restore_t5x(step, item) if self.t5x_layout else
                  self.manager.restore(step, args=ocp.args.StandardRestore(item)))
    except Exception as e:
      raise DamagedCheckpoint(_summary(e, 200)) from e
    if manifest is not None:
      got = _flat_checksums(jax.device_get(self._checksums(restored)[0]))
      bad = sorted(k for k in manifest['arrays'] if got.get(k) != manifest['arrays'][k])
      if bad:
        raise DamagedCheckpoint(f'{len(bad)} arrays differ from their manifest checksums, '
                                f'e.g. {bad[0]}')
    if self.model_cfg.scan_layers:
      restored['params'] = network.stack_layers(restored['params'], self.model_cfg)
    return restored

  def _restore_t5x(self, step: int, item: Mapping[str, Any]) -> dict[str, Any]:
    """`item` ({'step', 'params' per layer, 'opt_state'}, abstract) from T5X's tree: the
    parameters straight into their shardings; the Adafactor statistics per layer, then laid
    out (stacked if the model scans) and placed as the run shards them."""
    tree = interop.t5x_state_dict(item['params'], self.model_cfg, item['step'],
                                  item['opt_state'])

    def restore_args(x):
      if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      return ocp.RestoreArgs(restore_type=np.ndarray)  # a layer's slice of stacked statistics

    got = self.manager.restore(step, args=ocp.args.Composite(**{
        interop.T5X_STATE: ocp.args.PyTreeRestore(
            tree, restore_args=jax.tree.map(restore_args, tree))}))[interop.T5X_STATE]
    opt_state = jax.tree.map(_placed, interop.adafactor_from_t5x(got['state'], self.model_cfg),
                             item['opt_state'])
    # The count from the host: a buffer of its own (the step's is donated beside it).
    opt_state = opt_state._replace(count=_placed(np.asarray(got['state']['step']),
                                                 item['opt_state'].count))
    return {'step': got['state']['step'], 'params': got['target'], 'opt_state': opt_state}

  def written_by_ul2(self, step: int) -> bool:
    """Whether a ul2 run wrote `step` (its metadata says so, or it has a manifest); a step
    T5X wrote into the model_dir (T5X resumed the run) has neither."""
    if not self.t5x_layout:
      return True
    try:
      writer = (self.manager.metadata(step).custom_metadata or {}).get('writer')
    except Exception:  # unreadable metadata: the manifest decides
      writer = None
    return writer == WRITER or exists(self._data_path(step) + MANIFEST_SUFFIX)

  def _check_shapes(self, step: int, item: Any) -> None:
    """The saved tree's shapes against the run's: a damaged tree is `DamagedCheckpoint`, a
    different model `CheckpointError`."""
    try:
      metadata = self.manager.item_metadata(step)
      saved = (metadata[interop.T5X_STATE]['target'] if self.t5x_layout else
               metadata['params'])
      saved_shapes = {k: tuple(v.shape) for k, v in _flatten_tree(saved).items()}
    except Exception as e:
      raise DamagedCheckpoint(f'its metadata cannot be read: {_summary(e, 200)}') from e
    wanted = {k: tuple(v.shape) for k, v in _flatten_tree(item['params']).items()}
    if saved_shapes != wanted:
      differ = sorted(k for k in set(saved_shapes) | set(wanted)
                      if saved_shapes.get(k) != wanted.get(k))
      raise CheckpointError(
          f'Checkpoint step {step} in {self.directory} holds another model than this run\'s '
          f'({len(differ)} parameters differ, e.g. {differ[0]}: saved '
          f'{saved_shapes.get(differ[0])}, model {wanted.get(differ[0])}); run with the model '
          'config it was trained with, or use another model_dir.')

  def _read_manifest(self, step: int) -> dict | None:
    """This process's manifest of `step`, its position files verified; None for a
    checkpoint saved before manifests were written (only in a model_dir without the
    MANIFESTS marker: with it, a missing or malformed manifest is damage)."""
    path = self._data_path(step)
    if not exists(path + MANIFEST_SUFFIX):
      if exists(join(self.data_dir, MANIFESTS_MARKER)):
        raise DamagedCheckpoint(f'its manifest {path + MANIFEST_SUFFIX} is missing (this '
                                "model_dir's checkpoints are written with manifests)")
      return None
    try:
      with open_file(path + MANIFEST_SUFFIX) as f:
        manifest = json.load(f)
    except Exception as e:
      raise DamagedCheckpoint(f'its manifest {path + MANIFEST_SUFFIX} is unreadable '
                              f'({type(e).__name__})') from e
    if not (isinstance(manifest, dict) and isinstance(manifest.get('files'), dict)
            and isinstance(manifest.get('arrays'), dict)):
      raise DamagedCheckpoint(f'its manifest {path + MANIFEST_SUFFIX} is malformed (no '
                              "'files' and 'arrays' checksums)")
    files = _file_digests(path)
    bad = sorted(k for k in manifest['files'] if files.get(k) != manifest['files'][k])
    if bad:
      raise DamagedCheckpoint(f'input position file {bad[0]} differs from its manifest')
    return manifest

  def restore_latest(self, abstract: Any, per_layer_shardings: Any,
                     batches: data_lib.HostBatches | None, resume_input: str = 'exact',
                     log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The newest intact checkpoint (`restore`), with `batches` moved to its position; None
    when there is no checkpoint.

    A step that cannot be read or fails its manifest is moved to model_dir/quarantine/ with
    one warning line, and the next newest is tried; all processes agree on each verdict.
    """
    steps = sorted(self.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      ours = self.written_by_ul2(step)
      try:
        restored, error = self.restore(step, abstract, per_layer_shardings, ours), None
      except DamagedCheckpoint as e:
        restored, error = None, str(e)
      if _any_process(error is not None):
        error = error or 'damaged on another process'
        where = self.quarantine(step)
        damaged.append(step)
        rest = [s for s in steps if s < step]
        log(f'WARNING: checkpoint step {step} is damaged ({error}); moved to {where}; '
            + (f'trying step {rest[0]}.' if rest else 'no older checkpoint is left.'))
        continue
      if not ours:
        log(f'WARNING: {self.step_dir(step)} was not written by ul2 (no ul2 metadata or '
            'manifest: T5X resumed this run?): its arrays are not verified, and it has no '
            'input position, so the input pipeline starts from its beginning.')
      elif batches is not None:
        self.restore_position(step, batches, resume_input, log)
      self.verified = step
      self._trim()
      return restored
    if damaged:
      raise CheckpointError(
          f'No intact checkpoint in {self.directory}: steps {damaged} are damaged and were '
          f'moved to {join(self.model_dir, QUARANTINE)}. Rerun to start the run from its '
          'beginning, or restore a copy of a checkpoint first.')
    return None

  def _trim(self) -> None:
    """Applies the rotation to the steps a previous process left: one killed after a save was
    committed and before the oldest step was removed leaves `keep` + 1 (at 18, 21, 24 with
    keep=2 and 24 verified, 18 goes now rather than at this run's first save)."""
    steps = sorted(self.all_steps())
    for step in steps[:-self.keep]:
      if step != self.verified:
        self.manager.delete(step)
        if self._stage is not None:
          rmtree(self.step_dir(step))
    self._remove_stale_data()

  def quarantine(self, step: int) -> str:
    """Moves `step`'s checkpoint and input positions to model_dir/quarantine/<step>[.<n>]/."""
    target = join(self.model_dir, QUARANTINE, str(step))
    n = 0
    while exists(target):
      n += 1
      target = join(self.model_dir, QUARANTINE, f'{step}.{n}')
    if jax.process_index() == 0:
      makedirs(target)
      for source, name in ((self.step_dir(step), CHECKPOINTS),
                           (join(self.data_dir, str(step)), DATA)):
        if exists(source):
          move_tree(source, join(target, name))
      if self._stage is not None:
        shutil.rmtree(os.path.join(self._stage, self._step_name(step)), ignore_errors=True)
    _sync(f'quarantine_{step}')
    self.manager.reload()
    return target

  def restore_position(self, step: int, batches: data_lib.HostBatches,
                       resume_input: str = 'exact',
                       log: Callable[[str], None] = print) -> None:
    """Moves `batches` to its position at `step`, if it is still the pipeline that saved it.

    A changed pipeline (`HostBatches.layout_changes`) is refused with the differences named,
    or with `resume_input='restart'` left at its beginning.
    """
    path = self._data_path(step)
    if not data_lib.HostBatches.saved(path):
      changes = [f'no input position for process {jax.process_index()} at {path} (written '
                 'by fewer processes?)']
    else:
      changes = batches.layout_changes(path)
    if not changes:
      batches.restore(path)
    elif resume_input == 'restart':
      log(f'The input pipeline changed since step {step} ({"; ".join(changes)}): it starts '
          'from its beginning (TrainConfig.resume_input=restart).')
    else:
      raise ValueError(
          f'Cannot resume the input position of checkpoint step {step}: the input pipeline '
          f'changed ({"; ".join(changes)}). Run with the settings it was written with, or '
          "set TrainConfig.resume_input='restart' (flag: --gin.train.TrainConfig."
          """resume_input="'restart'") to keep the model and optimizer state and start the """
          'new pipeline from its beginning.')

  def wait(self) -> None:
    """Blocks until the save in flight is committed; `CheckpointError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if self._saving is None:
        raise
      raise self._save_failed(self._saving, e) from e
    saving = self._saving
    self.check()
    self._saving = saving
    if self._stage is not None and self._saving is not None:
      try:
        self._upload()
      except Exception as e:  # the step is not in model_dir: not a good checkpoint
        shutil.rmtree(os.path.join(self._stage, self._step_name(self._saving)),
                      ignore_errors=True)
        self.manager.reload()
        raise self._save_failed(self._saving, e) from e
    self._saving = None

  def close(self) -> None:
    try:
      self.manager.close()
    finally:
      self._background.uninstall()
    if self._stage is not None:
      shutil.rmtree(self._stage, ignore_errors=True)

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Commits the save in flight (the state it holds was good) and closes the manager,
    also when the run stops on an error."""
    if exc_type is None:
      self.wait()
    else:
      try:
        self.wait()
      except Exception:  # the run's own error is the one to report
        pass
    self.close()


LEASE = 'LEASE.json'  # model_dir/LEASE.json: the run writing into it


class Lease:
  """One writer per model_dir: a run holds `model_dir/LEASE.json` (host, process id, start,
  heartbeat) while it runs, and a second run refuses to start in one line naming the holder.

  The file is created only if absent: `O_CREAT | O_EXCL` on a local disk. gfile (URLs) has no
  create-if-absent precondition, so there it is check, write, and read back `settle_s` later:
  of two runs racing, the one whose record was overwritten refuses. Two writes further apart
  than that can still both pass, so every heartbeat reads the lease first: a run whose lease
  now holds another run's record stops at its next step (`check`) instead of writing on. A
  lease is stale, and taken over with a note, when its process is gone (same host) or its
  heartbeat, rewritten every `heartbeat_s`, is older than `stale_s` (another host: a run killed
  there). A multi-host job holds one lease: process 0 takes it and every process learns
  whether it did.
  """

  def __init__(self, model_dir: str, heartbeat_s: float = 30.0, stale_s: float = 600.0,
               settle_s: float = 1.0):
    self.path = join(model_dir, LEASE)
    self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.held = False
    self.lost: dict | None = None  # the record that replaced ours, seen by a heartbeat

  def _record(self, started: float) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': started,
                       'heartbeat': time.time()})

  @staticmethod
  def _ours(holder: dict | None, started: float) -> bool:
    return bool(holder) and (holder.get('host'), holder.get('pid'), holder.get('started')) == (
        socket.gethostname(), os.getpid(), started)

  def _holder(self) -> dict | None:
    try:
      with open_file(self.path) as f:
        return json.loads(f.read())
    except Exception:  # vanished or cut short: nobody to name
      return None

  def _stale(self, holder: dict) -> str | None:
    """Why `holder` no longer writes here (None: it may still)."""
    if holder.get('host') == socket.gethostname():
      if holder.get('pid') == os.getpid():
        return 'this process'
      try:
        os.kill(int(holder['pid']), 0)
      except ProcessLookupError:
        return f'process {holder["pid"]} on this host has ended'
      except (PermissionError, KeyError, TypeError, ValueError):
        pass
    age = time.time() - float(holder.get('heartbeat', 0))
    return f'its heartbeat is {age:.0f} s old' if age > self.stale_s else None

  def _create(self, started: float) -> bool:
    text = self._record(started)
    if is_url(self.path):
      if exists(self.path):
        return False
      _write_text(self.path, text)
      time.sleep(self.settle_s)  # a run racing us has written by now: the last write wins
      return self._ours(self._holder(), started)
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def acquire(self, log: Callable[[str], None] = print) -> Lease:
    """Takes the lease (process 0) or raises `CheckpointError` naming who holds it."""
    refusal = None
    if jax.process_index() == 0:
      started = time.time()
      if not self._create(started):
        holder = self._holder() or {}
        why = self._stale(holder)
        if why is None:
          age = time.time() - float(holder.get('heartbeat', 0))
          refusal = (f'{parent(self.path)} is being written by process {holder.get("pid")} '
                     f'on {holder.get("host")} (heartbeat {age:.0f} s ago): wait for it to '
                     'end, use another MODEL_DIR, or, if that run is gone, delete '
                     f'{self.path}.')
        else:
          if why != 'this process':
            log(f'note: taking over {self.path} ({why}).')
          _write_text(self.path, self._record(started))
      if refusal is None:
        self.held = True
        self._thread = threading.Thread(target=self._beat, args=(started,), daemon=True)
        self._thread.start()
    if jax.process_count() > 1:  # the job starts, or stops, as one
      from jax.experimental import multihost_utils
      ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
      if not ok and refusal is None:
        refusal = f'process 0 could not take the lease on {parent(self.path)}.'
    if refusal is not None:
      raise CheckpointError(refusal)
    return self

  def _beat(self, started: float) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._holder()
        if holder is not None and not self._ours(holder, started):
          self.lost = holder  # another run writes here now: stop (check), never overwrite
          return
        _write_text(self.path, self._record(started))
      except Exception:  # a missed beat only ages the lease
        pass

  def check(self, saving: bool = False) -> None:
    """Raises `CheckpointError` once a heartbeat found another run's record in the lease: at
    any step with one process; with several at a checkpoint (`saving`), all agreeing."""
    lost = self.lost is not None
    if jax.process_count() > 1:
      if not saving:
        return
      lost = _any_process(lost)
    if lost:
      holder = self.lost or self._holder() or {}
      raise CheckpointError(
          f'{parent(self.path)} is now written by process {holder.get("pid")} on '
          f'{holder.get("host")}, which took the lease; this run stops so that one writer '
          'remains. Stop one of the two runs and resume with the same command.')

  def release(self) -> None:
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._holder() or {}
    if holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
      remove(self.path)
    self.held = False

  def __enter__(self) -> Lease:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class DamagedCheckpoint(Exception):
  """A step that cannot be read or does not match its manifest (the message says how)."""


class _KeepVerified:
  """Orbax preservation policy: keep the step the run resumed from (verified against its
  manifest) until `keep` steps newer than it exist, so that the rotation never leaves the
  run with fewer intact checkpoints than it had, and never keeps more than `keep` for long."""

  def __init__(self, checkpoints: Checkpoints, keep: int):
    self.checkpoints, self.keep = checkpoints, keep

  def should_preserve(self, checkpoints, *, context):
    verified = self.checkpoints.verified
    newer = sum(1 for c in checkpoints if verified is not None and c.step > verified)
    return [c.step == verified and newer < self.keep for c in checkpoints]


def _placed(x: Any, abstract: jax.ShapeDtypeStruct) -> jax.Array:
  """`x` (a host or device array holding the whole value on every process) as a global array
  sharded as `abstract` says."""
  if isinstance(x, jax.Array) and x.sharding == abstract.sharding:
    return x
  host = np.asarray(jax.device_get(x), abstract.dtype)
  return jax.make_array_from_callback(host.shape, abstract.sharding, lambda index: host[index])


def _array_checksum(x: jax.Array) -> jax.Array:
  """Two 32-bit lanes of a position-dependent sum over the bits of `x` ([2] uint32).

  Each element is mixed with its index by a bijection, so changing any one element changes
  both lanes; computed by XLA on the sharded array, so every process gets the same value
  whatever the sharding, without gathering the array.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
  i = jax.lax.iota(jnp.uint32, bits.size)
  a = (bits ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  a = a ^ (a >> 16)
  b = (bits + i * jnp.uint32(0xC2B2AE35)) * jnp.uint32(0x27D4EB2F)
  b = b ^ (b >> 15)
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


def _checksums_and_finite(tree: Any) -> tuple[Any, jax.Array]:
  """(a checksum per leaf, whether every floating-point leaf is finite)."""
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jax.tree.map(_array_checksum, tree), jnp.all(jnp.stack(finite or [jnp.bool_(True)]))


def _flatten_tree(tree: Any) -> dict[str, Any]:
  """{'params/encoder/...': leaf}: the names a manifest uses.

  >>> _flatten_tree({'params': {'a': 1, 'b': [2, 3]}})
  {'params/a': 1, 'params/b/0': 2, 'params/b/1': 3}
  """
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                    for k in path)
  return {name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_checksums(checksums: Any) -> dict[str, str]:
  return {k: '%08x%08x' % tuple(int(v) for v in np.asarray(c))
          for k, c in _flatten_tree(checksums).items()}


def _file_digests(path: str) -> dict[str, str]:
  """sha256 of this process's position files (`<path>.*` but the manifest)."""
  folder, prefix = parent(path), path[len(parent(path)):].lstrip('/')
  digests = {}
  for name in sorted(listdir(folder)):
    if name.startswith(prefix + '.') and not name.endswith(MANIFEST_SUFFIX):
      with open_file(join(folder, name), 'rb') as f:
        digests[name] = hashlib.sha256(f.read()).hexdigest()
  return digests


class _BackgroundErrors(logging.Filter):
  """Keeps the first error orbax's background save threads log, for `Checkpoints.check`, and
  keeps their tracebacks (one per thread, and one per tensorstore callback that finds the
  save's event loop closed) out of the run's output; UL2_TRACEBACK=1 lets them through. Also
  drops orbax's warning that a step's item has no handler here: T5X's `dataset` item, in a
  step T5X wrote, which ul2 does not read (`restore_latest` says what such a step means)."""

  def __init__(self):
    super().__init__()
    self.error: BaseException | None = None
    self._hook = None

  def filter(self, record: logging.LogRecord) -> bool:
    if 'orbax' in record.pathname and 'could not be restored' in str(record.msg):
      return False
    if record.levelno < logging.ERROR or 'orbax' not in record.pathname:
      return True
    if record.exc_info and record.exc_info[1] is not None and self.error is None:
      self.error = record.exc_info[1]
    return bool(os.environ.get('UL2_TRACEBACK')) or not (record.exc_info or self.error)

  @staticmethod
  def quiet_asyncio() -> None:
    """After a failed save, the futures of its other writes report 'exception was never
    retrieved' when the interpreter collects them, at exit: the error was reported."""
    if not os.environ.get('UL2_TRACEBACK'):
      logging.getLogger('asyncio').addFilter(
          lambda record: 'exception was never retrieved' not in str(record.msg))

  def take(self) -> BaseException | None:
    error, self.error = self.error, None
    return error

  def _unraisable(self, unraisable) -> None:
    closed = (isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == 'Event loop is closed')
    if not closed or os.environ.get('UL2_TRACEBACK'):
      self._hook(unraisable)

  def install(self) -> None:
    logging.getLogger('absl').addFilter(self)
    self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

  def uninstall(self) -> None:
    logging.getLogger('absl').removeFilter(self)
    if sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._hook


def _write_cause(error: BaseException) -> str:
  """' writing <file>: <cause>' from a write error (an OSError, or the text tensorstore and
  TensorFlow put around one), else ': <its message>' on one line.

  >>> _write_cause(OSError(27, 'File too large', '/run/checkpoint_6/state/d/8a2f'))
  ' writing /run/checkpoint_6/state/d/8a2f: File too large'
  >>> _write_cause(ValueError('OUT_OF_RANGE: Error writing "params.x/0" in OCDBT database at '
  ...     'local file "/run/c/": Failed writing: "/run/c/d/8a2f": Failed to write 6041600 '
  ...     "bytes to file 7: File too large [os_error_code='27']"))
  ' writing /run/c/d/8a2f: File too large'
  """
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.filename and e.strerror:
      return f' writing {e.filename}: {e.strerror}'
  text = ' '.join(str(error).split())
  paths = re.findall(r'(?:[a-z][a-z0-9+]*://|/)[^\s"\';,\]\[]+', text)
  cause = re.sub(r'\s*\[[^\]]*\]\s*$', '', re.split(r': |; ', text)[-1]).strip()
  if paths and cause and len(cause) < 200:
    return f' writing {paths[-1]}: {cause}'
  return f': {_summary(error, 300)}'


def _summary(error: BaseException, limit: int) -> str:
  """An error's message on one line, at most `limit` characters (its type if it has none)."""
  return ' '.join(str(error).split())[:limit] or type(error).__name__


def _any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (the same answer everywhere)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# The best parameters (fine-tuning)
# ----------------------------------------------------------------------------------------------

def read_best(model_dir: str) -> dict | None:
  """best.json: {'step', 'metric', 'value', 'metrics', 'selection'} of `best/`, or None.

  `model_dir` may also be the `best/` folder itself."""
  model_dir = str(model_dir).rstrip('/')
  if posixpath.basename(model_dir) == BEST:
    model_dir = parent(model_dir)
  path = join(model_dir, BEST_JSON)
  if not exists(path):
    return None
  with open_file(path) as f:
    return json.load(f)


def best_selection(path: str) -> dict[str, str]:
  """How the parameters at `path` were selected ({'method', 'mode'} from best.json) when
  `path` is a run's best/ folder; {} for anything else.

  >>> best_selection('runs/no_such_run/checkpoints/3')
  {}
  """
  if posixpath.basename(str(path).rstrip('/')) != BEST:
    return {}
  return (read_best(path) or {}).get('selection', {})


def save_best(model_dir: str, step: int, metric: str, metrics: Mapping[str, float],
              params: Any, config: network.Config,
              selection: Mapping[str, str] | None = None) -> dict:
  """Writes `params` to model_dir/best/ and their metrics to best.json; returns the record.

  `selection`: how the metrics were computed, {'method': 'decode', 'mode': '[NLU]'}: what
  evaluating the best parameters should default to."""
  path, tree = join(model_dir, BEST), {'params': network.unstack_layers(params, config)}
  if orbax_writes(path):
    ocp.PyTreeCheckpointer().save(_orbax_path(path), tree, force=True)
  else:
    with tempfile.TemporaryDirectory() as local:
      ocp.PyTreeCheckpointer().save(os.path.join(local, BEST), tree, force=True)
      if jax.process_index() == 0:
        rmtree(path)
        copy_tree(os.path.join(local, BEST), path)
  best = {'step': step, 'metric': metric, 'value': metrics[metric], 'metrics': dict(metrics),
          'selection': dict(selection or {})}
  if jax.process_index() == 0:
    _write_text(join(model_dir, BEST_JSON), json.dumps(best, indent=1))
  return best
