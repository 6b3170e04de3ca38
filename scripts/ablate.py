"""The UL2 paper's ablation on your data: objectives x architectures at an equal token budget,
each measured on per-denoiser validation, fine-tuned on SuperGLUE and asked to generate.

    python scripts/ablate.py --output runs/ablation                     # ul2_cpu scale, CPU
    python scripts/ablate.py --output runs/ablation_tiny --preset tiny  # the grid in minutes
    python scripts/ablate.py --output /ckpt/ablation_base --model base \\
        --decoder_only_model prefix_lm_base --tokens 2000000000 --inputs_length 512 \\
        --targets_length 512 --batch_size 128 --finetune_steps 2000 --seeds 0,1,2

For each seed, architecture (encoder_decoder: `--model`; decoder_only: `--decoder_only_model`)
and objective (`<objective>_<corpus>` tasks: t5_span_corruption, prefix_lm, ul2_mod, ul2r;
causal_lm for decoder-only models only) one run in its own folder
OUTPUT/<architecture>/<objective>/seed<k>/:

  pretrain/          `--tokens` tokens (the same number of steps for every run: inputs +
                     targets per row, packed), runs/pretrain.gin's settings
  results.json       validation loss per denoiser and mode on the same fixed streams of the
                     corpus (`--by_denoiser`'s), CB / COPA / RTE after fine-tuning,
                     `--generation_task` ROUGE (`--few_shot` shots) of the pretrained model
  finetune_<task>/   each fine-tuning run (runs/finetune.gin, `--finetune_steps` steps)

then OUTPUT/ablation.md, ablation.json and ablation.png: one row per architecture and
objective, mean +/- standard deviation over the seeds (error bars on axes around the data), and
the price of generality: per architecture, the MoD model's loss minus each specialist's on the
specialist's own stream (span corruption: R(3,0.15) with [NLU]; prefix and causal LM: [S2S]),
paired by seed, with whether it is within seed noise. Everything resumes: a finished stage is
read back, an interrupted one continues from its last checkpoint. `--gin.NAME=VALUE` bindings
go to every pretraining run (e.g. --gin.train.OptimizerConfig.learning_rate=0.005).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402

OBJECTIVES = ('t5_span_corruption', 'prefix_lm', 'causal_lm', 'ul2_mod', 'ul2r')
FINETUNE_TASKS = ('cb', 'copa', 'rte')
# --preset: defaults for every flag it names (flags given still win). 'tiny': the whole grid
# on the smoke run's model size, to see it run (its numbers mean nothing).
PRESETS = {
    'tiny': dict(model='tiny', decoder_only_model='decoder_only_tiny', tokens=8 * 64 * 10,
                 inputs_length=32, targets_length=32, batch_size=8, finetune_tasks='cb',
                 finetune_steps=5, finetune_batch_size=8, finetune_inputs_length=128,
                 metrics_examples=8, denoiser_batches=1, generation_examples=4,
                 generation_length=8),
}


def parse_args(argv):
  _, bindings, rest = gin_cli.split_argv(argv)
  p = gin_cli.argument_parser(__doc__, gin_flags=True)
  p.add_argument('--output', required=True, help='folder of the whole grid')
  p.add_argument('--model', default='ul2_cpu', help='encoder-decoder: a models/*.gin name or path')
  p.add_argument('--decoder_only_model', default='decoder_only_cpu',
                 help='decoder-only: a models/*.gin name or path')
  p.add_argument('--architectures', default='encoder_decoder,decoder_only',
                 help='comma-separated')
  p.add_argument('--objectives', default=','.join(OBJECTIVES), help='comma-separated')
  p.add_argument('--corpus', default='gutenberg', help='tasks <objective>_<corpus>')
  p.add_argument('--seeds', default='0', help='comma-separated')
  p.add_argument('--tokens', type=int, default=614_400,
                 help='pretraining tokens per run (inputs + targets per row)')
  p.add_argument('--inputs_length', type=int, default=128, help='pretraining input tokens')
  p.add_argument('--targets_length', type=int, default=128, help='pretraining target tokens')
  p.add_argument('--batch_size', type=int, default=16, help='pretraining rows per step')
  p.add_argument('--finetune_tasks', default=','.join(FINETUNE_TASKS),
                 help="SuperGLUE tasks to fine-tune on, comma-separated ('': none)")
  p.add_argument('--finetune_steps', type=int, default=40, help='fine-tuning steps per task')
  p.add_argument('--finetune_batch_size', type=int, default=16, help='fine-tuning rows per step')
  p.add_argument('--finetune_inputs_length', type=int, default=192, help='fine-tuning inputs')
  p.add_argument('--metrics_examples', type=int, default=64,
                 help='validation examples per fine-tuned task (0: all)')
  p.add_argument('--denoiser_batches', type=int, default=4,
                 help='validation batches per denoiser')
  p.add_argument('--generation_task', default='gen_gutenberg_continuation',
                 help='the generation task (ul2_tasks.generation), or none')
  p.add_argument('--few_shot', type=int, default=1, help='shots for the generation task')
  p.add_argument('--generation_examples', type=int, default=32, help='generated examples')
  p.add_argument('--generation_length', type=int, default=32, help='tokens generated at most')
  p.add_argument('--preset', choices=sorted(PRESETS),
                 help='defaults for a budget: tiny = the tiny model, 10 steps per run')
  gin_cli.add_module_flag(p)
  gin_cli.add_memory_flag(p)
  args = p.parse_args(rest)
  if args.preset:
    p.set_defaults(**PRESETS[args.preset])
    args = p.parse_args(rest)
  args.bindings = bindings
  return args


def model_gin(name: str) -> str:
  return name if name.endswith('.gin') else f'models/{name}.gin'


def train_run(gin_files, bindings):
  """One train.train call configured by gin (what scripts/train.py does, without its CLI)."""
  import gin

  from ul2 import checkpoints
  from ul2 import train as train_lib
  gin_cli.parse(gin_files, bindings)
  model_dir = gin_cli.macro('MODEL_DIR')
  config = gin.config_str()
  return gin.get_configurable(train_lib.train)(
      started=lambda: checkpoints.write_gin_config(model_dir, config))


def cells(args):
  """(architecture, objective, seed) of every run: causal LM only for decoder-only models."""
  for seed in [int(s) for s in args.seeds.split(',')]:
    for arch in args.architectures.split(','):
      for objective in args.objectives.split(','):
        if objective == 'causal_lm' and arch != 'decoder_only':
          continue
        yield arch, objective, seed


def run_cell(args, arch: str, objective: str, seed: int, steps: int) -> dict:
  """Pretrain, measure, fine-tune and generate for one cell; results.json when done."""
  from ul2 import checkpoints, evaluation
  from ul2 import data as data_lib
  from ul2 import train as train_lib

  folder = os.path.join(args.output, arch, objective, f'seed{seed}')
  done = os.path.join(folder, 'results.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  model = model_gin(args.model if arch == 'encoder_decoder' else args.decoder_only_model)
  li, lt = args.inputs_length, args.targets_length
  lengths = {'targets': li + lt} if objective == 'causal_lm' else {'inputs': li, 'targets': lt}
  pretrain_dir = os.path.join(folder, 'pretrain')
  print(f'== {arch} / {objective} / seed {seed}: pretraining {steps} steps', flush=True)
  train_run([model, 'runs/pretrain.gin'], [
      f"MIXTURE_OR_TASK_NAME='{objective}_{args.corpus}'", f'TASK_FEATURE_LENGTHS={lengths}',
      f'TRAIN_STEPS={steps}', f'BATCH_SIZE={args.batch_size}', f"MODEL_DIR='{pretrain_dir}'",
      f'SEED={seed}', f'EVAL_EVERY={steps}', f'CHECKPOINT_EVERY={max(steps // 4, 1)}',
      'train.TrainConfig.denoiser_eval_batches=0', 'train.TrainConfig.progress_bar=False',
      *args.bindings])
  # Read once: the network (dropout off) and its parameters serve every measurement below.
  net, params = checkpoints.load_model(pretrain_dir)
  result = {'architecture': arch, 'objective': objective, 'seed': seed, 'steps': steps,
            'tokens': steps * args.batch_size * (li + lt)}

  # The same fixed streams for every run: the corpus's MoD validation split, one per denoiser.
  streams = data_lib.DataConfig(f'ul2_mod_{args.corpus}', {'inputs': li, 'targets': lt},
                                batch_size=args.batch_size)
  result['validation'] = train_lib.validate_by_denoiser(net.config, params, streams,
                                                        args.denoiser_batches)
  if args.generation_task != 'none':
    print(f'== {arch} / {objective} / seed {seed}: {args.generation_task}', flush=True)
    r = evaluation.evaluate(net, params, args.generation_task,
                            feature_lengths={'inputs': li + lt, 'targets': args.generation_length},
                            method='decode', few_shot=args.few_shot,
                            max_examples=args.generation_examples, batch_size=16, seed=seed)
    result['generation'] = r.metrics
  result['superglue'] = {}
  for task in filter(None, args.finetune_tasks.split(',')):  # '': no fine-tuning
    finetune_dir = os.path.join(folder, f'finetune_{task}')
    print(f'== {arch} / {objective} / seed {seed}: fine-tuning on {task}', flush=True)
    bindings = [f"MIXTURE_OR_TASK_NAME='superglue_{task}'",
                f"TASK_FEATURE_LENGTHS={{'inputs': {args.finetune_inputs_length}, 'targets': 8}}",
                f"INITIAL_CHECKPOINT_PATH='{pretrain_dir}'", f'TRAIN_STEPS={args.finetune_steps}',
                f'BATCH_SIZE={args.finetune_batch_size}', f"MODEL_DIR='{finetune_dir}'",
                f'SEED={seed}', f'EVAL_EVERY={args.finetune_steps}',
                f'METRICS_EVERY={args.finetune_steps}',
                f'CHECKPOINT_EVERY={args.finetune_steps}',
                'train.TrainConfig.progress_bar=False']
    if args.metrics_examples:
      bindings.append(f'train.TrainConfig.metrics_examples={args.metrics_examples}')
    train_run([model, 'runs/finetune.gin'], bindings)
    best = checkpoints.read_best(finetune_dir)
    result['superglue'][task] = best['metrics']
  with open(done, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def columns(result: dict) -> dict[str, float]:
  """The table's numbers of one run."""
  out = {}
  for key, metrics in result['validation'].items():
    if key.startswith('mode/'):
      out[f'loss {key[5:]}'] = metrics['loss']
  scores = []
  for task, metrics in result['superglue'].items():
    out[task] = metrics['average']  # the mean of the task's metrics (CB: accuracy and F1)
    scores.append(metrics['average'])
  if scores:
    out['SuperGLUE avg'] = sum(scores) / len(scores)
  if 'generation' in result:
    out['ROUGE-L'] = result['generation']['rougeL']
  return out


