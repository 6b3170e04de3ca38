"""Data-pipeline throughput: the MoD task next to span corruption alone, same seqio path.

    python scripts/bench_data.py [--rows 3000] [--inputs_length 512] [--targets_length 512]

Two paths, both ending in `EncDecFeatureConverter(pack=True)` on the train split, repeated, and
timed after a warm-up:
  text    `get_dataset`: read, tokenize (in blocks of 128 documents), denoise, EOS;
  cached  the tokenized blocks held in memory, then the task's post-cache preprocessors
          (denoise, EOS): what seqio runs for a cached task (`use_cached=True`), as production
          T5X training does.
Reported: packed rows/s, examples/s (segments packed into those rows), non-padding tokens/s and
raw corpus tokens/s, and the MoD/span-corruption ratios measured in this same run (target:
>= 0.9, i.e. the mixture costs at most 10%). With the T5 library installed
(`pip install --no-deps t5==0.9.4 babel==2.19.0`), T5's own `span_corruption` pipeline on the
same documents and lengths runs too, and the MoD is compared with it (target >= 1.0x
examples/s): the reference pipeline, not only ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import gin_cli  # noqa: E402

if TYPE_CHECKING:  # annotations only: --help must not load TensorFlow
  import seqio
  import tensorflow as tf


def cached_blocks(task: seqio.Task) -> tf.data.Dataset:
  """The task's pre-cache output (token blocks), materialised once, repeated forever."""
  import tensorflow as tf
  ds = task.preprocess_precache(task.source.get_dataset('train', shuffle=False), seed=0)
  blocks = [ex['targets'] for ex in ds.as_numpy_iterator()]
  return tf.data.Dataset.from_tensor_slices(
      {'targets': tf.ragged.constant(blocks, dtype=tf.int32)}).repeat()


T5_INSTALL = 'pip install --no-deps t5==0.9.4 babel==2.19.0'


def t5_library_preprocessors():
  """The T5 library's own `t5/data/preprocessors.py` (t5==0.9.4), loaded by file: the package's
  `__init__` imports its models and metrics, whose dependencies `--no-deps` leaves out."""
  import importlib.util
  spec = importlib.util.find_spec('t5')
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'preprocessors.py')
  module_spec = importlib.util.spec_from_file_location('t5_library_preprocessors', path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[module_spec.name] = module  # AutoGraph looks its functions' module up there
  module_spec.loader.exec_module(module)
  return module


def register_t5_reference(baseline: str) -> str | None:
  """T5's span corruption task (as t5/data/tasks.py defines c4_v220_span_corruption: rekey
  text -> targets, tokenize, span_corruption, EOS) over the baseline task's documents, built
  with the T5 library's own preprocessors; None when t5 is not installed."""
  import functools

  import seqio
  try:
    t5 = t5_library_preprocessors()
  except ImportError as e:
    print(f'T5 library reference skipped ({e}); install it with: {T5_INSTALL}')
    return None
  if t5 is None:
    print(f'T5 library reference skipped (t5 is not installed): {T5_INSTALL}')
    return None
  ours = seqio.get_mixture_or_task(baseline)
  name = 't5_library_span_corruption'
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=ours.source, output_features=ours.output_features,
                         preprocessors=[
                             ours.preprocessors[0],  # the corpus's lines -> {'text'}
                             functools.partial(t5.rekey, key_map={'inputs': None,
                                                                  'targets': 'text'}),
                             seqio.preprocessors.tokenize,
                             seqio.CacheDatasetPlaceholder(),
                             t5.span_corruption,
                             seqio.preprocessors.append_eos_after_trim],
                         metric_fns=[])
  return name


