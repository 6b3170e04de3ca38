"""The T5X-style trainer: a pure, jitted `train_step(state, batch) -> (state, metrics)` and one
readable loop around it.

    state = init_state(...)                   # initialised directly sharded on the mesh
    for step in range(start, steps):          # data: per-host seqio batches -> global arrays
      state, metrics = train_step(state, batch)
      ... log, validate, checkpoint ...

Objective (reference §3): cross-entropy on `decoder_loss_weights` plus z-loss
(`z_loss * logsumexp(logits)^2`, 1e-4), normalised by the real target tokens of the global
batch, so k microbatches give the same gradient as one full batch. Optimiser: Adafactor with
T5X's settings (factored second moments for dims >= 128, decay rate 0.8, update clipping 1.0,
no momentum, updates scaled by the parameter's RMS except for `relpos_bias`, epsilon 1e-30).
Learning rate: T5X's `1 / sqrt(max(step, 10000))` by default; constant, linear and cosine
decay (with linear warmup) on request.

Everything written goes to `model_dir`: `checkpoints/<step>/` (orbax, asynchronous, the last
`keep_checkpoints`), `data/<step>/` (each process's input-iterator position, so a restarted run
sees exactly the batches an uninterrupted one would), `train/` and `validation/` (TensorBoard).
This module imports TensorFlow and seqio only when it builds a seqio input pipeline, so a
synthetic-data benchmark runs on machines without them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from ul2 import network, partitioning

Batch = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Configuration: one typed config per component
# ----------------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adafactor and its learning-rate schedule, with T5X's defaults."""

  # 'rsqrt': learning_rate / sqrt(max(step, warmup_steps)) (T5X pretraining: 1.0 and 10k).
  # 'constant', 'linear', 'cosine': linear warmup to learning_rate over warmup_steps, then
  # constant or decayed to end_learning_rate at decay_steps (default: the training steps).
  schedule: str = 'rsqrt'
  learning_rate: float = 1.0
  warmup_steps: int = 10_000
  decay_steps: int | None = None
  end_learning_rate: float = 0.0
  decay_rate: float = 0.8  # second-moment decay 1 - (step + 1)^-0.8
  clipping_threshold: float | None = 1.0  # update clipping by block RMS
  min_dim_size_to_factor: int = 128
  multiply_by_parameter_scale: bool = True  # never for relpos_bias (as T5X)
  epsilon1: float = 1e-30

  def __post_init__(self):
    if self.schedule not in ('rsqrt', 'constant', 'linear', 'cosine'):
      raise ValueError("OptimizerConfig.schedule must be 'rsqrt', 'constant', 'linear' or "
                       f"'cosine', got {self.schedule!r}.")
    if self.warmup_steps < 0 or self.learning_rate <= 0:
      raise ValueError('OptimizerConfig needs learning_rate > 0 and warmup_steps >= 0, got '
                       f'{self.learning_rate} and {self.warmup_steps}.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The run: how long, where to write, how often to validate, checkpoint and log."""

  model_dir: str
  steps: int  # total: a restarted run continues up to this step
  microbatches: int = 1  # gradient accumulation: the batch is split into this many
  z_loss: float = 1e-4
  # 'num_real_target_tokens' (the loss is a mean over real target tokens of the global batch)
  # or a constant such as batch_size * targets_length (T5X's loss_normalizing_factor).
  loss_normalizing_factor: str | float = 'num_real_target_tokens'
  seed: int = 0  # parameter initialisation and dropout
  eval_every: int = 500
  eval_batches: int = 10
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  # Task metrics (greedy decoding, the task's postprocessor and metric functions) on the
  # validation split every this many steps and at the end; None: loss only.
  metrics_every: int | None = None
  metrics_examples: int | None = None  # None: the whole split
  # Keep the parameters with the best value of this metric in model_dir/best/ (fine-tuning).
  keep_best: str | None = None
  # Start a new run from pretrained weights: an HF T5/UL2 directory, a T5X checkpoint or one
  # of ours (optimizer state starts fresh). Ignored once model_dir has a checkpoint.
  init_from: str | None = None
  # Peak FLOP/s of one device for MFU; None looks the device kind up in PEAK_FLOPS.
  peak_flops_per_device: float | None = None
  progress_bar: bool = True
  # A resumed run restores its input position only into the same input pipeline (task,
  # lengths, batch size, shards, seed...). 'exact': any change is an error; 'restart': keep
  # the restored model and optimizer state and start the changed pipeline from its beginning.
  resume_input: str = 'exact'

  def __post_init__(self):
    for name in ('steps', 'microbatches', 'eval_every', 'checkpoint_every', 'log_every',
                 'keep_checkpoints'):
      if getattr(self, name) < 1:
        raise ValueError(f'TrainConfig.{name} must be >= 1, got {getattr(self, name)}.')
    if self.resume_input not in ('exact', 'restart'):
      raise ValueError("TrainConfig.resume_input must be 'exact' or 'restart', got "
                       f'{self.resume_input!r}.')
    if not (self.loss_normalizing_factor == 'num_real_target_tokens'
            or isinstance(self.loss_normalizing_factor, (int, float))):
      raise ValueError("TrainConfig.loss_normalizing_factor must be 'num_real_target_tokens' "
                       f'or a number, got {self.loss_normalizing_factor!r}.')


# Dense bfloat16 peak FLOP/s per chip, by `jax.Device.device_kind` prefix.
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6': 918e12, 'NVIDIA A100': 312e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12,
}


