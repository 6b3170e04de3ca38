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

import argparse
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402


def parse_args(argv):
  gin_files, bindings, rest = gin_cli.split_argv(argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--multiprocess', action='store_true',
                      help='call jax.distributed.initialize() (auto-detected cluster)')
  parser.add_argument('--coordinator_address', default=os.environ.get('UL2_COORDINATOR_ADDRESS'))
  parser.add_argument('--num_processes', type=int,
                      default=int(os.environ['UL2_NUM_PROCESSES'])
                      if 'UL2_NUM_PROCESSES' in os.environ else None)
  parser.add_argument('--process_id', type=int,
                      default=int(os.environ['UL2_PROCESS_ID'])
                      if 'UL2_PROCESS_ID' in os.environ else None)
  args = parser.parse_args(rest)
  if not gin_files:
    parser.error('give at least one --gin_file (e.g. --gin_file=quickstart.gin)')
  return gin_files, bindings, args


def initialize_distributed(args) -> None:
  import jax

  explicit = args.coordinator_address is not None
  if not (args.multiprocess or explicit):
    return
  if explicit and (args.num_processes is None or args.process_id is None):
    raise SystemExit('--coordinator_address needs --num_processes and --process_id (or '
                     'UL2_NUM_PROCESSES and UL2_PROCESS_ID).')
  # Several CPU processes (tests, laptops) exchange collectives over gloo; accelerators use
  # their own (NCCL, ICI) whatever this says.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=args.coordinator_address,
                  num_processes=args.num_processes, process_id=args.process_id)
  jax.distributed.initialize(**kwargs)


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow only feeds data: keep it off the accelerators JAX uses.

  TensorFlow is imported here first, with the process's stderr muted for the import alone:
  its C++ runtime prints INFO lines while loading (oneDNN, CUDA stubs), before
  TF_CPP_MIN_LOG_LEVEL or any other setting can apply. A failed import still raises.
  """
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow as tf
  except ImportError:
    return
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # GPUs already initialised by an earlier TF op: nothing to hide now
    pass


def main(argv=None):
  gin_files, bindings, args = parse_args(sys.argv[1:] if argv is None else argv)
  initialize_distributed(args)
  hide_gpus_from_tensorflow()
  import gin
  import jax
  from ul2 import train as train_lib

  gin_cli.parse(gin_files, bindings)
  model_dir = gin_cli.macro('MODEL_DIR')
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(gin.config_str())
  result = gin.get_configurable(train_lib.train)()
  if jax.process_index() == 0:
    # The operative config: every parameter the run actually used, with its value.
    with open(os.path.join(model_dir, 'operative_config.gin'), 'w') as f:
      f.write(gin.operative_config_str())
    print(f'Config: {os.path.join(model_dir, "config.gin")} and operative_config.gin')
  return result


if __name__ == '__main__':
  main()
