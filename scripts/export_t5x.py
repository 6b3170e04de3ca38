"""Write a model as a T5X model directory that T5X restores: a run of ours (parameters, step and
Adafactor state), its best/, an HF directory or another T5X checkpoint.

    python scripts/export_t5x.py --checkpoint runs/quickstart --output /tmp/t5x_model
    python scripts/export_t5x.py --checkpoint runs/quickstart --output /tmp/t5x_model --layout orbax

Writes OUTPUT/checkpoint_<step>/ in T5X's tensorstore layout (what `t5x.checkpoints.Checkpointer`
writes: msgpack `checkpoint` with version 3 plus zarr arrays) or its orbax layout (`state/`,
as T5X's Orbax checkpoint manager writes it). A run's own model_dir is already in the orbax
layout (T5X resumes it where it is); with the Adafactor state of a run (statistics per layer,
a scanned run's too), T5X continues training exactly where we stopped:

    python -m t5x.train --gin_file=YOUR_T5X_MODEL.gin ... \\
      --gin.MODEL_DIR="'/tmp/t5x_model'"

Without it (best/, HF), restore the parameters and start the optimizer fresh:

    python -m t5x.train --gin_file=YOUR_T5X_MODEL.gin ... \\
      --gin.utils.RestoreCheckpointConfig.path="'/tmp/t5x_model/checkpoint_600'" \\
      --gin.utils.RestoreCheckpointConfig.mode="'specific'" \\
      --gin.utils.RestoreCheckpointConfig.assignment_map="(('state/param_states.*', None),)" \\
      --gin.utils.RestoreCheckpointConfig.fallback_to_scratch=True

The T5X model gin must describe the same network (t5_1_1 with the matching size; for UL2's
gated SiLU, `network.T5Config.mlp_activations = ('silu', 'linear')`).
"""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import gin_cli  # noqa: E402


def main(argv=None):
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('--checkpoint', required=True,
                      help='a model_dir, its best/, checkpoint_<step> or an HF directory')
  parser.add_argument('--output', required=True, help='the T5X model directory to write')
  parser.add_argument('--layout', choices=('tensorstore', 'orbax'), default='tensorstore',
                      help="T5X's checkpoint layout: its Checkpointer's or its Orbax manager's")
  parser.add_argument('--gin_file', action='append', default=[],
                      help='models/<size>.gin when the checkpoint has no config')
  parser.add_argument('--ignore_extra_params', action='store_true',
                      help="drop checkpoint entries the model config does not have")
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the contents of a non-empty --output')
  args = parser.parse_args(argv)
  gin_cli.check_checkpoint(args.checkpoint)
  from ul2 import checkpoints, interop
  params, config = checkpoints.load(args.checkpoint, gin_cli.model_config(args.gin_file),
                                    ignore_extra=args.ignore_extra_params)
  try:  # after reading: a failed read leaves an existing export as it was
    interop.prepare_export_dir(args.output, args.overwrite)
  except ValueError as e:
    parser.error(str(e))
  opt_state, step = checkpoints.read_optimizer_state(args.checkpoint)
  out = interop.save_t5x(params, config, args.output, step or 0, opt_state, args.layout)
  with_state = opt_state is not None
  print(f'Wrote {out} (T5X {args.layout} layout, step {step or 0}, '
        f'{"with" if with_state else "without"} the Adafactor state).')


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main, sys.argv[1:])