def peak_flops(device: jax.Device) -> float | None:
  for prefix, flops in PEAK_FLOPS.items():
    if device.device_kind.startswith(prefix):
      return flops
  return None


# ----------------------------------------------------------------------------------------------
# Optimiser and loss
# ----------------------------------------------------------------------------------------------

def make_schedule(cfg: OptimizerConfig, train_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step.

  >>> schedule = make_schedule(OptimizerConfig(), 100)  # T5X: 1 / sqrt(max(step, 10000))
  >>> [round(float(schedule(step)), 6) for step in (0, 10000, 40000)]
  [0.01, 0.01, 0.005]
  """
  lr, warmup = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == 'rsqrt':
    return lambda step: lr / jnp.sqrt(jnp.maximum(step, max(warmup, 1)))
  decay_steps = cfg.decay_steps or train_steps
  after_warmup = {
      'constant': optax.constant_schedule(lr),
      'linear': optax.linear_schedule(lr, cfg.end_learning_rate,
                                      max(decay_steps - warmup, 1)),
      'cosine': optax.cosine_decay_schedule(lr, max(decay_steps - warmup, 1),
                                            alpha=cfg.end_learning_rate / lr),
  }[cfg.schedule]
  if warmup == 0:
    return after_warmup
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after_warmup], [warmup])


def _scale_by_parameter_rms_mask(params: Any) -> Any:
  """True where Adafactor multiplies updates by the parameter's RMS: all but relpos_bias."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: 'relpos_bias' not in path for path in flat})


def make_optimizer(cfg: OptimizerConfig, train_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adafactor as T5X configures it (reference §3), built from optax's parts."""
  schedule = make_schedule(cfg, train_steps)
  parts = [optax.scale_by_factored_rms(factored=True, decay_rate=cfg.decay_rate,
                                       min_dim_size_to_factor=cfg.min_dim_size_to_factor,
                                       epsilon=cfg.epsilon1)]
  if cfg.clipping_threshold:
    parts.append(optax.clip_by_block_rms(cfg.clipping_threshold))
  parts.append(optax.scale_by_learning_rate(schedule))  # also flips the sign: descent
  if cfg.multiply_by_parameter_scale:
    parts.append(optax.masked(optax.scale_by_param_block_rms(), _scale_by_parameter_rms_mask))
  return optax.chain(*parts), schedule


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
              z_loss: float) -> dict[str, jax.Array]:
  """Summed (not averaged) cross-entropy, z-loss, correct tokens and weight of a batch.

  Sums, so that microbatches and data shards add up before the one normalisation.

  >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  >>> s = loss_sums(logits, jnp.array([[0, 0]]), jnp.array([[1.0, 1.0]]), 0.0)
  >>> round(float(s['cross_entropy']), 4), float(s['correct']), float(s['weight'])
  (0.7985, 2.0, 2.0)
  """
  logits = jnp.asarray(logits, jnp.float32)  # [batch, length, vocab]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                      axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return {
      'cross_entropy': jnp.sum((log_z - target_logits) * weights),
      'z_loss': jnp.sum(z_loss * jnp.square(log_z) * weights),
      # The target's logit is the largest: argmax without argmax, which is ~5x slower than a
      # max-reduce over a 32k vocabulary on CPU.
      'correct': jnp.sum((target_logits >= jnp.max(logits, axis=-1)) * weights),
      'weight': jnp.sum(weights),
  }


