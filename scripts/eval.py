"""Evaluate a checkpoint on SuperGLUE tasks: zero-shot, few-shot or fine-tuned; decoding or
rank scoring; a results table (markdown and JSON) with per-task metrics and the average.

    python scripts/eval.py --checkpoint runs/quickstart_cb --tasks cb --output /tmp/eval
    python scripts/eval.py --checkpoint /models/ul2_hf --tasks cb,copa,rte --few_shot 1 \\
        --method rank --mode '[NLU]' --output /tmp/eval

`--checkpoint`: a model_dir of ours (its latest checkpoint, or `best/` with --best), a
checkpoints/<step> folder, an HF T5/UL2 directory or a T5X checkpoint_N folder. The model
config comes from model_config.json / config.json or `--gin_file=models/<size>.gin`.
`--method auto` ranks the label candidates of classification tasks and decodes ReCoRD.
"""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402
from ul2 import data, vocabulary  # noqa: E402


def results_table(results, average) -> str:
  lines = ['| task | examples | method | metrics | score |', '|---|---:|---|---|---:|']
  for r in results:
    metrics = ', '.join(f'{k} {v:.1f}' for k, v in r['metrics'].items())
    lines.append(f'| {r["task"]} | {r["examples"]} | {r["method"]} | {metrics} | '
                 f'{r["score"]:.1f} |')
  lines.append(f'| **average** ({len([r for r in results if r["in_average"]])} tasks) | | | | '
               f'**{average:.1f}** |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--best', action='store_true', help='use MODEL_DIR/best/ (fine-tuning)')
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--ignore_extra_params', action='store_true',
                      help='drop checkpoint entries the model config does not have')
  parser.add_argument('--tasks', default='cb,copa,rte', help='comma-separated SuperGLUE tasks')
  parser.add_argument('--split', default='validation')
  parser.add_argument('--method', choices=('auto', 'decode', 'rank'), default='auto')
  parser.add_argument('--few_shot', type=int, default=0)
  parser.add_argument('--mode', default=vocabulary.NLU,
                      help=f"one of {', '.join(vocabulary.MODE_TOKENS)} or '' (none)")
  parser.add_argument('--data_dir', default=None, help='official SuperGLUE jsonl folders')
  parser.add_argument('--inputs_length', type=int, default=512)
  parser.add_argument('--targets_length', type=int, default=16)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--max_examples', type=int, default=None)
  parser.add_argument('--output', default=None, help='folder for results.md and results.json')
  args = parser.parse_args(argv)
  data.hide_accelerators_from_tensorflow()  # the model runs on the accelerators

  from tasks import superglue
  from ul2 import checkpoints, evaluation
  try:
    mode = vocabulary.check_mode(args.mode, '--mode')
  except ValueError as e:
    parser.error(str(e))
  superglue.register_superglue(args.data_dir, mode=mode)
  checkpoint = (os.path.join(args.checkpoint, checkpoints.BEST) if args.best
                else args.checkpoint)
  model, params = checkpoints.load_model(checkpoint, gin_cli.model_config(args.gin_file),
                                         args.ignore_extra_params)
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  results = []
  for task in [t.strip() for t in args.tasks.split(',') if t.strip()]:
    if task not in superglue.FILES:
      raise SystemExit(f'Unknown SuperGLUE task {task!r}; choose from {sorted(superglue.FILES)}.')
    method = args.method
    if method == 'auto':
      method = 'rank' if task in superglue.LABELS else 'decode'
    split = 'test' if task in ('axb', 'axg') else args.split
    r = evaluation.evaluate(model, params, f'superglue_{task}', feature_lengths=lengths,
                            split=split, method=method, candidates=superglue.LABELS.get(task),
                            few_shot=args.few_shot, batch_size=args.batch_size,
                            max_examples=args.max_examples)
    results.append({'task': task, 'split': split, 'examples': r.examples, 'method': method,
                    'few_shot': args.few_shot, 'metrics': r.metrics,
                    'score': evaluation.task_score(r.metrics),
                    'in_average': task not in ('axb', 'axg')})
  scored = [r['score'] for r in results if r['in_average']]
  average = sum(scored) / len(scored) if scored else float('nan')
  table = results_table(results, average)
  print(table)
  if args.output:
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, 'results.md'), 'w') as f:
      f.write(f'# SuperGLUE: {checkpoint}\n\nmode {args.mode or "none"}, {args.few_shot}-shot, '
              f'split {args.split}\n\n{table}')
    with open(os.path.join(args.output, 'results.json'), 'w') as f:
      json.dump({'checkpoint': checkpoint, 'mode': args.mode, 'results': results,
                 'superglue_average': average}, f, indent=1)
    print(f'Wrote {args.output}/results.md and results.json')
  return results, average


if __name__ == '__main__':
  main(sys.argv[1:])