def summarize(args, results: list[dict]) -> tuple[str, list[dict]]:
  """One row per (architecture, objective): mean and standard deviation over seeds."""
  import numpy as np
  groups: dict[tuple[str, str], list[dict[str, float]]] = {}
  for r in results:
    groups.setdefault((r['architecture'], r['objective']), []).append(columns(r))
  present = {k for rows in groups.values() for row in rows for k in row}
  order = ['loss [NLU]', 'loss [S2S]', 'loss [NLG]', *args.finetune_tasks.split(','),
           'SuperGLUE avg', 'ROUGE-L']
  names = [k for k in order if k in present]
  rows = []
  lines = ['| architecture | objective | seeds | ' + ' | '.join(names) + ' |',
           '|---|---|---:|' + '---:|' * len(names)]
  for (arch, objective), runs in groups.items():
    row = {'architecture': arch, 'objective': objective, 'seeds': len(runs)}
    cells_text = []
    for name in names:
      values = np.array([run[name] for run in runs if name in run], float)
      mean, std = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
      row[name] = {'mean': mean, 'std': std}
      digits = 3 if name.startswith('loss') else 1
      cells_text.append(f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if len(values) > 1
                                                 else ''))
    rows.append(row)
    lines.append(f'| {arch} | {objective} | {len(runs)} | ' + ' | '.join(cells_text) + ' |')
  return '\n'.join(lines), rows


