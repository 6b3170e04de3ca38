"""Generate from, or score with, a checkpoint.

    python scripts/infer.py --checkpoint runs/quickstart --input "It was a dark and" --mode '[S2S]'
    python scripts/infer.py --checkpoint runs/quickstart --input "The cat <extra_id_0> mat." \\
        --mode '[NLG]' --decode beam
    python scripts/infer.py --checkpoint runs/quickstart --input "It was a dark and" \\
        --score "stormy night."

`--score TARGET` prints the total natural-log likelihood of TARGET given the input (summed over
the target tokens, EOS included) instead of generating.

Over a file, batched (a progress bar on a terminal, a throughput line at the end):

    python scripts/infer.py --checkpoint runs/quickstart --input_file prompts.txt \\
        --output_file out.jsonl --mode '[S2S]' --decode beam --batch_size 32
    python scripts/infer.py --checkpoint runs/quickstart --input_file pairs.jsonl --score_file \\
        --output_file scores.jsonl      # {"input": ..., "target": ...} per line

`prompts.txt`: one input per line (or `.jsonl` with an "input" field, `--input_key`);
`out.jsonl`: {"input", "output"} per input, in order; `scores.jsonl`: {"input", "target",
"log_likelihood"}.
"""

import dataclasses
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402
from ul2 import vocabulary  # noqa: E402  (light: the mode tokens for --help)

# Flags that set a field of the decoding.DecodeConfig a gin file (runs/infer.gin) may bind;
# given on the command line they win. Their defaults are the config's.
DECODE_FLAGS = {'decode': 'method', 'batch_size': 'batch_size',
                'max_input_length': 'max_input_length', 'max_length': 'max_decode_length',
                'beam_size': 'beam_size', 'alpha': 'alpha', 'temperature': 'temperature',
                'top_k': 'top_k', 'top_p': 'top_p', 'seed': 'seed'}


def parse_args(argv):
  gin_files, bindings, rest = gin_cli.split_argv(argv)
  parser = gin_cli.argument_parser(__doc__, gin_flags=True)
  parser.add_argument('--checkpoint', required=True,
                      help='a model_dir, its best/, checkpoint_<step>, an HF or a T5X directory')
  parser.add_argument('--gin_file', action='append', metavar='F',
                      help='models/<size>.gin when the checkpoint has no config; an inference '
                      'recipe (runs/infer.gin, experiments/*_infer_*.gin: decoding and mesh)')
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
  parser.add_argument('--batch_size', type=int, help='inputs per batch (files; default 16)')
  parser.add_argument('--max_input_length', type=int,
                      help='input tokens kept (files; longer inputs lose their end; 512)')
  parser.add_argument('--mode', default=None, help='mode token to prepend: one of '
                      f"{', '.join(vocabulary.MODE_TOKENS)} or '' (none); default: the one a "
                      "fine-tuned model's best/ was selected with (best.json), else none")
  parser.add_argument('--decode', choices=('greedy', 'beam', 'sample'),
                      help='how to generate (default greedy)')
  parser.add_argument('--max_length', type=int, help='generated tokens at most (64)')
  parser.add_argument('--beam_size', type=int, help='beams (--decode beam; 4)')
  parser.add_argument('--alpha', type=float, help='beam length penalty (0.6)')
  parser.add_argument('--temperature', type=float, help='sampling temperature (1.0)')
  parser.add_argument('--top_k', type=int, help='sample from the k likeliest (0: all)')
  parser.add_argument('--top_p', type=float, help='nucleus sampling mass (1.0)')
  parser.add_argument('--seed', type=int, help='sampling seed (0)')
  gin_cli.add_module_flag(parser)
  gin_cli.add_memory_flag(parser)
  gin_cli.add_distributed_flags(parser)
  parser.add_argument('--score', default=None, help='print log p(SCORE | input) instead')
  parser.add_argument('--raw', action='store_true',
                      help='show generated sentinels (<extra_id_N>); default: dropped')
  args = parser.parse_args(rest)
  if args.input_file and not args.output_file:
    parser.error('--input_file needs --output_file')
  if args.score_file and not args.input_file:
    parser.error('--score_file needs --input_file (one input: --score TARGET)')
  return gin_files, bindings, args, parser


def configs(gin_files, bindings, args):
  """(model config or None, DecodeConfig, MeshConfig): runs/infer.gin's, then the gin files'
  (their MODEL_CONFIG, DECODE_CONFIG, MESH_CONFIG), then the flags given."""
  gin_cli.parse(['runs/infer.gin', *gin_files], bindings,
                read_by_script=('MODEL_CONFIG', 'TPU_SLICE'))
  model = gin_cli.macro('MODEL_CONFIG') if gin_cli.has_macro('MODEL_CONFIG') else None
  given = {field: getattr(args, flag) for flag, field in DECODE_FLAGS.items()
           if getattr(args, flag) is not None}
  if args.input_file is None:  # one input: a batch of one
    given['batch_size'] = 1
  return (model, dataclasses.replace(gin_cli.macro('DECODE_CONFIG'), **given),
          gin_cli.macro('MESH_CONFIG'))


