"""The training objective, as sums: cross-entropy, z-loss, correct tokens and target weight.

Sums (not means), so that microbatches, data shards and validation batches add up before the
one normalisation (`validation_metrics`): the objective is T5X's (reference §3), cross-entropy
on `decoder_loss_weights` plus `z_loss * logsumexp(logits)^2`, normalised by the real target
tokens of the global batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def vocab_max(logits: jax.Array) -> jax.Array:
  """[..., vocab] -> [...]: the largest logit, bit for bit `jnp.max(logits, axis=-1)` (for
  logits without NaNs: with one, `loss_sums` is NaN either way).

  >>> vocab_max(jnp.array([[0.5, -1.0, 2.0, 1.5]]))
  Array([2.], dtype=float32)

  On CPU it reduces in two passes, first across blocks of the vocabulary, then within one:
  [..., 32128] -> [..., 128, 251] -> max over the 128 blocks (an elementwise max of
  contiguous rows, vectorised) -> [..., 251] -> max. XLA:CPU (jaxlib 0.10.2) runs one max over
  a 32k minor axis as a windowed reduction at a tenth of memory speed: 31 ms of `ul2_cpu`'s
  0.30 s float32 train step for its [8, 128, 32128] logits, 6.4 ms in two passes. The
  barriers keep XLA from merging the passes back into one reduction. A maximum is exact in
  any order, so the result is the same bit for bit; other platforms keep the one reduction.
  """
  vocab = logits.shape[-1]
  # The largest block count <= 128 that divides the vocabulary (32128 = 128 x 251); the
  # block axis stays outermost, so a vocabulary sharded over the mesh stays sharded.
  blocks = next((b for b in range(min(128, vocab // 2), 1, -1) if vocab % b == 0), 1)

  def one_pass(x):
    return jnp.max(x, axis=-1)

  def two_passes(x):
    x = jax.lax.optimization_barrier(x.reshape(x.shape[:-1] + (blocks, vocab // blocks)))
    return jnp.max(jax.lax.optimization_barrier(jnp.max(x, axis=-2)), axis=-1)

  if blocks == 1:
    return one_pass(logits)
  return jax.lax.platform_dependent(logits, cpu=two_passes, default=one_pass)


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
              z_loss: float) -> dict[str, jax.Array]:
  """Summed (not averaged) cross-entropy, z-loss, correct tokens and weight of a batch.

  Sums, so that microbatches and data shards add up before the one normalisation.

  >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  >>> s = loss_sums(logits, jnp.array([[0, 0]]), jnp.array([[1.0, 1.0]]), 0.0)
  >>> round(float(s['cross_entropy']), 4), float(s['correct']), float(s['weight'])
  (0.7985, 2.0, 2.0)
  """
  logits = jnp.asarray(logits, jnp.float32)  # [batch, length, vocab]
  top = vocab_max(logits)  # [batch, length]
  # logsumexp as jax.nn.logsumexp computes it (the same float32 sum), given the max.
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  log_z = jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1)) + shift
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                      axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return {
      'cross_entropy': jnp.sum((log_z - target_logits) * weights),
      'z_loss': jnp.sum(z_loss * jnp.square(log_z) * weights),
      # The target's logit is the largest: argmax without argmax, which is ~5x slower than a
      # max-reduce over a 32k vocabulary on CPU.
      'correct': jnp.sum((target_logits >= top) * weights),
      'weight': jnp.sum(weights),
  }


def validation_metrics(totals: Mapping[str, Any]) -> dict[str, float]:
  """Loss, cross-entropy and token accuracy from summed `loss_sums`."""
  weight = max(float(totals['weight']), 1.0)
  return {'loss': float(totals['cross_entropy'] + totals['z_loss']) / weight,
          'cross_entropy': float(totals['cross_entropy']) / weight,
          'accuracy': float(totals['correct']) / weight}


def by_denoiser_and_mode(sums: Mapping[str, tuple[str, Mapping[str, Any]]]
                         ) -> dict[str, dict[str, float]]:
  """{denoiser: (mode, summed loss_sums)} -> {'denoiser/<name>' or 'mode/<mode>': metrics};
  a mode's figures are over all its denoisers' target tokens together.

  >>> sums = {'R(3,0.15)': ('[NLU]', {'cross_entropy': 6.0, 'z_loss': 0.0, 'correct': 1.0,
  ...                                  'weight': 3.0}),
  ...         'R(8,0.15)': ('[NLU]', {'cross_entropy': 2.0, 'z_loss': 0.0, 'correct': 0.0,
  ...                                  'weight': 1.0})}
  >>> out = by_denoiser_and_mode(sums)
  >>> out['denoiser/R(3,0.15)']['loss'], out['mode/[NLU]']['loss'], out['mode/[NLU]']['accuracy']
  (2.0, 2.0, 0.25)
  """
  out, modes = {}, {}
  for name, (mode, totals) in sums.items():
    out[f'denoiser/{name}'] = validation_metrics(totals)
    modes[mode] = totals if mode not in modes else jax.tree.map(np.add, modes[mode], totals)
  for mode, totals in sorted(modes.items()):
    out[f'mode/{mode}'] = validation_metrics(totals)
  return out
