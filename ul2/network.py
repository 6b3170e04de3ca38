"""The T5 v1.1 / UL2 networks, encoder-decoder and decoder-only, with exactly T5X's trees.

UL2 is T5 v1.1 with a gated-SiLU MLP. The family (reference §2): pre-norm RMSNorm with a scale
only, no biases, a gated MLP (`wi_0` activation x `wi_1` linear, then `wo`), one T5 relative
position bias table per stack shared by its layers (bidirectional in the encoder, causal in the
decoder), attention logits not divided by sqrt(head_dim) (folded into the query initialiser),
unscaled embeddings, decoder start token 0 (= pad) and EOS 1.

Parameters (all float32; kernels are (in, out)), for `num_encoder_layers=2` and untied logits:

    token_embedder/embedding                                   (vocab, embed)
    encoder/relpos_bias/rel_embedding                          (heads, relpos_buckets)
    encoder/layers_0/pre_attention_layer_norm/scale            (embed,)
    encoder/layers_0/attention/{query,key,value}/kernel        (embed, joined_kv)
    encoder/layers_0/attention/out/kernel                      (joined_kv, embed)
    encoder/layers_0/pre_mlp_layer_norm/scale                  (embed,)
    encoder/layers_0/mlp/{wi_0,wi_1}/kernel                    (embed, mlp)
    encoder/layers_0/mlp/wo/kernel                             (mlp, embed)
    encoder/layers_1/...
    encoder/encoder_norm/scale                                 (embed,)
    decoder/relpos_bias/rel_embedding                          (heads, relpos_buckets)
    decoder/layers_0/pre_self_attention_layer_norm/scale       (embed,)
    decoder/layers_0/self_attention/{query,key,value,out}/kernel
    decoder/layers_0/pre_cross_attention_layer_norm/scale      (embed,)
    decoder/layers_0/encoder_decoder_attention/{query,key,value,out}/kernel
    decoder/layers_0/pre_mlp_layer_norm/scale                  (embed,)
    decoder/layers_0/mlp/{wi_0,wi_1,wo}/kernel
    decoder/decoder_norm/scale                                 (embed,)
    decoder/logits_dense/kernel                                (embed, vocab)   untied only

The names in parentheses are the logical axes each parameter carries (`nn.LogicallyPartitioned`
boxes); `ul2.partitioning` maps them onto a device mesh. With `scan_layers=True` the layers of a
stack live under one `layers` entry with a leading `layers` axis; `unstack_layers` /
`stack_layers` convert between the two trees, so checkpoints always use the per-layer names.

The decoder-only model (`architecture='decoder_only'`, `DecoderOnly`) has T5X's
`decoder_only` example's tree: everything under `decoder/`, the same blocks without
cross-attention, one causal relative-position table, `num_decoder_layers` layers:

    decoder/token_embedder/embedding                           (vocab, embed)
    decoder/relpos_bias/rel_embedding                          (heads, relpos_buckets)
    decoder/layers_0/pre_self_attention_layer_norm/scale       (embed,)
    decoder/layers_0/self_attention/{query,key,value,out}/kernel
    decoder/layers_0/pre_mlp_layer_norm/scale                  (embed,)
    decoder/layers_0/mlp/{wi_0,wi_1,wo}/kernel
    decoder/decoder_norm/scale                                 (embed,)
    decoder/logits_dense/kernel                                (embed, vocab)   untied only

It takes seqio's `DecoderFeatureConverter` features (`decoder_input_tokens`,
`decoder_target_tokens`, and `decoder_causal_attention` for a prefix LM). `build(config)` gives
either model.

Inputs are the features seqio's `EncDecFeatureConverter` produces, unchanged:
`encoder_input_tokens`, `decoder_input_tokens`, `decoder_target_tokens` and, for packed rows,
`encoder_segment_ids`, `decoder_segment_ids` (positions are accepted but not needed: relative
attention only sees distances, which packing does not change inside a segment).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
PAD_ID = 0  # also the decoder start token
EOS_ID = 1

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # T5X's 'gelu' is flax's tanh approximation, as is HF's "gated-gelu" (gelu_new).
    'gelu': nn.gelu,
    'silu': nn.silu,
    'swish': nn.silu,  # T5X spells SiLU 'swish' in the UL2 gin
    'relu': nn.relu,
    'linear': lambda x: x,
}
_REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    # Keep the matmul outputs, recompute the cheap element-wise work (T5X's 'minimal').
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep only the products the backward pass reads: the query, key and value projections
    # (attention's gradient) and the MLP's input projections (the gate's). The attention and
    # MLP output projections only feed the residual sum, so they are recomputed: one
    # [tokens, embed] product each instead of two [tokens, embed] stacks per layer, which
    # 'minimal' keeps unsharded under 1-D activation partitioning.
    'projections': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj', 'mlp_wi'),
}
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of one encoder-decoder; field names follow T5X's `TransformerConfig`.

  The defaults are T5 1.1 small. `gin_configs/models/*.gin` name the published sizes.
  """

  vocab_size: int = 32128  # 32000 pieces + 100 sentinels, padded to a multiple of 128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64  # heads x head_dim need not equal emb_dim (UL2 20B: 16 x 256 vs 4096)
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  # Gated MLP: one `wi_i` per activation, multiplied together. T5 1.1: gelu x linear;
  # UL2: silu x linear. A single activation gives T5 1.0's ungated `wi`.
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.0  # 0.0 for pretraining (UL2, T5 1.1), 0.1 for fine-tuning
  dtype: str = 'float32'  # activations: 'float32' or 'bfloat16'; parameters stay float32
  # Tied: logits = embedding.attend(y) / sqrt(emb_dim) (UL2 20B's public gin); untied: a
  # separate `decoder/logits_dense` (T5 1.1).
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  float32_attention_logits: bool = False  # T5X's: bfloat16 attention logits with bfloat16 activations
  layer_norm_epsilon: float = 1e-6
  # 'encoder_decoder' (T5, UL2) or 'decoder_only' (T5X's decoder_only example: one stack of
  # num_decoder_layers layers without cross-attention; num_encoder_layers is unused).
  architecture: str = 'encoder_decoder'
  # decoder_only: True, a prefix LM (the inputs that seqio's PrefixLMFeatureConverter marks in
  # decoder_causal_attention attend to each other both ways); False, causal throughout.
  prefix_lm: bool = True
  # Large models: one scanned layer per stack compiles in constant time; remat trades
  # recomputation for activation memory ('none', 'projections', 'minimal' or 'full';
  # docs/pods.md compares them on TPU slices). Pair remat with scan:
  # without scan, XLA schedules the recomputation early and remat saves little (T5 1.1
  # base: 79 -> 78 GiB compiled with 'full' unscanned, 7 GiB scanned).
  scan_layers: bool = False
  remat_policy: str = 'none'

  def __post_init__(self):
    # Gin passes lists where a tuple is expected; normalise so the config stays hashable.
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    for name in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim',
                 'num_encoder_layers', 'num_decoder_layers',
                 'relative_attention_num_buckets', 'relative_attention_max_distance'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'network.Config.{name} must be a positive integer, got {value!r}.')
    if self.relative_attention_num_buckets % 2:
      raise ValueError('network.Config.relative_attention_num_buckets must be even (the '
                       f'encoder splits them by direction), got '
                       f'{self.relative_attention_num_buckets}.')
    unknown = [a for a in self.mlp_activations if a not in _ACTIVATIONS]
    if not self.mlp_activations or unknown:
      raise ValueError(f'network.Config.mlp_activations {self.mlp_activations!r} has unknown '
                       f'entries {unknown}; use a tuple of {sorted(_ACTIVATIONS)}, e.g. '
                       "('gelu', 'linear') for T5 1.1 or ('silu', 'linear') for UL2.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"network.Config.dtype must be one of {sorted(_DTYPES)}, got "
                       f'{self.dtype!r}.')
    if self.architecture not in ('encoder_decoder', 'decoder_only'):
      raise ValueError("network.Config.architecture (gin: MODEL_ARCH) must be 'encoder_decoder'"
                       f" or 'decoder_only', got {self.architecture!r}.")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(f'network.Config.remat_policy must be one of {sorted(_REMAT_POLICIES)},'
                       f' got {self.remat_policy!r}.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'network.Config.dropout_rate must be in [0, 1), got '
                       f'{self.dropout_rate!r}.')

  @property
  def activation_dtype(self) -> jnp.dtype:
    return _DTYPES[self.dtype]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def _param(module: nn.Module, name: str, init, shape: tuple[int, ...],
           axes: tuple[str, ...]) -> Array:
  """A float32 parameter carrying its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Names an activation's axes; a no-op unless run under a mesh with logical-axis rules."""
  return nn.with_logical_constraint(x, axes)


