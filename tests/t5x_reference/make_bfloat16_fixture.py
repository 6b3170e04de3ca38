"""Writes fixtures/bfloat16.npz: T5X's networks in bfloat16 on fixed parameters.

Run where T5X's `t5x/examples/{t5,decoder_only}/{network,layers}.py` import (see README.md;
they need only flax, so those folders of a T5X checkout on PYTHONPATH suffice):

    PYTHONPATH=T5X_DIR:. JAX_PLATFORMS=cpu python tests/t5x_reference/make_bfloat16_fixture.py

T5X's `t5x/examples/t5/network.py` (`Transformer`, T5 1.1's gated GELU, untied and tied
logits) and `t5x/examples/decoder_only/network.py` (`DecoderWrapper`, causal and prefix LM),
each with `dtype=bfloat16` as T5X's model gins set it, jitted as T5X runs them (XLA may keep
a bfloat16 intermediate in float32 inside a fusion, so eager and jitted results differ),
packed and unpacked batches, on
parameters from ul2's `init_params` scaled by random factors (so that layer-norm scales and
every product are exercised away from their initial values). `tests/test_t5x_bfloat16.py`
checks ul2's bfloat16 logits against the stored ones.
"""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
from t5x.examples.decoder_only import network as t5x_decoder_only
from t5x.examples.t5 import network as t5x_t5

from ul2 import network

SHAPE = dict(vocab_size=128, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128)


def perturbed(cfg, seed):
  """ul2's initial parameters of `cfg`, each entry scaled by 1 + 0.5 N(0, 1)."""
  params = network.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [np.asarray(x * (1 + 0.5 * jax.random.normal(k, x.shape)))
                                   for x, k in zip(leaves, keys)])


def main():
  rng = np.random.default_rng(0)
  out = {}
  # Encoder-decoder: [3, 10] inputs, [3, 8] targets; packed: two segments per row.
  enc = rng.integers(2, 128, (3, 10)).astype(np.int32)
  tgt = rng.integers(2, 128, (3, 8)).astype(np.int32)
  dec = np.pad(tgt, ((0, 0), (1, 0)))[:, :-1]
  enc_seg = np.array([[1] * 6 + [2] * 4] * 3, np.int32)
  dec_seg = np.array([[1] * 5 + [2] * 3] * 3, np.int32)
  out.update({'encdec/inputs': enc, 'encdec/targets': tgt, 'encdec/decoder_inputs': dec,
              'encdec/encoder_segment_ids': enc_seg, 'encdec/decoder_segment_ids': dec_seg})
  for tied in (False, True):
    name = 'tied' if tied else 'untied'
    cfg = network.Config(**SHAPE, num_encoder_layers=2, num_decoder_layers=2,
                         dtype='bfloat16', mlp_activations=('gelu', 'linear'),
                         dropout_rate=0.0, logits_via_embedding=tied)
    model = t5x_t5.Transformer(t5x_t5.T5Config(
        **SHAPE, dtype=jnp.bfloat16, num_encoder_layers=2, num_decoder_layers=2,
        mlp_activations=('gelu', 'linear'), dropout_rate=0.0, logits_via_embedding=tied))
    params = perturbed(cfg, 0)
    theirs = model.init(jax.random.key(0), enc, dec, tgt, enable_dropout=False)['params']
    assert jax.tree.map(np.shape, flax.core.unfreeze(theirs)) == jax.tree.map(np.shape, params)
    for key, value in network.flatten_params(params).items():
      out[f'encdec/{name}/param/{key}'] = value
    for packed in ('unpacked', 'packed'):
      segments = (dict(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
                  if packed == 'packed' else {})
      out[f'encdec/{name}/logits/{packed}'] = np.asarray(jax.jit(
          lambda p, s: model.apply({'params': p}, enc, dec, tgt, enable_dropout=False, **s))(
              flax.core.freeze(params), segments), np.float32)

  # Decoder-only: [3, 12] targets, a prefix of 5, 0 and 8 tokens for the prefix LM.
  targets = rng.integers(2, 128, (3, 12)).astype(np.int32)
  inputs = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  causal = (np.arange(12)[None] < np.array([[5], [0], [8]])).astype(np.int32)
  segments = np.array([[1] * 6 + [2] * 6, [1] * 12, [1] * 9 + [2] * 3], np.int32)
  out.update({'decoder_only/targets': targets, 'decoder_only/inputs': inputs,
              'decoder_only/causal_attention': causal, 'decoder_only/segment_ids': segments})
  cfg = network.Config(**SHAPE, num_decoder_layers=2, architecture='decoder_only',
                       dtype='bfloat16', mlp_activations=('gelu', 'linear'), dropout_rate=0.0,
                       logits_via_embedding=True)
  model = t5x_decoder_only.DecoderWrapper(t5x_decoder_only.TransformerConfig(
      **SHAPE, dtype=jnp.bfloat16, num_layers=2, mlp_activations=('gelu', 'linear'),
      dropout_rate=0.0, logits_via_embedding=True))
  params = perturbed(cfg, 2)
  for key, value in network.flatten_params(params).items():
    out[f'decoder_only/param/{key}'] = value
  for mode, ca in (('causal', None), ('prefix', causal)):
    for packed, seg in (('unpacked', None), ('packed', segments)):
      out[f'decoder_only/logits/{mode}/{packed}'] = np.asarray(jax.jit(
          lambda p, seg, ca: model.apply({'params': p}, inputs, targets, decoder_segment_ids=seg,
                                         decoder_causal_attention=ca, enable_dropout=False))(
              flax.core.freeze(params), seg, ca), np.float32)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'bfloat16.npz')
  np.savez_compressed(path, **out)
  print('wrote', path, f'({os.path.getsize(path):,} bytes)')


if __name__ == '__main__':
  main()
