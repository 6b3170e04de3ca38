"""Train (pretrain or continue) a model configured by gin, T5X's command-line conventions.

    python scripts/train.py --gin_file=quickstart.gin
    python scripts/train.py --gin_file=models/base.gin --gin_file=runs/pretrain.gin \\
        --gin.MIXTURE_OR_TASK_NAME="'ul2_mod_c4'" --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 512}" \\
        --gin.TRAIN_STEPS=100000 --gin.MODEL_DIR="'/ckpt/t5_base_ul2'"

Multi-host: pass `--multiprocess` (TPU pods and SLURM/Kubernetes GPU clusters are detected by
`jax.distributed.initialize()`), or give the coordinator explicitly with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the environment
variables UL2_COORDINATOR_ADDRESS, UL2_NUM_PROCESSES, UL2_PROCESS_ID). Every process runs the
same command and reads its own input shard.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402


def parse_args(argv):
  gin_files, bindings, rest = gin_cli.split_argv(argv)
  parser = gin_cli.argument_parser(__doc__, gin_flags=True)
  parser.add_argument('--gin_file', action='append', metavar='F',
                      help='a gin file (repeatable): gin_configs/quickstart.gin, a '
                      'models/*.gin with a runs/*.gin, or your own')
  gin_cli.add_module_flag(parser)
  gin_cli.add_memory_flag(parser)
  gin_cli.add_distributed_flags(parser)
  args = parser.parse_args(rest)
  if not gin_files:
    parser.error('give at least one --gin_file (e.g. --gin_file=quickstart.gin)')
  return gin_files, bindings, args


def check_machine(gin_files, devices) -> None:
  """A recipe written for TPU slices (TPU_SLICE) or GPU hosts (GPUS_PER_HOST) stops at once
  on another machine, saying so, before it builds inputs or compiles anything."""
  platform = devices[0].platform
  here = f'this machine has {len(devices)} {platform.upper()} device(s)'
  files = ', '.join(gin_files)
  if gin_cli.has_macro('TPU_SLICE') and gin_cli.macro('TPU_SLICE') and platform != 'tpu':
    raise SystemExit(f"error: {files} is a recipe for a TPU {gin_cli.macro('TPU_SLICE')} slice "
                     f'(TPU_SLICE) and {here}: launch it there (docs/pods.md); check that it '
                     'fits with scripts/compile_tpu.py; try the pipeline here with bash '
                     'scripts/smoke.sh; or pass --gin.TPU_SLICE=None to run it here anyway.')
  if gin_cli.has_macro('GPUS_PER_HOST') and gin_cli.macro('GPUS_PER_HOST') and platform != 'gpu':
    raise SystemExit(f"error: {files} is a recipe for hosts of {gin_cli.macro('GPUS_PER_HOST')} "
                     f'GPUs (GPUS_PER_HOST) and {here}: try the pipeline here with bash '
                     'scripts/smoke.sh, or pass --gin.GPUS_PER_HOST=None to run it here anyway.')


def main(argv=None):
  gin_files, bindings, args = parse_args(sys.argv[1:] if argv is None else argv)
  gin_cli.initialize_distributed(args)
  gin_cli.reuse_freed_memory(args)  # after jax.distributed, before the first step
  from ul2 import data
  data.hide_accelerators_from_tensorflow()  # the model runs on the accelerators
  import gin
  import jax
  from ul2 import checkpoints
  from ul2 import train as train_lib

  gin_cli.import_modules(args.module)
  gin_cli.parse(gin_files, bindings, read_by_script=('MIXTURE_OR_TASK_MODULE', 'TPU_SLICE',
                                                     'GPUS_PER_HOST'))
  check_machine(gin_files, jax.devices())
  if gin_cli.has_macro('MIXTURE_OR_TASK_MODULE'):  # T5X's way to name the tasks' module
    gin_cli.import_modules([gin_cli.macro('MIXTURE_OR_TASK_MODULE')])
  model_dir = gin_cli.macro('MODEL_DIR')
  try:
    checkpoints.check_reachable(model_dir)  # seconds, not minutes of retries
  except checkpoints.CheckpointError as e:
    raise SystemExit(f'error: {e}') from None
  given_config = gin.config_str()
  # Written once the run has started: a run that fails to start leaves an existing run's
  # config.gin as it was.
  given = checkpoints.join(model_dir, checkpoints.CONFIG_GIN)
  try:
    result = gin.get_configurable(train_lib.train)(
        started=lambda: checkpoints.write_gin_config(model_dir, given_config))
  except checkpoints.CheckpointError as e:  # a failed save, a NaN loss, no intact checkpoint
    raise SystemExit(f'error: {str(e).splitlines()[0]}') from None  # without gin's addendum
  # The operative config: every parameter the run actually used, with its value.
  checkpoints.write_gin_config(model_dir, gin.operative_config_str(), operative=True)
  if jax.process_index() == 0:
    print(f'Config: {given} and {checkpoints.OPERATIVE_CONFIG_GIN}')
  return result


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main)