# How `dot` multiplies bfloat16 on XLA:CPU; 'auto' (the default) chooses by the CPU.
CPU_BFLOAT16_PRODUCTS_ENV = 'UL2_CPU_BFLOAT16_PRODUCTS'
_CPU_BFLOAT16_PRODUCTS = ('auto', 'library', 'float32')
# x86 instructions that multiply bfloat16 in hardware (AMX tiles, AVX512-BF16 dot products).
NATIVE_BFLOAT16_FEATURES = ('amx_bf16', 'avx512_bf16')


@functools.cache
def cpu_features() -> frozenset[str]:
  """The host CPU's instruction-set flags, from /proc/cpuinfo (empty where there is none)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      return frozenset(next((line for line in f if line.startswith(('flags', 'Features'))),
                            ':').split(':', 1)[1].split())
  except OSError:
    return frozenset()


def cpu_bfloat16_instructions() -> list[str]:
  """Which of `NATIVE_BFLOAT16_FEATURES` the host CPU has (sorted; empty on most CPUs)."""
  return sorted(set(NATIVE_BFLOAT16_FEATURES) & cpu_features())


def cpu_bfloat16_products() -> str:
  """How `dot` multiplies bfloat16 on XLA:CPU: 'library' or 'float32'.

  'library': bfloat16 operands into XLA:CPU's bfloat16 library (YNNPACK) through
  `_dot_bfloat16_cpu`, which pays for one row-major copy of each gradient product's
  transposed operand. 'float32': the plain product, whose operands XLA:CPU converts to
  float32. The library only wins where the CPU multiplies bfloat16 in hardware
  (`NATIVE_BFLOAT16_FEATURES`): `scripts/bench_matmul.py`, [4096, 512] x [512, 1024] with
  both gradients, gave 729 GFLOP/s against 382 on a Xeon with AMX, and 67 against 92 on an
  AVX2-only EPYC. The environment variable UL2_CPU_BFLOAT16_PRODUCTS ('auto', 'library' or
  'float32') overrides the choice; it is read when a function is traced.

  >>> os.environ[CPU_BFLOAT16_PRODUCTS_ENV] = 'library'  # on any CPU
  >>> cpu_bfloat16_products()
  'library'
  >>> del os.environ[CPU_BFLOAT16_PRODUCTS_ENV]
  """
  mode = os.environ.get(CPU_BFLOAT16_PRODUCTS_ENV, 'auto')
  if mode not in _CPU_BFLOAT16_PRODUCTS:
    raise ValueError(f'{CPU_BFLOAT16_PRODUCTS_ENV}={mode!r}: use one of '
                     f'{", ".join(_CPU_BFLOAT16_PRODUCTS)} (auto: library on CPUs with '
                     f'{" or ".join(NATIVE_BFLOAT16_FEATURES)}).')
  if mode == 'auto':
    return 'library' if cpu_bfloat16_instructions() else 'float32'
  return mode


@jax.custom_vjp
def _dot_bfloat16_cpu(x: Array, kernel: Array) -> Array:
  """`x @ kernel` for bfloat16 `x` [tokens, in] and a float32 `kernel` [in, out], on XLA:CPU.

  The same numbers as `jnp.dot(x, kernel.astype(bfloat16))` (products summed in float32,
  rounded once to bfloat16; the kernel's gradient rounded to bfloat16 too), but each of the
  three products (forward, input gradient, kernel gradient) reaches XLA:CPU in the form its
  bfloat16 library takes: bfloat16 operands, a float32 result, both operands row-major
  (`_row_major`). XLA:CPU (jaxlib 0.10.2) converts the operands of any other bfloat16 product
  to float32 and multiplies at float32 speed (`scripts/bench_matmul.py` measures both).
  """
  # [tokens, in] x [in, out] -> [tokens, out]
  return jnp.dot(x, kernel.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _dot_bfloat16_forward(x, kernel):
  return _dot_bfloat16_cpu(x, kernel), (x, kernel)


def _dot_bfloat16_backward(residuals, dy):
  x, kernel = residuals  # [tokens, in] bfloat16, [in, out] float32; dy [tokens, out] bfloat16
  # [tokens, out] x [out, in] -> [tokens, in]
  dx = jnp.dot(dy, _row_major(kernel.T.astype(jnp.bfloat16)), preferred_element_type=jnp.float32)
  # [in, tokens] x [tokens, out] -> [in, out]
  dkernel = jnp.dot(_row_major(x.T), dy, preferred_element_type=jnp.float32)
  return dx.astype(jnp.bfloat16), dkernel.astype(jnp.bfloat16).astype(jnp.float32)


_dot_bfloat16_cpu.defvjp(_dot_bfloat16_forward, _dot_bfloat16_backward)


def _row_major(x: Array) -> Array:
  """The 2-D `x` (a transpose) as a new row-major array: the same values.

  A transpose is only a layout to XLA, and XLA:CPU decides before assigning layouts that a
  bfloat16 product with a transposed operand is not its library's. Padding a row and
  slicing it off again gives an array with a layout of its own, which XLA then writes
  row-major: one copy of an operand, against a product's `in` x more arithmetic. The row
  added is on the first axis, the features, which a data-parallel mesh does not split.
  """
  return jnp.pad(x, ((0, 1), (0, 0)))[:-1]


def dot(x: Array, kernel: Array, dtype) -> Array:
  """[tokens, in] x float32 [in, out] -> [tokens, out] in `dtype`, as `jnp.dot` computes it.

  bfloat16 goes through `_dot_bfloat16_cpu` on CPUs where `cpu_bfloat16_products()` says
  'library' (XLA picks the branch when it compiles for a platform); GPUs and TPUs multiply
  bfloat16 natively and keep the plain product.

  >>> x = jnp.array([[1.0, 2.0]], jnp.bfloat16)
  >>> kernel = jnp.array([[0.5, 1.0, 0.0], [0.25, 0.0, 3.0]])
  >>> dot(x, kernel, jnp.bfloat16)
  Array([[1, 1, 6]], dtype=bfloat16)
  """
  def plain(x, kernel):
    return jnp.dot(x, kernel.astype(dtype))

  x = x.astype(dtype)
  if jnp.dtype(dtype) != jnp.bfloat16 or cpu_bfloat16_products() == 'float32':
    return plain(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=_dot_bfloat16_cpu, default=plain)


class Dense(nn.Module):
  """A bias-free projection of the last axis: x @ kernel, kernel (in, out) in float32."""

  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, 'kernel', self.kernel_init, (x.shape[-1], self.features),
                    self.kernel_axes)
    # [..., in] -> [tokens, in] @ [in, out]: a plain 2-D matmul. Its gradient w.r.t. the
    # kernel then contracts one axis; XLA:CPU runs a contraction over (batch, length) several
    # times slower (3x the step time of a 32k-vocabulary model).
    # The cast first, as T5X's DenseGeneral: XLA then sees convert -> dot, and may skip a
    # bfloat16 rounding before a float32 product (logits_dense) exactly where it does for T5X.
    x = x.astype(self.dtype)
    y = dot(x.reshape(-1, x.shape[-1]), kernel, self.dtype)
    return y.reshape(x.shape[:-1] + (self.features,))


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias; statistics in float32, the
  scale applied in `dtype` (as T5X's `layers.LayerNorm`: bfloat16 rounds before the scale)."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('embed',))
    x32 = jnp.asarray(x, jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(y, self.dtype) * jnp.asarray(scale, self.dtype)


class Embed(nn.Module):
  """The token embedding, shared by encoder and decoder inputs (and by the logits when tied)."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = _param(self, 'embedding', nn.initializers.normal(stddev=1.0),
                            (self.num_embeddings, self.features), ('vocab', 'embed'))

  def __call__(self, tokens: Array) -> Array:
    # [batch, length] -> [batch, length, embed]
    return jnp.asarray(jnp.take(self.embedding, tokens, axis=0), self.dtype)

  def attend(self, y: Array) -> Array:
    # [batch, length, embed] -> [batch, length, vocab], in float32 for a stable softmax.
    flat = jnp.asarray(y, jnp.float32).reshape(-1, y.shape[-1])  # 2-D: see Dense
    logits = jnp.dot(flat, jnp.asarray(self.embedding, jnp.float32).T)
    return logits.reshape(y.shape[:-1] + (self.num_embeddings,))