# Each specialist and the validation stream it was trained for: the price of generality is the
# MoD model's loss there minus the specialist's (the other columns favour MoD by construction:
# its [NLG] and [S2S] streams are MoD's own denoisers with their mode tokens).
SPECIALISTS = {'t5_span_corruption': 'denoiser/R(3,0.15)', 'prefix_lm': 'mode/[S2S]',
               'causal_lm': 'mode/[S2S]'}


def generality_gaps(results: list[dict]) -> tuple[str, list[dict]]:
  """Per architecture and specialist: ul2_mod's validation loss on the specialist's own stream
  minus the specialist's, per seed (runs paired by seed), as mean and standard deviation over
  seeds. The gap is 'within seed noise' when its mean is at most twice the larger standard
  deviation of the two models' losses over seeds.

  >>> runs = [{'architecture': 'encoder_decoder', 'objective': o, 'seed': s,
  ...          'validation': {'denoiser/R(3,0.15)': {'loss': loss}}}
  ...         for o, s, loss in (('ul2_mod', 0, 5.1), ('ul2_mod', 1, 5.3),
  ...                            ('t5_span_corruption', 0, 5.0), ('t5_span_corruption', 1, 5.0))]
  >>> table, rows = generality_gaps(runs)
  >>> rows[0]['gap'], rows[0]['within_seed_noise']
  ({'mean': 0.2, 'std': 0.141}, True)
  """
  import numpy as np
  loss = {(r['architecture'], r['objective'], r['seed']): r['validation'] for r in results}
  rows = []
  for arch in dict.fromkeys(r['architecture'] for r in results):
    for specialist, stream in SPECIALISTS.items():
      seeds = sorted(s for a, o, s in loss if a == arch and o == specialist
                     and (arch, 'ul2_mod', s) in loss and stream in loss[arch, o, s])
      if not seeds:
        continue
      mod = np.array([loss[arch, 'ul2_mod', s][stream]['loss'] for s in seeds])
      spec = np.array([loss[arch, specialist, s][stream]['loss'] for s in seeds])
      std = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0
      gap = mod - spec
      noise = 2 * max(std(mod), std(spec))
      rows.append({'architecture': arch, 'specialist': specialist, 'stream': stream,
                   'seeds': len(seeds),
                   'ul2_mod': {'mean': round(float(mod.mean()), 3), 'std': round(std(mod), 3)},
                   'specialist_loss': {'mean': round(float(spec.mean()), 3),
                                       'std': round(std(spec), 3)},
                   'gap': {'mean': round(float(gap.mean()), 3), 'std': round(std(gap), 3)},
                   'within_seed_noise': bool(len(seeds) > 1 and abs(gap.mean()) <= noise)})
  lines = ['| architecture | specialist | its stream | seeds | ul2_mod loss | specialist loss | '
           'gap (MoD - specialist) | within seed noise? |', '|---|---|---|---:|---:|---:|---:|---|']
  cell = lambda v: f"{v['mean']:.3f} ± {v['std']:.3f}"
  for r in rows:
    verdict = ('yes' if r['within_seed_noise'] else 'no') if r['seeds'] > 1 else 'one seed'
    lines.append(f"| {r['architecture']} | {r['specialist']} | {r['stream']} | {r['seeds']} | "
                 f"{cell(r['ul2_mod'])} | {cell(r['specialist_loss'])} | {cell(r['gap'])} | "
                 f'{verdict} |')
  return '\n'.join(lines), rows