def measure(task_name: str, path: str, lengths: dict[str, int], rows: int, warmup: int,
            batch_size: int) -> dict[str, float]:
  import seqio
  task = seqio.get_mixture_or_task(task_name)
  if path == 'text':
    ds = task.get_dataset(lengths, split='train', shuffle=True, seed=0, num_epochs=None)
  else:
    ds = task.preprocess_postcache(cached_blocks(task), lengths, seed=0).shuffle(1000, seed=0)
  ds = seqio.EncDecFeatureConverter(pack=True)(ds, lengths)
  ds = ds.batch(batch_size).prefetch(2)
  it = ds.as_numpy_iterator()
  for _ in range(max(1, warmup // batch_size)):
    next(it)
  n_rows = n_examples = n_tokens = 0
  start = time.perf_counter()
  while n_rows < rows:
    batch = next(it)
    n_rows += len(batch['encoder_segment_ids'])
    n_examples += int(batch['encoder_segment_ids'].max(axis=1).sum())
    n_tokens += int((batch['encoder_input_tokens'] > 0).sum()
                    + (batch['decoder_target_tokens'] > 0).sum())
  seconds = time.perf_counter() - start
  return {'rows_per_s': n_rows / seconds, 'examples_per_s': n_examples / seconds,
          'tokens_per_s': n_tokens / seconds, 'examples_per_row': n_examples / n_rows}


def main():
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('--rows', type=int, default=3000, help='packed rows timed per run')
  parser.add_argument('--warmup', type=int, default=256, help='untimed examples first')
  parser.add_argument('--batch_size', type=int, default=32, help='rows per batch')
  parser.add_argument('--inputs_length', type=int, default=512, help='input tokens per row')
  parser.add_argument('--targets_length', type=int, default=512, help='target tokens per row')
  parser.add_argument('--repeats', type=int, default=2, help='alternating runs per task')
  parser.add_argument('--json', action='store_true', help='print the report as JSON')
  parser.add_argument('--task', default='ul2_mod_gutenberg', help='the task measured')
  parser.add_argument('--baseline', default='t5_span_corruption_gutenberg',
                      help='the task it is compared with, in the same run')
  gin_cli.add_module_flag(parser)
  args = parser.parse_args()
  from ul2 import data
  data.hide_accelerators_from_tensorflow()  # TensorFlow loads quietly (and off the GPUs)
  import ul2_tasks  # noqa: F401  (registers the tasks; after --help, which needs no TensorFlow)
  gin_cli.import_modules(args.module)
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  names = {'mod': args.task, 'span_corruption': args.baseline}
  reference = register_t5_reference(args.baseline)
  if reference:
    names['t5_library'] = reference
  from ul2 import flops
  report = {'lengths': lengths, 'cpu_count': os.cpu_count()}
  print(f'packed {lengths["inputs"]}/{lengths["targets"]}, {os.cpu_count()} CPUs, best of '
        f'{args.repeats}, {args.rows} rows each')
  # With --json, stdout is the report alone: the load lines go to stderr.
  say = (lambda line: print(line, file=sys.stderr)) if args.json else print
  report['load_start'] = flops.machine_load('start', say)
  for path in ('text', 'cached'):
    results = {k: [] for k in names}
    # Alternate the tasks so drift in machine load affects both alike; keep the best run.
    for _ in range(args.repeats):
      for key, name in names.items():
        results[key].append(measure(name, path, lengths, args.rows, args.warmup,
                                    args.batch_size))
    best = {k: max(v, key=lambda r: r['rows_per_s']) for k, v in results.items()}
    ratio = {m: best['mod'][m] / best['span_corruption'][m]
             for m in ('rows_per_s', 'examples_per_s', 'tokens_per_s')}
    report[path] = {**best, 'mod_over_span_corruption': ratio}
    if 't5_library' in best:
      report[path]['mod_over_t5_library'] = {
          m: best['mod'][m] / best['t5_library'][m]
          for m in ('rows_per_s', 'examples_per_s', 'tokens_per_s')}
    if args.json:
      continue
    print(f'\n[{path}]')
    print(f'{"task":<30} {"rows/s":>9} {"examples/s":>11} {"tokens/s":>11} {"ex/row":>7}')
    for key, name in names.items():
      r = best[key]
      print(f'{name:<30} {r["rows_per_s"]:>9.0f} {r["examples_per_s"]:>11.0f} '
            f'{r["tokens_per_s"]:>11.0f} {r["examples_per_row"]:>7.2f}')
    print(f'MoD / span corruption: rows {ratio["rows_per_s"]:.2f}x, examples '
          f'{ratio["examples_per_s"]:.2f}x, tokens {ratio["tokens_per_s"]:.2f}x '
          '(target >= 0.90x)')
    if 'mod_over_t5_library' in report[path]:
      print(f'MoD / the T5 library\'s span_corruption: examples '
            f'{report[path]["mod_over_t5_library"]["examples_per_s"]:.2f}x (target >= 1.0x)')
  report['load_end'] = flops.machine_load('end', say)
  if args.json:
    print(json.dumps(report, indent=1))


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main)
