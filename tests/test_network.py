"""The encoder-decoder: T5X's parameter tree, masking, caching, precision and sharding."""

import dataclasses
import doctest
import glob
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin_cli
from ul2 import flops, network, partitioning

TINY = network.Config(vocab_size=512, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                      num_encoder_layers=2, num_decoder_layers=2)
MODEL_GIN_FILES = sorted(glob.glob(os.path.join(gin_cli.GIN_DIR, 'models', '*.gin')))


def init_params(cfg, seed=0):
  return network.init_params(cfg, jax.random.key(seed))


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep='/')


def random_tokens(rng, shape, vocab, lo=2):
  return jnp.asarray(np.random.default_rng(rng).integers(lo, vocab, size=shape), jnp.int32)


def shift_right(targets):
  """Teacher forcing: the decoder sees [0, t_0, ..., t_{n-2}] (0 is the start token)."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def closed_form_count(cfg: network.Config) -> int:
  """Parameter count from the architecture table, independent of the module code."""
  e, f, v = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size
  joined = cfg.num_heads * cfg.head_dim
  attention = 4 * e * joined  # q, k, v, out
  mlp = len(cfg.mlp_activations) * e * f + f * e
  encoder_layer = 2 * e + attention + mlp  # 2 norms
  decoder_layer = 3 * e + 2 * attention + mlp  # 3 norms, self + cross attention
  relpos = cfg.num_heads * cfg.relative_attention_num_buckets
  logits = 0 if cfg.logits_via_embedding else e * v
  if cfg.architecture == 'decoder_only':  # one stack of encoder-shaped layers (no cross)
    return v * e + relpos + cfg.num_decoder_layers * encoder_layer + e + logits
  return (v * e
          + relpos + cfg.num_encoder_layers * encoder_layer + e
          + relpos + cfg.num_decoder_layers * decoder_layer + e
          + (0 if cfg.logits_via_embedding else e * v))


def model_config(path):
  gin_cli.parse([path])
  return gin_cli.macro('MODEL_CONFIG')


# ---------------------------------------------------------------------------------------------
# Parameter tree
# ---------------------------------------------------------------------------------------------

def test_every_model_gin_file_is_tested():
  names = {os.path.basename(p)[:-4] for p in MODEL_GIN_FILES}
  assert {'tiny', 'small', 'base', 'large', 'xl', 'xxl', 'ul2_20b'} <= names


@pytest.mark.parametrize('path', MODEL_GIN_FILES, ids=os.path.basename)
def test_parameter_count_of_gin_models_matches_closed_form(path):
  cfg = model_config(path)
  assert isinstance(cfg, network.Config)
  shapes = network.param_shapes(cfg)  # jax.eval_shape: nothing allocated, even for 20B
  shapes = network.unstack_layers(shapes, cfg)
  assert network.count_parameters(shapes) == closed_form_count(cfg)


@pytest.mark.parametrize('name, expected, rel', [
    ('small', 77e6, 0.01), ('base', 248e6, 0.01), ('large', 783e6, 0.01),
    ('xl', 2.85e9, 0.01), ('xxl', 11.1e9, 0.01), ('ul2_20b', 19.5e9, 0.01)])
def test_published_sizes(name, expected, rel):
  cfg = model_config(os.path.join(gin_cli.GIN_DIR, 'models', f'{name}.gin'))
  count = network.count_parameters(network.param_shapes(cfg))
  assert abs(count - expected) / expected < rel, count


def test_ul2_20b_is_gated_silu_with_tied_logits():
  cfg = model_config('models/ul2_20b.gin')
  assert cfg.mlp_activations == ('silu', 'linear')
  assert cfg.logits_via_embedding and cfg.num_heads * cfg.head_dim == 4096
  assert 'logits_dense' not in network.unstack_layers(network.param_shapes(cfg), cfg)['decoder']


def t5x_table(cfg):
  """The reference §2 table of T5X names -> (shape, logical axes), written out by hand."""
  e, f, v, h = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size, cfg.num_heads
  hd = cfg.num_heads * cfg.head_dim
  table = {'token_embedder/embedding': ((v, e), ('vocab', 'embed'))}

  def attention(prefix):
    for proj in ('query', 'key', 'value'):
      table[f'{prefix}/{proj}/kernel'] = ((e, hd), ('embed', 'joined_kv'))
    table[f'{prefix}/out/kernel'] = ((hd, e), ('joined_kv', 'embed'))

  def mlp(prefix):
    table[f'{prefix}/wi_0/kernel'] = ((e, f), ('embed', 'mlp'))
    table[f'{prefix}/wi_1/kernel'] = ((e, f), ('embed', 'mlp'))
    table[f'{prefix}/wo/kernel'] = ((f, e), ('mlp', 'embed'))

  norm = ((e,), ('embed',))
  for stack in ('encoder', 'decoder'):
    table[f'{stack}/relpos_bias/rel_embedding'] = ((h, 32), ('heads', 'relpos_buckets'))
  for i in range(cfg.num_encoder_layers):
    p = f'encoder/layers_{i}'
    table[f'{p}/pre_attention_layer_norm/scale'] = norm
    attention(f'{p}/attention')
    table[f'{p}/pre_mlp_layer_norm/scale'] = norm
    mlp(f'{p}/mlp')
  table['encoder/encoder_norm/scale'] = norm
  for i in range(cfg.num_decoder_layers):
    p = f'decoder/layers_{i}'
    table[f'{p}/pre_self_attention_layer_norm/scale'] = norm
    attention(f'{p}/self_attention')
    table[f'{p}/pre_cross_attention_layer_norm/scale'] = norm
    attention(f'{p}/encoder_decoder_attention')
    table[f'{p}/pre_mlp_layer_norm/scale'] = norm
    mlp(f'{p}/mlp')
  table['decoder/decoder_norm/scale'] = norm
  table['decoder/logits_dense/kernel'] = ((e, v), ('embed', 'vocab'))
  return table


def test_parameter_paths_shapes_and_axes_equal_t5x_table():
  cfg = model_config('models/tiny.gin')
  boxed = jax.eval_shape(lambda r: network.init_params(cfg, r, boxed=True), jax.random.key(0))
  got = {k: (tuple(box.value.shape), tuple(box.names)) for k, box in flat(
      boxed if not isinstance(boxed, flax.core.FrozenDict) else boxed.unfreeze()).items()}
  assert got == t5x_table(cfg)
  assert all(box.value.dtype == jnp.float32 for box in flat(boxed).values())


def test_bfloat16_activations_keep_float32_parameters():
  params = init_params(dataclasses.replace(TINY, dtype='bfloat16'))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}


def test_scanned_layers_map_one_to_one_onto_per_layer_names():
  scanned_cfg = dataclasses.replace(TINY, scan_layers=True)
  scanned = init_params(scanned_cfg)
  assert 'layers' in scanned['encoder'] and 'layers_0' not in scanned['encoder']
  per_layer = network.unstack_layers(scanned, scanned_cfg)
  assert {k: v.shape for k, v in flat(per_layer).items()} == {
      k: shape for k, (shape, _) in t5x_table(TINY).items()}
  restacked = network.stack_layers(per_layer, scanned_cfg)
  for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(scanned)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(restacked) == jax.tree.structure(scanned)


def test_scan_and_remat_give_the_same_logits_and_gradients():
  params = init_params(TINY)
  enc, dec = random_tokens(0, (2, 8), TINY.vocab_size), random_tokens(1, (2, 6), TINY.vocab_size)

  def loss(cfg, p):
    logits = network.Transformer(cfg).apply({'params': p}, enc, shift_right(dec), dec)
    return -jnp.mean(network.token_log_likelihoods(logits, dec)), logits

  (ref_loss, ref_logits), ref_grads = jax.value_and_grad(
      lambda p: loss(TINY, p), has_aux=True)(params)
  for overrides in ({'scan_layers': True}, {'remat_policy': 'full'},
                    {'scan_layers': True, 'remat_policy': 'minimal'},
                    {'remat_policy': 'projections'},
                    {'scan_layers': True, 'remat_policy': 'projections'}):
    cfg = dataclasses.replace(TINY, **overrides)
    p = network.stack_layers(params, cfg) if cfg.scan_layers else params
    (l, logits), grads = jax.value_and_grad(lambda p: loss(cfg, p), has_aux=True)(p)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, err_msg=str(overrides))
    grads = network.unstack_layers(grads, cfg)
    ref_flat = flat(ref_grads)
    assert flat(grads).keys() == ref_flat.keys()
    for path, g in flat(grads).items():
      np.testing.assert_allclose(g, ref_flat[path], atol=1e-5, rtol=1e-4, err_msg=f'{overrides} {path}')


def test_tied_logits_have_no_logits_dense_and_use_the_embedding():
  cfg = dataclasses.replace(TINY, logits_via_embedding=True)
  params = init_params(cfg)
  assert 'logits_dense' not in params['decoder']
  assert network.count_parameters(params) == closed_form_count(cfg)
  enc = random_tokens(0, (1, 5), cfg.vocab_size)
  logits = network.Transformer(cfg).apply({'params': params}, enc, shift_right(enc), enc)
  # Scaling the embedding of the output vocabulary moves the tied logits.
  bumped = jax.tree.map(lambda x: x, params)
  bumped['token_embedder']['embedding'] = params['token_embedder']['embedding'].at[7].mul(3.0)
  logits2 = network.Transformer(cfg).apply({'params': bumped}, enc, shift_right(enc), enc)
  assert not np.allclose(logits[..., 7], logits2[..., 7])


# ---------------------------------------------------------------------------------------------
# Masking: packing and causality
# ---------------------------------------------------------------------------------------------

def seqio_batch(examples, pack, lengths):
  """Real `seqio.EncDecFeatureConverter` output for a few {'inputs', 'targets'} examples."""
  import seqio
  import tensorflow as tf
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})
  converter = seqio.EncDecFeatureConverter(pack=pack)
  ds = converter(ds, lengths)
  return [{k: jnp.asarray(v)[None] for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_packed_rows_give_the_logits_each_example_gives_alone():
  cfg, params = TINY, init_params(TINY)
  model = network.Transformer(cfg)
  a = {'inputs': [11, 12, 13, 1], 'targets': [21, 22, 1]}
  b = {'inputs': [31, 32, 33, 34, 35, 1], 'targets': [41, 42, 43, 44, 1]}
  lengths = {'inputs': 12, 'targets': 10}
  [packed] = seqio_batch([a, b], pack=True, lengths=lengths)
  np.testing.assert_array_equal(packed['encoder_segment_ids'][0],
                                [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(packed['decoder_input_tokens'][0],
                                [0, 21, 22, 0, 41, 42, 43, 44, 0, 0])
  packed_logits = model.apply({'params': params}, **network.model_inputs(packed))
  alone = seqio_batch([a, b], pack=False, lengths=lengths)
  assert 'encoder_segment_ids' not in alone[0]
  offset = 0
  for ex, batch in zip((a, b), alone):
    n = len(ex['targets'])
    logits = model.apply({'params': params}, **network.model_inputs(batch))
    np.testing.assert_allclose(packed_logits[0, offset:offset + n], logits[0, :n], atol=1e-5)
    offset += n
  # Without segment ids the second example would see the first: the test can fail.
  unmasked = {k: v for k, v in network.model_inputs(packed).items() if 'segment' not in k}
  leaky = model.apply({'params': params}, **unmasked)
  assert not np.allclose(leaky[0, 3:8], packed_logits[0, 3:8], atol=1e-3)


def test_padding_does_not_change_logits():
  params = init_params(TINY)
  model = network.Transformer(TINY)
  enc = random_tokens(0, (1, 6), TINY.vocab_size)
  dec = random_tokens(1, (1, 4), TINY.vocab_size)
  short = model.apply({'params': params}, enc, shift_right(dec), dec)
  enc_pad, dec_pad = jnp.pad(enc, ((0, 0), (0, 5))), jnp.pad(dec, ((0, 0), (0, 3)))
  long = model.apply({'params': params}, enc_pad, shift_right(dec_pad), dec_pad)
  np.testing.assert_allclose(long[:, :4], short, atol=1e-5)


def test_decoder_is_causal():
  params = init_params(TINY)
  model = network.Transformer(TINY)
  enc = random_tokens(0, (2, 7), TINY.vocab_size)
  targets = random_tokens(1, (2, 6), TINY.vocab_size)
  inputs = shift_right(targets)
  logits = model.apply({'params': params}, enc, inputs, targets)
  t = 3
  changed = inputs.at[:, t].set((inputs[:, t] + 17) % TINY.vocab_size + 2)
  logits2 = model.apply({'params': params}, enc, changed, targets)
  np.testing.assert_array_equal(logits[:, :t], logits2[:, :t])
  assert np.abs(logits[:, t:] - logits2[:, t:]).max() > 1e-3


def test_encoder_is_bidirectional():
  params = init_params(TINY)
  model = network.Transformer(TINY)
  enc = random_tokens(0, (1, 7), TINY.vocab_size)
  encoded = model.apply({'params': params}, enc, method='encode')
  encoded2 = model.apply({'params': params}, enc.at[:, -1].set(3), method='encode')
  assert np.abs(encoded[:, 0] - encoded2[:, 0]).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Cached decoding and scoring
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('scan', [False, True])
def test_cached_step_by_step_decoding_reproduces_full_forward(scan):
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  params = init_params(cfg)
  model = network.Transformer(cfg)
  batch, inputs_length, length = 3, 9, 7
  enc = random_tokens(0, (batch, inputs_length), cfg.vocab_size)
  enc = enc.at[0, 6:].set(0)  # a padded input row
  targets = random_tokens(1, (batch, length), cfg.vocab_size)
  dec_inputs = shift_right(targets)
  full = model.apply({'params': params}, enc, dec_inputs, targets)

  encoded = model.apply({'params': params}, enc, method='encode')
  cache = network.init_decoding_cache(model, batch, inputs_length, length)

  @jax.jit
  def step(cache, token):
    logits, mutated = model.apply({'params': params, 'cache': cache}, encoded, enc, token,
                                  decode=True, max_decode_length=length, method='decode',
                                  mutable=['cache'])
    return mutated['cache'], logits[:, 0]

  steps = []
  for t in range(length):
    cache, logits = step(cache, dec_inputs[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, axis=1), full, atol=1e-5, rtol=1e-5)

  # Scoring: the summed log-likelihood equals the sum of the per-step log-probabilities.
  score = network.sequence_log_likelihood(full, targets)
  per_step = sum(jax.nn.log_softmax(s)[jnp.arange(batch), targets[:, t]]
                 for t, s in enumerate(steps))
  np.testing.assert_allclose(score, per_step, rtol=1e-5)


def test_sequence_log_likelihood_skips_padding_and_takes_weights():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  targets = jnp.array([[2, 1, 0]])
  np.testing.assert_allclose(network.sequence_log_likelihood(logits, targets),
                             [np.log(0.25) + np.log(0.8)], rtol=1e-6)
  weights = jnp.array([[1.0, 0.0, 0.0]])
  np.testing.assert_allclose(network.sequence_log_likelihood(logits, targets, weights),
                             [np.log(0.25)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Precision and sharding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('query_length,key_length', [(1, 1), (1, 9), (5, 5), (7, 3), (200, 200)])
def test_relative_position_biases_are_the_table_at_each_distances_bucket(
    query_length, key_length, bidirectional):
  """The bias is T5X's `rel_embedding[h, bucket(key - query)]` at every (query, key) position
  (T5X `RelativePositionBiases`), exactly; its gradient adds each position's cotangent to
  its bucket's entry (computed here with numpy's scatter-add, in float64)."""
  heads, num_buckets, max_distance = 3, 32, 128
  module = network.RelativePositionBiases(num_buckets, max_distance, heads)
  params = nn.meta.unbox(module.init(jax.random.key(0), query_length, key_length,
                                     bidirectional))
  table = np.asarray(params['params']['rel_embedding'])                 # [heads, buckets]
  buckets = np.asarray(network.relative_position_bucket(
      np.arange(key_length)[None, :] - np.arange(query_length)[:, None], bidirectional,
      num_buckets, max_distance))                                         # [q, k]
  values = module.apply(params, query_length, key_length, bidirectional)
  assert values.shape == (1, heads, query_length, key_length)
  np.testing.assert_array_equal(np.asarray(values)[0], table[:, buckets])

  cotangent = np.random.default_rng(1).standard_normal(values.shape).astype(np.float32)
  grad = jax.grad(lambda p: jnp.vdot(module.apply(p, query_length, key_length,
                                                  bidirectional), cotangent))(params)
  expected = np.zeros((heads, num_buckets))
  for h in range(heads):
    np.add.at(expected[h], buckets.ravel(), cotangent[0, h].astype(np.float64).ravel())
  np.testing.assert_allclose(grad['params']['rel_embedding'], expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())


def test_bfloat16_activations_are_finite_and_close_to_float32():
  params = init_params(TINY)
  enc = random_tokens(0, (4, 16), TINY.vocab_size)
  targets = random_tokens(1, (4, 12), TINY.vocab_size)
  out = {}
  for dtype in ('float32', 'bfloat16'):
    model = network.Transformer(dataclasses.replace(TINY, dtype=dtype))
    out[dtype] = model.apply({'params': params}, enc, shift_right(targets), targets)
  assert out['bfloat16'].dtype == jnp.float32  # logits are always float32
  assert np.isfinite(out['bfloat16']).all()
  # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), and the residual stream,
  # norms and attention weights are rounded at every layer: measured on this model, the mean
  # logit error is ~0.7% of the logits' spread and the worst single logit ~7%. The bounds below
  # leave ~2x headroom; a float16-style overflow or a wrong cast would blow far past them.
  err = np.abs(out['bfloat16'] - out['float32']) / np.std(out['float32'])
  assert err.mean() < 0.015 and err.max() < 0.15, (err.mean(), err.max())
  p32, p16 = (jax.nn.softmax(out[d]) for d in ('float32', 'bfloat16'))
  assert np.abs(p32 - p16).sum(-1).max() / 2 < 0.02  # total variation distance per position


def _bfloat16_products(x, kernel, dot):
  """The value of `dot(x, kernel)` and the gradients of a random linear loss of it."""
  cotangent = jax.random.normal(jax.random.key(2), (x.shape[0], kernel.shape[1]))

  def loss(x, kernel):
    y = dot(x, kernel)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y

  (_, y), (dx, dkernel) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
  return y, dx, dkernel


@pytest.mark.parametrize('mode', ['library', 'float32'])
def test_bfloat16_products_on_cpu_equal_the_plain_product_and_its_gradients(mode, monkeypatch):
  monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, mode)
  x = jax.random.normal(jax.random.key(0), (96, 48)).astype(jnp.bfloat16)  # [tokens, in]
  kernel = jax.random.normal(jax.random.key(1), (48, 80)) * 0.2  # [in, out], float32
  ours = _bfloat16_products(x, kernel, lambda x, k: network.dot(x, k, jnp.bfloat16))
  plain = _bfloat16_products(x, kernel, lambda x, k: jnp.dot(x, k.astype(jnp.bfloat16)))
  for name, a, b in zip(('y', 'dx', 'dkernel'), ours, plain):
    assert a.dtype == b.dtype, name  # bfloat16, bfloat16, float32 (the parameter's)
    # Both sum the same exact products in float32 and round once to bfloat16; only the order
    # of the sums differs, so they agree to one bfloat16 step (2^-8 relative).
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-6 * np.abs(b).max(), err_msg=name)
    assert np.mean(a == b) > 0.9, name
  assert ours[2].dtype == jnp.float32 and ours[0].dtype == jnp.bfloat16


def test_bfloat16_products_reach_xla_cpus_bfloat16_library(monkeypatch):
  """The reason `network.dot` exists: jaxlib 0.10.2 converts the operands of a plain bfloat16
  product (and of its two gradient products) to float32 and multiplies at float32 speed; the
  forms `network.dot` gives them keep all three products bfloat16 x bfloat16 -> float32 in
  XLA:CPU's library (YNNPACK)."""
  if jax.default_backend() != 'cpu':
    pytest.skip('XLA:CPU only')
  monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, 'library')
  x = jnp.zeros((256, 64), jnp.bfloat16)
  kernel = jnp.zeros((64, 128), jnp.float32)

  def compiled(dot):
    grad = jax.grad(lambda x, k: jnp.sum(jnp.square(dot(x, k).astype(jnp.float32))),
                    argnums=(0, 1))
    return jax.jit(grad).lower(x, kernel).compile().as_text()

  ours = compiled(lambda x, k: network.dot(x, k, jnp.bfloat16))
  assert flops.dot_operand_types(ours) == [('bf16', 'bf16')] * 3
  assert ours.count('"kind":"__ynn_fusion"') == 3
  plain = compiled(lambda x, k: jnp.dot(x, k.astype(jnp.bfloat16)))
  plain_types = flops.dot_operand_types(plain)
  assert len(plain_types) == 3 and ('bf16', 'bf16') not in plain_types
  # 'float32' (the choice on CPUs without bfloat16 instructions) is the plain product.
  monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, 'float32')
  converted = compiled(lambda x, k: network.dot(x, k, jnp.bfloat16))
  assert flops.dot_operand_types(converted) == plain_types


