"""Evaluate a checkpoint on SuperGLUE tasks: zero-shot, few-shot or fine-tuned; decoding or
rank scoring; a results table (markdown and JSON) with per-task metrics and the average.

    python scripts/eval.py --checkpoint runs/quickstart_cb --tasks cb --output /tmp/eval
    python scripts/eval.py --checkpoint /models/ul2_hf --tasks cb,copa,rte --few_shot 1 \\
        --method rank --mode '[NLU]' --output /tmp/eval

`--checkpoint`: a model_dir of ours (its latest checkpoint, or `best/` with --best), a
checkpoint_<step> folder, an HF T5/UL2 directory or a T5X checkpoint_<step> folder. The model
config comes from model_config.json / config.json or `--gin_file=models/<size>.gin`.
`--method auto` ranks the label candidates of classification tasks and decodes ReCoRD and
WSC (whose model names the referent). With `--best`, the mode token and the method default to
those the fine-tuning run selected its best parameters with (best.json).

Generation (`ul2_tasks.generation`): `--generation gen_gutenberg_continuation` (or a task
registered with `generation.register_generation`, e.g. the paper's one-shot XSum) decodes each
input after `--few_shot` K training records and scores ROUGE-1/2/L (Google's rouge-score).

    python scripts/eval.py --checkpoint runs/quickstart --generation gen_gutenberg_continuation \\
        --few_shot 1 --inputs_length 256 --targets_length 48 --max_examples 100

Per-denoiser validation of a pretrained model (what training reports at each validation):
`--by_denoiser ul2_mod_gutenberg` gives loss and token accuracy on fixed validation streams of
that task's corpus, one per UL2 denoiser, and per mode ([NLU], [S2S], [NLG]), instead of
SuperGLUE; `--denoiser_batches` batches of `--batch_size` each.

    python scripts/eval.py --checkpoint runs/quickstart --by_denoiser ul2_mod_gutenberg \\
        --inputs_length 128 --targets_length 128 --batch_size 16

Leaderboard files: `--split test --submission DIR` writes DIR/<Task>.jsonl (AX-b and AX-g
added) and DIR.zip; `--predictions` writes OUTPUT/predictions/<task>.jsonl for any split.
A task that fails (a missing file, a bad record) is listed in the table; the others' results
are written, and the exit status is non-zero.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402
from ul2 import vocabulary  # noqa: E402  (light: the mode tokens for --help)


def results_table(results, average, failed=()) -> str:
  """The results as a markdown table; a decoded task whose predictions are partly no label
  says what share in its method cell.

  >>> print(results_table([{'task': 'cb', 'split': 'validation', 'examples': 56,
  ...                       'method': 'decode', 'metrics': {'accuracy': 50.0}, 'score': 50.0,
  ...                       'in_average': True, 'no_label_share': 0.25}], 50.0), end='')
  | task | split | examples | method | metrics | score |
  |---|---|---:|---|---|---:|
  | cb | validation | 56 | decode, 25% no label | accuracy 50.0 | 50.0 |
  | **average** (1 task) | | | | | **50.0** |
  """
  lines = ['| task | split | examples | method | metrics | score |', '|---|---|---:|---|---|---:|']
  for r in results:
    metrics = ', '.join(f'{k} {v:.1f}' for k, v in r['metrics'].items())
    method = r['method']
    if r.get('no_label_share'):  # decoded predictions that are no label: counted as T5 does
      method += f', {r["no_label_share"]:.0%} no label'
    lines.append(f'| {r["task"]} | {r["split"]} | {r["examples"]} | {method} | {metrics} | '
                 f'{r["score"]:.1f} |')
  counted = len([r for r in results if r['in_average']])
  lines.append(f'| **average** ({counted} task{"" if counted == 1 else "s"}) | | | | | '
               f'**{average:.1f}** |')
  for task, error in failed:
    lines.append(f'| {task} | failed | | | {error} | |')
  return '\n'.join(lines) + '\n'


def generation(args) -> tuple[list[dict], float]:
  """--generation: ROUGE of greedy decodes, k-shot, per task, and their average."""
  from ul2 import data
  data.hide_accelerators_from_tensorflow()
  import ul2_tasks  # noqa: F401  (gen_gutenberg_continuation)
  gin_cli.import_modules(args.module)
  from ul2 import checkpoints, evaluation
  model, params = checkpoints.load_model(args.checkpoint, gin_cli.model_config(args.gin_file),
                                         args.ignore_extra_params)
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  results = []
  for task in [t.strip() for t in args.generation.split(',') if t.strip()]:
    data.check_task(task)
    print(f'{task}: {args.split} split, {args.few_shot}-shot generation...', flush=True)
    r = evaluation.evaluate(model, params, task, feature_lengths=lengths, split=args.split,
                            method='decode', few_shot=args.few_shot,
                            batch_size=args.batch_size, max_examples=args.max_examples,
                            seed=args.seed)
    results.append({'task': task, 'split': args.split, 'examples': r.examples,
                    'method': f'decode, {args.few_shot}-shot', 'few_shot': args.few_shot,
                    'metrics': r.metrics, 'score': evaluation.task_score(r.metrics),
                    'in_average': True,
                    'samples': [{'input': rec['input'], 'prediction': p, 'target': rec['target']}
                                for rec, p in list(zip(r.records, r.predictions))[:5]]})
  average = sum(r['score'] for r in results) / len(results)
  table = results_table(results, average)
  print(table)
  if args.output:
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, 'generation.md'), 'w') as f:
      f.write(f'# Generation: {args.checkpoint}\n\n{table}\n' + samples_markdown(results))
    with open(os.path.join(args.output, 'generation.json'), 'w') as f:
      json.dump({'checkpoint': args.checkpoint, 'results': results, 'average': average}, f,
                indent=1)
  return results, average


def no_label_share(task: str, method: str, predictions) -> float | None:
  """The share of decoded predictions that are no label of a classification task (their
  postprocessed class is -1); None for ranking, ReCoRD and WSC (whose answers are text).

  >>> no_label_share('cb', 'decode', [0, -1, 2, -1])
  0.5
  """
  if method != 'decode' or task in ('record', 'wsc') or not predictions:
    return None
  return sum(1 for p in predictions if p == -1) / len(predictions)


def samples_markdown(results) -> str:
  """generation.md's samples: each task's first generations beside their targets (sentinel
  markers dropped; generation.json keeps the raw text)."""
  out = []
  for r in results:
    out.append(f'\n## {r["task"]}: samples\n')
    for i, sample in enumerate(r['samples'], 1):
      shown = lambda text: vocabulary.without_sentinels(str(text)).replace('\n', ' ')
      out.append(f'{i}. **input** ...{shown(sample["input"])[-300:]}\n'
                 f'   **generated** {shown(sample["prediction"])}\n'
                 f'   **target** {shown(sample["target"])}\n')
  return '\n'.join(out)


def by_denoiser(args) -> dict:
  """--by_denoiser: the per-denoiser and per-mode table of a checkpoint."""
  from ul2 import data
  data.hide_accelerators_from_tensorflow()
  import ul2_tasks  # noqa: F401  (the corpus tasks)
  gin_cli.import_modules(args.module)
  from ul2 import checkpoints, train
  params, config = checkpoints.load(args.checkpoint, gin_cli.model_config(args.gin_file),
                                    args.ignore_extra_params)
  data.check_task(args.by_denoiser)
  config_data = data.DataConfig(args.by_denoiser, {'inputs': args.inputs_length,
                                                   'targets': args.targets_length},
                                batch_size=args.batch_size)
  results = train.validate_by_denoiser(config, params, config_data, args.denoiser_batches)
  if not results:
    raise SystemExit(f'error: --by_denoiser {args.by_denoiser}: the task has no denoising or '
                     'LM objective to vary (give a pretraining task, e.g. ul2_mod_gutenberg).')
  lines = ['| denoiser / mode | loss | token accuracy |', '|---|---:|---:|']
  lines += [f'| {name.split("/", 1)[1]} | {m["loss"]:.4f} | {m["accuracy"]:.3f} |'
            for name, m in results.items()]
  table = '\n'.join(lines)
  print(table)
  if args.output:
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, 'by_denoiser.md'), 'w') as f:
      f.write(table + '\n')
    with open(os.path.join(args.output, 'by_denoiser.json'), 'w') as f:
      json.dump({'checkpoint': args.checkpoint, 'task': args.by_denoiser,
                 'feature_lengths': config_data.feature_lengths, 'results': results}, f,
                indent=1)
  return results


def main(argv=None):
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('--checkpoint', required=True,
                      help='a model_dir, checkpoint_<step>, an HF or a T5X directory')
  parser.add_argument('--best', action='store_true', help='use MODEL_DIR/best/ (fine-tuning)')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='models/<size>.gin when the checkpoint has no config')
  parser.add_argument('--ignore_extra_params', action='store_true',
                      help='drop checkpoint entries the model config does not have')
  parser.add_argument('--tasks', default='cb,copa,rte', help='comma-separated SuperGLUE tasks')
  parser.add_argument('--split', default='validation',
                      help='train, validation or test (AX-b/AX-g: always test)')
  parser.add_argument('--method', choices=('auto', 'decode', 'rank'), default=None,
                      help='default: how the fine-tuning run selected its best parameters '
                      '(best.json), else auto')
  parser.add_argument('--few_shot', type=int, default=0,
                      help='k training examples before each input (drawn with --seed)')
  parser.add_argument('--protocol', choices=('t5', 'prompted'), default='t5',
                      help="t5: T5's text-to-text formats (fine-tuned models); prompted: "
                      'natural-language prompts, per-example candidates scored by likelihood '
                      '(zero-/few-shot, docs/finetuning.md lists the prompts)')
  parser.add_argument('--length_normalized', action='store_true',
                      help='prompted: rank candidates by mean log-likelihood per token')
  parser.add_argument('--seed', type=int, default=0, help='which training examples are shots')
  parser.add_argument('--mode', default=None,
                      help=f"one of {', '.join(vocabulary.MODE_TOKENS)} or '' (none); default: "
                      f'the fine-tuning run\'s (best.json), else {vocabulary.NLU}')
  parser.add_argument('--data_dir', default=None, help='official SuperGLUE jsonl folders')
  gin_cli.add_module_flag(parser)
  gin_cli.add_memory_flag(parser)
  parser.add_argument('--inputs_length', type=int, default=512, help='input tokens')
  parser.add_argument('--targets_length', type=int, default=16,
                      help='decoded tokens at most')
  parser.add_argument('--batch_size', type=int, default=32, help='examples per batch')
  parser.add_argument('--max_examples', type=int, default=None,
                      help='evaluate the first N examples of each task (default: all)')
  parser.add_argument('--output', default=None, help='folder for results.md and results.json')
  parser.add_argument('--predictions', action='store_true',
                      help='also write OUTPUT/predictions/<task>.jsonl: idx, input, '
                      'prediction, target per example')
  parser.add_argument('--submission', default=None,
                      help='with --split test: write the leaderboard files (<Task>.jsonl, '
                      'AX-b and AX-g included) into this folder and zip them')
  parser.add_argument('--generation', default=None, metavar='TASKS',
                      help='instead of SuperGLUE: comma-separated generation tasks (gen_*), '
                      'decoded and scored with ROUGE')
  parser.add_argument('--by_denoiser', default=None, metavar='TASK',
                      help='instead of SuperGLUE: validation loss per denoiser and per mode '
                      "on TASK's corpus (e.g. ul2_mod_gutenberg)")
  parser.add_argument('--denoiser_batches', type=int, default=4,
                      help='--by_denoiser: batches per denoiser')
  args = parser.parse_args(argv)
  gin_cli.check_checkpoint(args.checkpoint)
  if args.best:
    gin_cli.check_checkpoint(os.path.join(args.checkpoint, 'best'), '--checkpoint (with --best)')
  gin_cli.reuse_freed_memory(args)
  if args.by_denoiser:
    return by_denoiser(args)
  if args.generation:
    return generation(args)
  if args.predictions and not args.output:
    parser.error('--predictions needs --output')
  if args.submission and args.split != 'test':
    parser.error('--submission needs --split test (the leaderboard scores the test set)')
  from ul2 import data
  data.hide_accelerators_from_tensorflow()  # the model runs on the accelerators

  from ul2_tasks import superglue
  gin_cli.import_modules(args.module)
  from ul2 import checkpoints, evaluation
  checkpoint = (checkpoints.join(args.checkpoint, checkpoints.BEST) if args.best
                else args.checkpoint)
  selection = checkpoints.best_selection(checkpoint)
  default_mode = vocabulary.S2S if args.protocol == 'prompted' else vocabulary.NLU
  mode = args.mode if args.mode is not None else selection.get('mode', default_mode)
  try:
    mode = vocabulary.check_mode(mode, '--mode')
  except ValueError as e:
    parser.error(str(e))
  superglue.register_superglue(args.data_dir, mode=mode)
  model, params = checkpoints.load_model(checkpoint, gin_cli.model_config(args.gin_file),
                                         args.ignore_extra_params)
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  names = [t.strip() for t in args.tasks.split(',') if t.strip()]
  for task in names:
    if task not in superglue.FILES:
      raise SystemExit(f'Unknown SuperGLUE task {task!r}; choose from {sorted(superglue.FILES)}.')
  if args.submission:
    names += [t for t in ('axb', 'axg') if t not in names]  # the leaderboard wants both
  results, failed, outputs = [], [], {}
  for task in names:
    if args.protocol == 'prompted':
      split = 'test' if task in ('axb', 'axg') else args.split
      print(f'{task}: {split} split, prompted {args.few_shot}-shot...', flush=True)
      try:
        r = evaluate_prompted(model, params, task, split, args, mode, superglue, evaluation)
      except Exception as e:
        failed.append((task, one_line(e)))
        print(f'{task}: failed: {failed[-1][1]}', flush=True)
        continue
      outputs[task] = r
      results.append({'task': task, 'split': split, 'examples': r.examples,
                      'method': r.method, 'few_shot': args.few_shot, 'metrics': r.metrics,
                      'score': evaluation.task_score(r.metrics),
                      'in_average': task not in ('axb', 'axg')})
      continue
    method = args.method or selection.get('method', 'auto')
    if method == 'auto':
      method = 'rank' if task in superglue.CANDIDATES else 'decode'
    elif method == 'rank' and task not in superglue.CANDIDATES:
      raise SystemExit(f'--method rank: {task} has no fixed label candidates (the model names '
                       'the answer); use --method decode or auto.')
    split = 'test' if task in ('axb', 'axg') else args.split
    print(f'{task}: {split} split, {method}...', flush=True)
    try:
      r = evaluation.evaluate(model, params, f'superglue_{task}', feature_lengths=lengths,
                              split=split, method=method,
                              candidates=superglue.CANDIDATES.get(task),
                              few_shot=args.few_shot, batch_size=args.batch_size,
                              max_examples=args.max_examples)
    except Exception as e:  # one bad task must not discard the others' results
      message = one_line(e)
      print(f'{task}: failed: {message}', flush=True)
      failed.append((task, message))
      continue
    outputs[task] = r
    no_label = no_label_share(task, method, r.predictions)
    results.append({'task': task, 'split': split, 'examples': r.examples, 'method': method,
                    'few_shot': args.few_shot, 'metrics': r.metrics,
                    'score': evaluation.task_score(r.metrics) if r.metrics else float('nan'),
                    'in_average': task not in ('axb', 'axg') and bool(r.metrics),
                    'no_label_share': no_label})
    if no_label is not None and no_label > 0.5:
      print(f'note: {task}: {no_label:.0%} of the decoded predictions are no label of the task '
            '(the metrics count them as T5 does); --method rank scores the labels instead.',
            flush=True)
  scored = [r['score'] for r in results if r['in_average']]
  average = sum(scored) / len(scored) if scored else float('nan')
  table = results_table(results, average, failed)
  print(table)
  if args.output:
    os.makedirs(args.output, exist_ok=True)
    splits = sorted({r['split'] for r in results} | {args.split})
    with open(os.path.join(args.output, 'results.md'), 'w') as f:
      f.write(f'# SuperGLUE: {checkpoint}\n\nmode {mode or "none"}, {args.few_shot}-shot, '
              f'split {", ".join(splits)}\n\n{table}')
    with open(os.path.join(args.output, 'results.json'), 'w') as f:
      json.dump({'checkpoint': checkpoint, 'mode': mode, 'split': args.split,
                 'results': results, 'failed': dict(failed), 'superglue_average': average},
                f, indent=1)
    if results:
      plot_results(results, average, os.path.join(args.output, 'results.png'))
    print(f'Wrote {args.output}/results.md, results.json and results.png')
    if args.predictions:
      folder = os.path.join(args.output, 'predictions')
      os.makedirs(folder, exist_ok=True)
      for task, r in outputs.items():
        with open(os.path.join(folder, f'{task}.jsonl'), 'w') as f:
          for record, prediction in zip(r.records, r.predictions):
            f.write(json.dumps({'idx': record['idx'], 'input': record['input'],
                                'prediction': superglue.prediction_text(task, prediction),
                                'target': record['target']}) + '\n')
      print(f'Wrote {folder}/<task>.jsonl')
  if args.submission:
    write_submission(args.submission, outputs, superglue)
  if failed:
    raise SystemExit(f'error: {len(failed)} task(s) failed: '
                     + '; '.join(f'{t}: {m}' for t, m in failed))
  return results, average


def evaluate_prompted(model, params, task, split, args, mode, superglue, evaluation):
  """The prompted protocol on one task: its prompts and candidates (superglue.PROMPTS), k
  shots drawn from its training split (RTE's for the diagnostics), the candidates ranked."""
  import numpy as np
  examples = superglue.prompted_split(task, split, args.data_dir)[:args.max_examples]
  shots = []
  if args.few_shot:
    pool = [p for p in superglue.prompted_split('rte' if task in ('axb', 'axg') else task,
                                                'train', args.data_dir) if p.answer_text()]
    chosen = np.random.default_rng(args.seed).choice(len(pool), args.few_shot, replace=False)
    shots = [(pool[i].prompt, pool[i].answer_text()) for i in chosen]
  picked = evaluation.rank_continuations(
      model, params, [p.prompt for p in examples], [p.candidates for p in examples],
      inputs_length=args.inputs_length, shots=shots, mode=mode, batch_size=args.batch_size,
      length_normalized=args.length_normalized)
  predictions = [superglue.prompted_prediction(task, p, c) for p, c in zip(examples, picked)]
  metrics = superglue.metrics_for(task)([p.target for p in examples], predictions)
  method = 'prompted' + (', per token' if args.length_normalized else '')
  records = [{'idx': p.target['idx'], 'group': p.target['group'], 'input': p.prompt,
              'target': p.answer_text() or ''} for p in examples]
  return evaluation.Result(task, metrics, len(examples), method, predictions, mode, records)


def plot_results(results, average, path) -> None:
  """results.png: each task's score (the mean of its metrics) and the average."""
  import matplotlib
  matplotlib.use('Agg')  # files only
  import matplotlib.pyplot as plt
  names = [r['task'] for r in results] + ['average']
  scores = [r['score'] for r in results] + [average]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names)), 3.5))
  bars = ax.bar(names, scores, color=['tab:blue'] * len(results) + ['tab:orange'])
  ax.bar_label(bars, fmt='%.1f')
  ax.set(ylim=(0, 100), ylabel='score', title=f'SuperGLUE ({results[0]["split"]})')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def one_line(error: BaseException) -> str:
  """The user's line of an error, also when TensorFlow wrapped it in an iterator error."""
  text = str(error)
  if 'SuperGLUE data:' in text:
    text = text[text.index('SuperGLUE data:'):].splitlines()[0]
  return ' '.join(text.split())[:400] or type(error).__name__


def write_submission(folder, outputs, superglue) -> str:
  """<Task>.jsonl per evaluated task in the leaderboard's format, zipped as folder.zip."""
  import zipfile
  os.makedirs(folder, exist_ok=True)
  for task, r in outputs.items():
    rows, invalid = superglue.submission_rows(task, r.records, r.predictions)
    if invalid:
      print(f'{task}: {invalid} predictions were no label; submitted as '
            f'{superglue.SUBMISSION_LABELS[task][0]!r}')
    with open(os.path.join(folder, f'{superglue.SUBMISSION_FILES[task]}.jsonl'), 'w') as f:
      f.write(''.join(json.dumps(row) + '\n' for row in rows))
  archive = folder.rstrip('/') + '.zip'
  with zipfile.ZipFile(archive, 'w', zipfile.ZIP_DEFLATED) as z:
    for task in outputs:
      name = f'{superglue.SUBMISSION_FILES[task]}.jsonl'
      z.write(os.path.join(folder, name), name)
  print(f'Wrote the leaderboard files to {folder} and {archive}')
  return archive


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main, sys.argv[1:])
