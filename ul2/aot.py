"""A run's train step compiled ahead of time for a TPU slice, on any machine: will it fit?

JAX compiles for an abstract TPU topology on a CPU-only machine once it can import `libtpu`
(scripts/compile_tpu.py finds it in `.venv/libtpu`). `compile_train_step` builds the real
train step of a run (its model, optimizer, batch and mesh, as `train.train` would) over the
slice's abstract chips, with abstract inputs, and `report` reads what XLA's TPU compiler says
of it: per-chip memory against the chip's HBM, the collectives it issues, and its own cost
model's step time.

Slices are named as Cloud TPU names them (`v4-512`: 512 TensorCores, 256 chips):

    >>> s = tpu_slice('v4-512')
    >>> s.chips, s.topology, s.wrap
    (256, 'v4:4x8x8', (True, True, True))
    >>> tpu_slice('v5litepod-16').topology, tpu_slice('v6e-256').hbm_bytes / 2**30
    ('v5e:4x4', 32.0)

XLA counts a loop's body once in `cost_analysis()` (a scanned stack of 32 layers costs one
layer there), so the step's compiler FLOPs and predicted time come from unscanned compiles of
the same run with 1 and 2 layers per stack, extrapolated linearly to the run's depth
(`layer_costs`; a test checks the extrapolation against an unscanned compile of more layers).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from ul2 import decoding
from ul2 import flops as flops_lib
from ul2 import network, partitioning
from ul2 import train as train_lib

GiB = 2**30
LIBTPU_HINT = "compiling for a TPU slice needs libtpu (scripts/compile_tpu.py says how)"


# ----------------------------------------------------------------------------------------------
# Slices
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Generation:
  libtpu_name: str  # the topology's prefix in libtpu: 'v4', 'v5' (v5p), 'v5e', 'v6e'
  cores_per_chip: int  # in the accelerator name: v4-8 is 4 chips of 2 TensorCores
  chip_config: str  # 'megacore': one device per chip, as the runtime shows it
  hbm_gib: float
  shapes: Mapping[int, tuple[int, ...]]  # chips -> Cloud TPU's default slice shape


_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 192: (4, 4, 12), 256: (4, 8, 8), 512: (8, 8, 8),
              768: (8, 8, 12), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_GENERATIONS = {
    'v4': _Generation('v4', 2, 'megacore', 32, {k: v for k, v in _SHAPES_3D.items()
                                                 if k <= 2048}),
    'v5p': _Generation('v5', 2, 'megacore', 95, _SHAPES_3D),
    'v5e': _Generation('v5e', 1, 'default', 16, _SHAPES_2D),
    'v5litepod': _Generation('v5e', 1, 'default', 16, _SHAPES_2D),
    'v6e': _Generation('v6e', 1, 'default', 32, _SHAPES_2D),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: its name, libtpu topology and per-chip HBM."""

  name: str  # Cloud TPU's accelerator type, e.g. 'v4-512'
  topology: str  # libtpu's, e.g. 'v4:4x8x8'
  chips: int
  chip_config: str
  wrap: tuple[bool, ...]  # torus wraparound links per axis
  hbm_bytes: int

  def devices(self) -> list[jax.Device]:
    """The slice's abstract chips (one device per chip), to compile for; needs libtpu."""
    if importlib.util.find_spec('libtpu') is None:
      raise RuntimeError(LIBTPU_HINT)
    # libtpu looks for a TPU VM's metadata server and hostnames when it loads; none is
    # needed to compile. Several processes may load it at once (parallel tests).
    for key, value in (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
                       ('TPU_ACCELERATOR_TYPE', self.name),
                       ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
      os.environ.setdefault(key, value)
    from jax.experimental import topologies

    bounds = (1, 1, 1) if self.chips == 1 else (2, 2, 1)
    wrap = self.wrap + (False,) * (3 - len(self.wrap))
    return list(topologies.get_topology_desc(
        platform='tpu', topology_name=self.topology, chip_config_name=self.chip_config,
        chips_per_host_bounds=bounds, num_slices=1, wrap=wrap).devices)


def tpu_slice(name: str) -> TpuSlice:
  """'v4-512', 'v5p-128', 'v5litepod-16' (or 'v5e-16'), 'v6e-256' -> its `TpuSlice`."""
  match = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
  known = ', '.join(f'{g}-{{{",".join(str(c * gen.cores_per_chip) for c in gen.shapes)}}}'
                    for g, gen in _GENERATIONS.items() if g != 'v5e')
  if not match:
    raise ValueError(f'Unknown TPU slice {name!r}: name it as Cloud TPU does, e.g. v4-512, '
                     f'v5p-128, v5litepod-16, v6e-256 ({known}).')
  gen = _GENERATIONS[match.group(1)]
  cores = int(match.group(2))
  chips = cores // gen.cores_per_chip
  if cores % gen.cores_per_chip or chips not in gen.shapes:
    raise ValueError(f'Unknown TPU slice {name!r}: the sizes of {match.group(1)} are '
                     f'{sorted(c * gen.cores_per_chip for c in gen.shapes)}.')
  shape = gen.shapes[chips]
  if len(shape) == 3:  # v4 and v5p: a torus once the slice is whole 4x4x4 cubes
    wrap = (all(d % 4 == 0 for d in shape),) * 3
  else:  # v5e, v6e: a full 16-chip side wraps around
    wrap = tuple(d == 16 for d in shape)
  return TpuSlice(name, f'{gen.libtpu_name}:{"x".join(map(str, shape))}', chips,
                  gen.chip_config, wrap, int(gen.hbm_gib * GiB))


# ----------------------------------------------------------------------------------------------
# Compiling a run's train step
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  """What `train.train` compiles: the configs a gin file binds to it."""

  model: network.Config
  batch_size: int
  feature_lengths: Mapping[str, int]  # the model's features (seqio's converter's names)
  run: train_lib.TrainConfig
  optimizer: train_lib.OptimizerConfig
  mesh: partitioning.MeshConfig


def abstract_batch(feature_lengths: Mapping[str, int], batch_size: int,
                   mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as int32 `ShapeDtypeStruct`s split over `data`, as the loop feeds it."""
  sharding = partitioning.data_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=sharding)
          for k, n in feature_lengths.items()}


def compile_train_step(run: Run, devices: Sequence[jax.Device],
                       compiler_options: Mapping[str, Any] | None = None):
  """(`CompiledRun`, the compiled train step) of `run` over `devices` (abstract or real).

  Raises XLA's error (`RESOURCE_EXHAUSTED: ...`) when the step does not fit.
  """
  compiled_run = _compiled_run(run, devices)
  return compiled_run, _compile(run, compiled_run, compiler_options)


def _compiled_run(run: Run, devices: Sequence[jax.Device]) -> train_lib.CompiledRun:
  return train_lib.compile_run(run.model, run.optimizer, run.run, run.mesh, devices=devices)


def _compile(run: Run, compiled_run: train_lib.CompiledRun,
             compiler_options: Mapping[str, Any] | None = None):
  partitioning.check_batch_size(run.batch_size, compiled_run.mesh, run.run.microbatches)
  batch = abstract_batch(run.feature_lengths, run.batch_size, compiled_run.mesh)
  lowered = compiled_run.train_step.lower(compiled_run.abstract_state(), batch)
  return lowered.compile(compiler_options=dict(compiler_options or {}))


def _with_layers(run: Run, encoder: int, decoder: int) -> Run:
  """The same run unscanned with `encoder` / `decoder` layers and one microbatch of
  batch / microbatches rows (the cost of one microbatch)."""
  model = dataclasses.replace(run.model, num_encoder_layers=encoder,
                              num_decoder_layers=decoder, scan_layers=False)
  k = run.run.microbatches
  return dataclasses.replace(run, model=model, batch_size=run.batch_size // k,
                             run=dataclasses.replace(run.run, microbatches=1))


# libtpu's options for a program without XLA's own loops (`layer_costs`).
LOOP_FREE = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
             'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


def _cost(compiled) -> dict[str, float]:
  """XLA's per-chip FLOPs and `optimal_seconds` of a compiled program.

  The TPU cost model gives an operation it cannot cost -1 s (here: some float32 softmax
  fusions) and `optimal_seconds` adds those in; a program of this module (one or two layers)
  costs well under a second, so the whole seconds below zero are those operations, counted
  out and reported as `uncosted_ops` (their time is missing from the prediction).
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  seconds = float(cost.get('optimal_seconds', float('nan')))
  uncosted = math.ceil(-seconds) if seconds < 0 else 0
  return {'flops': float(cost.get('flops', 0.0)), 'optimal_seconds': seconds + uncosted,
          'uncosted_ops': uncosted}


def layer_costs(run: Run, devices: Sequence[jax.Device]) -> dict[str, Any]:
  """XLA's per-chip FLOPs and `optimal_seconds` of the whole step, from unscanned compiles.

  On large meshes XLA's TPU compiler splits a product whose operand it must gather or whose
  result it must scatter into a loop over the model-parallel shards (windowed einsum, or
  collective matmul), and counts that loop's body once as well; these compiles turn it off
  (`LOOP_FREE`), so that every product is counted whole (their FLOPs then match `ul2.flops`
  within a few percent plus the recomputation).

  The step's cost is linear in the depth: `base + encoder_layers * per_encoder_layer +
  decoder_layers * per_decoder_layer`. Three compiles with (1, 1), (2, 1) and (1, 2) layers
  (a decoder-only model: 1 and 2) give the terms; with microbatches the step costs
  `microbatches` times one microbatch (Adafactor's update, < 1% of a large model's step, is
  then counted that many times).
  """
  decoder_only = run.model.architecture == 'decoder_only'
  depths = [(1, 1), (1, 2)] if decoder_only else [(1, 1), (2, 1), (1, 2)]
  costs = {}
  for encoder, decoder in depths:
    _, compiled = compile_train_step(_with_layers(run, encoder, decoder), devices, LOOP_FREE)
    costs[encoder, decoder] = _cost(compiled)
  per_decoder = {k: costs[1, 2][k] - costs[1, 1][k] for k in costs[1, 1]}
  per_encoder = ({k: 0.0 for k in per_decoder} if decoder_only
                 else {k: costs[2, 1][k] - costs[1, 1][k] for k in costs[1, 1]})
  enc = 0 if decoder_only else run.model.num_encoder_layers
  dec = run.model.num_decoder_layers
  total = {k: run.run.microbatches * (costs[1, 1][k] + (enc - 1) * per_encoder[k]
                                      + (dec - 1) * per_decoder[k]) for k in per_decoder}
  return {'step': total, 'per_encoder_layer': per_encoder, 'per_decoder_layer': per_decoder,
          'compiled': {f'{e}x{d}': c for (e, d), c in costs.items()}}


# ----------------------------------------------------------------------------------------------
# What the compiled program says
# ----------------------------------------------------------------------------------------------

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_COMPUTATION = re.compile(r'^(ENTRY )?%?([\w.-]+) [^\n]*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?[\w.-]+ = (.+?) ([a-z][\w-]*)\(')
_ARRAY = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')


def _array_bytes(shape: str) -> list[int]:
  return [_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
          for dtype, dims in _ARRAY.findall(shape)]


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Collectives of a compiled program (`compiled.as_text()`) by kind: how many the program
  holds (`in_program`), how many run per step (`per_step`: inside a loop, times its trip
  count) and the bytes they produce per step, per chip.

  A loop's trip count is the bound its condition compares the counter with (JAX's scans
  count from 0 in steps of 1), or XLA's `known_trip_count` where the HLO keeps it:

  >>> hlo = '''
  ... %cond (p: (s32[], f32[8])) -> pred[] {
  ...   %n = s32[]{:T(128)} constant(32)
  ...   ROOT %lt = pred[] compare(%i, %n), direction=LT
  ... }
  ... %body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  ...   %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}, to_apply=%add
  ... }
  ... ENTRY %main (a: f32[8]) -> f32[16] {
  ...   %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ...   %ag = f32[16]{0} all-gather(f32[8]{0} %a), dimensions={0}
  ... }'''
  >>> collectives(hlo)['all-reduce']
  {'in_program': 1, 'per_step': 32, 'bytes_per_step': 1024}
  >>> collectives(hlo)['all-gather']['bytes_per_step']
  64
  """
  found: dict[str, list[tuple[str, int]]] = {}  # computation -> [(kind, bytes)]
  calls: dict[str, list[tuple[str, int | str]]] = {}  # computation -> [(callee, times)]
  bounds: dict[str, list[int]] = {}  # computation -> its s32 scalar constants
  entry, current = None, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and ' = ' not in line:
      current = head.group(2)
      found[current], calls[current], bounds[current] = [], [], []
      if head.group(1):
        entry = current
      continue
    if current is None:
      continue
    constant = re.search(r' = s32\[\][^ ]* constant\((\d+)\)', line)
    if constant:
      bounds[current].append(int(constant.group(1)))
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    condition = re.search(r'\bcondition=%?([\w.-]+)', line)
    for attr, callee in re.findall(r'\b(body|calls|to_apply|branch_computations)='
                                   r'\{?%?([\w.-]+)', line):
      times: int | str = 1
      if attr == 'body':  # the condition's bound, read once every computation is parsed
        times = int(known.group(1)) if known else (condition.group(1) if condition else 1)
      calls[current].append((callee, times))
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    shape, opcode = instruction.groups()
    kind = opcode.removesuffix('-start')
    if kind in COLLECTIVES and not opcode.endswith('-done'):
      sizes = _array_bytes(shape)
      # An async start's output holds its operands too: the largest array is the result.
      produced = max(sizes, default=0) if opcode.endswith('-start') else sum(sizes)
      found[current].append((kind, produced))
  runs: dict[str, int] = {}

  def visit(name: str, multiplier: int) -> None:
    runs[name] = runs.get(name, 0) + multiplier
    for callee, times in calls.get(name, []):
      if isinstance(times, str):  # a loop: the bound its condition compares with
        times = max(bounds.get(times) or [1])
      visit(callee, multiplier * times)

  if entry is not None:
    visit(entry, 1)
  result = {kind: {'in_program': 0, 'per_step': 0, 'bytes_per_step': 0} for kind in COLLECTIVES}
  for name, items in found.items():
    for kind, produced in items:
      result[kind]['in_program'] += 1
      result[kind]['per_step'] += runs.get(name, 0)
      result[kind]['bytes_per_step'] += runs.get(name, 0) * produced
  return result


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def state_bytes(abstract_state: Any) -> dict[str, Any]:
  """Per-chip bytes of the sharded train state, and its fully replicated leaves over 1 MiB."""
  per_part = {'params': 0, 'opt_state': 0, 'step': 0}
  replicated = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
    shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    per_part[_leaf_name(path[:1])] += shard
    total = math.prod(leaf.shape) * leaf.dtype.itemsize
    if leaf.sharding.is_fully_replicated and total > 2**20 and len(leaf.sharding.device_set) > 1:
      replicated.append({'leaf': _leaf_name(path), 'bytes': total})
  return {'per_chip': sum(per_part.values()), 'params_per_chip': per_part['params'],
          'opt_state_per_chip': per_part['opt_state'], 'replicated_over_1mib': replicated}


def _model_group(mesh: jax.sharding.Mesh) -> list[list[int]]:
  """The chip coordinates of the first model-parallel group (mesh row 0)."""
  return [list(getattr(d, 'coords', [d.id])) for d in mesh.devices[0]]


def _resource_exhausted(error: Exception) -> dict[str, Any] | None:
  message = str(error)
  if 'RESOURCE_EXHAUSTED' not in message:
    return None
  numbers = re.findall(r'\(([\d.]+)([KMGT])\)', message)
  scale = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  sizes = [float(v) * scale[u] for v, u in numbers]
  return {'message': message.strip().splitlines()[0][:400],
          'required_bytes': sizes[0] if sizes else None,
          'available_bytes': sizes[1] if len(sizes) > 1 else None}


def _memory(compiled, tpu: TpuSlice) -> dict[str, Any]:
  """A compiled program's per-chip memory against the chip's HBM, and its collectives."""
  stats = compiled.memory_analysis()
  peak_bytes = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return {'memory': {
      'argument_bytes': stats.argument_size_in_bytes,
      'output_bytes': stats.output_size_in_bytes,
      'alias_bytes': stats.alias_size_in_bytes,
      'temporary_bytes': stats.temp_size_in_bytes,
      'generated_code_bytes': stats.generated_code_size_in_bytes,
      'peak_bytes': peak_bytes,
      'headroom_bytes': tpu.hbm_bytes - peak_bytes,
      'headroom_fraction': 1 - peak_bytes / tpu.hbm_bytes,
  }, 'fits': peak_bytes <= tpu.hbm_bytes, 'collectives': collectives(compiled.as_text())}


def _does_not_fit(error: Exception) -> dict[str, Any]:
  """XLA's RESOURCE_EXHAUSTED verdict as the report's fields (other errors are raised)."""
  exhausted = _resource_exhausted(error)
  if exhausted is None:
    raise error
  return {'fits': False, 'memory': {'error': exhausted['message'],
                                    'required_temporaries_bytes': exhausted['required_bytes'],
                                    'available_bytes': exhausted['available_bytes']}}


def report_decode(model: network.Config, config: decoding.DecodeConfig,
                  mesh: partitioning.MeshConfig, tpu: TpuSlice,
                  devices: Sequence[jax.Device] | None = None, log=print) -> dict[str, Any]:
  """Compiles a file's decoding (`decoding.compile_decode`: one batch of
  `config.batch_size` rows of `config.max_input_length` tokens, `config.method`) for `tpu`
  and measures it as `report` does a train step (no cost model: a decoding loop's length
  depends on when its rows end)."""
  devices = tpu.devices() if devices is None else devices
  log(f'Compiling {config.method} decoding for {tpu.name} ({devices[0].device_kind}, '
      f'{tpu.chips} chips, {tpu.topology})...')
  start = time.perf_counter()
  decoder = decoding.compile_decode(model, config, mesh, devices)
  params = decoder.abstract_params()
  out: dict[str, Any] = {
      'program': 'decode', 'slice': tpu.name, 'topology': tpu.topology,
      'device_kind': devices[0].device_kind, 'chips': tpu.chips,
      'hbm_bytes_per_chip': tpu.hbm_bytes, 'decode': dataclasses.asdict(config),
      'rows': decoder.rows, 'dtype': model.dtype, 'scan_layers': model.scan_layers,
      'mesh': {'model': mesh.model, 'parameter_partitioning_dims': mesh.parameter_partitioning_dims,
               'activation_partitioning_dims': mesh.activation_partitioning_dims},
      'mesh_shape': dict(decoder.mesh.shape), 'model_group_coords': _model_group(decoder.mesh),
      'parameters': network.count_parameters(network.param_shapes(model)),
      'state': state_bytes({'params': params}),
  }
  try:
    compiled = decoder.generate.lower(params, decoder.abstract_batch(
        config.max_input_length)).compile()
  except Exception as e:  # XLA's verdict: RESOURCE_EXHAUSTED
    out.update(_does_not_fit(e))
  else:
    out.update(_memory(compiled, tpu))
  out['compile_seconds'] = time.perf_counter() - start
  return out


def report(run: Run, tpu: TpuSlice, devices: Sequence[jax.Device] | None = None,
           cost_model: bool = True, log=print) -> dict[str, Any]:
  """Compiles `run`'s train step for `tpu` and measures it (the compile command's JSON)."""
  devices = tpu.devices() if devices is None else devices
  kind = devices[0].device_kind
  peak = flops_lib.peak_flops(devices[0])
  model = run.model
  lengths = run.feature_lengths
  if model.architecture == 'decoder_only':
    inputs_length, targets_length = 0, lengths['decoder_target_tokens']
  else:
    inputs_length, targets_length = (lengths['encoder_input_tokens'],
                                     lengths['decoder_target_tokens'])
  model_flops = flops_lib.flops_per_step(model, run.batch_size, inputs_length, targets_length)
  out: dict[str, Any] = {
      'program': 'train', 'slice': tpu.name, 'topology': tpu.topology, 'device_kind': kind,
      'chips': tpu.chips,
      'hbm_bytes_per_chip': tpu.hbm_bytes, 'peak_flops_per_chip': peak,
      'batch_size': run.batch_size, 'feature_lengths': dict(lengths),
      'microbatches': run.run.microbatches, 'dtype': model.dtype,
      'remat_policy': model.remat_policy, 'scan_layers': model.scan_layers,
      'mesh': {'model': run.mesh.model,
               'parameter_partitioning_dims': run.mesh.parameter_partitioning_dims,
               'activation_partitioning_dims': run.mesh.activation_partitioning_dims},
      'parameters': network.count_parameters(network.param_shapes(model)),
      'model_flops_per_step': model_flops,
      'model_flops_per_chip': model_flops / tpu.chips,
      'ideal_step_seconds': model_flops / tpu.chips / peak if peak else None,
  }
  log(f'Compiling the train step for {tpu.name} ({kind}, {tpu.chips} chips, '
      f'{tpu.topology})...')
  start = time.perf_counter()
  compiled_run = _compiled_run(run, devices)
  out.update(mesh_shape=dict(compiled_run.mesh.shape),
             model_group_coords=_model_group(compiled_run.mesh),
             state=state_bytes(compiled_run.abstract_state()))
  try:
    compiled = _compile(run, compiled_run)
  except Exception as e:  # XLA's verdict: RESOURCE_EXHAUSTED
    out.update(_does_not_fit(e), compile_seconds=time.perf_counter() - start)
    return out
  out['compile_seconds'] = time.perf_counter() - start
  out.update(_memory(compiled, tpu))
  if cost_model:
    log('Compiling 1- and 2-layer unscanned copies for XLA\'s cost model...')
    costs = layer_costs(run, devices)
    seconds = costs['step']['optimal_seconds']
    out['cost_model'] = {
        'compiler_flops_per_chip': costs['step']['flops'],
        'recompute_factor': costs['step']['flops'] / (model_flops / tpu.chips),
        'predicted_step_seconds': seconds,
        'predicted_mfu': (model_flops / tpu.chips / peak / seconds
                          if peak and seconds > 0 else None),
        'uncosted_ops_per_step': costs['step']['uncosted_ops'],
        'layers': {k: costs[k] for k in ('per_encoder_layer', 'per_decoder_layer', 'compiled')},
    }
  return out


def format_report(r: Mapping[str, Any], min_headroom: float = 0.0) -> str:
  """The compile command's printout of a `report`."""
  g = lambda b: f'{b / GiB:.2f} GiB'
  partitioning_dims = (f"activation/parameter partitioning "
                       f"{r['mesh']['activation_partitioning_dims']}-D/"
                       f"{r['mesh']['parameter_partitioning_dims']}-D")
  where = (f"{r['slice']} ({r['device_kind']}, {r['chips']} chips, {r['topology']}), mesh "
           f"{r['mesh_shape']}")
  decode = r['program'] == 'decode'
  if decode:
    d = r['decode']
    method = (f"beam search ({d['beam_size']} beams)" if d['method'] == 'beam'
              else d['method'])
    lines = [f"{where}; {method} decoding of {r['rows']} rows of {d['max_input_length']} "
             f"input tokens into {d['max_decode_length']}, {r['dtype']} activations, "
             f"{d['params_dtype']} parameters, {partitioning_dims}"]
  else:
    lengths = r['feature_lengths']
    rows = (f"{lengths['encoder_input_tokens']} / {lengths['decoder_target_tokens']} tokens"
            if 'encoder_input_tokens' in lengths else f"{lengths['decoder_target_tokens']} tokens")
    lines = [f"{where}; batch {r['batch_size']} rows of {rows}, {r['microbatches']} "
             f"microbatch(es), {r['dtype']}, remat {r['remat_policy']!r}, {partitioning_dims}"]
  lines.append("model-parallel group 0, chip coordinates: "
               + ' '.join('(' + ','.join(map(str, c)) + ')' for c in r['model_group_coords']))
  memory = r['memory']
  hbm = r['hbm_bytes_per_chip']
  if not r['fits'] and 'error' in memory:
    lines.append(f"memory per chip: DOES NOT FIT: {memory['error']}")
  else:
    verdict = 'FITS' if r['fits'] else 'DOES NOT FIT'
    if r['fits'] and memory['headroom_fraction'] < min_headroom:
      verdict = f'FITS, but under the {min_headroom:.0%} headroom asked for'
    lines += [
        'memory per chip:',
        f"  arguments    {g(memory['argument_bytes']):>12}",
        f"  outputs      {g(memory['output_bytes']):>12}",
        f"  aliased      {g(-memory['alias_bytes']):>12}"
        + ('' if decode else '  (the donated state)'),
        f"  temporaries  {g(memory['temporary_bytes']):>12}",
        f"  peak         {g(memory['peak_bytes']):>12}  of {g(hbm)} HBM: {verdict}, headroom "
        f"{g(memory['headroom_bytes'])} ({memory['headroom_fraction']:.1%})"]
  state = r['state']
  leaves = sorted(state['replicated_over_1mib'], key=lambda x: -x['bytes'])
  replicated = ', '.join(f"{x['leaf']} ({x['bytes'] / 2**20:.1f} MiB)" for x in leaves[:6])
  if len(leaves) > 6:  # a data-parallel run replicates every parameter; the JSON has them all
    replicated += (f" and {len(leaves) - 6} more ({sum(x['bytes'] for x in leaves) / GiB:.2f} "
                   'GiB in all)')
  if decode:
    lines.append(f"parameters per chip: {g(state['params_per_chip'])}; replicated leaves over "
                 f"1 MiB: {replicated or 'none'}")
    if 'collectives' in r:
      parts = [f"{kind} {c['per_step']} ({c['in_program']} in the program, "
               f"{g(c['bytes_per_step'])})" for kind, c in r['collectives'].items()
               if c['in_program']]
      lines.append('collectives per batch per chip (all decoding steps run): '
                   + ('; '.join(parts) or 'none'))
    return '\n'.join(lines)
  lines.append(f"train state per chip: {g(state['per_chip'])} (parameters "
               f"{g(state['params_per_chip'])}, optimizer {g(state['opt_state_per_chip'])}); "
               f"replicated leaves over 1 MiB: {replicated or 'none'}")
  lines.append(f"FLOPs per step: {r['model_flops_per_step']:.3e} (model, ul2.flops), "
               f"{r['model_flops_per_chip']:.3e} per chip")
  if r['ideal_step_seconds']:
    lines.append(f"ideal step: {r['ideal_step_seconds']:.3f} s at "
                 f"{r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s per chip (MFU 100%)")
  cost = r.get('cost_model')
  if cost:
    mfu = f"{cost['predicted_mfu']:.1%}" if cost['predicted_mfu'] else 'n/a'
    lines.append(f"XLA cost model: {cost['predicted_step_seconds']:.3f} s per step (MFU {mfu}),"
                 f" {cost['compiler_flops_per_chip']:.3e} compiler FLOPs per chip "
                 f"({cost['recompute_factor']:.2f}x the model's: recomputation included)"
                 + (f"; {cost['uncosted_ops_per_step']:.0f} operations per step XLA could not "
                    'cost are left out' if cost['uncosted_ops_per_step'] else ''))
  if 'collectives' in r:
    parts = [f"{kind} {c['per_step']} ({c['in_program']} in the program, "
             f"{g(c['bytes_per_step'])})" for kind, c in r['collectives'].items()
             if c['in_program']]
    lines.append('collectives per step per chip: ' + ('; '.join(parts) or 'none'))
  return '\n'.join(lines)