def relative_position_bucket(relative_position: np.ndarray | Array, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucketing of `memory_position - query_position` (T5X `_relative_position_bucket`).

  Half the buckets hold exact small distances, the rest grow logarithmically up to
  `max_distance`; a bidirectional stack spends half its buckets on each direction.

  >>> np.asarray(relative_position_bucket(np.array([-3, 0, 2, 200]), True)).tolist()
  [3, 0, 18, 31]
  >>> np.asarray(relative_position_bucket(np.array([-3, 0, 2, -200]), False)).tolist()
  [3, 0, 0, 31]
  """
  ret = 0
  n = -jnp.asarray(relative_position)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps) /
      np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


def toeplitz(diagonals: Array, query_length: int, key_length: int) -> Array:
  """[..., q + k - 1] -> [..., q, k]: out[..., i, j] = diagonals[..., j - i + q - 1], i.e.
  entry `d + q - 1` of `diagonals` fills the diagonal of key - query distance d.

  >>> toeplitz(jnp.array([1, 2, 3, 4]), 2, 3)  # distances -1, 0, 1, 2
  Array([[2, 3, 4],
         [1, 2, 3]], dtype=int32)

  Built by a skew, not a gather: append one zero to `diagonals` (a period of q + k entries),
  repeat it q times and read that in rows of q + k - 1 from offset q - 1. Each row starts one
  entry earlier in the period than the row before, so row i starts at distance -i. Above:
  [1, 2, 3, 4, 0 | 1, 2, 3, 4, 0] read from offset 1 in rows of 4 is [2, 3, 4, 0],
  [1, 2, 3, 4], whose first 3 columns are the result. Only pads, copies and reshapes, so the
  gradient is a sum of q contiguous rows per head.
  """
  q, k = query_length, key_length
  width = q + k - 1
  lead = diagonals.shape[:-1]
  period = jnp.pad(diagonals, [(0, 0)] * len(lead) + [(0, 1)])          # [..., q + k]
  flat = jnp.tile(period, (1,) * len(lead) + (q,))[..., q - 1:q - 1 + q * width]
  return flat.reshape(lead + (q, width))[..., :k]                        # [..., q, k]


class RelativePositionBiases(nn.Module):
  """One learned scalar per (head, distance bucket), added to every layer's attention logits."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int, bidirectional: bool) -> Array:
    rel_embedding = _param(self, 'rel_embedding',
                           nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                           (self.num_heads, self.num_buckets), ('heads', 'relpos_buckets'))
    # The bias depends on key - query position only: one value per diagonal. Gathering
    # the [q, k] matrix from the table instead would make its gradient a scatter of
    # q * k rows, which XLA:CPU feeds through a transposing copy (1.1 s of T5 1.1 small's
    # 18 s train step at 512 tokens); `toeplitz`'s gradient sums contiguous rows.
    distances = np.arange(-(query_length - 1), key_length, dtype=np.int32)
    buckets = relative_position_bucket(distances, bidirectional, self.num_buckets,
                                       self.max_distance)
    # [heads, buckets] -> [heads, q + k - 1] -> [1, heads, q, k]; float32 until the end, so
    # that the gradient's sums over positions are float32 sums.
    diagonals = jnp.take(jnp.asarray(rel_embedding, jnp.float32), buckets, axis=1)
    return jnp.asarray(toeplitz(diagonals, query_length, key_length), self.dtype)[None]


def _mask_to_bias(mask: Array | None, bias: Array | None, dtype) -> Array | None:
  """Boolean/0-1 mask [batch, 1, q, k] plus additive bias -> one additive bias."""
  if mask is not None:
    mask_bias = jnp.where(mask > 0, 0.0, -1e10).astype(dtype)
    bias = mask_bias if bias is None else bias.astype(dtype) + mask_bias
  return bias


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention without the 1/sqrt(head_dim) logit scaling, with a decoding cache.

  In decode mode the first call (from `model.init`, or `init_decoding_cache`) sizes the cache
  from the full-length inputs; later calls take one token per sequence, write its key and value
  at the row's `cache_index` and attend to positions `<= cache_index`. A call with
  `prefill_lengths` [batch] instead fills the cache with a whole prompt in one pass (a
  decoder-only model's inputs) and sets each row's `cache_index` to its value.

  `cross` (encoder-decoder attention) in decode mode: the keys and values of `inputs_kv` (the
  encoded inputs, the same at every step) are read from the cache's `cross_key` and
  `cross_value` [batch, heads, length, kv], the layout the step's products read, when it has
  them; a step without them computes them and adds them to the cache
  (`with_cross_attention_cache` does that once before a decoding loop). XLA hoists the
  projections out of a loop, but not the transposes that feed the batched products, which
  would copy both arrays at every step.
  """

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = True
  deterministic: bool = True
  decode: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None,
               bias: Array | None = None, prefill_lengths: Array | None = None) -> Array:
    kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    # NOTE: T5 does not divide the logits by sqrt(head_dim); the factor is folded into the
    # query initialiser instead, so a trained T5 checkpoint and this code agree.
    depth_scaling = np.sqrt(self.head_dim).astype(np.float32)
    query_init = lambda *args: kernel_init(*args) / depth_scaling
    joined = self.num_heads * self.head_dim
    projection = functools.partial(Dense, joined, ('embed', 'joined_kv'), dtype=self.dtype)
    batch, q_length = inputs_q.shape[:2]
    # [batch, length, embed] -> [batch, length, heads, kv]
    query = checkpoint_name(projection(kernel_init=query_init, name='query')(inputs_q),
                            'query_proj')
    key = checkpoint_name(projection(kernel_init=kernel_init, name='key')(inputs_kv),
                          'key_proj')
    value = checkpoint_name(projection(kernel_init=kernel_init, name='value')(inputs_kv),
                            'value_proj')
    query = query.reshape(batch, q_length, self.num_heads, self.head_dim)
    key = key.reshape(batch, inputs_kv.shape[1], self.num_heads, self.head_dim)
    value = value.reshape(batch, inputs_kv.shape[1], self.num_heads, self.head_dim)
    axes = ('batch', 'length', 'heads', 'kv')
    query, key, value = (_constrain(t, axes) for t in (query, key, value))

    heads_major = False  # key and value as [batch, heads, length, kv]
    if self.decode and self.cross and not self.is_initializing():
      if self.has_variable('cache', 'cross_key'):
        key, value = self.get_variable('cache', 'cross_key'), self.get_variable(
            'cache', 'cross_value')
      else:
        key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
        self.put_variable('cache', 'cross_key', key)
        self.put_variable('cache', 'cross_value', value)
      heads_major = True
    elif self.decode:
      is_initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
      # One write position per row: prompts of a decoder-only model differ in length.
      cache_index = self.variable('cache', 'cache_index', jnp.zeros, (batch,), jnp.int32)
      if is_initialized and prefill_lengths is not None:
        # Prefill: the prompt's keys and values fill positions [0, q_length) in one pass,
        # attending with the caller's mask; row b's next step writes at prefill_lengths[b].
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key.astype(cached_key.value.dtype), (0, 0, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), (0, 0, 0, 0))
        cache_index.value = prefill_lengths.astype(jnp.int32)
        if bias is not None:  # [1, heads, max_length, max_length] -> the prompt's block
          bias = bias[:, :, :q_length, :q_length]
      elif is_initialized:
        max_length = cached_key.value.shape[1]
        if q_length != 1:
          raise ValueError(f'Cached decoding takes one token per step, got {q_length}.')
        index = cache_index.value  # [batch]
        # Row b's new key and value go to position index[b]: a select over the cache, which
        # XLA fuses, rather than a scatter per row.
        at = (jnp.arange(max_length)[None, :] == index[:, None])[:, :, None, None]
        key = jnp.where(at, key.astype(cached_key.value.dtype), cached_key.value)
        value = jnp.where(at, value.astype(cached_value.value.dtype), cached_value.value)
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + 1
        # Each row's query sees every cached position up to and including its own.
        step_mask = (jnp.arange(max_length)[None, :] <= index[:, None])[:, None, None, :]
        mask = step_mask if mask is None else jnp.logical_and(mask, step_mask)
        if bias is not None:  # [1, heads, max_length, max_length] -> [batch, heads, 1, max]
          bias = jnp.swapaxes(jnp.take(bias[0], index, axis=1), 0, 1)[:, :, None, :]

    logits_dtype = jnp.float32 if self.float32_logits else self.dtype
    # [batch, q, heads, kv] x [batch, k, heads, kv] -> [batch, heads, q, k]
    logits = jnp.einsum('bqhd,bhkd->bhqk' if heads_major else 'bqhd,bkhd->bhqk',
                        query.astype(logits_dtype), key.astype(logits_dtype))
    attention_bias = _mask_to_bias(mask, bias, logits_dtype)
    if attention_bias is not None:
      logits = logits + attention_bias
    weights = jax.nn.softmax(logits).astype(self.dtype)
    if not self.deterministic and self.dropout_rate > 0.0:
      weights = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(weights, deterministic=False)
    # [batch, heads, q, k] x [batch, k, heads, kv] -> [batch, q, heads * kv]
    out = jnp.einsum('bhqk,bhkd->bqhd' if heads_major else 'bhqk,bkhd->bqhd', weights,
                     value.astype(self.dtype))
    out = out.reshape(batch, q_length, joined)
    return Dense(inputs_q.shape[-1], ('joined_kv', 'embed'), kernel_init=kernel_init,
                 dtype=self.dtype, name='out')(out)


class MlpBlock(nn.Module):
  """Gated MLP: prod_i act_i(x @ wi_i), dropout, then @ wo."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gated = len(cfg.mlp_activations) > 1
    hidden = None
    for i, name in enumerate(cfg.mlp_activations):
      # [batch, length, embed] -> [batch, length, mlp]
      h = checkpoint_name(Dense(cfg.mlp_dim, ('embed', 'mlp'), dtype=cfg.activation_dtype,
                                name=f'wi_{i}' if gated else 'wi')(x), 'mlp_wi')
      h = _ACTIVATIONS[name](h)
      hidden = h if hidden is None else hidden * h
    hidden = _constrain(hidden, ('batch', 'length', 'mlp'))
    hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(hidden, self.deterministic)
    # [batch, length, mlp] -> [batch, length, embed]
    return Dense(x.shape[-1], ('mlp', 'embed'), dtype=cfg.activation_dtype, name='wo')(hidden)


def _attention(cfg: Config, deterministic: bool, **kwargs) -> MultiHeadDotProductAttention:
  return MultiHeadDotProductAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.activation_dtype,
      dropout_rate=cfg.dropout_rate, float32_logits=cfg.float32_attention_logits,
      deterministic=deterministic, **kwargs)


def _dropout(cfg: Config, deterministic: bool) -> nn.Dropout:
  # Broadcast over the length axis, as T5X does: one mask per sequence and channel.
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,), deterministic=deterministic)


