"""The T5X-style trainer: a pure, jitted `train_step(state, batch) -> (state, metrics)` and one
readable loop around it.

    state = init or restore                   # initialised directly sharded on the mesh
    for step in range(start, run.steps):      # data: per-host seqio batches -> global arrays
      state, metrics = train_step(state, batch)
      log / validate / task metrics / checkpoint, each at its own cadence

Objective: `ul2.losses` (T5X's cross-entropy plus z-loss, normalised by the global batch's
target tokens, so k microbatches give one full batch's gradient). Optimiser: T5X's Adafactor
(`ul2.adafactor`). Learning rate: T5X's `1 / sqrt(max(step, 10000))` by default; constant,
linear and cosine decay (with linear warmup) on request.

The input pipeline is `ul2.data`'s; the model directory is `ul2.checkpoints`'; the run's
record (TensorBoard, metrics.jsonl, progress) is `ul2.records`'. TensorFlow and seqio are
imported only for a seqio input pipeline, so `compile_run` alone runs without them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ul2 import adafactor
from ul2 import checkpoints as checkpoints_lib
from ul2 import data as data_lib
from ul2 import losses, network, partitioning
from ul2 import records as records_lib

Batch = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Configuration: one typed config per component (the data's is `ul2.data.DataConfig`)
# ----------------------------------------------------------------------------------------------

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
  multiply_by_parameter_scale: bool = True  # every parameter, relpos_bias too (as T5X)
  epsilon1: float = 1e-30  # added to squared gradients
  epsilon2: float = 1e-3  # the smallest parameter RMS that parameter scaling uses

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
  # Validation loss and token accuracy per denoiser and per mode ([NLU], [S2S], [NLG]) at
  # every validation: fixed streams of the task corpus's validation split, one per denoiser
  # (`data.denoiser_tasks`), this many batches each; 0: off. `denoiser_eval`: the denoisers
  # (None: the paper's seven, denoisers.UL2_DENOISERS), the same for every objective so that
  # runs with different objectives compare.
  denoiser_eval_batches: int = 2
  denoiser_eval: tuple | None = None
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
  init_from_ignore_extra: bool = False  # drop init_from entries the model does not have
  # Peak FLOP/s of one device for MFU; None looks the device kind up in flops.PEAK_FLOPS.
  peak_flops_per_device: float | None = None
  # A tqdm bar (True), plain lines every log_every steps (False: step, loss, tokens/s,
  # learning rate, ETA), or None: the bar on a terminal, lines when output is redirected
  # (SLURM, nohup, CI).
  progress_bar: bool | None = None
  # A resumed run restores its input position only into the same input pipeline (task,
  # lengths, batch size, shards, seed...). 'exact': any change is an error; 'restart': keep
  # the restored model and optimizer state and start the changed pipeline from its beginning.
  resume_input: str = 'exact'

  def __post_init__(self):
    for name in ('steps', 'microbatches', 'eval_every', 'checkpoint_every', 'log_every',
                 'keep_checkpoints'):
      if getattr(self, name) < 1:
        raise ValueError(f'TrainConfig.{name} must be >= 1, got {getattr(self, name)}.')
    if self.denoiser_eval_batches < 0:
      raise ValueError('TrainConfig.denoiser_eval_batches must be >= 0 (0: off), got '
                       f'{self.denoiser_eval_batches}.')
    if self.denoiser_eval is not None:
      object.__setattr__(self, 'denoiser_eval', tuple(self.denoiser_eval))
    if self.resume_input not in ('exact', 'restart'):
      raise ValueError("TrainConfig.resume_input must be 'exact' or 'restart', got "
                       f'{self.resume_input!r}.')
    if not (self.loss_normalizing_factor == 'num_real_target_tokens'
            or isinstance(self.loss_normalizing_factor, (int, float))):
      raise ValueError("TrainConfig.loss_normalizing_factor must be 'num_real_target_tokens' "
                       f'or a number, got {self.loss_normalizing_factor!r}.')


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


def make_optimizer(cfg: OptimizerConfig, train_steps: int, model: network.Config
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adafactor as T5X configures it (reference §3), factored by `model`'s logical axes."""
  schedule = make_schedule(cfg, train_steps)
  boxed = jax.eval_shape(lambda r: network.init_params(model, r, boxed=True),
                         jax.random.key(0))
  tx = adafactor.adafactor(
      schedule, adafactor.logical_factor_rules(boxed), decay_rate=cfg.decay_rate,
      clipping_threshold=cfg.clipping_threshold,
      multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
      min_dim_size_to_factor=cfg.min_dim_size_to_factor, epsilon1=cfg.epsilon1,
      epsilon2=cfg.epsilon2)
  return tx, schedule


