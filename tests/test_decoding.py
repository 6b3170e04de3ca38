"""Greedy, beam search, sampling and rank classification against exact computations."""

import doctest
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ul2 import decoding, network

CFG = network.Config(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                     num_encoder_layers=2, num_decoder_layers=2)
MODEL = network.Transformer(CFG)


def init(cfg=CFG, seed=0, eos_boost=1.0):
  params = network.init_params(cfg, jax.random.key(seed))
  # A random model rarely says EOS; boosting its logit makes some rows stop early.
  kernel = params['decoder']['logits_dense']['kernel']
  params['decoder']['logits_dense']['kernel'] = kernel.at[:, 1].multiply(eos_boost)
  return params


def inputs(batch=4, length=7, vocab=64, seed=0):
  x = np.random.default_rng(seed).integers(2, vocab, size=(batch, length))
  x[0, 5:] = 0  # a padded row
  return jnp.asarray(x, jnp.int32)


def full_log_probs(model, params, enc, prefix):
  """log p(next | prefix) by the full (uncached) forward pass: [batch, vocab]."""
  targets = jnp.concatenate([prefix, jnp.ones((prefix.shape[0], 1), jnp.int32)], axis=1)
  decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  logits = model.apply({'params': params}, enc, decoder_inputs, jnp.ones_like(targets))
  return jax.nn.log_softmax(logits[:, -1])


def test_greedy_equals_step_by_step_argmax_of_the_full_forward_pass():
  params, enc = init(eos_boost=4.0), inputs()
  out = np.asarray(decoding.greedy(MODEL, params, enc, max_decode_length=8))
  prefix = jnp.zeros((enc.shape[0], 0), jnp.int32)
  expected = []
  for _ in range(8):
    next_token = jnp.argmax(full_log_probs(MODEL, params, enc, prefix), axis=-1)
    expected.append(np.asarray(next_token))
    prefix = jnp.concatenate([prefix, next_token[:, None].astype(jnp.int32)], axis=1)
  expected = np.stack(expected, axis=1)
  stopped = 0
  for row, want in zip(out, expected):
    eos = np.flatnonzero(want == 1)
    end = eos[0] + 1 if len(eos) else len(want)
    np.testing.assert_array_equal(row[:end], want[:end])
    assert (row[end:] == 0).all()  # padding after EOS
    stopped += end < len(want)
  assert stopped >= 1  # EOS handling was exercised


def test_beam_size_one_equals_greedy():
  params, enc = init(eos_boost=4.0), inputs()
  greedy = decoding.greedy(MODEL, params, enc, max_decode_length=8)
  beams, _ = decoding.beam_search(MODEL, params, enc, beam_size=1, max_decode_length=8,
                                  alpha=0.0)
  np.testing.assert_array_equal(beams[:, 0], greedy)


def test_beam_search_finds_the_best_sequence_on_an_exhaustible_model():
  """Vocabulary 6, 3 steps: 6^2 = 36 beams keep every prefix, so beam search is exact."""
  cfg = network.Config(vocab_size=6, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1)
  model = network.Transformer(cfg)
  params, enc = init(cfg, seed=3, eos_boost=2.0), inputs(batch=2, length=5, vocab=6)
  length = 3

  def exact(seq, row):
    """log p(seq) up to and including its first EOS, by full forward passes."""
    seq = list(seq)
    if 1 in seq:
      seq = seq[:seq.index(1) + 1]
    targets = jnp.asarray([seq], jnp.int32)
    decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    logits = model.apply({'params': params}, enc[row:row + 1], decoder_inputs,
                         jnp.ones_like(targets))
    return float(jnp.sum(network.token_log_likelihoods(logits, targets))), tuple(seq)

  beams, scores = decoding.beam_search(model, params, enc, beam_size=36,
                                       max_decode_length=length, alpha=0.0)
  for row in range(2):
    hypotheses = {exact(seq, row) for seq in itertools.product(range(6), repeat=length)}
    best_score, best_seq = max(hypotheses)
    got = [int(t) for t in beams[row, 0]]
    got = got[:got.index(1) + 1] if 1 in got else got
    assert tuple(got) == best_seq
    assert float(scores[row, 0]) == pytest.approx(best_score, abs=1e-4)
    assert (np.diff(np.asarray(scores[row])) <= 1e-6).all()  # best first


