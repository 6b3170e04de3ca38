"""Compile a run's train step (or a file's decoding) for a TPU slice here: does it fit?

    python scripts/compile_tpu.py --gin_file=experiments/ul2_20b_tpu_v4.gin
    python scripts/compile_tpu.py --gin_file=experiments/ul2_20b_infer_tpu_v4.gin
    python scripts/compile_tpu.py --topology=v4-8 --gin_file=models/small.gin \\
        --gin_file=runs/pretrain.gin --gin.MIXTURE_OR_TASK_NAME="'ul2_mod_gutenberg'" \\
        --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 512}" --gin.TRAIN_STEPS=1 \\
        --gin.MODEL_DIR="'/tmp/unused'" --gin.ACTIVATION_DTYPE="'bfloat16'"

It takes the same gin files and flags as scripts/train.py and compiles the real train step
(model, optimizer, batch, mesh) for the slice's abstract chips with XLA's TPU compiler
(libtpu); nothing runs and no TPU is needed. It prints, per chip:
argument, output, temporary and peak bytes against the chip's HBM with FITS or DOES NOT FIT and
the headroom; the train state's bytes and any replicated leaf over 1 MiB; the model's FLOPs per
step and the ideal step time at the chip's peak; XLA's cost model's predicted step time and MFU
(recomputation and collectives included); the collectives per step by kind; and the chip
coordinates of a model-parallel group. Gin files with DECODE_CONFIG (runs/infer.gin, the
inference recipes) compile what scripts/infer.py runs instead: one batch's decoding, with its
memory, parameters per chip and collectives. The slice is --topology or the gin files' TPU_SLICE
macro (the pod recipes set it). libtpu is read from UL2_LIBTPU_DIR (default .venv/libtpu,
where scripts/test.sh installs it) or the environment. Exit status 1 when the step does not
fit (or has less headroom than --min_headroom); --json writes the same figures.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compiled for the TPU slice, run nowhere

import gin_cli  # noqa: E402


def parse_args(argv):
  gin_files, bindings, rest = gin_cli.split_argv(argv)
  parser = gin_cli.argument_parser(__doc__, gin_flags=True)
  parser.add_argument('--gin_file', action='append', metavar='F',
                      help="a run's gin files, as scripts/train.py takes them")
  parser.add_argument('--topology', default=None,
                      help='the TPU slice, as Cloud TPU names it: v4-8 ... v4-2048, v5p-8 ... '
                      'v5p-8192, v5litepod-1 ... v5litepod-256, v6e-1 ... v6e-256 '
                      '(default: the TPU_SLICE macro)')
  parser.add_argument('--json', metavar='PATH', help='also write the figures as JSON here')
  parser.add_argument('--min_headroom', type=float, default=0.0,
                      help='exit 1 unless this fraction of HBM is left at peak (recipes: 0.1)')
  parser.add_argument('--no_cost_model', action='store_true',
                      help="skip XLA's cost model (its 2-3 small extra compiles)")
  gin_cli.add_module_flag(parser)
  args = parser.parse_args(rest)
  if not gin_files:
    parser.error('give the run\'s gin files (e.g. --gin_file=experiments/ul2_20b_tpu_v4.gin)')
  if not 0.0 <= args.min_headroom < 1.0:
    parser.error(f'--min_headroom must be a fraction in [0, 1), got {args.min_headroom}')
  return gin_files, bindings, args


# libtpu kept apart from the environment (scripts/test.sh puts it here): installed into it,
# every JAX process on a machine without TPUs would try to start one and print libtpu's errors.
LIBTPU_DIR = os.environ.get('UL2_LIBTPU_DIR', os.path.join(sys.prefix, 'libtpu'))
LIBTPU_HINT = ("error: compiling for a TPU slice needs libtpu: pip install --target "
               f"{LIBTPU_DIR} 'libtpu==0.0.42.*' (the version jax 0.10.2 pins; on a TPU VM: "
               "pip install -e '.[tpu]')")


def find_libtpu() -> bool:
  """Whether libtpu can be imported, from the environment or LIBTPU_DIR; before JAX loads."""
  import importlib.util
  if importlib.util.find_spec('libtpu') is None and os.path.isdir(LIBTPU_DIR):
    sys.path.insert(0, LIBTPU_DIR)
  return importlib.util.find_spec('libtpu') is not None


def main(argv=None):
  gin_files, bindings, args = parse_args(sys.argv[1:] if argv is None else argv)
  if not find_libtpu():
    raise SystemExit(LIBTPU_HINT)
  from ul2 import aot
  if args.topology:
    tpu = aot.tpu_slice(args.topology)  # a misspelt slice fails before the imports below
  import gin
  from ul2 import data as data_lib
  from ul2 import train as train_lib

  gin_cli.import_modules(args.module)
  gin_cli.parse(gin_files, bindings, read_by_script=('TPU_SLICE', 'MIXTURE_OR_TASK_MODULE',
                                                     'DECODE_CONFIG', 'MESH_CONFIG'))
  if not args.topology:
    if not gin_cli.has_macro('TPU_SLICE'):
      raise SystemExit('error: name the TPU slice: --topology=v4-512 (or set the TPU_SLICE '
                       'macro in a gin file)')
    tpu = aot.tpu_slice(gin_cli.macro('TPU_SLICE'))
  if gin_cli.has_macro('DECODE_CONFIG'):  # an inference recipe (runs/infer.gin)
    if not gin_cli.has_macro('MODEL_CONFIG'):
      raise SystemExit('error: the gin files set no MODEL_CONFIG: include a models/*.gin '
                       'before runs/infer.gin')
    result = aot.report_decode(gin_cli.macro('MODEL_CONFIG'), gin_cli.macro('DECODE_CONFIG'),
                               gin_cli.macro('MESH_CONFIG'), tpu)
    return finish(result, args)
  bound = gin.get_bindings(train_lib.train)
  missing = [k for k in ('model', 'data', 'run', 'mesh') if k not in bound]
  if missing:
    raise SystemExit(f'error: the gin files bind no train.train {", ".join(missing)}: include '
                     'a runs/*.gin (e.g. --gin_file=runs/pretrain.gin) after a models/*.gin')
  data = bound['data']
  model = bound['model']
  converter = data_lib.feature_converter(data, model.architecture)
  run = aot.Run(model=model, batch_size=data.batch_size,
                feature_lengths=converter.get_model_feature_lengths(data.feature_lengths),
                run=bound['run'], optimizer=bound.get('optimizer', train_lib.OptimizerConfig()),
                mesh=bound['mesh'])
  return finish(aot.report(run, tpu, cost_model=not args.no_cost_model), args)


def finish(result, args) -> int:
  """Prints the report (and writes its JSON); the exit status."""
  from ul2 import aot
  print(aot.format_report(result, args.min_headroom))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'JSON: {args.json}')
  ok = result['fits'] and result['memory']['headroom_fraction'] >= args.min_headroom
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(gin_cli.exit_on_user_error(main))