def main(argv=None, out=sys.stdout):
  gin_files, bindings, args, parser = parse_args(sys.argv[1:] if argv is None else argv)
  gin_cli.check_checkpoint(args.checkpoint)
  gin_cli.initialize_distributed(args)
  gin_cli.reuse_freed_memory(args)
  from ul2 import data
  data.hide_accelerators_from_tensorflow()  # the model runs on the accelerators
  gin_cli.import_modules(args.module)  # e.g. one that registers a vocabulary's tasks

  import jax
  import numpy as np
  from ul2 import checkpoints, decoding, evaluation, network

  mode = args.mode
  if mode is None:  # a fine-tuned model's best/ answers in the mode it was fine-tuned with
    mode = checkpoints.best_selection(args.checkpoint).get('mode', '')
  try:
    mode = vocabulary.check_mode(mode, '--mode')
    model_cfg, config, mesh = configs(gin_files, bindings, args)
  except ValueError as e:  # gin adds a line naming the configurable the message names
    parser.error(str(e).splitlines()[0])
  records = read_inputs(args) if args.input_file else None  # bad input fails before loading
  model, params = checkpoints.load_model(args.checkpoint, model_cfg, args.ignore_extra_params)
  try:
    decoder = decoding.compile_decode(model.config, config, mesh)
  except ValueError as e:
    parser.error(str(e))
  params = decoder.place_params(params)
  vocab = vocabulary.get_vocabulary()
  write = jax.process_index() == 0  # every process decodes; the first one writes

  def encode(text, length=None):
    ids = vocab.encode(text)[:length - 1 if length else None]
    return ids + [network.EOS_ID]

  def text_of(ids):
    ids = [int(i) for i in np.asarray(ids)]
    ids = ids[:ids.index(network.EOS_ID)] if network.EOS_ID in ids else ids
    text = vocabulary.render([i for i in ids if i], vocab)
    return text if args.raw else vocabulary.without_sentinels(text)

  if records is None:  # one input
    tokens = len(vocab.encode(vocabulary.with_mode(args.input, mode))) + 1  # with EOS
    if tokens > config.max_input_length and write:
      print(f'note: --input is {tokens:,} tokens; its first {config.max_input_length} are '
            'read (--max_input_length).', file=sys.stderr)
    inputs = decoder.place_batch([encode(vocabulary.with_mode(args.input, mode),
                                         config.max_input_length)])
    if args.score is not None:
      targets = decoder.place_batch([encode(args.score)])
      value = float(decoder.score(params, inputs, targets)[0])
      if write:
        print(f'log p(target | input) = {value:.4f} nats (natural log, summed over the '
              f'{len(encode(args.score))} target tokens, EOS included)', file=out)
      return value
    text = text_of(decoder.generate(params, inputs)[0])
    if write:
      print(text, file=out)
    return text

  # A file: fixed-shape batches (the last one padded with copies), so one compilation.
  from tqdm import tqdm
  batch_size = config.batch_size
  inputs = [encode(vocabulary.with_mode(r['input'], mode), config.max_input_length)
            for r in records]
  targets = [encode(r['target']) for r in records] if args.score_file else None
  width = max(len(i) for i in inputs)
  target_width = max(len(t) for t in targets) if targets else 0
  start, produced, rows = time.perf_counter(), 0, []
  first_batch = None  # (seconds, tokens) of the first batch, which compiles
  bar = tqdm(total=len(records), unit='input', disable=not (write and sys.stderr.isatty()))
  for first in range(0, len(records), batch_size):
    chunk = list(range(first, min(first + batch_size, len(records))))
    batch = decoder.place_batch(evaluation.pad_rows([inputs[i] for i in chunk], width))
    if targets:
      values = np.asarray(decoder.score(params, batch, decoder.place_batch(
          evaluation.pad_rows([targets[i] for i in chunk], target_width))))
      rows += [{'input': records[i]['input'], 'target': records[i]['target'],
                'log_likelihood': float(values[j])} for j, i in enumerate(chunk)]
      produced += sum(len(targets[i]) for i in chunk)
    else:
      generated = np.asarray(decoder.generate(params, batch))
      for j, i in enumerate(chunk):
        rows.append({'input': records[i]['input'], 'output': text_of(generated[j])})
        produced += int((generated[j] > 0).sum())
    if first_batch is None:
      first_batch = (time.perf_counter() - start, produced)
    bar.update(len(chunk))
  bar.close()
  seconds = time.perf_counter() - start
  if write:
    with open(args.output_file, 'w', encoding='utf-8') as f:
      f.write(''.join(json.dumps(row, ensure_ascii=False) + '\n' for row in rows))
    what = 'target tokens scored' if targets else f'tokens generated ({config.method})'
    after = seconds - first_batch[0]
    rate = (f'{(produced - first_batch[1]) / after:,.0f} tokens/s after the first batch' if after
            > 0 and len(rows) > batch_size else 'one batch: its time includes compilation')
    print(f'{len(rows)} inputs -> {args.output_file}: {produced:,} {what} in {seconds:.1f} s '
          f'({rate}; compiling and the first batch {first_batch[0]:.1f} s; batch '
          f'{batch_size}, mesh {dict(decoder.mesh.shape)})', file=out)
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