def test_length_penalty_prefers_longer_hypotheses_as_alpha_grows():
  params, enc = init(eos_boost=3.0), inputs()
  lengths = []
  for alpha in (0.0, 2.0):
    beams, _ = decoding.beam_search(MODEL, params, enc, beam_size=4, max_decode_length=8,
                                    alpha=alpha)
    lengths.append(int(np.sum(np.asarray(beams[:, 0]) > 0)))
  assert lengths[1] >= lengths[0]


def test_rank_classification_picks_the_argmax_of_exact_scores():
  params, enc = init(), inputs(batch=3)
  candidates = jnp.asarray([[[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 1]]] * 3, jnp.int32)
  scores, best = decoding.rank_classification(MODEL, params, enc, candidates)
  for b in range(3):
    exact = []
    for c in range(3):
      t = candidates[b, c][None]
      logits = MODEL.apply({'params': params}, enc[b:b + 1],
                           jnp.pad(t, ((0, 0), (1, 0)))[:, :-1], t)
      exact.append(float(network.sequence_log_likelihood(logits, t)[0]))
    np.testing.assert_allclose(scores[b], exact, rtol=1e-5)
    assert int(best[b]) == int(np.argmax(exact))


def test_sampling_follows_the_model_distribution():
  params = init()
  enc = jnp.repeat(inputs(batch=1), 4000, axis=0)
  first = np.asarray(decoding.sample(MODEL, params, enc, jax.random.key(1),
                                     max_decode_length=1))[:, 0]
  probs = np.asarray(jnp.exp(full_log_probs(MODEL, params, enc[:1],
                                            jnp.zeros((1, 0), jnp.int32))), np.float64)[0]
  probs /= probs.sum()
  likely = probs > 0.02  # pool rare tokens so every expected count is >= 5
  observed = np.append(np.bincount(first, minlength=64)[likely], (~likely[first]).sum())
  expected = np.append(probs[likely], probs[~likely].sum()) * len(first)
  assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


def test_top_k_one_and_tiny_temperature_equal_greedy():
  params, enc = init(eos_boost=4.0), inputs()
  greedy = decoding.greedy(MODEL, params, enc, max_decode_length=6)
  for kwargs in ({'top_k': 1}, {'temperature': 1e-4}, {'top_p': 1e-6}):
    out = decoding.sample(MODEL, params, enc, jax.random.key(2), max_decode_length=6, **kwargs)
    np.testing.assert_array_equal(out, greedy, err_msg=str(kwargs))


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda out: (np.asarray(out[0]) > -1e8).tolist()
  assert kept(decoding.filter_logits(logits, top_k=2)) == [True, True, False, False]
  assert kept(decoding.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
  assert kept(decoding.filter_logits(logits, top_p=0.81)) == [True, True, True, False]
  assert kept(decoding.filter_logits(logits)) == [True] * 4
  with pytest.raises(ValueError, match='temperature must be > 0'):
    decoding.sample(MODEL, init(), inputs(), jax.random.key(0), 4, temperature=0.0)


def test_docstring_examples():
  result = doctest.testmod(decoding)
  assert result.attempted > 0 and result.failed == 0


def test_decoding_with_sharded_parameters_equals_unsharded():
  from ul2 import partitioning
  cfg = network.Config(vocab_size=64, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1)
  model = network.Transformer(cfg)
  params, enc = init(cfg, seed=4, eos_boost=3.0), inputs()
  expected = decoding.greedy(model, params, enc, max_decode_length=6)
  expected_beams, _ = decoding.beam_search(model, params, enc, 2, 6)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, model=4))
  rules = partitioning.logical_axis_rules()
  boxed = jax.eval_shape(lambda r: network.init_params(cfg, r, boxed=True), jax.random.key(0))
  sharded = jax.device_put(params, partitioning.logical_shardings(boxed, mesh, rules))
  batch = jax.device_put(enc, partitioning.data_sharding(mesh))
  with jax.set_mesh(mesh), flax.linen.logical_axis_rules(rules):
    got = decoding.greedy(model, sharded, batch, max_decode_length=6)
    beams, _ = decoding.beam_search(model, sharded, batch, 2, 6)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(beams, expected_beams)
