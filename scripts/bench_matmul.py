"""The matrix products of a bfloat16 train step on a CPU, XLA:CPU against PyTorch: one
projection's forward product and its two gradient products, as a train step runs them for
every layer, in float32 and bfloat16, and what XLA compiles the bfloat16 products to.

    python scripts/bench_matmul.py                       # [4096, 512] x [512, 1024]
    python scripts/bench_matmul.py --m 8192 --k 512 --n 2048 --rounds 9

`x` [m, k] (activations) times `kernel` [k, n] (a float32 parameter), then the gradients
with respect to both: three products. Three implementations alternate in rounds, so they meet
the same machine load; per dtype and side the median GFLOP/s:

- `xla`: the plain product, `jnp.dot(x, kernel.astype(dtype))`. jaxlib 0.10.2 converts the
  operands of these bfloat16 products to float32 before multiplying, so they run at float32
  speed.
- `library`: `ul2.network.dot` in its 'library' form (UL2_CPU_BFLOAT16_PRODUCTS=library): the
  bfloat16 products reach XLA:CPU's bfloat16 library (YNNPACK) in the form it takes (bfloat16
  operands, float32 result, row-major operands); the same numbers up to the order of the
  float32 sums.
- `torch`: PyTorch, the same products through autograd (oneDNN, AMX where the CPU has it).

The report also says which element types the products in XLA's optimized HLO take, per
implementation, which bfloat16 instructions the CPU has (AMX, AVX512-BF16), and which form
`network.dot` takes on it ('auto': the library only with those instructions). Needs the
`bench` extra for the PyTorch side.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402


def parse_args(argv=None):
  p = gin_cli.argument_parser(__doc__)
  p.add_argument('--m', type=int, default=4096, help='rows of x (batch x length)')
  p.add_argument('--k', type=int, default=512, help='contracted dimension (embed)')
  p.add_argument('--n', type=int, default=1024, help='columns of the kernel (mlp)')
  p.add_argument('--rounds', type=int, default=5, help='timed rounds per side and dtype')
  p.add_argument('--calls', type=int, default=10, help='calls per round')
  p.add_argument('--json', default=None, help='also write the results to this file')
  return p.parse_args(argv)


def jax_sides(args):
  """{side: {dtype: call}} for 'xla' and 'library', and {side: {dtype: operand types of the
  three products in XLA's optimized HLO}}."""
  import jax
  import jax.numpy as jnp

  from ul2 import flops, network
  products = {'xla': lambda x, kernel, dtype: jnp.dot(x, kernel.astype(dtype)),
              'library': network.dot}
  calls, operand_types = {}, {}
  # network.dot's form is chosen when it is traced (below); the user's setting comes back after.
  user_choice = os.environ.get(network.CPU_BFLOAT16_PRODUCTS_ENV)
  os.environ[network.CPU_BFLOAT16_PRODUCTS_ENV] = 'library'
  for side, product in products.items():
    calls[side], operand_types[side] = {}, {}
    for name, dtype in (('float32', jnp.float32), ('bfloat16', jnp.bfloat16)):
      key = jax.random.key(0)
      x = jax.random.normal(key, (args.m, args.k), dtype)
      kernel = jax.random.normal(jax.random.fold_in(key, 1), (args.k, args.n)) * 0.05
      cotangent = jax.random.normal(jax.random.fold_in(key, 2), (args.m, args.n), dtype)

      def loss(x, kernel, product=product, dtype=dtype, cotangent=cotangent):
        return jnp.sum((product(x, kernel, dtype) * cotangent).astype(jnp.float32))

      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      hlo = step.lower(x, kernel).compile().as_text()
      operand_types[side][name] = sorted({'/'.join(t) for t in flops.dot_operand_types(hlo)})
      calls[side][name] = (lambda step=step, x=x, kernel=kernel:
                           jax.block_until_ready(step(x, kernel)))
  os.environ.pop(network.CPU_BFLOAT16_PRODUCTS_ENV)
  if user_choice is not None:
    os.environ[network.CPU_BFLOAT16_PRODUCTS_ENV] = user_choice
  return calls, operand_types


def torch_side(args):
  import torch
  torch.set_num_threads(os.cpu_count())
  calls = {}
  for name, dtype in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.m, args.k, generator=g).to(dtype).requires_grad_()
    kernel = (torch.randn(args.k, args.n, generator=g) * 0.05).requires_grad_()
    cotangent = torch.randn(args.m, args.n, generator=g).to(dtype)

    def call(x=x, kernel=kernel, cotangent=cotangent, dtype=dtype):
      x.grad = kernel.grad = None
      (x @ kernel.to(dtype)).backward(cotangent)
    calls[name] = call
  return calls, torch.__version__


def main(argv=None):
  args = parse_args(argv)  # --help and flag mistakes before JAX loads
  import numpy as np

  from ul2 import flops, network
  report = {'shape': [args.m, args.k, args.n],
            'cpu_features': network.cpu_bfloat16_instructions(),
            'network_dot_on_this_cpu': network.cpu_bfloat16_products(),
            'load_start': flops.machine_load('start'), 'runs': {}}
  jax_calls, report['xla_dot_operand_types'] = jax_sides(args)
  sides = dict(jax_calls)
  try:
    sides['torch'], report['torch'] = torch_side(args)
  except ImportError as e:
    print(f'PyTorch side skipped ({e}); install the bench extra: pip install -e ".[bench]"')
  gflop = 3 * 2 * args.m * args.k * args.n / 1e9  # forward and two gradient products
  print(f'x [{args.m}, {args.k}] x kernel [{args.k}, {args.n}], forward and both gradients '
        f'({gflop:.1f} GFLOP) per call; CPU bfloat16 instructions: '
        f'{", ".join(report["cpu_features"]) or "none"}, so network.dot takes the '
        f'{report["network_dot_on_this_cpu"]!r} form here')
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
    line = f'{dtype:>9}'
    for side in jax_calls:
      types = ', '.join(report['xla_dot_operand_types'][side][dtype])
      line += f'  {side} {entry[side]["gflops"]:7.1f} GFLOP/s ({types})'
    if 'torch' in entry:
      for side in jax_calls:
        entry[f'{side}_over_torch'] = entry['torch']['seconds'] / entry[side]['seconds']
      line += (f'  PyTorch {entry["torch"]["gflops"]:7.1f} GFLOP/s  xla / library vs '
               f'PyTorch {entry["xla_over_torch"]:.2f}x / {entry["library_over_torch"]:.2f}x')
    report['runs'][dtype] = entry
    print(line, flush=True)
  flops.finish_report(report, args.json)
  return report


if __name__ == '__main__':
  main()