def _mlp_sublayer(cfg: Config, deterministic: bool, x: Array) -> Array:
  """The last sublayer of every layer: pre-norm gated MLP with a residual connection.

  Called from a layer's compact `__call__`, so its modules are that layer's children.
  """
  y = RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name='pre_mlp_layer_norm')(x)
  y = MlpBlock(cfg, deterministic, name='mlp')(y)
  x = x + _dropout(cfg, deterministic)(y)
  return _constrain(x, ('batch', 'length', 'embed'))


class EncoderLayer(nn.Module):
  config: Config
  deterministic: bool = True
  scanned: bool = False  # under nn.scan the layer returns (carry, None)

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, cfg.activation_dtype)
    # [batch, length, embed]
    y = norm(name='pre_attention_layer_norm')(x)
    y = _attention(cfg, self.deterministic, name='attention')(y, y, mask=mask, bias=bias)
    x = x + _dropout(cfg, self.deterministic)(y)
    x = _mlp_sublayer(cfg, self.deterministic, x)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """A decoder layer; without `encoded` (a decoder-only model) it has no cross-attention."""

  config: Config
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Array | None, self_mask: Array | None,
               cross_mask: Array | None, bias: Array, prefill_lengths: Array | None = None):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, cfg.activation_dtype)
    # [batch, length, embed]
    y = norm(name='pre_self_attention_layer_norm')(x)
    y = _attention(cfg, self.deterministic, decode=self.decode, name='self_attention')(
        y, y, mask=self_mask, bias=bias, prefill_lengths=prefill_lengths)
    x = x + _dropout(cfg, self.deterministic)(y)
    if encoded is not None:
      y = norm(name='pre_cross_attention_layer_norm')(x)
      y = _attention(cfg, self.deterministic, decode=self.decode, cross=True,
                     name='encoder_decoder_attention')(y, encoded, mask=cross_mask)
      x = x + _dropout(cfg, self.deterministic)(y)
    x = _mlp_sublayer(cfg, self.deterministic, x)
    return (x, None) if self.scanned else x


