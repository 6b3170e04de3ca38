"""Training FLOPs of the network and model FLOPs utilisation (MFU): the one place both the
trainer's logs and `scripts/bench_train.py` take their throughput figures from.

    >>> cfg = network.Config(vocab_size=10, emb_dim=2, num_heads=1, head_dim=2, mlp_dim=4,
    ...                      num_encoder_layers=1, num_decoder_layers=1)
    >>> per_step = flops_per_step(cfg, batch_size=1, inputs_length=3, targets_length=2)
    >>> per_step
    2136
    >>> rates = throughput(per_step, tokens_per_step=5, seconds_per_step=0.5,
    ...                    devices=2, peak_flops_per_device=1e4)
    >>> rates['tokens_per_s'], round(rates['mfu'], 4)
    (10.0, 0.2136)

MFU is the analytic model FLOPs done per second over the devices' dense peak, as the PaLM
paper defines it: recomputation (remat) and padding are not credited, so it compares honestly
across settings.
"""

from __future__ import annotations

import jax

from ul2 import network

# Dense bfloat16 peak FLOP/s per chip, by `jax.Device.device_kind` prefix, first match: v5e
# calls itself 'TPU v5 lite', v5p 'TPU v5', v6e 'TPU v6 lite'.
PEAK_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v5': 459e12, 'TPU v6': 918e12, 'NVIDIA A100': 312e12, 'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """The device's dense bfloat16 peak FLOP/s, or None for a kind not in `PEAK_FLOPS` (CPUs)."""
  for prefix, flops in PEAK_FLOPS.items():
    if device.device_kind.startswith(prefix):
      return flops
  return None


def flops_per_step(cfg: network.Config, batch_size: int, inputs_length: int,
                   targets_length: int) -> float:
  """Analytic training FLOPs of one step: 3x the forward matmuls (forward + backward).

  Counts every matmul of attention (projections, scores, values, full not causal, as MFU
  conventions do), the MLP and the logits; embeddings lookups and norms are not counted.
  A decoder-only model reads inputs and targets as one row of `inputs_length +
  targets_length` (0 inputs for a causal LM) through its `num_decoder_layers` layers.

  >>> cfg = network.Config(vocab_size=10, emb_dim=2, num_heads=1, head_dim=2, mlp_dim=4,
  ...                      num_decoder_layers=1, architecture='decoder_only')
  >>> flops_per_step(cfg, batch_size=1, inputs_length=3, targets_length=2)  # 6 x 5 tokens x 80 MACs
  2400
  """
  e, f, v = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size
  hd = cfg.num_heads * cfg.head_dim
  mlp = (len(cfg.mlp_activations) + 1) * e * f
  li, lt = inputs_length, targets_length
  if cfg.architecture == 'decoder_only':
    n = li + lt
    layers = n * cfg.num_decoder_layers * (4 * e * hd + 2 * n * hd + mlp)
    return 3 * 2 * (layers + n * e * v) * batch_size
  encoder = li * cfg.num_encoder_layers * (4 * e * hd + 2 * li * hd + mlp)
  decoder = cfg.num_decoder_layers * (
      lt * (4 * e * hd + 2 * lt * hd)  # self-attention
      + lt * 2 * e * hd + li * 2 * e * hd + lt * 2 * li * hd  # cross: q, o; k, v; scores
      + lt * mlp)
  logits = lt * e * v
  forward_macs = encoder + decoder + logits
  return 3 * 2 * forward_macs * batch_size


def machine_load(when: str, log=print) -> dict[str, float]:
  """The 1-minute load average and core count, printed by every benchmark at its start and end
  with a warning when other work competes for the cores (its figures are then not comparable).
  """
  import os
  load, cores = os.getloadavg()[0], os.cpu_count() or 1
  line = f'load average at {when}: {load:.2f} ({cores} cores)'
  if load > cores and when == 'start':
    line += ('. WARNING: above the core count: other work is running, so these figures are '
             'not comparable with a quiet run')
  elif load > cores:  # the last minute holds the benchmark's own threads too
    line += ('. WARNING: above the core count; it counts this benchmark\'s own threads over '
             'the last minute: if the start was quiet, other work may still have run')
  log(line)
  return {'load_average': load, 'cores': cores}


def finish_report(report: dict, json_path: str | None) -> dict:
  """A benchmark's end: the load average at the end (`machine_load`) into `report`, which is
  also written to `json_path` as JSON when given; returns `report`."""
  import json
  report['load_end'] = machine_load('end')
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(report, f, indent=1)
  return report


def dot_operand_types(compiled_hlo: str) -> list[tuple[str, ...]]:
  """The element types of each matrix product's operands in XLA's optimized HLO text
  (`jax.jit(f).lower(...).compile().as_text()`), wherever XLA fused the product.

  >>> dot_operand_types('''
  ... %fused (p0: bf16[8,4], p1: bf16[4,2]) -> f32[8,2] {
  ...   %p0 = bf16[8,4]{1,0} parameter(0)
  ...   %p1 = bf16[4,2]{1,0} parameter(1)
  ...   ROOT %d = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}
  ... }''')
  [('bf16', 'bf16')]
  """
  import re
  instruction = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\w+)\[.*? ([\w-]+)\((.*?)\)', re.M)
  types, dots = {}, []
  for name, dtype, opcode, operands in instruction.findall(compiled_hlo):
    types[name] = dtype
    if opcode == 'dot':
      dots.append(re.findall(r'%([\w.-]+)', operands))
  return [tuple(types.get(o, '?') for o in operands) for operands in dots]


def reset_peak_memory() -> None:
  """Starts a new high-water mark of this process's resident memory (Linux's
  /proc/self/clear_refs), so that `peak_rss_gib` measures what runs after it; elsewhere the
  mark keeps counting from the process's start."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def peak_rss_gib() -> float | None:
  """This process's peak resident memory (VmHWM; `ru_maxrss` without /proc) in GiB since it
  started or since `reset_peak_memory`."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2**20  # kB
  except OSError:
    pass
  try:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  except ImportError:
    return None


def throughput(flops: float, tokens_per_step: int, seconds_per_step: float, devices: int,
               peak_flops_per_device: float | None) -> dict[str, float | None]:
  """tokens/s, model TFLOP/s and MFU (None without a known peak) of a measured step time."""
  return {
      'tokens_per_s': tokens_per_step / seconds_per_step,
      'model_tflops_per_s': flops / seconds_per_step / 1e12,
      'mfu': (flops / seconds_per_step / (peak_flops_per_device * devices)
              if peak_flops_per_device else None),
  }
