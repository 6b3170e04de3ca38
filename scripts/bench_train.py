"""Training-step throughput and MFU of ul2's jitted train_step, next to HF transformers' PyTorch
T5ForConditionalGeneration doing the same training step in the same run: the two sides
alternate in rounds of a few steps (`--rounds`, `--steps`), so both meet the same machine load,
and each reports its median step time and the spread over its rounds. The PyTorch side runs in
a process of its own, so that each side's peak resident memory (RSS) is its own.

    python scripts/bench_train.py                              # ul2_cpu model, CPU, f32 + bf16
    python scripts/bench_train.py --model=base --batch_size=32 --inputs_length=512 \\
        --targets_length=512 --dtypes=bfloat16 --synthetic --no_torch   # on a GPU: MFU
    python scripts/bench_train.py --model=large ... --gin.network.Config.remat_policy="'minimal'"
    python scripts/bench_train.py --model=decoder_only_cpu      # decoder-only (no HF peer)
    bash scripts/bench_gpu.sh                                  # T5 1.1 base + large on one GPU

Both sides run the same architecture (gated GELU or SiLU, untied logits, relative position
buckets), the same Adafactor (factored, decay 0.8, clipping 1.0, parameter scaling; HF's
`transformers.optimization.Adafactor` implements the same algorithm) on the same token batches,
dropout off, from the same initial weights (ul2's, in HF's names: `interop.to_hf_state_dict`;
both report the first step's cross-entropy), and with subnormal floats flushed to zero on both
sides, as XLA:CPU computes. bfloat16 means bfloat16 activations with float32 parameters on
both sides (JAX: `network.Config.dtype`; PyTorch: `torch.autocast`), with one difference:
ul2's logits product is float32, as T5X's `logits_dense` is, where autocast runs HF's in
bfloat16; `--torch_float32_logits` gives PyTorch T5X's. The PyTorch side needs the `bench`
extra (`pip install -e '.[bench]'`).

`--synthetic` feeds random tokens and imports neither TensorFlow nor seqio, so it runs on an
accelerator image that has only JAX; without it the batches are real packed MoD batches.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Sequence

import gin_cli


def parse_args(argv=None):
  """The benchmark's flags; `--gin.NAME=VALUE` bindings (T5X's convention) go to the model."""
  _, bindings, rest = gin_cli.split_argv(sys.argv[1:] if argv is None else argv)
  p = gin_cli.argument_parser(__doc__, gin_flags=True)
  p.add_argument('--model', default='ul2_cpu', help='a gin_configs/models/*.gin name or path')
  p.add_argument('--batch_size', type=int, default=8, help='global batch')
  p.add_argument('--inputs_length', type=int, default=128, help='input tokens per row')
  p.add_argument('--targets_length', type=int, default=128, help='target tokens per row')
  p.add_argument('--dtypes', default='float32,bfloat16',
                 help='activation dtypes to measure, comma-separated')
  p.add_argument('--steps', type=int, default=3, help='timed steps per round and side')
  p.add_argument('--rounds', type=int, default=5,
                 help='rounds per side, alternating JAX and PyTorch')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps (compilation) first')
  p.add_argument('--synthetic', action='store_true', help='random tokens; no TF or seqio')
  p.add_argument('--no_torch', action='store_true', help='skip the PyTorch peer')
  p.add_argument('--model_parallel', type=int, default=1,
                 help="the mesh's model axis (the rest is data parallel)")
  p.add_argument('--peak_flops', type=float, default=None,
                 help='peak FLOP/s per device for MFU (default: known accelerators)')
  p.add_argument('--torch_glibc_tunables', default=None, metavar='TUNABLES',
                 help="GLIBC_TUNABLES for the PyTorch process alone, e.g. 'glibc.malloc.mmap_max=0:"
                 "glibc.malloc.trim_threshold=68719476736' (what ul2's reuse of freed memory "
                 'sets in its own process; PyTorch runs its ops on the calling thread)')
  p.add_argument('--torch_float32_logits', action='store_true',
                 help="bfloat16: PyTorch's logits product in float32, as T5X's (and ul2's) "
                 "logits_dense computes it; without it HF's autocast runs it in bfloat16")
  gin_cli.add_memory_flag(p)
  p.add_argument('--json', default=None, help='also write the results to this file')
  args = p.parse_args(rest)
  args.bindings = bindings
  return args


if __name__ == '__main__':  # --help and flag mistakes answer before JAX and TensorFlow load
  parse_args()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ul2 import data as data_lib  # noqa: E402
from ul2 import flops as flops_lib  # noqa: E402
from ul2 import interop  # noqa: E402
from ul2 import network  # noqa: E402
from ul2 import partitioning  # noqa: E402
from ul2 import train as train_lib  # noqa: E402


def model_config(name: str, dtype: str, bindings: Sequence[str] = ()) -> network.Config:
  path = name if name.endswith('.gin') else f'models/{name}.gin'
  gin_cli.parse([path], [f"ACTIVATION_DTYPE='{dtype}'", 'DROPOUT_RATE=0.0', *bindings])
  return gin_cli.macro('MODEL_CONFIG')


def make_batches(args, cfg: network.Config, count: int) -> list[dict[str, np.ndarray]]:
  """`count` host batches with the feature converter's keys (a decoder-only model's: one row
  of inputs + targets, as seqio's PrefixLMFeatureConverter makes it)."""
  if args.synthetic:
    rng = np.random.default_rng(0)
    shift = lambda x: np.pad(x, ((0, 0), (1, 0)))[:, :-1].astype(np.int32)
    out = []
    for _ in range(count):
      inputs = rng.integers(2, min(cfg.vocab_size, 32000), (args.batch_size, args.inputs_length))
      targets = rng.integers(2, min(cfg.vocab_size, 32000),
                             (args.batch_size, args.targets_length))
      if cfg.architecture == 'decoder_only':
        row = np.concatenate([inputs, targets], axis=1).astype(np.int32)
        position = np.arange(row.shape[1])[None].repeat(args.batch_size, 0)
        out.append({'decoder_target_tokens': row, 'decoder_input_tokens': shift(row),
                    'decoder_loss_weights': (position >= args.inputs_length).astype(np.int32),
                    'decoder_causal_attention': (position <= args.inputs_length)
                                                .astype(np.int32)})
        continue
      out.append({'encoder_input_tokens': inputs.astype(np.int32),
                  'decoder_target_tokens': targets.astype(np.int32),
                  'decoder_input_tokens': shift(targets),
                  'decoder_loss_weights': np.ones_like(targets, np.float32)})
    return out
  import ul2_tasks  # noqa: F401  (TensorFlow and seqio: only without --synthetic)
  data = data_lib.DataConfig('ul2_mod_gutenberg', {'inputs': args.inputs_length,
                                                   'targets': args.targets_length},
                             batch_size=args.batch_size, pack=False)
  batches = data_lib.HostBatches(data_lib.make_datasets(data, 'train', 0, repeat=True,
                                                        shuffle=False,
                                                        architecture=cfg.architecture))
  return [next(batches) for _ in range(count)]


