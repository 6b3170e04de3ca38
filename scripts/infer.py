"""Generate from, or score with, a checkpoint.

    python scripts/infer.py --checkpoint runs/quickstart --input "It was a dark and" --mode '[S2S]'
    python scripts/infer.py --checkpoint runs/quickstart --input "The cat <extra_id_0> mat." \\
        --mode '[NLG]' --decode beam
    python scripts/infer.py --checkpoint runs/quickstart --input "It was a dark and" \\
        --score "stormy night."

`--score TARGET` prints the total natural-log likelihood of TARGET given the input (summed over
the target tokens, EOS included) instead of generating.

Over a file, batched (a progress bar on a terminal, a throughput line at the end):

    python scripts/infer.py --checkpoint runs/quickstart --input_file prompts.txt \
        --output_file out.jsonl --mode '[S2S]' --decode beam --batch_size 32
    python scripts/infer.py --checkpoint runs/quickstart --input_file pairs.jsonl --score_file \
        --output_file scores.jsonl      # {"input": ..., "target": ...} per line

`prompts.txt`: one input per line (or `.jsonl` with an "input" field, `--input_key`);
`out.jsonl`: {"input", "output"} per input, in order; `scores.jsonl`: {"input", "target",
"log_likelihood"}.
"""

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402
from ul2 import data, vocabulary  # noqa: E402


def main(argv=None, out=sys.stdout):
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('--checkpoint', required=True,
                      help='a model_dir, its best/, checkpoints/<step>, an HF or a T5X directory')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='models/<size>.gin when the checkpoint has no config')
  parser.add_argument('--ignore_extra_params', action='store_true',
                      help='drop checkpoint entries the model config does not have')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--input', help='one input text')
  source.add_argument('--input_file', help='inputs: .txt (one per line) or .jsonl (objects '
                      'with --input_key and, for --score_file, --target_key)')
  parser.add_argument('--output_file', help='with --input_file: one JSON object per input '
                      '(input, output; or input, target, log_likelihood)')
  parser.add_argument('--input_key', default='input', help='the input field of .jsonl inputs')
  parser.add_argument('--target_key', default='target', help='the target field (scoring)')
  parser.add_argument('--score_file', action='store_true',
                      help="with --input_file: score each record's target instead of "
                      'generating')
  parser.add_argument('--batch_size', type=int, default=16, help='inputs per batch (files)')
  parser.add_argument('--max_input_length', type=int, default=512,
                      help='input tokens kept (files; longer inputs lose their end)')
  parser.add_argument('--mode', default=None, help='mode token to prepend: one of '
                      f"{', '.join(vocabulary.MODE_TOKENS)} or '' (none); default: the one a "
                      "fine-tuned model's best/ was selected with (best.json), else none")
  parser.add_argument('--decode', choices=('greedy', 'beam', 'sample'), default='greedy',
                      help='how to generate')
  parser.add_argument('--max_length', type=int, default=64, help='generated tokens at most')
  parser.add_argument('--beam_size', type=int, default=4, help='beams (--decode beam)')
  parser.add_argument('--alpha', type=float, default=0.6, help='beam length penalty')
  parser.add_argument('--temperature', type=float, default=1.0, help='sampling temperature')
  parser.add_argument('--top_k', type=int, default=0, help='sample from the k likeliest (0: all)')
  parser.add_argument('--top_p', type=float, default=1.0, help='nucleus sampling mass')
  parser.add_argument('--seed', type=int, default=0, help='sampling seed')
  gin_cli.add_module_flag(parser)
  gin_cli.add_memory_flag(parser)
  parser.add_argument('--score', default=None, help='print log p(SCORE | input) instead')
  args = parser.parse_args(argv)
  gin_cli.reuse_freed_memory(args)
  data.hide_accelerators_from_tensorflow()  # the model runs on the accelerators
  gin_cli.import_modules(args.module)  # e.g. one that registers a vocabulary's tasks

  import jax
  import jax.numpy as jnp
  import numpy as np
  from ul2 import checkpoints, decoding, evaluation, network

  mode = args.mode
  if mode is None:  # a fine-tuned model's best/ answers in the mode it was fine-tuned with
    mode = checkpoints.best_selection(args.checkpoint).get('mode', '')
  try:
    mode = vocabulary.check_mode(mode, '--mode')
  except ValueError as e:
    parser.error(str(e))
  if args.input_file and not args.output_file:
    parser.error('--input_file needs --output_file')
  if args.score_file and not args.input_file:
    parser.error('--score_file needs --input_file (one input: --score TARGET)')
  records = read_inputs(args) if args.input_file else None  # bad input fails before loading
  model, params = checkpoints.load_model(args.checkpoint, gin_cli.model_config(args.gin_file),
                                         args.ignore_extra_params)
  vocab = vocabulary.get_vocabulary()

  def encode(text, length=None):
    ids = vocab.encode(text)[:length - 1 if length else None]
    return ids + [network.EOS_ID]

  def generate(inputs):  # [batch, length] -> [batch, max_length] token ids
    if args.decode == 'greedy':
      return decoding.greedy(model, params, inputs, max_decode_length=args.max_length)
    if args.decode == 'beam':
      sequences, _ = decoding.beam_search(model, params, inputs, beam_size=args.beam_size,
                                          max_decode_length=args.max_length, alpha=args.alpha)
      return sequences[:, 0]
    return decoding.sample(model, params, inputs, jax.random.key(args.seed),
                           max_decode_length=args.max_length, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p)

  def text_of(ids):
    ids = [int(i) for i in np.asarray(ids)]
    ids = ids[:ids.index(network.EOS_ID)] if network.EOS_ID in ids else ids
    return vocabulary.render([i for i in ids if i], vocab)

  if records is None:  # one input
    inputs = jnp.asarray([encode(vocabulary.with_mode(args.input, mode))], jnp.int32)
    if args.score is not None:
      targets = jnp.asarray([encode(args.score)], jnp.int32)
      value = float(decoding.score(model, params, inputs, targets)[0])
      print(f'{value:.4f}', file=out)
      return value
    text = text_of(generate(inputs)[0])
    print(text, file=out)
    return text

  # A file: fixed-shape batches (the last one padded with copies), so one compilation.
  from tqdm import tqdm
  inputs = [encode(vocabulary.with_mode(r['input'], mode), args.max_input_length)
            for r in records]
  targets = [encode(r['target']) for r in records] if args.score_file else None
  width = max(len(i) for i in inputs)
  target_width = max(len(t) for t in targets) if targets else 0
  start, produced, rows = time.perf_counter(), 0, []
  bar = tqdm(total=len(records), unit='input', disable=not sys.stderr.isatty())
  for first in range(0, len(records), args.batch_size):
    chunk = list(range(first, min(first + args.batch_size, len(records))))
    padded = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
    batch = jnp.asarray(evaluation.pad_rows([inputs[i] for i in padded], width))
    if targets:
      values = np.asarray(decoding.score(model, params, batch, jnp.asarray(
          evaluation.pad_rows([targets[i] for i in padded], target_width))))
      rows += [{'input': records[i]['input'], 'target': records[i]['target'],
                'log_likelihood': float(values[j])} for j, i in enumerate(chunk)]
      produced += sum(len(targets[i]) for i in chunk)
    else:
      generated = np.asarray(generate(batch))
      for j, i in enumerate(chunk):
        rows.append({'input': records[i]['input'], 'output': text_of(generated[j])})
        produced += int((generated[j] > 0).sum())
    bar.update(len(chunk))
  bar.close()
  seconds = time.perf_counter() - start
  with open(args.output_file, 'w', encoding='utf-8') as f:
    f.write(''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows))
  what = 'target tokens scored' if targets else f'tokens generated ({args.decode})'
  print(f'{len(rows)} inputs -> {args.output_file}: {produced:,} {what} in {seconds:.1f} s '
        f'({produced / seconds:,.0f} tokens/s, batch {args.batch_size})', file=out)
  return rows


