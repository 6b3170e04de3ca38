"""Prints the ul2 model gin equivalent to a T5X model gin: T5X's t5x/examples/t5/*/*.gin
(`network.T5Config`), the decoder-only example's (`network.TransformerConfig`), or a flaxformer
model gin (size macros; the public UL2 20B gin's kind). Includes are read from the folders
above the file, as in a T5X or flaxformer checkout.

    python scripts/convert_t5x_gin.py ~/t5x/t5x/examples/t5/t5_1_1/base.gin > my_base.gin

`--gin_file=<T5X model gin>` in train.py, eval.py, infer.py and the exports does the same
conversion on the fly; this script shows (and lets you keep) what ul2 reads.
"""

from __future__ import annotations

import sys

import gin_cli


def main(argv=None):
  parser = gin_cli.argument_parser(__doc__)
  parser.add_argument('path', help='the T5X (or flaxformer) model gin file')
  args = parser.parse_args(argv)
  text = gin_cli.t5x_model_gin_as_ul2(args.path)
  sys.stdout.write(text)
  return text


if __name__ == '__main__':
  gin_cli.exit_on_user_error(main)
