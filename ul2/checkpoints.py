"""The model directory: its layout, saving and restoring a run, and reading any model back.

A training run writes everything into one `model_dir`:

    config.gin, operative_config.gin   the gin config as given / as used (scripts/train.py)
    model_config.json                  the network.Config, so eval and export need no gin
    checkpoints/<step>/                orbax: {'step', 'params', 'opt_state'}, the last N
    data/<step>/process_<i>.*          each process's input position at that step, with the
                                       input layout it belongs to (`ul2.data.HostBatches`)
    best/, best.json                   the parameters with the best task metric (fine-tuning)
    train/, validation/                TensorBoard event files

Parameters are saved with T5X's per-layer names even when the model scans its layers, so a
checkpoint is a T5X orbax tree: it restores into T5X and into a model with either layout.

`load(path)` reads any of these back, and the exported formats too, as `(params, config)`:

    params, config = load('runs/quickstart')               # latest checkpoints/<step>
    params, config = load('runs/quickstart_cb/best')       # the best fine-tuned parameters
    params, config = load('runs/quickstart/checkpoints/300')
    params, config = load('/models/ul2_hf')                # HF config.json + safetensors
    params, config = load('/t5x/checkpoint_1000', config)  # T5X: no config inside, pass one

Nothing else opens a model directory: the trainer (`init_from`), `eval.py`, `infer.py` and the
export scripts all come here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from ul2 import data as data_lib
from ul2 import adafactor, interop, network

MODEL_CONFIG = 'model_config.json'
CONFIG_GIN = 'config.gin'
OPERATIVE_CONFIG_GIN = 'operative_config.gin'
CHECKPOINTS = 'checkpoints'
DATA = 'data'
BEST = 'best'
BEST_JSON = 'best.json'


# ----------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------

def write_model_config(model_dir: str, config: network.Config) -> None:
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, MODEL_CONFIG), 'w') as f:
      json.dump(dataclasses.asdict(config), f, indent=1)


def write_gin_config(model_dir: str, text: str, operative: bool = False) -> str:
  """Writes config.gin (as given) or operative_config.gin (as used); returns the path."""
  path = os.path.join(model_dir, OPERATIVE_CONFIG_GIN if operative else CONFIG_GIN)
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(path, 'w') as f:
      f.write(text)
  return path


def read_model_config(path: str) -> network.Config:
  """The `model_config.json` of the model_dir that `path` is (or is inside of)."""
  path = os.path.abspath(path)
  while True:
    candidate = os.path.join(path, MODEL_CONFIG)
    if os.path.exists(candidate):
      with open(candidate) as f:
        return network.Config(**json.load(f))
    parent = os.path.dirname(path)
    if parent == path:
      raise FileNotFoundError(f'No {MODEL_CONFIG} in the checkpoint folder or above it; pass '
                              'the model with --gin_file=models/<size>.gin instead.')
    path = parent


# ----------------------------------------------------------------------------------------------
# Reading a model back
# ----------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str) -> str:
  """model_dir | model_dir/checkpoints | a step folder -> the latest step folder."""
  for candidate in (path, os.path.join(path, CHECKPOINTS)):
    if not os.path.isdir(candidate):
      continue
    steps = [d for d in os.listdir(candidate) if re.fullmatch(r'\d+', d)]
    if steps:
      return os.path.join(candidate, max(steps, key=int))
  if os.path.isdir(path):
    return path
  raise FileNotFoundError(f'No checkpoint at {path}.')


def load(path: str, config: network.Config | None = None, ignore_extra: bool = False
         ) -> tuple[Any, network.Config]:
  """(parameters, config) from any model we read, parameters laid out as `config` says
  (scanned or per-layer), checked against it.

  `path`: one of our model_dirs (its latest step), its checkpoints/ folder, a step folder or
  `best/`; an HF T5/UL2 directory (config.json + safetensors); a T5X model directory, its
  `checkpoint_<step>` or that folder's `state/` (tensorstore or orbax layout). `config`: the
  network to read into; None takes the directory's own (model_config.json, config.json),
  which a T5X folder does not have. `ignore_extra`: drop parameters the config lacks instead
  of refusing.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}.')
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
  if interop.is_hf_directory(path) or interop.find_t5x_checkpoint(path) is not None:
    return None, None
  tree = interop.read_orbax_tree(resolve_checkpoint(path))
  if 'opt_state' not in tree:
    return None, None
  return adafactor.AdafactorState(**tree['opt_state']), int(tree['step'])