class JaxSide:
  """ul2's jitted train step on its mesh, ready to run timed rounds."""

  name = 'jax'

  def __init__(self, cfg: network.Config, args, batches):
    run = train_lib.TrainConfig(tempfile.mkdtemp(), steps=10_000, progress_bar=False)
    optimizer = train_lib.OptimizerConfig(schedule='constant', learning_rate=0.01,
                                          warmup_steps=0)
    self.compiled = train_lib.compile_run(cfg, optimizer, run,
                                          partitioning.MeshConfig(model=args.model_parallel))
    partitioning.check_batch_size(args.batch_size, self.compiled.mesh)
    self.state = self.compiled.init(jax.random.key(0))
    self.batches = [partitioning.global_batch(b, self.compiled.mesh) for b in batches]
    self.done = 0
    self.cfg, self.args = cfg, args

  def hf_weights(self) -> dict[str, np.ndarray]:
    """The initial parameters as HF T5 tensors, for the PyTorch peer to start from (before
    any step: the steps donate the state's buffers)."""
    assert self.done == 0
    return interop.to_hf_state_dict(jax.device_get(self.state.params), self.cfg)

  def round(self, steps: int) -> float:
    """Runs `steps` steps; seconds per step."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.compiled.train_step(
          self.state, self.batches[self.done % len(self.batches)])
      if self.done == 0:  # the initial weights' loss, to compare with the peer's
        self.first_loss = float(self.metrics['cross_entropy'])
      self.done += 1
    jax.block_until_ready(self.metrics)
    return (time.perf_counter() - start) / steps

  def report(self, seconds: float) -> dict:
    args = self.args
    flops = flops_lib.flops_per_step(self.cfg, args.batch_size, args.inputs_length,
                                     args.targets_length)
    rates = flops_lib.throughput(
        flops, args.batch_size * (args.inputs_length + args.targets_length), seconds,
        self.compiled.mesh.devices.size,
        args.peak_flops or flops_lib.peak_flops(jax.devices()[0]))
    # Accelerators report the allocator's high-water mark; the CPU client reports nothing.
    memory = jax.devices()[0].memory_stats() or {}
    return {'peak_memory_gib': memory['peak_bytes_in_use'] / 2**30
            if 'peak_bytes_in_use' in memory else None,
            'peak_rss_gib': flops_lib.peak_rss_gib(), 'pid': os.getpid(),
            **rates, 'first_loss': self.first_loss, 'final_loss': float(self.metrics['loss']),
            'parameters': sum(x.size for x in jax.tree.leaves(self.state.params))}


class TorchSide:
  """HF transformers' T5ForConditionalGeneration doing the same training step in PyTorch,
  from `weights` (HF tensors: the JAX side's initial parameters) when given."""

  name = 'torch'

  def __init__(self, cfg: network.Config, args, batches, dtype: str,
               weights: dict[str, np.ndarray] | None = None):
    import torch
    import transformers
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    # XLA:CPU flushes subnormal floats to zero; PyTorch by default computes with them, which
    # x86 cores do in slow microcode (HF's own initialisation of T5 1.1 small made float32
    # steps 4x slower that way).
    torch.set_flush_denormal(True)
    # The architecture as ul2 exports it (interop's config.json), dropout off.
    config = transformers.T5Config(**{**interop.hf_config(cfg), 'dropout_rate': 0.0})
    # transformers 5 ties T5's logits to the embedding whatever the keyword says (its
    # from_pretrained unties a checkpoint that holds both); the attribute unties them, as in
    # T5 1.1, and the stacks' inputs are then re-tied to the one shared embedding below.
    config.tie_word_embeddings = bool(cfg.logits_via_embedding)
    self.torch, self.versions = torch, {'torch': torch.__version__,
                                        'transformers': transformers.__version__}
    self.model = transformers.T5ForConditionalGeneration(config).train()
    self.model.set_input_embeddings(self.model.shared)
    assert (self.model.lm_head.weight is self.model.shared.weight) == cfg.logits_via_embedding
    self.parameter_count = sum(p.numel() for p in self.model.parameters())
    if weights is not None:
      missing, unexpected = self.model.load_state_dict(
          {name: torch.from_numpy(value) for name, value in weights.items()}, strict=False)
      # The two embed_tokens are the shared embedding (tied above), which the tensors hold.
      assert not unexpected and set(missing) <= {'encoder.embed_tokens.weight',
                                                  'decoder.embed_tokens.weight'}, missing
    if args.torch_float32_logits:
      head = self.model.lm_head

      def float32_logits(x):  # [batch, length, emb] -> float32 [batch, length, vocab]
        with torch.autocast('cpu', enabled=False):
          return torch.nn.functional.linear(x.float(), head.weight)

      head.forward = float32_logits
    self.opt = Adafactor(self.model.parameters(), lr=0.01, relative_step=False,
                         scale_parameter=True, warmup_init=False, clip_threshold=1.0,
                         decay_rate=-0.8)
    self.dtype, self.args, self.done = dtype, args, 0
    self.tensors = []
    for b in batches:
      labels = torch.from_numpy(b['decoder_target_tokens'].astype(np.int64))
      labels[labels == 0] = -100
      self.tensors.append(dict(
          input_ids=torch.from_numpy(b['encoder_input_tokens'].astype(np.int64)),
          attention_mask=torch.from_numpy((b['encoder_input_tokens'] > 0).astype(np.int64)),
          decoder_input_ids=torch.from_numpy(b['decoder_input_tokens'].astype(np.int64)),
          labels=labels))

  def round(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      with self.torch.autocast('cpu', dtype=self.torch.bfloat16,
                               enabled=self.dtype == 'bfloat16'):
        loss = self.model(**self.tensors[self.done % len(self.tensors)]).loss
      loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      self.loss = float(loss.detach())
      if self.done == 0:
        self.first_loss = self.loss
      self.done += 1
    return (time.perf_counter() - start) / steps

  def report(self, seconds: float) -> dict:
    args = self.args
    return {'tokens_per_s': args.batch_size * (args.inputs_length + args.targets_length)
            / seconds, 'first_loss': self.first_loss, 'final_loss': self.loss,
            'parameters': self.parameter_count,
            'peak_rss_gib': flops_lib.peak_rss_gib(),
            'pid': os.getpid(), **self.versions}


class TorchProcess:
  """A `TorchSide` in a process of its own, driven over a pipe: its peak RSS is PyTorch's
  alone, not the sum with JAX's in one process."""

  name = 'torch'

  def __init__(self, cfg: network.Config, args, batches, dtype: str,
               weights: dict[str, np.ndarray] | None = None):
    context = multiprocessing.get_context('spawn')  # no fork of a process running XLA
    self.conn, child = context.Pipe()
    self.process = context.Process(target=_torch_process, daemon=True,
                                   args=(child, cfg, args, batches, dtype, weights))
    given = os.environ.get('GLIBC_TUNABLES')
    if args.torch_glibc_tunables is not None:  # read by glibc when the child starts
      os.environ['GLIBC_TUNABLES'] = args.torch_glibc_tunables
    try:
      self.process.start()
    finally:
      os.environ.pop('GLIBC_TUNABLES', None)
      if given is not None:
        os.environ['GLIBC_TUNABLES'] = given
    child.close()  # so that a child that dies ends recv() instead of leaving it waiting
    self._ask()  # built, or its ImportError

  def _ask(self, *command):
    """Sends `command` (none: only waits for the answer) and returns the child's answer."""
    try:
      if command:
        self.conn.send(command)
      ok, value = self.conn.recv()
    except (EOFError, OSError):  # the child is gone: a crash, a kill, out of memory
      self.process.join()
      raise RuntimeError(f'the PyTorch process exited (code {self.process.exitcode}) before '
                         'answering; its error, if it printed one, is above') from None
    if not ok:
      self.process.join()
      raise value
    return value

  def round(self, steps: int) -> float:
    return self._ask('round', steps)

  def report(self, seconds: float) -> dict:
    report = self._ask('report', seconds)
    self.process.join()
    return report


def _torch_process(conn, cfg, args, batches, dtype, weights) -> None:
  try:
    side = TorchSide(cfg, args, batches, dtype, weights)
  except Exception as e:
    conn.send((False, e))
    return
  conn.send((True, None))
  while True:
    command, value = conn.recv()
    conn.send((True, getattr(side, command)(value)))
    if command == 'report':
      return


def interleaved(sides, args) -> dict[str, dict]:
  """Warm-up, then `args.rounds` rounds of `args.steps` steps per side, alternating sides so
  that both meet the same machine load; per side the median seconds per step (the figures
  reported) and its spread over the rounds."""
  for side in sides:
    side.round(args.warmup)
  times = {side.name: [] for side in sides}
  for _ in range(args.rounds):
    for side in sides:
      times[side.name].append(side.round(args.steps))
  out = {}
  for side in sides:
    t = np.array(times[side.name])
    median = float(np.median(t))
    out[side.name] = {'seconds_per_step': median, 'rounds': t.tolist(),
                      'spread': float((t.max() - t.min()) / median), **side.report(median)}
  return out


def main(argv=None):
  args = parse_args(argv)
  reused = gin_cli.reuse_freed_memory(args)  # the JAX side's process, as scripts/train.py does
  results = {'model': args.model, 'gin_bindings': args.bindings, 'batch_size': args.batch_size,
             'lengths': [args.inputs_length, args.targets_length],
             'device': str(jax.devices()[0].device_kind), 'devices': jax.device_count(),
             'synthetic': args.synthetic, 'reuse_freed_memory': reused,
             'torch_glibc_tunables': args.torch_glibc_tunables,
             'torch_float32_logits': args.torch_float32_logits, 'runs': {}}
  print(f'{args.model}: batch {args.batch_size}, {args.inputs_length}/{args.targets_length} '
        f'tokens, {jax.device_count()} x {jax.devices()[0].device_kind}; {args.rounds} '
        f'alternating rounds of {args.steps} steps per side, medians')
  if jax.default_backend() == 'cpu':
    # PyTorch, too, multiplies bfloat16 fast only with these instructions.
    native = network.cpu_bfloat16_instructions()
    results['cpu_bfloat16'] = {'instructions': native,
                               'network_dot': network.cpu_bfloat16_products()}
    print(f'CPU bfloat16 instructions: {", ".join(native) or "none"}; bfloat16 products in '
          f"network.dot's {results['cpu_bfloat16']['network_dot']!r} form")
  glibc = "glibc's default"
  torch_memory = f'GLIBC_TUNABLES={args.torch_glibc_tunables}' if args.torch_glibc_tunables \
      else f'released ({glibc})'
  print(f"Freed memory: ul2/JAX {'reused' if reused else f'released ({glibc})'}, "
        f'PyTorch {torch_memory}')
  print('bfloat16 logits products: ul2/JAX float32 (T5X\'s logits_dense), PyTorch '
        + ('float32 (--torch_float32_logits)' if args.torch_float32_logits
           else "bfloat16 (HF's autocast)"))
  results['load_start'] = flops_lib.machine_load('start')
  batches = None
  for dtype in args.dtypes.split(','):
    cfg = model_config(args.model, dtype, args.bindings)
    if batches is None:
      batches = make_batches(args, cfg, 4)
    if cfg.architecture != 'encoder_decoder' and not args.no_torch:
      print(f'No PyTorch peer for a {cfg.architecture} model: transformers has no T5-style '
            'relative-position decoder-only class.')
      args.no_torch = True
    sides = None
    gc.collect()  # the previous configuration's arrays, before this one's peak is measured
    flops_lib.reset_peak_memory()
    sides = [JaxSide(cfg, args, batches)]
    if not args.no_torch:
      try:
        sides.append(TorchProcess(cfg, args, batches, dtype, sides[0].hf_weights()))
      except ImportError as e:
        print(f'PyTorch peer skipped ({e}); install the bench extra: pip install -e ".[bench]"')
        args.no_torch = True
    entry = interleaved(sides, args)
    jax_run = entry['jax']
    line = (f'{dtype:>9}  ul2/JAX {jax_run["tokens_per_s"]:>10,.0f} tokens/s '
            f'({jax_run["seconds_per_step"]:.3f} s/step, spread {jax_run["spread"]:.0%}')
    line += f', MFU {jax_run["mfu"]:.1%}' if jax_run['mfu'] else ''
    if jax_run['peak_memory_gib']:
      line += f', device peak {jax_run["peak_memory_gib"]:.1f} GiB'
    line += f', peak RSS {jax_run["peak_rss_gib"]:.2f} GiB)'
    if 'torch' in entry:
      torch_run = entry['torch']
      entry['jax_over_torch'] = jax_run['tokens_per_s'] / torch_run['tokens_per_s']
      line += (f'   HF PyTorch {torch_run["tokens_per_s"]:>10,.0f} tokens/s (spread '
               f'{torch_run["spread"]:.0%}, peak RSS {torch_run["peak_rss_gib"]:.2f} GiB)   '
               f'ratio of medians {entry["jax_over_torch"]:.2f}x (target >= 1.0x); '
               f'first-step cross-entropy {jax_run["first_loss"]:.4f} / '
               f'{torch_run["first_loss"]:.4f} (the same initial weights)')
    results['runs'][dtype] = entry
    print(line, flush=True)
  flops_lib.finish_report(results, args.json)
  if args.synthetic:
    assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules
  return results


if __name__ == '__main__':
  main()
