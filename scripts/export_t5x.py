"""Write a checkpoint of ours in T5X's tensorstore layout, for T5X to restore.

    python scripts/export_t5x.py --checkpoint runs/quickstart --output /tmp/t5x_ckpt
    # then, in T5X, continue from the parameters (fresh optimizer state):
    python -m t5x.train --gin_file=YOUR_T5X_MODEL.gin ... \\
      --gin.utils.RestoreCheckpointConfig.path="'/tmp/t5x_ckpt/checkpoint_600'" \\
      --gin.utils.RestoreCheckpointConfig.mode="'specific'" \\
      --gin.utils.RestoreCheckpointConfig.fallback_to_scratch=True

The T5X model gin must describe the same network (t5_1_1 with the matching size; for UL2's
gated SiLU, `network.T5Config.mlp_activations = ('silu', 'linear')`).
"""

import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import gin_cli  # noqa: E402
from ul2 import checkpoints, interop  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--gin_file', action='append', default=[])
  args = parser.parse_args(argv)
  params, config = checkpoints.load(args.checkpoint, gin_cli.model_config(args.gin_file))
  step_dir = os.path.basename(checkpoints.resolve_checkpoint(args.checkpoint))
  out = interop.save_t5x_tensorstore(params, config, args.output,
                                     int(step_dir) if step_dir.isdigit() else 0)
  print(f'Wrote {out} (T5X tensorstore layout).')


if __name__ == '__main__':
  main(sys.argv[1:])
