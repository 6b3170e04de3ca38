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


def t5x_beam_search(log_probs_fn, batch, beam_size, length, alpha, vocab, eos=1):
  """t5x.decoding.beam_search, transcribed from T5X's source into numpy over an uncached
  next-token function (`log_probs_fn(prefixes [n, t]) -> [n, vocab]`): live sequences with a
  dummy start token, 2 x beam candidates per step, a separate finished pool, T5X's
  termination test and its NEG_INF of -1e7. Returns T5X's outputs (best last)."""
  neg_inf = -1.0e7
  penalty = lambda n: ((5.0 + n) / 6.0) ** alpha
  max_len = length + 1
  live_lp = np.tile(np.array([0.0] + [neg_inf] * (beam_size - 1)), (batch, 1))
  fin_scores = np.full((batch, beam_size), neg_inf)
  live = np.zeros((batch, beam_size, max_len), np.int64)
  fin = np.zeros((batch, beam_size, max_len), np.int64)
  flags = np.zeros((batch, beam_size), bool)

  def top(x, k):  # lax.top_k (ties: lower index first), then flipped as T5X does
    return np.argsort(-x, axis=1, kind='stable')[:, :k][:, ::-1]

  take = lambda x, idx: np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
  i = 0
  while True:
    best_live = live_lp[:, -1:] / penalty(max_len)
    worst = np.where(flags, fin_scores.min(axis=1, keepdims=True), neg_inf)
    if not (i < max_len - 1) or np.all(worst > best_live):
      break
    step = log_probs_fn(live[:, :, 1:i + 1].reshape(batch * beam_size, i))
    cand = (step.reshape(batch, beam_size, vocab) + live_lp[:, :, None]).reshape(batch, -1)
    order = np.argsort(-cand, axis=1, kind='stable')[:, :2 * beam_size]
    top_lp = np.take_along_axis(cand, order, 1)
    ids, parents = order % vocab, order // vocab
    seqs = take(live, parents).copy()
    seqs[:, :, i + 1] = ids
    ends = ids == eos
    new_lp = top_lp + ends * neg_inf
    keep = top(new_lp, beam_size)
    live, live_lp = take(seqs, keep), take(new_lp, keep)
    scores = top_lp / penalty(i + 1) + (~ends) * neg_inf
    pool = [np.concatenate(x, axis=1) for x in ((fin, seqs), (fin_scores, scores), (flags, ends))]
    best = top(pool[1], beam_size)
    fin, fin_scores, flags = (take(x, best) for x in pool)
    i += 1
  any_finished = flags.any(axis=1)
  seqs = np.where(any_finished[:, None, None], fin, live)
  scores = np.where(any_finished[:, None], fin_scores, live_lp)
  return seqs[:, :, 1:], scores


def uncached_log_probs(model, params, enc, beam_size):
  """Next-token log-probabilities by full forward passes, each input repeated per beam."""
  enc = np.repeat(np.asarray(enc), beam_size, axis=0)
  return lambda prefixes: np.asarray(full_log_probs(model, params, jnp.asarray(enc),
                                                    jnp.asarray(prefixes, jnp.int32)),
                                     np.float64)


@pytest.mark.parametrize('seed, beam_size', [(seed, 4) for seed in range(12)]
                         + [(seed, beam) for seed in range(2) for beam in (1, 2)])
def test_beam_search_equals_t5x_on_random_models(seed, beam_size):
  """Alpha 0.6, length 6, random models over a vocabulary of 16 whose EOS is likely enough
  that rows finish at different steps, some not at all: the same sequences and scores as
  T5X's algorithm (float32 against float64: 1e-4). Beam size 1 is not greedy decoding: an
  early finished hypothesis stays in the pool and can win."""
  cfg = network.Config(vocab_size=16, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1)
  model = network.Transformer(cfg)
  params = init(cfg, seed=seed, eos_boost=float(1 + seed % 4))
  enc = inputs(batch=3, length=5, vocab=16, seed=seed)
  beams, scores = decoding.beam_search(model, params, enc, beam_size=beam_size,
                                       max_decode_length=6, alpha=0.6)
  want_seqs, want_scores = t5x_beam_search(uncached_log_probs(model, params, enc, beam_size),
                                           3, beam_size, 6, 0.6, 16)
  np.testing.assert_array_equal(np.asarray(beams), want_seqs[:, ::-1])
  np.testing.assert_allclose(np.asarray(scores), want_scores[:, ::-1], rtol=1e-4, atol=1e-4)


def sequence_log_prob(model, params, enc, sequences):
  """Plain log p of each row's sequence (through its first EOS), by full forward passes."""
  lp = uncached_log_probs(model, params, enc, 1)
  sequences = np.asarray(sequences)
  total, alive = np.zeros(len(sequences)), np.ones(len(sequences), bool)
  for t in range(sequences.shape[1]):
    step = lp(sequences[:, :t])
    total += alive * step[np.arange(len(sequences)), sequences[:, t]]
    alive &= sequences[:, t] != 1
  return total


