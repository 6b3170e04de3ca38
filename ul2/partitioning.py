"""Device mesh and logical-axis partitioning, after the Flax lm1b example (not T5X's partitioner).

Every parameter and key activation of `ul2.network` carries logical axis names (`batch`,
`length`, `embed`, `heads`, `kv`, `joined_kv`, `mlp`, `vocab`, `relpos_buckets`, `layers`).
One table of rules maps them onto the named mesh axes `data` and `model`:

    >>> dict(logical_axis_rules(parameter_partitioning_dims=1))['mlp']
    'model'

With 2-D parameter partitioning, `embed` is also sharded over `data` (FSDP-like) wherever
`data` is not already taken by `batch`, i.e. on parameters but not on activations; with 2-D
activation partitioning, activations' `embed` is sharded over `model` (T5X's
`activation_partitioning_dims=2`), which large models on pods need.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ul2 import network

AxisRules = tuple[tuple[str, str | None], ...]


def logical_axis_rules(parameter_partitioning_dims: int = 1,
                       activation_partitioning_dims: int = 1) -> AxisRules:
  """T5X's `standard_logical_axis_rules`, for 1-D or 2-D parameters and activations.

  Flax applies the rules in order and skips a mesh axis an array already uses. With 2-D
  parameters, `('embed', 'data')` shards parameters' `embed` axis but not activations', whose
  `batch` already holds `data`. With 2-D activations, `('embed', 'model')` also splits the
  activations' `embed` axis over `model` (the residual stream, 1/model of it per device), while
  a kernel's `embed` axis stays off `model`, which its `mlp`, `heads`, `joined_kv` or `vocab`
  axis took first:

      >>> rules = logical_axis_rules(parameter_partitioning_dims=2,
      ...                            activation_partitioning_dims=2)
      >>> [mesh for name, mesh in rules if name == 'embed']
      ['model', 'data', None]
      >>> tuple(nn.logical_to_mesh_axes(('batch', 'length', 'embed'), rules))
      ('data', None, 'model')
      >>> tuple(nn.logical_to_mesh_axes(('embed', 'mlp'), rules))
      ('data', 'model')
  """
  for name, value in (('parameter_partitioning_dims', parameter_partitioning_dims),
                      ('activation_partitioning_dims', activation_partitioning_dims)):
    if value not in (1, 2):
      raise ValueError(f'MeshConfig.{name} must be 1 or 2, got {value}.')
  rules: list[tuple[str, str | None]] = [
      ('batch', 'data'),
      ('vocab', 'model'),
      ('mlp', 'model'),
      ('heads', 'model'),
      ('kv', None),
      ('joined_kv', 'model'),
  ]
  if activation_partitioning_dims == 2:
    rules.append(('embed', 'model'))
  if parameter_partitioning_dims == 2:
    rules.append(('embed', 'data'))
  rules += [
      ('embed', None),
      ('relpos_buckets', None),
      ('length', None),
      ('layers', None),
  ]
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh: `data` x `model` devices; -1 means "all devices left over"."""

  data: int = -1
  model: int = 1  # model parallelism: 8 for UL2 20B on a TPU v4 pod, as in the paper
  parameter_partitioning_dims: int = 1  # 2: parameters' embed axis also over data (FSDP-like)
  activation_partitioning_dims: int = 1  # 2: activations' embed axis also over model

  def rules(self) -> AxisRules:
    return logical_axis_rules(self.parameter_partitioning_dims,
                              self.activation_partitioning_dims)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh(('data', 'model'))` over all devices (every process's, on multi-host runs).

  On TPUs the mesh follows the chips' physical torus (`mesh_utils.create_device_mesh`), so
  that a model-parallel group, which exchanges activations at every layer, is a ring of
  neighbouring chips; over several slices (multislice) `data` also spans the slices
  (`create_hybrid_device_mesh`) and `model` stays inside one. Elsewhere the devices are taken
  in order.

  >>> dict(make_mesh(MeshConfig(data=1, model=1), jax.devices()[:1]).shape)
  {'data': 1, 'model': 1}
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, model = config.data, config.model
  if model < 1 or (data < 1 and data != -1):
    raise ValueError(f'MeshConfig(data={data}, model={model}): sizes must be positive '
                     '(data may be -1 for "all remaining devices").')
  if data == -1:
    if n % model:
      raise ValueError(f'MODEL_PARALLEL={model} (MeshConfig.model) does not divide the {n} '
                       f'devices; set MODEL_PARALLEL to a divisor of {n}.')
    data = n // model
  if data * model != n:
    raise ValueError(f'MeshConfig(data={data}, model={model}) needs {data * model} devices but '
                     f'{n} are available; set data * MODEL_PARALLEL = {n} (or data = -1).')
  if devices[0].platform != 'tpu':
    return Mesh(np.asarray(devices).reshape(data, model), ('data', 'model'))
  return Mesh(_tpu_device_grid(devices, data, model), ('data', 'model'))


def _tpu_device_grid(devices: Sequence[jax.Device], data: int, model: int) -> np.ndarray:
  """[data, model] TPU devices laid along the physical torus."""
  from jax.experimental import mesh_utils

  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  try:
    if slices > 1:
      if data % slices:
        raise ValueError(f'The {slices} TPU slices split the data axis: MeshConfig.data '
                         f'({data}) must be a multiple of {slices}.')
      return mesh_utils.create_hybrid_device_mesh((data // slices, model), (slices, 1), devices)
    return mesh_utils.create_device_mesh((data, model), devices)
  except (ValueError, AssertionError, NotImplementedError):
    if slices > 1:
      raise
    # A shape the torus cannot hold without splitting one of its axes over both mesh axes.
    return mesh_utils.create_device_mesh((data, model), devices,
                                         allow_split_physical_axes=True)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: AxisRules) -> Any:
  """`NamedSharding`s for a tree of `nn.LogicallyPartitioned` values (or their shapes)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(config: network.Config, mesh: Mesh, rules: AxisRules) -> Any:
  """Each parameter's sharding, from its logical axes."""
  boxed = jax.eval_shape(lambda r: network.init_params(config, r, boxed=True),
                         jax.random.key(0))
  return logical_shardings(boxed, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, jax.sharding.PartitionSpec())


def place(tree: Any, shardings: Any) -> Any:
  """A tree of host arrays, whole on every process, as global arrays with `shardings`; each
  process keeps only its own devices' shards (so it works on one host and on many)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


@dataclasses.dataclass(frozen=True)
class InMesh:
  """A jitted function called, or lowered (`.lower(*abstract_args)`, ahead-of-time
  compilation for another machine), under its mesh and logical-axis rules: the activations'
  `nn.with_logical_constraint`s of `ul2.network` then shard as the rules say."""

  fn: Any
  mesh: Mesh
  rules: AxisRules

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Batches: per-host numpy -> global arrays sharded over `data`
# ----------------------------------------------------------------------------------------------

def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over the `data` axis, replicated over `model`."""
  return NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def check_batch_size(batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
  """Raises with the fix when the global batch cannot be split evenly."""
  shards = mesh.shape['data']
  if batch_size % shards:
    raise ValueError(f'Batch size {batch_size} must be divisible by the {shards} data shards; '
                     f'set BATCH_SIZE to a multiple of {shards}.')
  if batch_size % jax.process_count():
    raise ValueError(f'Batch size {batch_size} must be divisible by the '
                     f'{jax.process_count()} processes, each of which reads its own part.')
  if microbatches < 1 or batch_size % (microbatches * shards):
    raise ValueError(f'Batch size {batch_size} must split into {microbatches} microbatches of '
                     f'a multiple of the {shards} data shards; choose microbatches so that '
                     f'{batch_size} / microbatches is a multiple of {shards}.')


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of the batch -> one global `jax.Array` per feature.

  Every process passes its own `batch_size / process_count` rows, in process order.
  """
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


# ----------------------------------------------------------------------------------------------
# The host: where XLA:CPU's step buffers come from
# ----------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


def reuse_freed_memory() -> bool:
  """Lets XLA:CPU's steps reuse the memory the previous step freed; call it before JAX starts.

  XLA:CPU allocates a step's buffers with `malloc` and frees them when the step ends. glibc
  maps blocks above its mmap threshold (at most 32 MiB) afresh and unmaps them on free; it does
  so for blocks of any size in the arenas of XLA's worker threads, which run the steps under
  asynchronous dispatch. Every step then page-faults each 4 KiB of its buffers back in, and the
  kernel zeroes each page: T5 1.1 small's float32 train step (batch 8, 512/114 tokens) took
  ~760,000 minor faults on the project's 2-core EPYC, 7.25-7.51 s a step, against ~26,000 and
  6.61-6.98 s with this call; peak RSS 4.20-4.29 GiB against 4.21-4.67 GiB.

  It does two things, on CPU with glibc (elsewhere it leaves glibc alone):
  - `jax_cpu_enable_async_dispatch=False`: computations run on the calling thread, so their
    buffers come from glibc's main arena, the one the next two settings govern;
  - `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, SIZE_MAX)`: large blocks come from
    the heap, and freed memory stays in the process for the next step instead of going back
    to the kernel. Peak RSS moves little (a step reuses what the last one freed; up to 11%
    more above, where a block that outlived a step sits where the next step's buffer would
    have gone); the process keeps its peak until it exits.

  It must come before anything starts JAX's backends (`jax.devices()`, the first jitted call)
  and after `jax.distributed.initialize`, and it starts them itself, to learn the platform.
  Returns whether it took effect: False where the backends had already started (the dispatch
  mode is fixed when the CPU client is made), on accelerators, or without glibc. A
  computation over several CPU devices in one process (`--xla_force_host_platform_device_count`)
  still runs its devices' parts on worker threads and gains nothing; it stays correct.
  """
  import ctypes
  import sys

  from jax._src import xla_bridge  # the one place JAX says whether its backends have started

  if sys.platform != 'linux' or xla_bridge.backends_are_initialized():
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc's own symbol: musl's mallopt does nothing
  except (OSError, AttributeError):
    return False
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  if jax.default_backend() != 'cpu':
    return False
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  # mallopt's value is a C int, converted to size_t for the trim threshold: -1 is SIZE_MAX.
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