def _layer_stack(cfg: Config, layer_cls: type[nn.Module], num_layers: int, num_args: int,
                 **kwargs) -> Callable[..., Array]:
  """Applies `num_layers` layers, named `layers_{i}` or scanned as one `layers` entry."""
  if cfg.remat_policy != 'none':
    layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(
        layer_cls,
        variable_axes={'params': 0, 'cache': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(nn.broadcast,) * num_args,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )(cfg, scanned=True, name='layers', **kwargs)
    return lambda x, *args: scanned(x, *args)[0]

  layers = [layer_cls(cfg, name=f'layers_{i}', **kwargs) for i in range(num_layers)]

  def apply(x, *args):
    for layer in layers:
      x = layer(x, *args)
    return x
  return apply


class Encoder(nn.Module):
  config: Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               deterministic: bool = True) -> Array:
    cfg = self.config
    length = encoder_input_tokens.shape[1]
    mask = nn.make_attention_mask(encoder_input_tokens > 0, encoder_input_tokens > 0)
    if encoder_segment_ids is not None:  # packed rows: never attend across examples
      mask = nn.combine_masks(mask, nn.make_attention_mask(
          encoder_segment_ids, encoder_segment_ids, jnp.equal))
    # [1, heads, length, length], shared by every layer.
    bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.num_heads,
                                  cfg.activation_dtype, name='relpos_bias')(length, length, True)
    # [batch, length] -> [batch, length, embed]
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
    x = _constrain(_dropout(cfg, deterministic)(x), ('batch', 'length', 'embed'))
    x = _layer_stack(cfg, EncoderLayer, cfg.num_encoder_layers, 2,
                     deterministic=deterministic)(x, mask, bias)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name='encoder_norm')(x)
    return _dropout(cfg, deterministic)(x)


