"""Decoding throughput: ul2's greedy, beam search (4), sampling and scoring next to HF
transformers' `generate` (and a teacher-forced forward for scoring) on the same weights and
inputs, in one run, the two sides alternating round for round.

    python scripts/bench_decode.py                     # T5 1.1 small, batch 8, 256 in, 64 new
    python scripts/bench_decode.py --model=ul2_cpu --methods=greedy,score --rounds=5

The weights are random (`network.init_params`, exported with `interop.save_hf`)
with the padding and EOS output columns zeroed, so that every row generates all `--new_tokens`
tokens on both sides. Reported per method: generated (or scored) tokens/s per side as the
median over `--rounds` rounds, and the ratio of medians; for greedy, whether the two sides'
tokens are equal. Needs the `hf` (or `bench`) extra for the HF side; `--no_hf` times ul2 alone.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402

METHODS = ('greedy', 'beam', 'sample', 'score')


def parse_args(argv):
  _, bindings, rest = gin_cli.split_argv(argv)
  p = gin_cli.argument_parser(__doc__, gin_flags=True)
  p.add_argument('--model', default='small', help='a gin_configs/models/*.gin name or path')
  p.add_argument('--batch_size', type=int, default=8, help='rows per call')
  p.add_argument('--inputs_length', type=int, default=256, help='input tokens per row')
  p.add_argument('--new_tokens', type=int, default=64, help='tokens generated per row')
  p.add_argument('--beam_size', type=int, default=4, help='beams for the beam method')
  p.add_argument('--methods', default=','.join(METHODS), help='comma-separated')
  p.add_argument('--rounds', type=int, default=3, help='timed rounds per side and method')
  p.add_argument('--no_hf', action='store_true', help='time ul2 alone')
  gin_cli.add_memory_flag(p)
  p.add_argument('--json', default=None, help='also write the results to this file')
  args = p.parse_args(rest)
  args.bindings = bindings
  return args


def setup(args):
  """(model config, ul2 model, params, inputs [batch, L] with EOS, targets [batch, new])."""
  import jax
  import numpy as np

  from ul2 import network
  path = args.model if args.model.endswith('.gin') else f'models/{args.model}.gin'
  cfg = gin_cli.model_config([path], ['DROPOUT_RATE=0.0', *args.bindings])
  params = network.init_params(cfg, jax.random.key(0))
  kernel = params['decoder']['logits_dense']['kernel'] if not cfg.logits_via_embedding else None
  if kernel is None:
    raise SystemExit('error: bench_decode.py needs untied logits (logits_via_embedding=False) '
                     'to keep padding and EOS out of the random model\'s outputs.')
  params['decoder']['logits_dense']['kernel'] = kernel.at[:, :2].set(0.0)
  rng = np.random.default_rng(0)
  vocab = min(cfg.vocab_size, 32000)
  inputs = rng.integers(2, vocab, (args.batch_size, args.inputs_length)).astype(np.int32)
  inputs[:, -1] = network.EOS_ID
  targets = rng.integers(2, vocab, (args.batch_size, args.new_tokens)).astype(np.int32)
  return cfg, network.build(cfg), params, inputs, targets


def ul2_calls(model, params, inputs, targets, args):
  """{method: a call that returns host tokens (or scores) once the device is done}."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ul2 import decoding
  x, y = jnp.asarray(inputs), jnp.asarray(targets)
  return {
      'greedy': lambda: np.asarray(decoding.greedy(model, params, x, args.new_tokens)),
      'beam': lambda: np.asarray(decoding.beam_search(model, params, x, args.beam_size,
                                                      args.new_tokens)[0]),
      'sample': lambda: np.asarray(decoding.sample(model, params, x, jax.random.key(1),
                                                   args.new_tokens)),
      'score': lambda: np.asarray(decoding.score(model, params, x, y)),
  }