def read_inputs(args) -> list[dict[str, str]]:
  """The records of --input_file as {'input'[, 'target']}; a bad line is one error naming
  the file, the line and the fix."""
  path = args.input_file
  if not os.path.exists(path):
    raise SystemExit(f'error: --input_file {path}: no such file.')
  jsonl = path.endswith('.jsonl')
  if args.score_file and not jsonl:
    raise SystemExit(f'error: --input_file {path}: --score_file reads .jsonl records with '
                     f'"{args.input_key}" and "{args.target_key}" fields.')
  records = []
  with open(path, encoding='utf-8', errors='strict') as f:
    try:
      lines = f.read().splitlines()
    except UnicodeDecodeError as e:
      raise SystemExit(f'error: --input_file {path}: not UTF-8 text ({e.reason} at byte '
                       f'{e.start}).') from None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if not jsonl:
      records.append({'input': line})
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise SystemExit(f'error: {path}:{number}: not valid JSON ({e.msg}).') from None
    keys = [args.input_key] + ([args.target_key] if args.score_file else [])
    missing = [k for k in keys if not isinstance(row, dict) or k not in row]
    if missing:
      raise SystemExit(f'error: {path}:{number}: no field {missing[0]!r} (set --input_key / '
                       '--target_key to the fields your file has).')
    records.append({'input': str(row[args.input_key]),
                    **({'target': str(row[args.target_key])} if args.score_file else {})})
  if not records:
    raise SystemExit(f'error: --input_file {path}: no inputs in it.')
  return records


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main, sys.argv[1:])
