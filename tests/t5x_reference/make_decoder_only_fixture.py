"""Writes fixtures/decoder_only.npz: T5X's decoder-only network run on fixed parameters.

Run where T5X's `t5x/examples/decoder_only/{network,layers}.py` import (see README.md; the two
files need only flax, so a package `t5x/examples/decoder_only/` holding them suffices):

    PYTHONPATH=T5X_DIR:. python tests/t5x_reference/make_decoder_only_fixture.py

The parameters are ul2's `init_params` of the config below, so the fixture also records that
T5X initialises the same tree (the script stops if it does not). `tests/test_decoder_only.py`
checks ul2's logits against the stored ones.
"""
import os

import flax
import jax
import numpy as np
from t5x.examples.decoder_only import network as t5x_network

from ul2 import network

CONFIG = dict(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
              num_decoder_layers=2, architecture='decoder_only',
              mlp_activations=('silu', 'linear'))


def main():
  cfg = network.Config(**CONFIG)
  t5x_model = t5x_network.DecoderWrapper(t5x_network.TransformerConfig(
      vocab_size=128, emb_dim=32, num_heads=4, num_layers=2, head_dim=8, mlp_dim=64,
      mlp_activations=('silu', 'linear'), dropout_rate=0.0, logits_via_embedding=False))
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 128, (3, 12)).astype(np.int32)
  targets[2, 9:] = 0
  inputs = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  causal = (np.arange(12)[None] < np.array([[5], [0], [8]])).astype(np.int32)
  segments = np.array([[1] * 6 + [2] * 6, [1] * 12, [1] * 9 + [0] * 3], np.int32)
  t5x_params = t5x_model.init(jax.random.key(0), inputs, targets, enable_dropout=False)['params']
  ours = network.init_params(cfg, jax.random.key(0))
  shapes = lambda p: {k: v.shape for k, v in network.flatten_params(p).items()}
  assert shapes(t5x_params) == shapes(ours), 'parameter trees differ'
  out = {'targets': targets, 'inputs': inputs, 'causal_attention': causal,
         'segment_ids': segments}
  for name, value in network.flatten_params(ours).items():
    out['param/' + name] = np.asarray(value)
  for mode, ca in (('causal', None), ('prefix', causal)):
    for packed, seg in (('unpacked', None), ('packed', segments)):
      out[f'logits/{mode}/{packed}'] = np.asarray(t5x_model.apply(
          {'params': flax.core.freeze(ours)}, inputs, targets, decoder_segment_ids=seg,
          decoder_causal_attention=ca, enable_dropout=False))
  path = os.path.join(os.path.dirname(__file__), 'fixtures', 'decoder_only.npz')
  np.savez_compressed(path, **out)
  print('wrote', path)


if __name__ == '__main__':
  main()
