"""Generate from, or score with, a checkpoint.

    python scripts/infer.py --checkpoint runs/quickstart --input "It was a dark and" --mode '[S2S]'
    python scripts/infer.py --checkpoint runs/quickstart --input "The cat <extra_id_0> mat." \\
        --mode '[NLG]' --decode beam
    python scripts/infer.py --checkpoint runs/quickstart --input "It was a dark and" \\
        --score "stormy night."

`--score TARGET` prints the total natural-log likelihood of TARGET given the input (summed over
the target tokens, EOS included) instead of generating.
"""

import argparse
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import gin_cli  # noqa: E402
from ul2 import data, vocabulary  # noqa: E402


def main(argv=None, out=sys.stdout):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--ignore_extra_params', action='store_true',
                      help='drop checkpoint entries the model config does not have')
  parser.add_argument('--input', required=True)
  parser.add_argument('--mode', default=None, help='mode token to prepend: one of '
                      f"{', '.join(vocabulary.MODE_TOKENS)} or '' (none); default: the one a "
                      "fine-tuned model's best/ was selected with (best.json), else none")
  parser.add_argument('--decode', choices=('greedy', 'beam', 'sample'), default='greedy')
  parser.add_argument('--max_length', type=int, default=64)
  parser.add_argument('--beam_size', type=int, default=4)
  parser.add_argument('--alpha', type=float, default=0.6, help='beam length penalty')
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--score', default=None, help='print log p(SCORE | input) instead')
  args = parser.parse_args(argv)
  data.hide_accelerators_from_tensorflow()  # the model runs on the accelerators

  import jax
  import jax.numpy as jnp
  import numpy as np
  from ul2 import checkpoints, decoding, network

  mode = args.mode
  if mode is None:  # a fine-tuned model's best/ answers in the mode it was fine-tuned with
    best = (checkpoints.read_best(args.checkpoint)
            if args.checkpoint.rstrip('/').endswith(checkpoints.BEST) else None)
    mode = (best or {}).get('selection', {}).get('mode', '')
  try:
    mode = vocabulary.check_mode(mode, '--mode')
  except ValueError as e:
    parser.error(str(e))
  model, params = checkpoints.load_model(args.checkpoint, gin_cli.model_config(args.gin_file),
                                         args.ignore_extra_params)
  vocab = vocabulary.get_vocabulary()
  inputs = jnp.asarray([vocab.encode(vocabulary.with_mode(args.input, mode)) + [network.EOS_ID]],
                       jnp.int32)
  if args.score is not None:
    targets = jnp.asarray([vocab.encode(args.score) + [network.EOS_ID]], jnp.int32)
    value = float(decoding.score(model, params, inputs, targets)[0])
    print(f'{value:.4f}', file=out)
    return value
  if args.decode == 'greedy':
    ids = decoding.greedy(model, params, inputs, max_decode_length=args.max_length)[0]
  elif args.decode == 'beam':
    sequences, _ = decoding.beam_search(model, params, inputs, beam_size=args.beam_size,
                                        max_decode_length=args.max_length, alpha=args.alpha)
    ids = sequences[0, 0]
  else:
    ids = decoding.sample(model, params, inputs, jax.random.key(args.seed),
                          max_decode_length=args.max_length, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p)[0]
  ids = [int(i) for i in np.asarray(ids)]
  ids = ids[:ids.index(network.EOS_ID)] if network.EOS_ID in ids else ids
  text = vocabulary.render([i for i in ids if i], vocab)
  print(text, file=out)
  return text


if __name__ == '__main__':
  main(sys.argv[1:])