# ----------------------------------------------------------------------------------------------
# State and the pure step
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  opt_state: Any


def _dummy_inputs() -> tuple[jax.Array, ...]:
  tokens = jnp.ones((1, 1), jnp.int32)
  return tokens, tokens, tokens


def _init_fn(model: network.Transformer, tx: optax.GradientTransformation
             ) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    params = model.init(rng, *_dummy_inputs())['params']
    params = nn.meta.unbox(params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def state_shardings(model: network.Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: partitioning.AxisRules) -> TrainState:
  """Shardings of every leaf of the train state, from the parameters' logical axes.

  Optimiser statistics shaped like their parameter share its sharding; Adafactor's factored
  row/column statistics (vectors) are replicated.
  """
  boxed = jax.eval_shape(lambda r: model.init(r, *_dummy_inputs())['params'],
                         jax.random.key(0))
  param_shardings = partitioning.logical_shardings(boxed, mesh, rules)
  params = nn.meta.unbox(boxed)
  opt_shapes = jax.eval_shape(tx.init, params)
  replicated = partitioning.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda leaf, sharding, param: sharding if leaf.shape == param.shape else replicated,
      opt_shapes, param_shardings, params, transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return TrainState(replicated, param_shardings, opt_shardings)


def make_train_step(model: network.Transformer, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, run: TrainConfig
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)`, pure: the dropout key is derived from
  `run.seed` and the step, so the same state and batch always give the same result."""
  dropout = model.config.dropout_rate > 0
  base_key = jax.random.key(run.seed + 1)

  def sums_and_grads(params, batch, rng):
    def loss_fn(p):
      logits = model.apply({'params': p}, **network.model_inputs(batch),
                           enable_dropout=dropout, rngs={'dropout': rng} if dropout else None)
      sums = loss_sums(logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
                       run.z_loss)
      return sums['cross_entropy'] + sums['z_loss'], sums
    return jax.grad(loss_fn, has_aux=True)(params)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(base_key, state.step)
    k = run.microbatches
    if k == 1:
      grads, sums = sums_and_grads(state.params, batch, rng)
    else:
      # [batch, ...] -> [k, batch / k, ...]: microbatch j takes rows j, j + k, ..., so every
      # data shard contributes equally to every microbatch.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch)

      def accumulate(carry, inputs):
        j, mb = inputs
        grads, sums = sums_and_grads(state.params, mb, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          sums_and_grads, state.params, jax.tree.map(lambda x: x[0], micro), rng))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))

    if run.loss_normalizing_factor == 'num_real_target_tokens':
      normalizer = jnp.maximum(sums['weight'], 1.0)
    else:
      normalizer = jnp.float32(run.loss_normalizing_factor)
    grads = jax.tree.map(lambda g: g / normalizer, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': (sums['cross_entropy'] + sums['z_loss']) / normalizer,
        'cross_entropy': sums['cross_entropy'] / jnp.maximum(sums['weight'], 1.0),
        'z_loss': sums['z_loss'] / jnp.maximum(sums['weight'], 1.0),
        'accuracy': sums['correct'] / jnp.maximum(sums['weight'], 1.0),
        'learning_rate': schedule(state.step),
        'grad_norm': optax.tree.norm(grads),
        'target_tokens': sums['weight'],
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(model: network.Transformer, z_loss: float) -> Callable[[Any, Batch], dict]:
  def eval_step(params, batch):
    logits = model.apply({'params': params}, **network.model_inputs(batch))
    return loss_sums(logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
                     z_loss)
  return eval_step


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------

def model_flops_per_step(cfg: network.Config, batch_size: int, inputs_length: int,
                         targets_length: int) -> float:
  """Analytic training FLOPs of one step: 3x the forward matmuls (forward + backward).

  Counts every matmul of attention (projections, scores, values, full not causal, as MFU
  conventions do), the MLP and the logits; embeddings lookups and norms are not counted.
  """
  e, f, v = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size
  hd = cfg.num_heads * cfg.head_dim
  mlp = (len(cfg.mlp_activations) + 1) * e * f
  li, lt = inputs_length, targets_length
  encoder = li * cfg.num_encoder_layers * (4 * e * hd + 2 * li * hd + mlp)
  decoder = cfg.num_decoder_layers * (
      lt * (4 * e * hd + 2 * lt * hd)  # self-attention
      + lt * 2 * e * hd + li * 2 * e * hd + lt * 2 * li * hd  # cross: q, o; k, v; scores
      + lt * mlp)
  logits = lt * e * v
  forward_macs = encoder + decoder + logits
  return 3 * 2 * forward_macs * batch_size


# ----------------------------------------------------------------------------------------------
# Data: seqio task -> per-host numpy batches
# ----------------------------------------------------------------------------------------------

def _check_task(name: str):
  import seqio  # only the seqio input path needs TensorFlow and seqio

  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(f'Unknown task or mixture {name!r} (DataConfig.task / '
                     f'MIXTURE_OR_TASK_NAME). Registered: {", ".join(known)}. Import the '
                     'module that registers it (gin: `import tasks`).') from None


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


def input_layout(data: DataConfig, seed: int) -> dict[str, Any]:
  """Everything that decides which examples this process's training pipelines yield, in order."""
  return {'task': data.task, 'feature_lengths': dict(data.feature_lengths),
          'batch_size': data.batch_size, 'pack': data.pack, 'shuffle': data.shuffle,
          'use_cached': data.use_cached, 'seed': seed, 'processes': jax.process_count(),
          'input_shards': total_input_shards(data), 'shards_of_this_process': input_shards(data)}


def make_datasets(data: DataConfig, split: str, seed: int, repeat: bool,
                  shuffle: bool) -> list:
  """One tf.data pipeline per input shard of this process, each batched to its rows."""
  import seqio

  task = _check_task(data.task)
  shards = input_shards(data)
  total = total_input_shards(data)
  rows = data.batch_size // total
  if data.batch_size % total:
    raise ValueError(f'Batch size {data.batch_size} must be divisible by the {total} input '
                     'shards.')
  converter = seqio.EncDecFeatureConverter(pack=data.pack)
  out = []
  for shard in shards:
    ds = task.get_dataset(dict(data.feature_lengths), split=split, shuffle=shuffle, seed=seed,
                          shard_info=seqio.ShardInfo(index=shard, num_shards=total),
                          num_epochs=None if repeat else 1, use_cached=data.use_cached)
    # Only the model's features: the converter would drop (and warn about) e.g. `denoiser`.
    ds = ds.map(lambda ex: {k: ex[k] for k in ('inputs', 'targets')})
    ds = converter(ds, dict(data.feature_lengths))
    out.append(ds.batch(rows, drop_remainder=True).prefetch(2))
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
    # What the pipelines were built from (`input_layout`); saved beside the position, since a
    # position only means something in the pipeline that produced it. Kept as JSON reads it
    # back (tuples as lists), so that it compares equal to a saved copy.
    self.layout = json.loads(json.dumps(dict(layout or {})))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [{k: v.numpy() for k, v in next(it).items()} for it in self.iterators]
    self.consumed += 1
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def save(self, path: str) -> None:
    import tensorflow as tf
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.layout.json', 'w') as f:
      json.dump(self.layout, f, indent=1)
    try:
      tf.train.Checkpoint(**self._named()).write(path)
    except tf.errors.FailedPreconditionError:  # e.g. "PyFunc is stateful"
      with open(path + '.json', 'w') as f:
        json.dump({'batches_consumed': self.consumed}, f)

  @staticmethod
  def saved(path: str) -> bool:
    return os.path.exists(path + '.index') or os.path.exists(path + '.json')

  def layout_changes(self, path: str) -> list[str]:
    """The layout fields that differ from those the position at `path` was saved with."""
    if not os.path.exists(path + '.layout.json'):
      return []  # written before layouts were saved: nothing to compare
    with open(path + '.layout.json') as f:
      return self._describe_changes(json.load(f))

  def _describe_changes(self, saved: Mapping[str, Any]) -> list[str]:
    """
    >>> batches = HostBatches([], {'task': 'ul2_mod_c4', 'batch_size': 128})
    >>> batches._describe_changes({'task': 'ul2_mod_c4', 'batch_size': 64})
    ['batch_size: 64 -> 128']
    """
    keys = sorted(set(saved) | set(self.layout))
    return [f'{k}: {saved.get(k)} -> {self.layout.get(k)}' for k in keys
            if saved.get(k) != self.layout.get(k)]

  def restore(self, path: str) -> None:
    import tensorflow as tf
    if os.path.exists(path + '.index'):
      tf.train.Checkpoint(**self._named()).read(path).assert_consumed()
      return
    with open(path + '.json') as f:
      target = json.load(f)['batches_consumed']
    while self.consumed < target:
      next(self)

  def _named(self):
    return {f'shard_{i}': it for i, it in enumerate(self.iterators)}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

class Checkpoints:
  """Orbax checkpoints of the train state plus each process's input position, per step.

  Parameters are saved with T5X's per-layer names even when the model scans its layers, so a
  checkpoint restores into T5X and into a model with either layout. A step exists only once
  orbax has finalised it (it writes to a temporary directory and renames it), and the input
  positions are written before the state, so a listed step always has both.
  """

  def __init__(self, model_dir: str, run: TrainConfig, model_cfg: network.Config):
    self.model_cfg = model_cfg
    self.data_dir = os.path.join(model_dir, 'data')
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(model_dir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=run.keep_checkpoints,
            enable_async_checkpointing=run.async_checkpointing,
            cleanup_tmp_directories=True))

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _data_path(self, step: int) -> str:
    return os.path.join(self.data_dir, str(step), f'process_{jax.process_index()}')

  def save(self, step: int, state: TrainState, data: HostBatches | None) -> None:
    if data is not None:
      data.save(self._data_path(step))
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

  def restore(self, step: int, abstract: TrainState, per_layer_shardings: Any,
              data: HostBatches | None, resume_input: str = 'exact',
              log: Callable[[str], None] = print) -> TrainState:
    params_abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        network.unstack_layers(abstract.params, self.model_cfg),
        per_layer_shardings)
    item = {'step': abstract.step, 'params': params_abstract, 'opt_state': abstract.opt_state}
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(item))
    params = restored['params']
    if self.model_cfg.scan_layers:
      params = network.stack_layers(params, self.model_cfg)
    if data is not None:
      self._restore_position(step, data, resume_input, log)
    return TrainState(restored['step'], params, restored['opt_state'])

  def _restore_position(self, step: int, data: HostBatches, resume_input: str,
                        log: Callable[[str], None]) -> None:
    path = self._data_path(step)
    if not HostBatches.saved(path):
      changes = [f'no input position for process {jax.process_index()} at {path} (written '
                 'by fewer processes?)']
    else:
      changes = data.layout_changes(path)
    if not changes:
      data.restore(path)
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
# The loop
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict[str, float]]  # one entry per step run here: {'step', 'loss', ...}
  eval_history: list[dict[str, float]]
  model_dir: str
  start_step: int
  metrics_history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def abstract_state(model: network.Transformer, tx: optax.GradientTransformation,
                   shardings: TrainState) -> TrainState:
  shapes = jax.eval_shape(_init_fn(model, tx), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted, sharded functions of a run on its mesh."""

  mesh: Mesh
  model: network.Transformer
  optimizer: optax.GradientTransformation
  shardings: TrainState
  per_layer_param_shardings: Any  # the checkpoint layout (T5X per-layer names)
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # donates the state
  eval_step: Callable[[Any, Batch], dict]


def build_steps(model: network.Config, optimizer: OptimizerConfig, run: TrainConfig,
                mesh: partitioning.MeshConfig,
                devices: Sequence[jax.Device] | None = None) -> Steps:
  """Mesh, sharded init, and jitted train and eval steps under the logical-axis rules."""
  device_mesh = partitioning.make_mesh(mesh, devices)
  rules = partitioning.logical_axis_rules(mesh.parameter_partitioning_dims)
  net = network.Transformer(model)
  tx, schedule = make_optimizer(optimizer, run.steps)
  shardings = state_shardings(net, tx, device_mesh, rules)
  per_layer = shardings.params
  if model.scan_layers:  # checkpoints hold per-layer names: their shardings too
    per_layer_net = network.Transformer(dataclasses.replace(model, scan_layers=False))
    per_layer = state_shardings(per_layer_net, tx, device_mesh, rules).params
  batch_sharding = partitioning.data_sharding(device_mesh)

  def in_mesh(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.set_mesh(device_mesh), nn.logical_axis_rules(rules):
        return fn(*args)
    return wrapped

  return Steps(
      mesh=device_mesh, model=net, optimizer=tx, shardings=shardings,
      per_layer_param_shardings=per_layer,
      init=in_mesh(jax.jit(_init_fn(net, tx), out_shardings=shardings)),
      train_step=in_mesh(jax.jit(make_train_step(net, tx, schedule, run),
                                 in_shardings=(shardings, batch_sharding),
                                 out_shardings=(shardings, None), donate_argnums=(0,))),
      eval_step=in_mesh(jax.jit(make_eval_step(net, run.z_loss),
                                in_shardings=(shardings.params, batch_sharding))))


def _state_from_pretrained(path: str, model: network.Config, steps: Steps) -> TrainState:
  """Pretrained parameters, sharded as the run shards them, with a fresh optimizer state."""
  from ul2 import interop

  params = interop.load_pretrained(path, model)
  if model.scan_layers:
    params = network.stack_layers(params, model)
  params = jax.device_put(params, steps.shardings.params)
  opt_state = jax.jit(steps.optimizer.init, out_shardings=steps.shardings.opt_state)(params)
  return TrainState(jax.device_put(jnp.zeros((), jnp.int32), steps.shardings.step), params,
                    opt_state)


def train(*, model: network.Config, data: DataConfig, run: TrainConfig,
          optimizer: OptimizerConfig = OptimizerConfig(),
          mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
          devices: Sequence[jax.Device] | None = None,
          batches: Iterator[dict[str, np.ndarray]] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
  """Trains (or resumes training) until `run.steps`; returns the state and per-step metrics.

  `batches` replaces the seqio input (host-local numpy batches with the feature converter's
  keys), for synthetic benchmarks; such a run cannot checkpoint its input position.
  """
  # --- Mesh, model, optimiser ------------------------------------------------------------
  steps = build_steps(model, optimizer, run, mesh, devices)
  device_mesh, shardings = steps.mesh, steps.shardings
  partitioning.check_batch_size(data.batch_size, device_mesh, run.microbatches)
  init, step_fn, eval_fn = steps.init, steps.train_step, steps.eval_step
  net, tx = steps.model, steps.optimizer
  os.makedirs(run.model_dir, exist_ok=True)
  is_chief = jax.process_index() == 0

  # --- Data --------------------------------------------------------------------------------
  host_batches = None
  if batches is None:
    host_batches = HostBatches(make_datasets(data, 'train', run.seed, repeat=True,
                                             shuffle=data.shuffle),
                               input_layout(data, run.seed))
    batches = host_batches

  # --- State: fresh, or resumed with its input position --------------------------------------
  checkpoints = Checkpoints(run.model_dir, run, model)
  latest = checkpoints.latest_step()
  if latest is not None:
    state = checkpoints.restore(latest, abstract_state(net, tx, shardings),
                                steps.per_layer_param_shardings, host_batches,
                                run.resume_input, log)
    log(f'Resumed from {checkpoints.directory}/{latest} (step {int(state.step)}).')
  elif run.init_from:
    state = _state_from_pretrained(run.init_from, model, steps)
    log(f'Initialised {network.count_parameters(state.params):,} parameters from '
        f'{run.init_from}.')
  else:
    state = init(jax.random.key(run.seed))
    log(f'Initialised {network.count_parameters(state.params):,} parameters on a '
        f'{dict(device_mesh.shape)} mesh of {device_mesh.devices.size} devices.')
  if is_chief:
    with open(os.path.join(run.model_dir, 'model_config.json'), 'w') as f:
      json.dump(dataclasses.asdict(model), f, indent=1)
  start = int(state.step)

  eval_batches = None
  if data.eval_split and batches is host_batches:
    eval_sets = make_datasets(data, data.eval_split, seed=0, repeat=False, shuffle=False)
    eval_batches = [b for _, b in zip(range(run.eval_batches), HostBatches(eval_sets))]
    if not eval_batches:
      log(f'Validation split {data.eval_split!r} gave no full batch; validation is off.')
      eval_batches = None

  def validate(params) -> dict[str, float]:
    totals = None
    for b in eval_batches:
      sums = jax.device_get(eval_fn(params, partitioning.global_batch(b, device_mesh)))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    weight = max(float(totals['weight']), 1.0)
    return {'loss': float(totals['cross_entropy'] + totals['z_loss']) / weight,
            'cross_entropy': float(totals['cross_entropy']) / weight,
            'accuracy': float(totals['correct']) / weight}

  # --- Logging ------------------------------------------------------------------------------
  lengths = data.feature_lengths
  flops = model_flops_per_step(model, data.batch_size, lengths['inputs'], lengths['targets'])
  peak = run.peak_flops_per_device or peak_flops(device_mesh.devices.flat[0])
  tokens_per_step = data.batch_size * (lengths['inputs'] + lengths['targets'])
  writers = _summary_writers(run.model_dir) if is_chief and host_batches is not None else None
  bar = _progress(run, start, is_chief)

  history, eval_history, metrics_history, pending = [], [], [], []
  best = _read_best(run.model_dir)
  last_time, last_step = time.perf_counter(), start
  for step in range(start, run.steps):
    batch = partitioning.global_batch(next(batches), device_mesh)
    state, metrics = step_fn(state, batch)
    pending.append((step + 1, metrics))
    done = step + 1
    if done % run.log_every == 0 or done == run.steps:
      # One device-to-host transfer per log interval: the only sync point of the loop.
      fetched = jax.device_get([m for _, m in pending])
      now = time.perf_counter()
      seconds_per_step = (now - last_time) / (done - last_step)
      last_time, last_step = now, done
      for (s, _), m in zip(pending, fetched):
        entry = {'step': s, **{k: float(v) for k, v in m.items()}}
        entry['tokens_per_s'] = tokens_per_step / seconds_per_step
        entry['mfu'] = flops / seconds_per_step / (peak * device_mesh.devices.size) if peak else None
        history.append(entry)
        if writers:
          _write_scalars(writers['train'], s, entry)
      pending = []
      if bar is not None:
        last = history[-1]
        bar.set_postfix(loss=f'{last["loss"]:.3f}', tok_s=f'{last["tokens_per_s"]:,.0f}',
                        refresh=False)
        bar.update(done - bar.n)
    if eval_batches is not None and (done % run.eval_every == 0 or done == run.steps):
      result = {'step': done, **validate(state.params)}
      eval_history.append(result)
      if writers:
        _write_scalars(writers['validation'], done, result)
      log_line = f'step {done}: validation loss {result["loss"]:.4f}, accuracy ' \
                 f'{result["accuracy"]:.3f}'
      (bar.write if bar is not None else log)(log_line)
    if run.metrics_every and data.eval_split and (done % run.metrics_every == 0
                                                  or done == run.steps):
      metrics = _task_metrics(net, state.params, data, run)
      metrics_history.append({'step': done, **metrics})
      if writers:
        _write_scalars(writers['validation'], done, metrics)
      line = f'step {done}: ' + ', '.join(f'{k} {v:.2f}' for k, v in metrics.items())
      (bar.write if bar is not None else log)(line)
      if run.keep_best:
        best = _keep_best(run, done, metrics, state.params, model, best)
    if host_batches is not None and (done % run.checkpoint_every == 0 or done == run.steps):
      checkpoints.save(done, state, host_batches)

  checkpoints.wait()
  checkpoints.close()
  if bar is not None:
    bar.close()
  if writers:
    for w in writers.values():
      w.flush()
  if is_chief and host_batches is not None:
    log(f'Checkpoints: {checkpoints.directory}  (steps {checkpoints.manager.all_steps()})')
    log(f'TensorBoard: tensorboard --logdir {os.path.abspath(run.model_dir)}')
  return TrainResult(state, history, eval_history, run.model_dir, start, metrics_history)


def _task_metrics(net: network.Transformer, params: Any, data: DataConfig,
                  run: TrainConfig) -> dict[str, float]:
  from ul2 import evaluation
  return evaluation.evaluate(net, params, data.task, feature_lengths=data.feature_lengths,
                             split=data.eval_split, method='decode',
                             max_examples=run.metrics_examples).metrics


def _read_best(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, 'best.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _keep_best(run: TrainConfig, step: int, metrics: Mapping[str, float], params: Any,
               model: network.Config, best: dict | None) -> dict | None:
  """Saves the parameters to model_dir/best/ when `run.keep_best` improved; returns the best."""
  if run.keep_best not in metrics:
    raise ValueError(f'TrainConfig.keep_best={run.keep_best!r} is not one of the task\'s '
                     f'metrics {sorted(metrics)}.')
  value = metrics[run.keep_best]
  if best is not None and value <= best['value']:
    return best
  path = os.path.abspath(os.path.join(run.model_dir, 'best'))
  ocp.PyTreeCheckpointer().save(path, {'params': network.unstack_layers(params, model)},
                                force=True)
  best = {'step': step, 'metric': run.keep_best, 'value': value, 'metrics': dict(metrics)}
  if jax.process_index() == 0:
    with open(os.path.join(run.model_dir, 'best.json'), 'w') as f:
      json.dump(best, f, indent=1)
  return best


def _progress(run: TrainConfig, start: int, is_chief: bool):
  if not (run.progress_bar and is_chief):
    return None
  from tqdm import tqdm
  return tqdm(total=run.steps, initial=start, desc='train', unit='step', dynamic_ncols=True)


def _summary_writers(model_dir: str) -> dict[str, Any]:
  import tensorflow as tf
  return {split: tf.summary.create_file_writer(os.path.join(model_dir, split))
          for split in ('train', 'validation')}


def _write_scalars(writer, step: int, values: Mapping[str, float | None]) -> None:
  import tensorflow as tf
  with writer.as_default(step=step):
    for name, value in values.items():
      if name != 'step' and value is not None:
        tf.summary.scalar(name, value)