def test_a_finished_hypothesis_beats_every_truncated_one():
  """Peaked random models (logits x4, EOS logit halved), length 4. Seed 1: in every row the
  greedy path never ends and is more likely than anything that does, yet beam search returns
  a hypothesis that ended (as T5X: truncated ones only where nothing ended). Seed 0: nothing
  ends in any row, and the live hypotheses come back with their plain log-probabilities."""
  cfg = network.Config(vocab_size=16, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1)
  model = network.Transformer(cfg)
  for seed in (1, 0):
    enc = inputs(batch=3, length=5, vocab=16, seed=seed)
    params = init(cfg, seed=seed)
    kernel = params['decoder']['logits_dense']['kernel'] * 4.0
    params['decoder']['logits_dense']['kernel'] = kernel.at[:, 1].multiply(0.5)
    beams, scores = decoding.beam_search(model, params, enc, beam_size=4, max_decode_length=4,
                                         alpha=0.6)
    want_seqs, want_scores = t5x_beam_search(uncached_log_probs(model, params, enc, 4), 3, 4,
                                             4, 0.6, 16)
    np.testing.assert_array_equal(np.asarray(beams), want_seqs[:, ::-1])
    np.testing.assert_allclose(np.asarray(scores), want_scores[:, ::-1], rtol=1e-4)
    best = np.asarray(beams[:, 0])
    greedy = np.asarray(decoding.greedy(model, params, enc, max_decode_length=4))
    greedy_log_prob = sequence_log_prob(model, params, enc, greedy)
    if seed == 1:
      assert (best == 1).any(axis=1).all() and not (greedy == 1).any()
      assert (greedy_log_prob > np.asarray(scores[:, 0])).all()
    else:
      assert not (best == 1).any()
      np.testing.assert_allclose(np.asarray(scores[:, 0]),
                                 sequence_log_prob(model, params, enc, best), rtol=1e-4)


def test_beam_search_finds_the_best_finished_sequence_on_an_exhaustible_model():
  """Vocabulary 6, 3 steps, 75 beams: 2 x 75 candidates hold all 5^2 x 6 extensions of the
  live prefixes, so nothing is pruned and the result is the best EOS-terminated sequence
  (alpha 0: by log-probability)."""
  cfg = network.Config(vocab_size=6, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=1, num_decoder_layers=1)
  model = network.Transformer(cfg)
  params, enc = init(cfg, seed=3, eos_boost=2.0), inputs(batch=2, length=5, vocab=6)
  length = 3

  def exact(seq, row):
    """log p(seq), which ends with its first EOS, by one full forward pass."""
    targets = jnp.asarray([seq], jnp.int32)
    decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    logits = model.apply({'params': params}, enc[row:row + 1], decoder_inputs,
                         jnp.ones_like(targets))
    return float(jnp.sum(network.token_log_likelihoods(logits, targets)))

  finished = [seq + (1,) for n in range(length) for seq in itertools.product(
      [t for t in range(6) if t != 1], repeat=n)]
  beams, scores = decoding.beam_search(model, params, enc, beam_size=75,
                                       max_decode_length=length, alpha=0.0)
  for row in range(2):
    best_score, best_seq = max((exact(seq, row), seq) for seq in finished)
    got = [int(t) for t in beams[row, 0]]
    assert tuple(got[:got.index(1) + 1]) == best_seq
    assert float(scores[row, 0]) == pytest.approx(best_score, abs=1e-4)
    real = np.asarray(scores[row]) > -1e6
    assert (np.diff(np.asarray(scores[row])[real]) <= 1e-6).all()  # best first


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


def test_bench_decode_compares_with_hf_generate_on_the_same_weights(tmp_path):
  """scripts/bench_decode.py: every method on both sides; greedy tokens and scores agree."""
  import bench_decode
  report = bench_decode.main(['--model', 'tiny', '--batch_size', '2', '--inputs_length', '16',
                              '--new_tokens', '6', '--rounds', '1',
                              '--json', str(tmp_path / 'decode.json')])
  methods = report['methods']
  assert set(methods) == {'greedy', 'beam', 'sample', 'score'}
  for entry in methods.values():
    assert entry['ul2']['tokens_per_s'] > 0 and entry['hf']['tokens_per_s'] > 0
    assert entry['ul2_over_hf'] == pytest.approx(entry['hf']['seconds'] / entry['ul2']['seconds'])
  assert methods['greedy']['greedy_equal_rows'] == 2
  assert methods['score']['score_max_abs_diff'] < 1e-3
  assert 'load_start' in report and 'load_end' in report


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
def test_the_cross_attention_cache_holds_the_encoder_keys_and_values_steps_then_read(scan):
  """`with_cross_attention_cache` adds each layer's encoder keys and values [batch, heads,
  inputs, kv] and leaves the rest of the cache as it was; a step reading them gives what a
  step computing them gives, and the keys are the layer's own projection of the encoding."""
  import dataclasses
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  model, params, enc = network.Transformer(cfg), init(cfg), inputs()
  encoded = model.apply({'params': params}, enc, method='encode')
  empty = network.init_decoding_cache(model, 4, 7, 5)
  cache = network.with_cross_attention_cache(model, params, empty, encoded, enc, 5)
  flat, before = (flax.traverse_util.flatten_dict(c) for c in (cache, empty))
  added = {k: v for k, v in flat.items() if k not in before}
  assert sorted({k[-1] for k in added}) == ['cross_key', 'cross_value']
  assert len(added) == 2 * (1 if scan else CFG.num_decoder_layers)
  for key, value in before.items():
    np.testing.assert_array_equal(flat[key], value)
  for value in added.values():  # a scanned stack has a leading layer axis
    assert value.shape == (CFG.num_decoder_layers,) * bool(scan) + (4, 2, 7, 8)
  if not scan:
    kernel = params['decoder']['layers_0']['encoder_decoder_attention']['key']['kernel']
    want = (encoded @ kernel).reshape(4, 7, 2, 8).transpose(0, 2, 1, 3)
    got = flat[('decoder', 'layers_0', 'encoder_decoder_attention', 'cross_key')]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def step(start):
    logits, _ = model.apply({'params': params, 'cache': start}, encoded, enc,
                            jnp.zeros((4, 1), jnp.int32), decode=True, max_decode_length=5,
                            method='decode', mutable=['cache'])
    return logits
  # The same products, fused differently: equal to float32 rounding.
  np.testing.assert_allclose(step(cache), step(empty), rtol=1e-5, atol=1e-6)