class Decoder(nn.Module):
  config: Config
  shared_embedding: Embed

  @nn.compact
  def __call__(self, encoded: Array, decoder_input_tokens: Array, self_mask: Array | None,
               cross_mask: Array, deterministic: bool = True, decode: bool = False,
               max_decode_length: int | None = None) -> Array:
    cfg = self.config
    length = decoder_input_tokens.shape[1]
    if decode and max_decode_length is not None:
      # Step mode: the attention picks this step's row out of the full causal table.
      length = max_decode_length
    bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.num_heads,
                                  cfg.activation_dtype, name='relpos_bias')(length, length, False)
    # [batch, length] -> [batch, length, embed]
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    y = _constrain(_dropout(cfg, deterministic)(y), ('batch', 'length', 'embed'))
    y = _layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, 4, deterministic=deterministic,
                     decode=decode)(y, encoded, self_mask, cross_mask, bias)
    return _output_logits(cfg, deterministic, self.shared_embedding, y)


def _output_logits(cfg: Config, deterministic: bool, embedder: Embed, y: Array) -> Array:
  """Final norm, dropout and logits of a decoder stack (called from its compact `__call__`).

  [batch, length, embed] -> [batch, length, vocab], float32.
  """
  y = RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name='decoder_norm')(y)
  y = _dropout(cfg, deterministic)(y)
  if cfg.logits_via_embedding:
    # Tied logits are rescaled: the embedding was initialised with stddev 1, not 1/sqrt(E).
    logits = embedder.attend(y) / np.sqrt(y.shape[-1])
  else:
    logits = Dense(cfg.vocab_size, ('embed', 'vocab'), dtype=jnp.float32,
                   name='logits_dense')(y)
  return _constrain(logits, ('batch', 'length', 'vocab'))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class Transformer(nn.Module):
  """The encoder-decoder. `__call__` takes a seqio `EncDecFeatureConverter` batch's features.

  >>> model = Transformer(Config(vocab_size=128, emb_dim=16, num_heads=2, head_dim=8,
  ...                            mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1))
  >>> tokens = jnp.array([[5, 6, 7, 1]])
  >>> variables = model.init(jax.random.key(0), tokens, tokens, tokens)
  >>> model.apply(variables, tokens, tokens, tokens).shape
  (1, 4, 128)
  """

  config: Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             enable_dropout: bool = False) -> Array:
    """[batch, inputs_length] tokens -> [batch, inputs_length, embed] encodings."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids,
                        deterministic=not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array | None = None,
             encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None,
             enable_dropout: bool = False, decode: bool = False,
             max_decode_length: int | None = None) -> Array:
    """Decoder logits [batch, length, vocab] given encodings.

    `decode=True` runs one step against the key/value cache (`mutable=['cache']`), with
    `decoder_input_tokens` of shape [batch, 1] and `max_decode_length` the cache's length.
    """
    if decode:
      # The cache supplies causality; every cached position is a real token.
      self_mask = None
      cross_mask = nn.make_attention_mask(jnp.ones_like(decoder_input_tokens),
                                          encoder_input_tokens > 0)
    else:
      if decoder_target_tokens is None:
        decoder_target_tokens = jnp.ones_like(decoder_input_tokens)
      self_mask = nn.combine_masks(
          nn.make_causal_mask(decoder_target_tokens),
          nn.make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0))
      cross_mask = nn.make_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0)
      if decoder_segment_ids is not None:
        self_mask = nn.combine_masks(self_mask, nn.make_attention_mask(
            decoder_segment_ids, decoder_segment_ids, jnp.equal))
        cross_mask = nn.combine_masks(cross_mask, nn.make_attention_mask(
            decoder_segment_ids, encoder_segment_ids, jnp.equal))
    return self.decoder(encoded, decoder_input_tokens, self_mask, cross_mask,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None,
               decoder_positions: Array | None = None,
               enable_dropout: bool = False, decode: bool = False) -> Array:
    """Teacher-forced logits [batch, targets_length, vocab] (float32).

    `*_positions` are accepted so a seqio batch can be passed whole (`**batch`), and ignored:
    relative attention depends only on distances inside a segment.
    """
    del encoder_positions, decoder_positions
    if (encoder_segment_ids is None) != (decoder_segment_ids is None):
      raise ValueError('Packed batches need both encoder_segment_ids and decoder_segment_ids '
                       '(seqio.EncDecFeatureConverter(pack=True) produces both).')
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       enable_dropout, decode)


# ----------------------------------------------------------------------------------------------
# The decoder-only model
# ----------------------------------------------------------------------------------------------

def decoder_only_mask(decoder_target_tokens: Array, decoder_causal_attention: Array | None = None,
                      decoder_segment_ids: Array | None = None) -> Array:
  """Self-attention mask [batch, 1, length, length] of a decoder-only model (T5X's
  `make_decoder_mask`): causal, except that positions marked in `decoder_causal_attention`
  (the inputs of a prefix LM) see each other both ways; never padding (target 0) or another
  packed segment.

  seqio's `PrefixLMFeatureConverter` marks the inputs and one position more (the one that
  reads the last input token and predicts the first target):

  >>> targets = jnp.array([[6, 7, 8, 3, 4, 5, 0]])
  >>> mask = decoder_only_mask(targets, jnp.array([[1, 1, 0, 1, 1, 0, 0]]),
  ...                          jnp.array([[1, 1, 1, 2, 2, 2, 0]]))
  >>> np.asarray(mask[0, 0]).astype(int).tolist()
  [[1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]]
  """
  mask = nn.make_causal_mask(decoder_target_tokens)
  if decoder_causal_attention is not None:
    prefix = nn.make_attention_mask(decoder_causal_attention, decoder_causal_attention,
                                    jnp.logical_and)
    mask = jnp.logical_or(mask, prefix).astype(jnp.float32)
  mask = nn.combine_masks(mask, nn.make_attention_mask(decoder_target_tokens > 0,
                                                       decoder_target_tokens > 0))
  if decoder_segment_ids is not None:
    mask = nn.combine_masks(mask, nn.make_attention_mask(decoder_segment_ids,
                                                         decoder_segment_ids, jnp.equal))
  return mask


class DecoderOnlyStack(nn.Module):
  """T5X's decoder-only `Decoder`: embedding, one causal relative-position table shared by the
  layers, decoder layers without cross-attention, final norm and logits."""

  config: Config

  @nn.compact
  def __call__(self, decoder_input_tokens: Array, mask: Array | None,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: int | None = None,
               prefill_lengths: Array | None = None) -> Array:
    cfg = self.config
    length = decoder_input_tokens.shape[1]
    if decode and max_decode_length is not None:  # the cache's length
      length = max_decode_length
    embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.activation_dtype, name='token_embedder')
    # Causal buckets also inside a prefix-LM's bidirectional inputs, as T5X has it.
    bias = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.num_heads,
                                  cfg.activation_dtype, name='relpos_bias')(length, length, False)
    # [batch, length] -> [batch, length, embed]
    y = embedder(decoder_input_tokens.astype(jnp.int32))
    y = _constrain(_dropout(cfg, deterministic)(y), ('batch', 'length', 'embed'))
    y = _layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, 5, deterministic=deterministic,
                     decode=decode)(y, None, mask, None, bias, prefill_lengths)
    return _output_logits(cfg, deterministic, embedder, y)


class DecoderOnly(nn.Module):
  """The decoder-only model (T5X's `decoder_only` example, everything under `decoder/`).

  `__call__` takes the features of seqio's `DecoderFeatureConverter`: a causal LM over text
  (`LMFeatureConverter`), or a prefix LM over inputs + targets (`PrefixLMFeatureConverter`,
  whose `decoder_causal_attention` makes attention over the inputs bidirectional).

  >>> model = DecoderOnly(Config(vocab_size=128, emb_dim=16, num_heads=2, head_dim=8,
  ...                            mlp_dim=32, num_decoder_layers=1, architecture='decoder_only'))
  >>> targets = jnp.array([[5, 6, 7, 1]])
  >>> inputs = jnp.array([[0, 5, 6, 7]])  # targets shifted right after the start token 0
  >>> variables = model.init(jax.random.key(0), inputs, targets)
  >>> model.apply(variables, inputs, targets).shape
  (1, 4, 128)
  """

  config: Config

  def setup(self):
    self.decoder = DecoderOnlyStack(self.config)

  def __call__(self, decoder_input_tokens: Array, decoder_target_tokens: Array,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_causal_attention: Array | None = None,
               enable_dropout: bool = False, decode: bool = False,
               max_decode_length: int | None = None,
               prefill_lengths: Array | None = None) -> Array:
    """Logits [batch, length, vocab] (float32).

    Three modes. Teacher forcing (`decode=False`): every position at once.
    Prefill (`decode=True` with `prefill_lengths` [batch], `mutable=['cache']`): a prompt
    [batch, P] fills the key/value cache in one pass with the same mask as teacher forcing
    (`decoder_target_tokens` > 0 marks the prompt's real positions); row b's next step writes
    at position `prefill_lengths[b]`. Step (`decode=True`): one token per row, against the
    cache. `max_decode_length` is the cache's length in both decode modes.
    """
    del decoder_positions  # relative attention sees distances only
    if not self.config.prefix_lm:
      decoder_causal_attention = None
    mask = None
    if not decode or prefill_lengths is not None:
      mask = decoder_only_mask(decoder_target_tokens, decoder_causal_attention,
                               decoder_segment_ids)
    return self.decoder(decoder_input_tokens, mask, deterministic=not enable_dropout,
                        decode=decode, max_decode_length=max_decode_length,
                        prefill_lengths=prefill_lengths)


ARCHITECTURES = {'encoder_decoder': Transformer, 'decoder_only': DecoderOnly}
Model = Transformer | DecoderOnly  # what `build` returns


def build(config: Config) -> Model:
  """The flax module of `config.architecture`.

  >>> type(build(Config(architecture='decoder_only'))).__name__
  'DecoderOnly'
  """
  return ARCHITECTURES[config.architecture](config)


MODEL_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens', 'decoder_target_tokens',
                  'encoder_segment_ids', 'decoder_segment_ids', 'encoder_positions',
                  'decoder_positions', 'decoder_causal_attention')


def model_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The features of a seqio batch the network takes (drops `decoder_loss_weights`)."""
  return {k: v for k, v in batch.items() if k in MODEL_FEATURES}


# ----------------------------------------------------------------------------------------------
# Decoding cache and scoring
# ----------------------------------------------------------------------------------------------

def init_decoding_cache(model: Model, batch_size: int, inputs_length: int,
                        max_decode_length: int) -> Any:
  """A zero key/value cache for `max_decode_length` decoding steps, without running the model.

  A decoder-only model's cache holds its prompt too: `max_decode_length` is then the prompt's
  length plus the steps, and `inputs_length` is unused.

  Pass it as `{'params': params, 'cache': cache}` to `model.apply(..., method='decode',
  decode=True, max_decode_length=max_decode_length, mutable=['cache'])`, one token per step,
  starting with the decoder start token 0.
  """
  def init(rng):
    decoder_tokens = jnp.ones((batch_size, max_decode_length), jnp.int32)
    if isinstance(model, DecoderOnly):
      return model.init(rng, decoder_tokens, decoder_tokens, decode=True)
    encoder_tokens = jnp.ones((batch_size, inputs_length), jnp.int32)
    return model.init(rng, encoder_tokens, decoder_tokens, decoder_tokens, decode=True)
  shapes = jax.eval_shape(init, jax.random.key(0))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


CROSS_ATTENTION_CACHE = ('cross_key', 'cross_value')  # names in a decoding cache


def with_cross_attention_cache(model: Transformer, params: Any, cache: Any, encoded: Array,
                               encoder_input_tokens: Array, max_decode_length: int) -> Any:
  """`cache` (`init_decoding_cache`) with each decoder layer's cross-attention keys and
  values of `encoded` [batch, inputs, embed] added, so that the steps of a decoding loop read
  them (`MultiHeadDotProductAttention`, `cross`). One step is run for them; its
  self-attention writes are dropped, so the cache is otherwise as given."""
  _, mutated = model.apply(
      {'params': params, 'cache': cache}, encoded, encoder_input_tokens,
      jnp.zeros((encoded.shape[0], 1), jnp.int32), decode=True,
      max_decode_length=max_decode_length, method='decode', mutable=['cache'])
  added = {path: value for path, value in flax.traverse_util.flatten_dict(
      mutated['cache']).items() if path[-1] in CROSS_ATTENTION_CACHE}
  return flax.traverse_util.unflatten_dict(
      {**flax.traverse_util.flatten_dict(cache), **added})


def token_log_likelihoods(logits: Array, targets: Array) -> Array:
  """log p(target_t | ...) per position: [batch, length, vocab], [batch, length] -> [b, l]."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_log_likelihood(logits: Array, targets: Array, weights: Array | None = None) -> Array:
  """Summed natural-log likelihood of each row's targets, padding (target 0) excluded.

  >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  >>> round(float(sequence_log_likelihood(logits, jnp.array([[2, 1]]))[0]), 4)  # ln .25 + ln .8
  -1.6094
  """
  if weights is None:
    weights = targets > 0
  return jnp.sum(token_log_likelihoods(logits, targets) * weights, axis=-1)


# ----------------------------------------------------------------------------------------------
# Scanned <-> per-layer parameter trees
# ----------------------------------------------------------------------------------------------

_STACKS = {'encoder': 'num_encoder_layers', 'decoder': 'num_decoder_layers'}


def _is_placeholder(x) -> bool:
  """An unused Adafactor statistic: zeros of shape (1,) (T5X's placeholder), one for the whole
  stack as for each layer."""
  return tuple(x.shape) == (1,)


def _layer_slice(x, i: int, placeholders: bool = False):
  if placeholders and _is_placeholder(x):
    return x
  if isinstance(x, jax.ShapeDtypeStruct):  # shapes from jax.eval_shape
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def _stack(*xs, placeholders: bool = False):
  if placeholders and _is_placeholder(xs[0]):
    return xs[0]
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
  return jnp.stack(xs)


def unstack_layers(params: Mapping[str, Any], config: Config, placeholders: bool = False
                   ) -> dict[str, Any]:
  """Scanned tree (`encoder/layers/...` with a leading layer axis) -> `layers_{i}` names.

  A tree that is already per-layer is returned unchanged, so checkpoint code can always call it.
  `placeholders=True` for a tree of Adafactor statistics: a (1,) leaf is an unused statistic
  (T5X's placeholder) and each layer gets it unchanged; e.g. with 2 layers, `v_row` of a
  stacked kernel (2, 32) -> (32,) per layer, of a stacked norm scale (1,) -> (1,) per layer.
  """
  params = dict(params)
  for stack, count in _STACKS.items():
    sub = dict(params.get(stack, {}))
    if 'layers' not in sub:
      continue
    stacked = sub.pop('layers')
    for i in range(getattr(config, count)):
      sub[f'layers_{i}'] = jax.tree.map(lambda a, i=i: _layer_slice(a, i, placeholders),
                                        stacked)
    params[stack] = sub
  return params


def stack_layers(params: Mapping[str, Any], config: Config, placeholders: bool = False
                 ) -> dict[str, Any]:
  """Per-layer tree (`layers_{i}`) -> scanned tree; the inverse of `unstack_layers`."""
  params = dict(params)
  for stack, count in _STACKS.items():
    sub = dict(params.get(stack, {}))
    names = [k for k in sub if re.fullmatch(r'layers_\d+', k)]
    if not names:
      continue
    expected = getattr(config, count)
    if len(names) != expected:
      raise ValueError(f'{stack} has {len(names)} layers in the parameter tree but '
                       f'network.Config.{count} is {expected}.')
    layers = [sub.pop(f'layers_{i}') for i in range(expected)]
    sub['layers'] = jax.tree.map(lambda *xs: _stack(*xs, placeholders=placeholders), *layers)
    params[stack] = sub
  return params


def count_parameters(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_params(config: Config, rng: Array, *, boxed: bool = False) -> Any:
  """Freshly initialised parameters (the tree in the module docstring).

  Shapes depend on the config only, so a 1x1 dummy batch initialises any model. `boxed=True`
  keeps the `nn.LogicallyPartitioned` boxes that carry each parameter's logical axes (for
  shardings); otherwise plain arrays. Jit- and `jax.eval_shape`-compatible.

  >>> cfg = Config(vocab_size=8, emb_dim=4, num_heads=1, head_dim=4, mlp_dim=8,
  ...              num_encoder_layers=1, num_decoder_layers=1)
  >>> init_params(cfg, jax.random.key(0))['decoder']['logits_dense']['kernel'].shape
  (4, 8)
  """
  tokens = jnp.ones((1, 1), jnp.int32)
  model = build(config)
  args = (tokens,) * (3 if isinstance(model, Transformer) else 2)
  params = model.init(rng, *args)['params']
  return params if boxed else nn.meta.unbox(params)


def param_shapes(config: Config) -> Any:
  """The parameter tree as `ShapeDtypeStruct`s, by `jax.eval_shape`: nothing is allocated."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def flatten_params(params: Any) -> dict[str, Any]:
  """{'encoder/layers_0/mlp/wo/kernel': array, ...}: T5X's parameter names, '/'-joined."""
  return {'/'.join(path): value
          for path, value in flax.traverse_util.flatten_dict(dict(params)).items()}