# ----------------------------------------------------------------------------------------------
# State and the pure step
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  opt_state: Any


def _init_fn(config: network.Config, tx: optax.GradientTransformation
             ) -> Callable[[jax.Array], TrainState]:
  def init(rng):
    params = network.init_params(config, rng)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  return init


def state_shardings(config: network.Config, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: partitioning.AxisRules) -> TrainState:
  """Shardings of every leaf of the train state: the parameters' from their logical axes,
  Adafactor's as T5X partitions them (`adafactor.state_shardings`)."""
  params = partitioning.param_shardings(config, mesh, rules)
  replicated = partitioning.replicated(mesh)
  opt_shapes = jax.eval_shape(tx.init, network.param_shapes(config))
  return TrainState(replicated, params,
                    adafactor.state_shardings(opt_shapes, params, replicated))


def make_train_step(model: network.Model, tx: optax.GradientTransformation,
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
      sums = losses.loss_sums(logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
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


def make_eval_step(model: network.Model, z_loss: float) -> Callable[[Any, Batch], dict]:
  def eval_step(params, batch):
    logits = model.apply({'params': params}, **network.model_inputs(batch))
    return losses.loss_sums(logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'],
                     z_loss)
  return eval_step


# ----------------------------------------------------------------------------------------------
# A compiled run: the mesh and the jitted, sharded functions
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CompiledRun:
  """The jitted, sharded functions of a run on its mesh (what `compile_run` builds)."""

  mesh: Mesh
  model: network.Model
  optimizer: optax.GradientTransformation
  shardings: TrainState
  per_layer_param_shardings: Any  # the checkpoint layout (T5X per-layer names)
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # donates the state
  eval_step: Callable[[Any, Batch], dict]

  def abstract_state(self) -> TrainState:
    """The train state as sharded `jax.ShapeDtypeStruct`s: what a restore fills in."""
    shapes = jax.eval_shape(_init_fn(self.model.config, self.optimizer), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.shardings)


def compile_run(model: network.Config, optimizer: OptimizerConfig, run: TrainConfig,
                mesh: partitioning.MeshConfig,
                devices: Sequence[jax.Device] | None = None) -> CompiledRun:
  """Mesh, sharded init, and jitted train and eval steps under the logical-axis rules."""
  device_mesh = partitioning.make_mesh(mesh, devices)
  rules = mesh.rules()
  tx, schedule = make_optimizer(optimizer, run.steps, model)
  shardings = state_shardings(model, tx, device_mesh, rules)
  per_layer = shardings.params
  if model.scan_layers:  # checkpoints hold per-layer names: their shardings too
    per_layer = partitioning.param_shardings(dataclasses.replace(model, scan_layers=False),
                                             device_mesh, rules)
  batch_sharding = partitioning.data_sharding(device_mesh)
  net = network.build(model)

  def in_mesh(fn):
    return partitioning.InMesh(fn, device_mesh, rules)

  return CompiledRun(
      mesh=device_mesh, model=net, optimizer=tx, shardings=shardings,
      per_layer_param_shardings=per_layer,
      init=in_mesh(jax.jit(_init_fn(model, tx), out_shardings=shardings)),
      train_step=in_mesh(jax.jit(make_train_step(net, tx, schedule, run),
                                 in_shardings=(shardings, batch_sharding),
                                 out_shardings=(shardings, None), donate_argnums=(0,))),
      eval_step=in_mesh(jax.jit(make_eval_step(net, run.z_loss),
                                in_shardings=(shardings.params, batch_sharding))))


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
  # per-denoiser and per-mode validation: {'step', 'denoiser/R(3,0.15)/loss', ...}
  denoiser_history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def train(*, model: network.Config, data: data_lib.DataConfig, run: TrainConfig,
          optimizer: OptimizerConfig = OptimizerConfig(),
          mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
          devices: Sequence[jax.Device] | None = None,
          batches: Iterator[dict[str, np.ndarray]] | None = None,
          log: Callable[[str], None] | None = None,
          started: Callable[[], None] | None = None) -> TrainResult:
  """Trains (or resumes training) until `run.steps`; returns the state and per-step metrics.

  `batches` replaces the seqio input with given host batches (the feature converter's keys):
  they have no position to save, so such a run neither validates, checkpoints nor writes
  summaries. `started` is called once the run has its state, fresh or restored: what it
  writes into model_dir (the gin config) is then never written by a run that failed to start.
  """
  log = log or functools.partial(print, flush=True)  # at once also into a file (SLURM)
  say = log if jax.process_index() == 0 else (lambda _: None)
  compiled = compile_run(model, optimizer, run, mesh, devices)
  partitioning.check_batch_size(data.batch_size, compiled.mesh, run.microbatches)
  checkpoints_lib.makedirs(run.model_dir)
  lease = checkpoints_lib.Lease(run.model_dir).acquire(log)  # one writer per model_dir
  try:
    if batches is None:
      say(f'Building the input pipeline of {data.task}'
          + (f' (validation: its {data.eval_split} split)' if data.eval_split else '') + '...')
    inputs = _Inputs.build(data, run, batches, log, model.architecture)
    checkpoints = checkpoints_lib.Checkpoints(run.model_dir, model, run.keep_checkpoints,
                                              run.async_checkpointing)
    state = _initial_state(compiled, checkpoints, inputs, model, run, log)
    checkpoints_lib.write_model_config(run.model_dir, model)
    if started is not None:
      started()
    start = int(state.step)
    records = records_lib.Records(
        run.model_dir, run.steps, start, model=model, batch_size=data.batch_size,
        feature_lengths=data.feature_lengths, mesh=compiled.mesh,
        peak_flops_per_device=run.peak_flops_per_device, progress_bar=run.progress_bar,
        summaries=inputs.pipeline is not None, log=log)
    best = checkpoints_lib.read_best(run.model_dir)
    if start < run.steps:
      say(f'Compiling the train step and training steps {start + 1}-{run.steps}...')
  except BaseException:
    lease.release()
    raise

  with lease, _StopSignals() as signals, records, checkpoints:
    for step in range(start, run.steps):
      batch = next(inputs.train, None)
      if batch is None:
        raise ValueError(
            f'The training input ended before step {step + 1}: '
            + (f"{data.task}'s train split gave no full batch of {data.batch_size} (empty "
               'corpus files?).' if inputs.pipeline is not None else 'the given batches ran out.'))
      state, metrics = compiled.train_step(state, partitioning.global_batch(batch, compiled.mesh))
      done = step + 1
      records.add(done, metrics)
      checkpoints.check()  # a failed asynchronous save stops the run at once
      lease.check()  # so does another run that took the model_dir over
      stop = signals.agreed(done)
      if _due(done, run.log_every, run.steps) or stop:
        checkpoints.check_finite_loss(records.flush(done))
      if _due(done, run.eval_every, run.steps):
        if inputs.validation:
          records.validation(done, _validate(compiled, state.params, inputs.validation))
        if inputs.by_denoiser:
          records.by_denoiser(done, losses.by_denoiser_and_mode({
              name: (mode, _validation_sums(compiled, state.params, batches))
              for name, (mode, batches) in inputs.by_denoiser.items()}))
      if run.metrics_every and data.eval_split and _due(done, run.metrics_every, run.steps):
        records.log(f'step {done}: decoding {data.task}\'s {data.eval_split} split for its '
                    'task metrics...')
        task_metrics, mode = _task_metrics(compiled.model, state.params, data, run)
        records.task_metrics(done, data.task, task_metrics)
        if run.keep_best:
          best = _keep_best(run, done, task_metrics, state.params, model, best, mode)
      if inputs.pipeline is not None and (_due(done, run.checkpoint_every, run.steps) or stop):
        checkpoints.check_finite_loss(records.persist(done))
        lease.check(saving=True)
        checkpoints.save(done, state, inputs.pipeline)
      if stop:
        checkpoints.wait()
        log(f'Stopped by {signals.received} at step {done}: saved '
            f'{checkpoints.step_dir(done)}; run the same command to resume.')
        break

  if jax.process_index() == 0 and inputs.pipeline is not None:
    log(f'Checkpoints: {checkpoints.directory}  (steps {checkpoints.all_steps()})')
    log(f'TensorBoard: tensorboard --logdir {checkpoints_lib.absolute(run.model_dir)}')
    picture = records_lib.plot_metrics(run.model_dir)
    if picture:
      log(f'Metrics: {checkpoints_lib.join(run.model_dir, records_lib.METRICS_JSONL)}, plotted in {picture}')
  return TrainResult(state, records.history, records.eval_history, run.model_dir, start,
                     records.metrics_history, records.denoiser_history)


class _StopSignals:
  """SIGTERM (a preemption, `scancel`, `kill`) and SIGINT (Ctrl-C) ask the loop to checkpoint
  the step it is at and return; a second signal exits at once.

  Every process must stop at the same step: with several processes they agree through JAX's
  preemption sync point (the coordination service relays a SIGTERM to all of them), and the
  handlers are installed only in a single process, where nothing else listens.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self) -> _StopSignals:
    single = jax.process_count() == 1
    if single and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    if self.received is not None:
      os._exit(128 + signum)  # a second signal: stop now, as the user insists
    self.received = signal.Signals(signum).name

  def agreed(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or 'a preemption notice'
        return True
      return False
    return self.received is not None

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _due(step: int, every: int, last: int) -> bool:
  """A cadence: every `every` steps, and at the last step."""
  return step % every == 0 or step == last


@dataclasses.dataclass
class _Inputs:
  """What the loop reads: training batches, the seqio pipeline behind them (its position is
  checkpointed; None for given batches) and the validation batches (None: no validation)."""

  train: Iterator[dict[str, np.ndarray]]
  pipeline: data_lib.HostBatches | None
  validation: list[dict[str, np.ndarray]] | None
  # {denoiser name: (its mode, its fixed validation batches)}
  by_denoiser: dict[str, tuple[str, list[dict[str, np.ndarray]]]] | None = None

  @classmethod
  def build(cls, data: data_lib.DataConfig, run: TrainConfig,
            batches: Iterator[dict[str, np.ndarray]] | None,
            log: Callable[[str], None], architecture: str) -> _Inputs:
    if batches is not None:
      return cls(batches, None, None)
    pipeline = data_lib.HostBatches(
        data_lib.make_datasets(data, 'train', run.seed, repeat=True, shuffle=data.shuffle,
                               architecture=architecture),
        data_lib.input_layout(data, run.seed, architecture))
    validation = None
    if data.eval_split:
      eval_sets = data_lib.make_datasets(data, data.eval_split, seed=0, repeat=False,
                                         shuffle=False, architecture=architecture)
      validation = [b for _, b in zip(range(run.eval_batches),
                                      data_lib.HostBatches(eval_sets))]
      if not validation:
        log(f'Validation split {data.eval_split!r} gave no full batch; validation is off.')
    by_denoiser = None
    if data.eval_split and run.denoiser_eval_batches:
      by_denoiser = data_lib.denoiser_validation_batches(
          data, run.denoiser_eval_batches, run.denoiser_eval, architecture, log)
    return cls(pipeline, pipeline, validation or None, by_denoiser or None)


def _initial_state(compiled: CompiledRun, checkpoints: checkpoints_lib.Checkpoints,
                   inputs: _Inputs, model: network.Config, run: TrainConfig,
                   log: Callable[[str], None]) -> TrainState:
  """The newest intact checkpoint with its input position; else `run.init_from`; else fresh."""
  restored = checkpoints.restore_latest(compiled.abstract_state(),
                                       compiled.per_layer_param_shardings, inputs.pipeline,
                                       run.resume_input, log)
  if restored is not None:
    state = TrainState(**restored)
    log(f'Resumed from {checkpoints.step_dir(int(state.step))} (step {int(state.step)}).')
    return state
  if run.init_from:
    # Pretrained parameters, sharded as the run shards them, with a fresh optimizer state.
    params, _ = checkpoints_lib.load(run.init_from, model, run.init_from_ignore_extra)
    params = jax.device_put(params, compiled.shardings.params)
    opt_state = jax.jit(compiled.optimizer.init,
                        out_shardings=compiled.shardings.opt_state)(params)
    log(f'Initialised {network.count_parameters(params):,} parameters from {run.init_from}.')
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), compiled.shardings.step),
                      params, opt_state)
  state = compiled.init(jax.random.key(run.seed))
  log(f'Initialised {network.count_parameters(state.params):,} parameters on a '
      f'{dict(compiled.mesh.shape)} mesh of {compiled.mesh.devices.size} devices.')
  return state


def _validation_sums(compiled: CompiledRun, params: Any,
                     batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  totals = None
  for b in batches:
    sums = jax.device_get(compiled.eval_step(params, partitioning.global_batch(b, compiled.mesh)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  return totals


def _validate(compiled: CompiledRun, params: Any,
              batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
  return losses.validation_metrics(_validation_sums(compiled, params, batches))


def validate_by_denoiser(model: network.Config, params: Any, data: data_lib.DataConfig,
                         batches: int = 2, denoisers: Sequence[Any] | None = None,
                         mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
                         log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
  """A finished model's validation loss and token accuracy per denoiser and per mode, on the
  same fixed streams training reports (`TrainConfig.denoiser_eval_batches`): what
  `scripts/eval.py --by_denoiser` prints. {} when `data.task` has no denoising objective."""
  import tempfile
  run = TrainConfig(tempfile.mkdtemp(prefix='ul2_eval_'), steps=1)  # nothing is written
  compiled = compile_run(model, OptimizerConfig(), run, mesh)
  partitioning.check_batch_size(data.batch_size, compiled.mesh)
  params = jax.device_put(params, compiled.shardings.params)
  streams = data_lib.denoiser_validation_batches(data, batches, denoisers, model.architecture,
                                                 log)
  return losses.by_denoiser_and_mode({name: (mode, _validation_sums(compiled, params, b))
                                      for name, (mode, b) in streams.items()})


def _task_metrics(net: network.Model, params: Any, data: data_lib.DataConfig,
                  run: TrainConfig) -> tuple[dict[str, float], str]:
  from ul2 import evaluation
  return evaluation.evaluate_during_training(
      net, params, data.task, feature_lengths=data.feature_lengths, split=data.eval_split,
      max_examples=run.metrics_examples)


def _keep_best(run: TrainConfig, step: int, metrics: Mapping[str, float], params: Any,
               model: network.Config, best: dict | None, mode: str) -> dict | None:
  """Saves the parameters as the best when `run.keep_best` improved; returns the best. The
  record says how they were selected (greedy decoding) and the mode token the task's inputs
  carry, which eval.py and infer.py then default to."""
  if run.keep_best not in metrics:
    raise ValueError(f'TrainConfig.keep_best={run.keep_best!r} is not one of the task\'s '
                     f'metrics {sorted(metrics)}.')
  if best is not None and metrics[run.keep_best] <= best['value']:
    return best
  return checkpoints_lib.save_best(run.model_dir, step, run.keep_best, metrics, params, model,
                                   {'method': 'decode', 'mode': mode})