def hf_calls(cfg, params, inputs, targets, args):
  """The same methods with transformers' T5ForConditionalGeneration on the same weights."""
  import numpy as np
  import torch
  import transformers

  import tempfile

  from ul2 import interop
  torch.set_num_threads(os.cpu_count())
  # Through the exporter and from_pretrained: the path whose logits are tested equal to ul2's
  # (transformers 5 ties an untied model's lm_head to its embedding when built otherwise).
  folder = tempfile.mkdtemp(prefix='ul2_bench_decode_')
  interop.save_hf(params, cfg, folder)
  model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
  x = torch.from_numpy(inputs.astype(np.int64))
  mask = torch.ones_like(x)
  labels = torch.from_numpy(targets.astype(np.int64))
  common = dict(input_ids=x, attention_mask=mask, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)

  def generate(**kwargs):
    with torch.no_grad():
      out = model.generate(**common, **kwargs)
    return out[:, 1:].numpy()  # without the decoder start token

  def score():
    with torch.no_grad():
      logits = model(input_ids=x, attention_mask=mask, labels=labels).logits
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0].sum(-1)

  return {
      'greedy': lambda: generate(do_sample=False, num_beams=1),
      'beam': lambda: generate(do_sample=False, num_beams=args.beam_size,
                               num_return_sequences=1),
      'sample': lambda: generate(do_sample=True, top_k=0, top_p=1.0, temperature=1.0),
      'score': lambda: score().numpy(),
  }, {'torch': torch.__version__, 'transformers': transformers.__version__}


def timed(call) -> tuple[float, object]:
  start = time.perf_counter()
  out = call()
  return time.perf_counter() - start, out


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)  # before JAX loads
  import numpy as np

  from ul2 import flops
  reused = gin_cli.reuse_freed_memory(args)  # both sides: they share this process
  cfg, model, params, inputs, targets = setup(args)
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise SystemExit(f'error: --methods: unknown {sorted(unknown)}; choose from {METHODS}.')
  sides = {'ul2': ul2_calls(model, params, inputs, targets, args)}
  report = {'model': args.model, 'batch_size': args.batch_size,
            'inputs_length': args.inputs_length, 'new_tokens': args.new_tokens,
            'load_start': flops.machine_load('start'), 'reuse_freed_memory': reused,
            'methods': {}}
  if not args.no_hf:
    try:
      sides['hf'], report['versions'] = hf_calls(cfg, params, inputs, targets, args)
    except ImportError as e:
      print(f'HF side skipped ({e}); install the hf extra: pip install -e ".[hf]"')
  print(f'{args.model}: batch {args.batch_size}, {args.inputs_length} input tokens, '
        f'{args.new_tokens} new tokens, {args.rounds} alternating rounds, medians')
  tokens = args.batch_size * args.new_tokens
  for method in methods:
    outputs, times = {}, {side: [] for side in sides}
    for side, calls in sides.items():
      outputs[side] = calls[method]()  # warm-up: compilation, allocation
    for _ in range(args.rounds):
      for side, calls in sides.items():
        seconds, outputs[side] = timed(calls[method])
        times[side].append(seconds)
    entry = {side: {'seconds': float(np.median(t)), 'rounds': t,
                    'tokens_per_s': tokens / float(np.median(t))} for side, t in times.items()}
    line = f'{method:>7}  ul2 {entry["ul2"]["tokens_per_s"]:>9,.0f} tokens/s'
    if 'hf' in entry:
      entry['ul2_over_hf'] = entry['hf']['seconds'] / entry['ul2']['seconds']
      line += (f'   HF {entry["hf"]["tokens_per_s"]:>9,.0f} tokens/s   ratio '
               f'{entry["ul2_over_hf"]:.2f}x')
      if method == 'greedy':
        same = np.asarray(outputs['ul2']) == np.asarray(outputs['hf'])
        entry['greedy_equal_rows'] = int(same.all(axis=1).sum())
        line += f'   equal outputs: {entry["greedy_equal_rows"]}/{args.batch_size} rows'
      if method == 'score':
        entry['score_max_abs_diff'] = float(np.max(np.abs(outputs['ul2'] - outputs['hf'])))
        line += f'   scores differ by {entry["score_max_abs_diff"]:.1e} at most'
    report['methods'][method] = entry
    print(line, flush=True)
  flops.finish_report(report, args.json)
  return report


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main)