def test_bfloat16_products_are_chosen_by_the_cpus_instructions(monkeypatch):
  """'auto' sends bfloat16 products to the library only on CPUs that multiply bfloat16 in
  hardware (where it measured 1.9x the plain product; 0.73x on an AVX2-only CPU)."""
  monkeypatch.delenv(network.CPU_BFLOAT16_PRODUCTS_ENV, raising=False)
  native = bool(set(network.NATIVE_BFLOAT16_FEATURES) & network.cpu_features())
  assert network.cpu_bfloat16_products() == ('library' if native else 'float32')
  with open('/proc/cpuinfo') as f:  # the flags read are the kernel's own
    assert ('avx512_bf16' in f.read().split()) == ('avx512_bf16' in network.cpu_features())
  for mode in ('library', 'float32'):
    monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, mode)
    assert network.cpu_bfloat16_products() == mode
  monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, 'fast')
  with pytest.raises(ValueError, match=r"^UL2_CPU_BFLOAT16_PRODUCTS='fast': use one of auto, "
                     r'library, float32'):
    network.dot(jnp.ones((2, 2), jnp.bfloat16), jnp.ones((2, 2)), jnp.bfloat16)


def test_bfloat16_gradients_agree_with_scan_and_remat_and_with_float32(monkeypatch):
  monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, 'library')  # row-major copies too
  params = init_params(TINY)
  enc, dec = random_tokens(0, (2, 8), TINY.vocab_size), random_tokens(1, (2, 6), TINY.vocab_size)

  def grads(cfg):
    p = network.stack_layers(params, cfg) if cfg.scan_layers else params

    def loss(p):
      logits = network.Transformer(cfg).apply({'params': p}, enc, shift_right(dec), dec)
      return -jnp.mean(network.token_log_likelihoods(logits, dec))

    return flat(network.unstack_layers(jax.grad(loss)(p), cfg))

  reference = grads(TINY)
  # float32 attention logits: the tolerances below are for the products' rounding; T5X's
  # bfloat16 attention logits (the default) add a softmax in bfloat16 to both sides.
  bf16_cfg = dataclasses.replace(TINY, dtype='bfloat16', float32_attention_logits=True)
  bf16 = grads(bf16_cfg)
  scanned = grads(dataclasses.replace(bf16_cfg, scan_layers=True, remat_policy='minimal'))
  for path, g in reference.items():
    assert bf16[path].dtype == jnp.float32 and np.isfinite(bf16[path]).all(), path
    # The same bfloat16 computation, scanned and rematerialised: equal up to the order XLA
    # sums in (a few bfloat16 steps after a dozen rounded layers).
    np.testing.assert_allclose(scanned[path], bf16[path], rtol=0.05,
                               atol=0.02 * np.abs(bf16[path]).max(), err_msg=path)
    # Against float32: the gradient's direction survives bfloat16 rounding.
    cosine = np.sum(g * bf16[path]) / (np.linalg.norm(g) * np.linalg.norm(bf16[path]))
    assert cosine > 0.99, (path, cosine)


