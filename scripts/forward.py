"""One forward pass of a gin-configured model on real tokenized text: a smoke test of the network.

    python scripts/forward.py --gin_file=models/tiny.gin [--gin.network.Config.dtype="'bfloat16'"]

Prints the parameter count, the logits' shape and the teacher-forced loss of a randomly
initialised model (about ln(32128) = 10.4 nats per token: it has learned nothing yet).
"""

import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

import gin_cli
from ul2 import network

VOCAB = os.path.join(gin_cli.REPO, 'data', 't5_vocab', 'spiece.model')
TEXT = ('It was the best of times, it was the worst of times, it was the age of wisdom, '
        'it was the age of foolishness.')


def main(argv):
  gin_files, bindings, rest = gin_cli.split_argv(argv[1:])
  if rest:
    raise SystemExit(f'unknown arguments {rest}; use --gin_file=FILE and --gin.NAME=VALUE')
  gin_cli.parse(gin_files or ['models/tiny.gin'], bindings)
  cfg = gin_cli.macro('MODEL_CONFIG')

  sp = spm.SentencePieceProcessor(model_file=VOCAB)
  ids = sp.encode(TEXT) + [network.EOS_ID]
  half = len(ids) // 2
  # Prefix-LM style: the first half is the input, the model must predict the second half.
  inputs = jnp.asarray([ids[:half] + [network.EOS_ID]], jnp.int32)  # [1, inputs_length]
  targets = jnp.asarray([ids[half:]], jnp.int32)                     # [1, targets_length]
  decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]        # shifted right, start 0

  model = network.Transformer(cfg)
  start = time.time()
  params = jax.jit(lambda rng: model.init(rng, inputs, decoder_inputs, targets))(
      jax.random.key(0))['params']
  logits = jax.jit(model.apply)({'params': params}, inputs, decoder_inputs, targets)
  loss = -float(network.sequence_log_likelihood(logits, targets)[0]) / targets.shape[1]
  print(f'model: {cfg}')
  print(f'parameters: {network.count_parameters(params):,}  devices: {jax.devices()}')
  print(f'input:  {sp.decode(ids[:half])!r}')
  print(f'target: {sp.decode(ids[half:-1])!r}')
  print(f'logits: {tuple(logits.shape)} {logits.dtype}; loss {loss:.3f} nats/token '
        f'(ln vocab = {np.log(cfg.vocab_size):.3f}); {time.time() - start:.1f}s')
  if not np.isfinite(loss):
    raise SystemExit('non-finite loss')


if __name__ == '__main__':
  main(sys.argv)
