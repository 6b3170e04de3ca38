"""Why bfloat16 training on a CPU is slower in JAX than in PyTorch: one matrix product of a
train step's size in float32 and bfloat16, XLA:CPU against PyTorch, and what XLA compiles the
bfloat16 product to.

    python scripts/bench_matmul.py                       # [4096, 512] x [512, 1024], 2 products
    python scripts/bench_matmul.py --m 8192 --k 512 --n 2048 --rounds 9

Each side runs `tanh(a @ b) @ b.T` (two products, as a layer's forward has) in rounds that
alternate between the sides; per side and dtype the median GFLOP/s. The report also says
whether the bfloat16 products in XLA's optimized HLO still take bfloat16 operands, or are
converted to float32 first (then bfloat16 is no faster than float32), and which matrix
instructions the CPU has (AMX, AVX512-BF16: what PyTorch's oneDNN uses for bfloat16).
Needs the `bench` extra for the PyTorch side.
"""

from __future__ import annotations

import os
import re
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402


def parse_args(argv=None):
  p = gin_cli.argument_parser(__doc__)
  p.add_argument('--m', type=int, default=4096, help='rows of a (batch x length)')
  p.add_argument('--k', type=int, default=512, help='contracted dimension (embed)')
  p.add_argument('--n', type=int, default=1024, help='columns of b (mlp)')
  p.add_argument('--rounds', type=int, default=5, help='timed rounds per side and dtype')
  p.add_argument('--calls', type=int, default=10, help='calls per round')
  p.add_argument('--json', default=None, help='also write the results to this file')
  return p.parse_args(argv)


def cpu_matrix_features() -> list[str]:
  """The CPU's bfloat16/matrix instruction sets, from /proc/cpuinfo (empty elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line for line in f if line.startswith('flags')), '').split()
  except OSError:
    return []
  return sorted(f for f in set(flags) if f.startswith('amx') or f == 'avx512_bf16')


def jax_side(args):
  """{dtype: call} and {dtype: the element types XLA's optimized HLO multiplies}."""
  import jax
  import jax.numpy as jnp
  calls, operand_types = {}, {}
  for name, dtype in (('float32', jnp.float32), ('bfloat16', jnp.bfloat16)):
    key = jax.random.key(0)
    a = jax.random.normal(key, (args.m, args.k), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (args.k, args.n), dtype)
    f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b.T)
    hlo = f.lower(a, b).compile().as_text()
    # The operands of every dot: 'f32[4096,512]' etc., wherever XLA fused them.
    types = set()
    for line in hlo.splitlines():
      match = re.search(r'= \S+ dot\((.*?)\)', line)
      if match:
        for operand in match.group(1).split(', '):
          types.update(re.findall(r'%(\S+)', operand))
    defined = dict(re.findall(r'%(\S+) = (\w+)\[', hlo))
    operand_types[name] = sorted({defined.get(t, '?') for t in types})
    calls[name] = (lambda f=f, a=a, b=b: f(a, b).block_until_ready())
  return calls, operand_types


def torch_side(args):
  import torch
  torch.set_num_threads(os.cpu_count())
  calls = {}
  for name, dtype in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(args.m, args.k, generator=g).to(dtype)
    b = torch.randn(args.k, args.n, generator=g).to(dtype)
    calls[name] = (lambda a=a, b=b: torch.tanh(a @ b) @ b.T)
  return calls, torch.__version__


def main(argv=None):
  import numpy as np

  from ul2 import flops
  args = parse_args(argv)
  report = {'shape': [args.m, args.k, args.n], 'cpu_features': cpu_matrix_features(),
            'load_start': flops.machine_load('start'), 'runs': {}}
  sides = {}
  sides['jax'], report['xla_dot_operand_types'] = jax_side(args)
  try:
    sides['torch'], report['torch'] = torch_side(args)
  except ImportError as e:
    print(f'PyTorch side skipped ({e}); install the bench extra: pip install -e ".[bench]"')
  gflop = 2 * 2 * args.m * args.k * args.n / 1e9  # two products
  print(f'[{args.m}, {args.k}] x [{args.k}, {args.n}], two products ({gflop:.1f} GFLOP) per '
        f'call; CPU matrix features: {", ".join(report["cpu_features"]) or "none"}')
  for dtype in ('float32', 'bfloat16'):
    times = {side: [] for side in sides}
    for side in sides:
      sides[side][dtype]()  # compile, allocate
    for _ in range(args.rounds):
      for side, calls in sides.items():
        start = time.perf_counter()
        for _ in range(args.calls):
          calls[dtype]()
        times[side].append((time.perf_counter() - start) / args.calls)
    entry = {side: {'seconds': float(np.median(t)), 'gflops': gflop / float(np.median(t))}
             for side, t in times.items()}
    line = (f'{dtype:>9}  XLA {entry["jax"]["gflops"]:7.1f} GFLOP/s (products on '
            f'{"/".join(report["xla_dot_operand_types"][dtype])})')
    if 'torch' in entry:
      entry['jax_over_torch'] = entry['torch']['seconds'] / entry['jax']['seconds']
      line += (f'   PyTorch {entry["torch"]["gflops"]:7.1f} GFLOP/s   XLA / PyTorch '
               f'{entry["jax_over_torch"]:.2f}x')
    report['runs'][dtype] = entry
    print(line, flush=True)
  if 'bf16' not in report['xla_dot_operand_types']['bfloat16']:
    print('XLA converts the bfloat16 operands to float32 before every product on this '
          'CPU: its bfloat16 step cannot be faster than its float32 one.')
  flops.finish_report(report, args.json)
  return report


if __name__ == '__main__':
  main()