def tiny_model_batch_and_params(dtype='float32', **overrides):
  """models/tiny.gin's network, a batch of 8 rows, its boxed parameter shapes and parameters."""
  cfg = dataclasses.replace(model_config('models/tiny.gin'), dtype=dtype, **overrides)
  targets = random_tokens(1, (8, 12), cfg.vocab_size)
  batch = {'encoder_input_tokens': random_tokens(0, (8, 16), cfg.vocab_size),
           'decoder_input_tokens': shift_right(targets), 'decoder_target_tokens': targets}
  boxed = jax.eval_shape(lambda r: network.init_params(cfg, r, boxed=True), jax.random.key(0))
  return network.Transformer(cfg), batch, boxed, network.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize('data, model, dims, activation_dims',
                         [(2, 4, 1, 1), (2, 4, 2, 1), (8, 1, 1, 1), (2, 4, 1, 2), (2, 4, 2, 2)])
def test_sharded_logits_equal_unsharded(data, model, dims, activation_dims):
  net, batch, boxed, params = tiny_model_batch_and_params()
  cfg = net.config
  expected = net.apply({'params': params}, **batch)

  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=data, model=model))
  rules = partitioning.logical_axis_rules(dims, activation_dims)
  shardings = partitioning.logical_shardings(boxed, mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  # The parameters really are split: the embedding over the model (and, 2-D, data) axis.
  emb = sharded_params['token_embedder']['embedding']
  assert emb.addressable_shards[0].data.shape == (
      cfg.vocab_size // model, cfg.emb_dim // (data if dims == 2 else 1))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  sharded_batch = jax.device_put(batch, batch_sharding)

  @jax.jit
  def forward(p, b):
    return net.apply({'params': p}, **b)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = forward(sharded_params, sharded_batch)
  assert logits.sharding.spec[0] == 'data'
  np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-5)


def test_sharded_bfloat16_gradients_equal_unsharded(monkeypatch):
  """bfloat16 training on a 2-D mesh of 8 CPU devices: `network.dot`'s row-major copies split
  like any array (the features over the model axis), and the gradients match one device's."""
  monkeypatch.setenv(network.CPU_BFLOAT16_PRODUCTS_ENV, 'library')
  net, batch, boxed, params = tiny_model_batch_and_params('bfloat16')

  @jax.jit
  def grads(p, b):
    return jax.grad(lambda p: -jnp.mean(network.token_log_likelihoods(
        net.apply({'params': p}, **b), b['decoder_target_tokens'])))(p)

  expected = flat(grads(params, batch))
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, model=4))
  rules = partitioning.logical_axis_rules(2)
  sharded_params = jax.device_put(params, partitioning.logical_shardings(boxed, mesh, rules))
  sharded_batch = jax.device_put(
      batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = flat(grads(sharded_params, sharded_batch))
  for path, g in expected.items():
    assert len(got[path].sharding.device_set) == 8, path
    # bfloat16 sums in another order across devices: a few bfloat16 steps apart. A layer
    # norm's scale gradient is a sum over every token of bfloat16 products (the scale is
    # applied in bfloat16, as T5X does), whose per-device partial sums are rounded too.
    atol = (0.05 if path.endswith('/scale') else 0.02) * np.abs(g).max()
    np.testing.assert_allclose(got[path], g, rtol=0.05, atol=atol, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Configuration errors and docstrings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, message', [
    ({'mlp_activations': ('gelu', 'tanh')}, 'mlp_activations'),
    ({'dtype': 'float16'}, 'dtype'),
    ({'emb_dim': 0}, 'emb_dim'),
    ({'remat_policy': 'some'}, 'remat_policy'),
    ({'relative_attention_num_buckets': 31}, 'even'),
])
def test_config_errors_name_the_setting(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **overrides)