def load_model(path: str, config: network.Config | None = None, ignore_extra: bool = False
               ) -> tuple[network.Transformer, Any]:
  """(model, params) for inference from `path` (as `load` reads it): dropout off."""
  params, config = load(path, config, ignore_extra)
  return network.Transformer(dataclasses.replace(config, dropout_rate=0.0)), params


# ----------------------------------------------------------------------------------------------
# A run's checkpoints and input positions
# ----------------------------------------------------------------------------------------------

class Checkpoints:
  """Orbax checkpoints of the train state plus each process's input position, per step.

  A step exists only once orbax has finalised it (it writes to a temporary directory and
  renames it), and the input positions are written before the state, so a listed step always
  has both.
  """

  def __init__(self, model_dir: str, model_cfg: network.Config, keep: int,
               async_checkpointing: bool = True):
    self.model_cfg = model_cfg
    self.data_dir = os.path.join(model_dir, DATA)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(model_dir, CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_checkpointing,
            cleanup_tmp_directories=True))

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def _data_path(self, step: int) -> str:
    return os.path.join(self.data_dir, str(step), f'process_{jax.process_index()}')

  def save(self, step: int, state: Any, batches: data_lib.HostBatches) -> None:
    """Saves `state` (a `train.TrainState`) and the input position of `batches` as `step`."""
    batches.save(self._data_path(step))
    item = {'step': state.step, 'params': network.unstack_layers(state.params, self.model_cfg),
            'opt_state': state.opt_state}
    self.manager.save(step, args=ocp.args.StandardSave(item), force=True)
    self._remove_stale_data()

  def _remove_stale_data(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.data_dir):
      return
    kept = set(self.manager.all_steps())
    oldest = min(kept) if kept else None
    for name in os.listdir(self.data_dir):
      if name.isdigit() and oldest is not None and int(name) < oldest:
        shutil.rmtree(os.path.join(self.data_dir, name), ignore_errors=True)

  def restore(self, step: int, abstract: Any, per_layer_shardings: Any) -> dict[str, Any]:
    """{'step', 'params', 'opt_state'} of `step`, sharded as `abstract` (a `TrainState` of
    `jax.ShapeDtypeStruct`s) and `per_layer_shardings` (the parameters' in the saved layout)
    say; the parameters in the run's layout (scanned or not)."""
    params_abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        network.unstack_layers(abstract.params, self.model_cfg),
        per_layer_shardings)
    item = {'step': abstract.step, 'params': params_abstract, 'opt_state': abstract.opt_state}
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(item))
    if self.model_cfg.scan_layers:
      restored['params'] = network.stack_layers(restored['params'], self.model_cfg)
    return restored

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# ----------------------------------------------------------------------------------------------
# The best parameters (fine-tuning)
# ----------------------------------------------------------------------------------------------

def read_best(model_dir: str) -> dict | None:
  """best.json: {'step', 'metric', 'value', 'metrics'} of `best/`, or None."""
  path = os.path.join(model_dir, BEST_JSON)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def save_best(model_dir: str, step: int, metric: str, metrics: Mapping[str, float],
              params: Any, config: network.Config) -> dict:
  """Writes `params` to model_dir/best/ and their metrics to best.json; returns the record."""
  path = os.path.abspath(os.path.join(model_dir, BEST))
  ocp.PyTreeCheckpointer().save(path, {'params': network.unstack_layers(params, config)},
                                force=True)
  best = {'step': step, 'metric': metric, 'value': metrics[metric], 'metrics': dict(metrics)}
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, BEST_JSON), 'w') as f:
      json.dump(best, f, indent=1)
  return best