def plot(rows: list[dict], path: str) -> dict[str, tuple[float, float]]:
  """ablation.png: per-mode validation loss and the SuperGLUE average, per run, with error
  bars; returns each panel's y range."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  labels = [f'{r["architecture"].replace("encoder_decoder", "enc-dec").replace("decoder_only", "dec")}'
            f'\n{r["objective"]}' for r in rows]
  panels = [k for k in ('loss [NLU]', 'loss [S2S]', 'loss [NLG]', 'SuperGLUE avg', 'ROUGE-L')
            if k in rows[0]]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8), squeeze=False)
  x = np.arange(len(rows))
  for ax, name in zip(axes[0], panels):
    ax.bar(x, [r[name]['mean'] for r in rows], yerr=[r[name]['std'] for r in rows],
           color=['tab:blue' if r['architecture'] == 'encoder_decoder' else 'tab:orange'
                  for r in rows])
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_title(name, fontsize=9)
    # Axes around the data, not from 0: the differences discussed are tenths of a nat.
    low = min(r[name]['mean'] - r[name]['std'] for r in rows)
    high = max(r[name]['mean'] + r[name]['std'] for r in rows)
    margin = 0.15 * (high - low) or 0.05 * abs(high) or 0.1
    ax.set_ylim(low - margin, high + margin)
  limits = {name: tuple(map(float, ax.get_ylim())) for ax, name in zip(axes[0], panels)}
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return limits


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  gin_cli.reuse_freed_memory(args)
  from ul2 import data as data_lib
  data_lib.hide_accelerators_from_tensorflow()
  import ul2_tasks  # noqa: F401  (the corpus, SuperGLUE and generation tasks)
  gin_cli.import_modules(args.module)
  row_tokens = args.batch_size * (args.inputs_length + args.targets_length)
  steps = max(args.tokens // row_tokens, 1)
  os.makedirs(args.output, exist_ok=True)
  results = [run_cell(args, arch, objective, seed, steps)
             for arch, objective, seed in cells(args)]
  table, rows = summarize(args, results)
  gap_table, gaps = generality_gaps(results)
  finetuned = ([f'SuperGLUE: validation after {args.finetune_steps} fine-tuning steps']
               if args.finetune_tasks else [])
  generated = ([f'ROUGE-L: {args.generation_task}, {args.few_shot}-shot']
               if args.generation_task != 'none' else [])
  header = '; '.join([f'{steps} pretraining steps of {args.batch_size} x '
                      f'({args.inputs_length} + {args.targets_length}) tokens = '
                      f'{steps * row_tokens:,} tokens per run', 'validation loss per mode on '
                      f'the {args.corpus} MoD validation streams', *finetuned, *generated]) + '.'
  with open(os.path.join(args.output, 'ablation.md'), 'w') as f:
    f.write(f'# Ablation\n\n{header}\n\n{table}\n')
    if gaps:
      f.write(f'\nThe price of generality: the MoD model against each specialist on the '
              f'stream that specialist was trained for.\n\n{gap_table}\n')
  with open(os.path.join(args.output, 'ablation.json'), 'w') as f:
    json.dump({'settings': {k: v for k, v in vars(args).items()}, 'steps': steps,
               'rows': rows, 'gaps': gaps, 'runs': results}, f, indent=1)
  plot(rows, os.path.join(args.output, 'ablation.png'))
  print(f'{header}\n\n{table}\n' + (f'\n{gap_table}\n' if gaps else '')
        + f'\nWrote {args.output}/ablation.md, ablation.json, ablation.png')
  return rows


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main)