def test_mesh_errors_say_how_to_fix():
  with pytest.raises(ValueError, match='needs 6 devices but 8 are available'):
    partitioning.make_mesh(partitioning.MeshConfig(data=3, model=2))
  with pytest.raises(ValueError, match=r'^MODEL_PARALLEL=3 \(MeshConfig.model\) does not '
                     'divide the 8 devices; set MODEL_PARALLEL to a divisor of 8'):
    partitioning.make_mesh(partitioning.MeshConfig(data=-1, model=3))


def test_stack_layers_rejects_a_tree_of_the_wrong_depth():
  params = init_params(TINY)
  with pytest.raises(ValueError, match='num_encoder_layers is 3'):
    network.stack_layers(params, dataclasses.replace(TINY, num_encoder_layers=3,
                                                     scan_layers=True))


@pytest.mark.parametrize('module', [network, partitioning, gin_cli], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, extraglobs={'np': np, 'jnp': jnp, 'jax': jax})
  assert result.attempted > 0 and result.failed == 0


def test_importing_ul2_sets_the_xla_cpu_flags_unless_told_not_to():
  """The XLA:CPU defaults reach XLA_FLAGS before JAX starts its client; a value the user set
  stays, and UL2_XLA_CPU_DEFAULTS=0 leaves XLA_FLAGS alone."""
  import subprocess
  import sys
  import ul2
  (name, value), = ul2.XLA_CPU_FLAGS.items()
  code = ('import os, ul2, jax, jax.numpy as jnp\n'
          'jax.jit(lambda x: x @ x)(jnp.ones((4, 4))).block_until_ready()\n'
          'print(os.environ.get("XLA_FLAGS"))\n')

  def flags(**env):
    base = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'UL2_XLA_CPU_DEFAULTS')}
    out = subprocess.run([sys.executable, '-c', code], env={**base, **env}, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]

  assert flags() == f'--{name}={value}'
  assert flags(XLA_FLAGS='--xla_force_host_platform_device_count=2') == (
      f'--xla_force_host_platform_device_count=2 --{name}={value}')
  assert flags(XLA_FLAGS=f'--{name}=LIBRARY_FUSION_TYPE_DOT') == f'--{name}=LIBRARY_FUSION_TYPE_DOT'
  assert flags(UL2_XLA_CPU_DEFAULTS='0') == 'None'
