"""Device mesh and logical-axis partitioning, after the Flax lm1b example (not T5X's partitioner).

Every parameter and key activation of `ul2.network` carries logical axis names (`batch`,
`length`, `embed`, `heads`, `kv`, `joined_kv`, `mlp`, `vocab`, `relpos_buckets`, `layers`).
One table of rules maps them onto the named mesh axes `data` and `model`:

    >>> dict(logical_axis_rules(parameter_partitioning_dims=1))['mlp']
    'model'

With 2-D parameter partitioning, `embed` is also sharded over `data` (FSDP-like) wherever
`data` is not already taken by `batch`, i.e. on parameters but not on activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

AxisRules = tuple[tuple[str, str | None], ...]


def logical_axis_rules(parameter_partitioning_dims: int = 1) -> AxisRules:
  """T5X's standard rules (`standard_logical_axis_rules`, 1-D activations).

  Flax applies the rules in order and skips a mesh axis an array already uses, so the
  `('embed', 'data')` rule shards parameters' `embed` axis but leaves activations, whose `batch`
  already holds `data`, to the later `('embed', None)`.
  """
  if parameter_partitioning_dims not in (1, 2):
    raise ValueError('parameter_partitioning_dims must be 1 (model parallel only) or 2 '
                     f'(also shard embed over data), got {parameter_partitioning_dims}.')
  rules: list[tuple[str, str | None]] = [
      ('batch', 'data'),
      ('vocab', 'model'),
      ('mlp', 'model'),
      ('heads', 'model'),
      ('joined_kv', 'model'),
  ]
  if parameter_partitioning_dims == 2:
    rules.append(('embed', 'data'))
  rules += [
      ('embed', None),
      ('kv', None),
      ('length', None),
      ('relpos_buckets', None),
      ('layers', None),
  ]
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh: `data` x `model` devices; -1 means "all devices left over"."""

  data: int = -1
  model: int = 1  # model parallelism: 8 for UL2 20B on a TPU v4 pod, as in the paper
  parameter_partitioning_dims: int = 1


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh(('data', 'model'))` over all devices (every process's, on multi-host runs).

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
      raise ValueError(f'MeshConfig.model={model} does not divide the {n} devices; set it '
                       f'to a divisor of {n}.')
    data = n // model
  if data * model != n:
    raise ValueError(f'MeshConfig(data={data}, model={model}) needs {data * model} devices but '
                     f'{n} are available; set data * model = {n} (or data = -1).')
  return Mesh(np.asarray(devices).reshape(data, model), ('data', 'model'))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: AxisRules) -> Any:
  """`NamedSharding`s for a tree of `nn.LogicallyPartitioned` values (or their shapes)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, jax.sharding.PartitionSpec())


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
