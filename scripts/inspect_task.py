"""Print a seqio task's examples with sentinels and mode tokens visible, and denoiser statistics.

    python scripts/inspect_task.py --task ul2_mod_gutenberg --split train --num_examples 5
    python scripts/inspect_task.py --task ul2_mod_gutenberg --num_examples 100 --json

With `--json`, one JSON object per line and example: `denoiser`, `mode`, `inputs` and `targets`
(token ids as the task emits them: before packing and padding, EOS included) and their decoded
text (`inputs_text`, `targets_text`). The statistics then go to standard error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import collections
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # the data pipeline never needs a GPU

import gin_cli  # noqa: E402

if TYPE_CHECKING:  # annotations only: --help must not load TensorFlow
  import seqio
  from ul2 import denoisers

GUTENBERG_DIR_ENV = 'UL2_GUTENBERG_DIR'  # ul2_tasks.pretrain's (read without importing seqio)


def mixture_of(task: seqio.Task) -> denoisers.MixtureConfig | None:
  from ul2 import denoisers
  for p in task.preprocessors:
    if isinstance(p, denoisers.MixtureOfDenoisers):
      return p.config
  return None


def parse_args(argv):
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('--task', required=True, help='a registered seqio task or mixture')
  parser.add_argument('--split', default='train', help='the split to read')
  parser.add_argument('--num_examples', type=int, default=5, help='examples to show')
  parser.add_argument('--json', action='store_true', help='one JSON object per example')
  parser.add_argument('--seed', type=int, default=0, help="the denoisers' seed")
  parser.add_argument('--inputs_length', type=int, default=512, help='input feature length')
  parser.add_argument('--targets_length', type=int, default=512, help='target feature length')
  gin_cli.add_module_flag(parser)
  parser.add_argument('--gutenberg_dir', default=None,
                      help='directory of gutenberg_{train,validation}_*.txt (default: '
                           f'${GUTENBERG_DIR_ENV} or the bundled sample)')
  return parser.parse_args(argv)


def main(argv=None, out=sys.stdout, err=sys.stderr):
  args = parse_args(argv)
  from ul2 import data
  data.hide_accelerators_from_tensorflow()  # TensorFlow loads quietly (and off the GPUs)
  import seqio
  import ul2_tasks  # noqa: F401  (registers the tasks)
  from ul2_tasks import pretrain
  from ul2 import denoisers, vocabulary
  gin_cli.import_modules(args.module)
  if args.gutenberg_dir:
    pretrain.register_gutenberg(args.gutenberg_dir)
  try:
    task = data.check_task(args.task)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  mixture = mixture_of(task) if isinstance(task, seqio.Task) else None
  vocab = task.output_features['targets'].vocabulary
  special = {v: k for k, v in (mixture.mode_token_ids or {}).items()} if mixture else {}
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  ds = task.get_dataset(lengths, split=args.split, shuffle=False, seed=args.seed)

  stats = collections.defaultdict(lambda: collections.Counter())
  report = err if args.json else out
  for i, ex in enumerate(ds.take(args.num_examples).as_numpy_iterator()):
    inputs, targets = ex['inputs'].tolist(), ex['targets'].tolist()
    d = mixture.denoisers[int(ex['denoiser'])] if mixture and 'denoiser' in ex else None
    name = d.name if d else 'task'
    record = {
        'denoiser': d.name if d else None,
        'mode': d.mode if d else None,
        'inputs': inputs,
        'targets': targets,
        'inputs_text': vocabulary.render(inputs, vocab, special),
        'targets_text': vocabulary.render(targets, vocab, special),
    }
    s = stats[name]
    s['examples'] += 1
    s['inputs_tokens'] += len(inputs)
    s['targets_tokens'] += len(targets)
    if d is not None and d.family != 'S':
      spans = sum(vocab.vocab_size - vocab.extra_ids <= t < vocab.vocab_size for t in inputs)
      s['spans'] += spans
      s['noise'] += len(targets) - 1 - spans  # minus EOS and sentinels
      s['raw'] += len(inputs) - 1 - len(denoisers.mode_token_ids(d.mode, mixture, vocab)) - spans + (
          len(targets) - 1 - spans)
    if args.json:
      print(json.dumps(record), file=out)
    else:
      print(f'--- example {i}: {name} {d.mode if d else ""}', file=out)
      print(f'inputs  ({len(inputs)}): {record["inputs_text"]}', file=out)
      print(f'targets ({len(targets)}): {record["targets_text"]}', file=out)

  print(f'\n{"denoiser":<12} {"examples":>8} {"inputs":>8} {"targets":>8} {"corrupt":>8} '
        f'{"span":>6}', file=report)
  for name, s in sorted(stats.items()):
    n = s['examples']
    rate = f'{s["noise"] / s["raw"]:.3f}' if s['raw'] else '-'
    span = f'{s["noise"] / s["spans"]:.1f}' if s['spans'] else '-'
    print(f'{name:<12} {n:>8} {s["inputs_tokens"] / n:>8.1f} {s["targets_tokens"] / n:>8.1f} '
          f'{rate:>8} {span:>6}', file=report)
  print('(inputs/targets: mean tokens per example incl. mode token and EOS; corrupt: noise '
        'tokens / raw chunk tokens; span: mean noise-span length)', file=report)


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main)
