"""The decoder-only model: T5X's network, its attention modes, cached decoding, the trainer.

The reference is T5X's `t5x/examples/decoder_only/network.py`, run by
`t5x_reference/make_decoder_only_fixture.py` on fixed parameters (fixtures/decoder_only.npz).
"""

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_setup
from ul2 import data as data_lib
from ul2 import decoding, interop, network, partitioning

FIXTURE = os.path.join(os.path.dirname(__file__), 't5x_reference', 'fixtures', 'decoder_only.npz')
CFG = network.Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                     num_decoder_layers=2, architecture='decoder_only',
                     mlp_activations=('silu', 'linear'))
TINY = dataclasses.replace(train_setup.TINY, architecture='decoder_only', num_decoder_layers=3)
# T5X's decoder-only parameter names (t5x/examples/decoder_only/network.py: DecoderWrapper ->
# Decoder; embedder, relpos_bias and logits_dense inside `decoder`), for 2 layers.
T5X_NAMES = sorted(
    ['decoder/token_embedder/embedding', 'decoder/relpos_bias/rel_embedding',
     'decoder/decoder_norm/scale', 'decoder/logits_dense/kernel']
    + [f'decoder/layers_{i}/{name}' for i in range(2) for name in (
        'pre_self_attention_layer_norm/scale', 'self_attention/query/kernel',
        'self_attention/key/kernel', 'self_attention/value/kernel', 'self_attention/out/kernel',
        'pre_mlp_layer_norm/scale', 'mlp/wi_0/kernel', 'mlp/wi_1/kernel', 'mlp/wo/kernel')])


def params_of(cfg=CFG, seed=0):
  return network.init_params(cfg, jax.random.key(seed))


def forward(params, targets, causal=None, segments=None, cfg=CFG):
  targets = jnp.asarray(targets, jnp.int32)
  inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  if segments is not None:  # packed: each segment starts with the start token 0
    segments = jnp.asarray(segments)
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                              segments[:, 1:] != segments[:, :-1]], axis=1)
    inputs = jnp.where(starts, 0, inputs)
  return network.DecoderOnly(cfg).apply({'params': params}, inputs, targets,
                                        decoder_segment_ids=segments,
                                        decoder_causal_attention=causal)


# ---------------------------------------------------------------------------------------------
# The network against T5X
# ---------------------------------------------------------------------------------------------

def test_parameter_tree_is_t5x_decoder_only():
  shapes = {k: v.shape for k, v in network.flatten_params(params_of()).items()}
  assert sorted(shapes) == T5X_NAMES
  assert shapes['decoder/relpos_bias/rel_embedding'] == (4, 32)
  assert shapes['decoder/layers_0/mlp/wi_0/kernel'] == (32, 64)
  fixture = np.load(FIXTURE)
  assert sorted(k[len('param/'):] for k in fixture if k.startswith('param/')) == T5X_NAMES


@pytest.mark.parametrize('mode', ['causal', 'prefix'])
@pytest.mark.parametrize('packed', ['unpacked', 'packed'])
def test_logits_equal_t5x(mode, packed):
  """Causal and prefix-LM attention, packed and not: T5X's logits on every real position."""
  f = np.load(FIXTURE)
  params = {}
  for key in f:
    if key.startswith('param/'):
      node = params
      *path, leaf = key[len('param/'):].split('/')
      for part in path:
        node = node.setdefault(part, {})
      node[leaf] = jnp.asarray(f[key])
  logits = network.DecoderOnly(CFG).apply(
      {'params': params}, f['inputs'], f['targets'],
      decoder_segment_ids=f['segment_ids'] if packed == 'packed' else None,
      decoder_causal_attention=f['causal_attention'] if mode == 'prefix' else None)
  real = f['targets'] > 0
  np.testing.assert_allclose(np.asarray(logits)[real], f[f'logits/{mode}/{packed}'][real],
                             rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Attention modes
# ---------------------------------------------------------------------------------------------

def test_causal_mode_never_sees_the_future():
  params = params_of()
  targets = np.random.default_rng(0).integers(2, 128, (2, 10))
  base = np.asarray(forward(params, targets))
  for k in range(1, 10):
    changed = targets.copy()
    changed[:, k - 1] = (changed[:, k - 1] + 7) % 126 + 2  # the token read at position k
    out = np.asarray(forward(params, changed))
    np.testing.assert_array_equal(out[:, :k], base[:, :k])
    assert np.abs(out[:, k:] - base[:, k:]).max() > 1e-4


def test_prefix_mode_inputs_see_each_other_targets_never_see_later_targets():
  params = params_of()
  targets = np.random.default_rng(1).integers(2, 128, (1, 12))
  causal = (np.arange(12) <= 5)[None].astype(np.int32)  # 5 inputs + the position reading the last
  base = np.asarray(forward(params, targets, causal))
  # An input token (read at position 4) changes every input position, earlier ones included.
  changed = targets.copy()
  changed[0, 3] += 1
  out = np.asarray(forward(params, changed, causal))
  assert np.abs(out[0, :4] - base[0, :4]).max(axis=-1).min() > 1e-5
  # A target token (read at position k > 5) changes nothing before k.
  for k in range(6, 12):
    changed = targets.copy()
    changed[0, k - 1] += 1
    out = np.asarray(forward(params, changed, causal))
    np.testing.assert_array_equal(out[0, :k], base[0, :k])
  # Causal mode (prefix_lm=False) ignores decoder_causal_attention.
  causal_cfg = dataclasses.replace(CFG, prefix_lm=False)
  np.testing.assert_array_equal(np.asarray(forward(params, targets, causal, cfg=causal_cfg)),
                                np.asarray(forward(params, targets)))


def test_packed_rows_equal_unpacked_rows():
  """Two prefix-LM examples packed into one row give each example's unpacked logits."""
  params = params_of()
  rng = np.random.default_rng(2)
  a, b = rng.integers(2, 128, 7), rng.integers(2, 128, 5)
  packed = np.concatenate([a, b, [0, 0]])[None]
  segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
  causal = np.array([[1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]])
  out = np.asarray(forward(params, packed, causal, segments))
  alone_a = np.asarray(forward(params, a[None], causal[:, :7]))
  alone_b = np.asarray(forward(params, b[None], causal[:, 7:12]))
  np.testing.assert_allclose(out[0, :7], alone_a[0], atol=2e-5)
  np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=2e-5)


def test_scanned_equals_unscanned():
  params = params_of()
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True, remat_policy='full')
  scanned = network.stack_layers(params, scanned_cfg)
  assert 'layers' in scanned['decoder'] and 'layers_0' not in scanned['decoder']
  targets = np.random.default_rng(3).integers(2, 128, (2, 9))
  causal = (np.arange(9) <= 3)[None].repeat(2, 0).astype(np.int32)
  np.testing.assert_allclose(np.asarray(forward(scanned, targets, causal, cfg=scanned_cfg)),
                             np.asarray(forward(params, targets, causal)), atol=2e-5)
  assert network.unstack_layers(scanned, scanned_cfg).keys() == params.keys()


# ---------------------------------------------------------------------------------------------
# Cached decoding
# ---------------------------------------------------------------------------------------------

def prompts():
  """Three prompts of different lengths, ending in EOS, padded with 0; one empty."""
  return jnp.asarray([[5, 9, 17, 33, 1, 0], [40, 41, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
                     jnp.int32)


@pytest.mark.parametrize('prefix_lm', [True, False])
@pytest.mark.parametrize('scan', [False, True])
def test_cached_greedy_decoding_equals_the_full_forward_pass(prefix_lm, scan):
  """Each generated token is the argmax of the full, uncached forward pass over prompt +
  everything generated before it, with the training mask; and the cached log-probabilities
  equal the full pass's."""
  cfg = dataclasses.replace(CFG, prefix_lm=prefix_lm, scan_layers=scan)
  params = params_of(dataclasses.replace(cfg, scan_layers=False), seed=4)
  if scan:
    params = network.stack_layers(params, cfg)
  model = network.build(cfg)
  inputs = prompts()
  # Padding's and EOS's logits 0, below the largest of 126 random ones: every row decodes 8
  # real tokens.
  params['decoder']['logits_dense']['kernel'] = (
      params['decoder']['logits_dense']['kernel'].at[..., :2].set(0.0))
  out = np.asarray(decoding.greedy(model, params, inputs, max_decode_length=8))
  assert out.shape == (3, 8) and (out > 1).all()
  rows = decoding.prefix_lm_rows(inputs, jnp.asarray(out))
  weights = np.asarray(rows.pop('decoder_loss_weights'))
  logits = np.asarray(model.apply({'params': params}, **rows))
  predicted = logits.argmax(-1)
  for r in range(3):
    positions = np.nonzero(weights[r])[0]
    # The logits at position p predict the target token at p: the generated one.
    np.testing.assert_array_equal(predicted[r, positions], out[r])
  # Scores: teacher forcing over the cache-free path equals the sum of the full pass's.
  log_probs = jax.nn.log_softmax(jnp.asarray(logits))
  full = np.take_along_axis(np.asarray(log_probs), np.asarray(rows['decoder_target_tokens'])[
      ..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(decoding.score(model, params, inputs, jnp.asarray(out))),
                             (full * weights).sum(-1), rtol=1e-5)


def test_beam_search_scores_are_teacher_forced_scores():
  model = network.build(CFG)
  params = params_of(seed=5)
  inputs = prompts()
  seqs, scores = decoding.beam_search(model, params, inputs, beam_size=4, max_decode_length=6)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert seqs.shape == (3, 4, 6)
  assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
  real = scores > decoding.BEAM_NEG_INF / 2  # a finished pool's unfilled slots score ~-1e7
  assert real[:, 0].all()
  for r in range(3):
    for k in np.nonzero(real[r])[0]:
      seq = seqs[r, k]
      length = int((seq > 0).sum())
      ll = float(decoding.score(model, params, inputs[r:r + 1], jnp.asarray(seq[None]))[0])
      finished = (seq == 1).any()
      expected = ll / float(decoding.length_penalty(length, 0.6)) if finished else ll
      np.testing.assert_allclose(scores[r, k], expected, rtol=1e-4, atol=1e-4)
  greedy = np.asarray(decoding.greedy(model, params, inputs, max_decode_length=6))
  # Beam search never scores below the greedy sequence it could have kept.
  for r in range(3):
    g = float(decoding.score(model, params, inputs[r:r + 1], jnp.asarray(greedy[r:r + 1]))[0])
    g /= float(decoding.length_penalty(int((greedy[r] > 0).sum()), 0.6))
    assert scores[r, 0] >= g - 1e-4


def test_sampling_with_top_k_1_is_greedy_and_a_seed_repeats():
  model = network.build(CFG)
  params = params_of(seed=6)
  inputs = prompts()
  greedy = np.asarray(decoding.greedy(model, params, inputs, max_decode_length=6))
  top1 = decoding.sample(model, params, inputs, jax.random.key(1), max_decode_length=6, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  a = decoding.sample(model, params, inputs, jax.random.key(2), max_decode_length=6)
  b = decoding.sample(model, params, inputs, jax.random.key(2), max_decode_length=6)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rank_classification_scores_each_candidate_after_its_inputs():
  model = network.build(CFG)
  params = params_of(seed=7)
  inputs = prompts()[:2]
  candidates = jnp.asarray([[[7, 1, 0], [8, 9, 1]], [[10, 1, 0], [11, 1, 0]]], jnp.int32)
  scores, best = decoding.rank_classification(model, params, inputs, candidates)
  for r in range(2):
    for c in range(2):
      one = decoding.score(model, params, inputs[r:r + 1], candidates[r, c][None])
      np.testing.assert_allclose(float(scores[r, c]), float(one[0]), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(best), np.asarray(scores).argmax(-1))


def test_prefix_lm_rows_match_seqio_prefix_lm_converter():
  """decoding.prefix_lm_rows makes the rows seqio's PrefixLMFeatureConverter makes."""
  import seqio
  import tensorflow as tf

  inputs = np.array([[9, 4, 6, 1, 0, 0], [3, 1, 0, 0, 0, 0]])
  targets = np.array([[3, 9, 1, 0], [5, 6, 7, 1]])
  ds = tf.data.Dataset.from_tensor_slices(
      {'inputs': tf.ragged.constant([[9, 4, 6, 1], [3, 1]]),
       'targets': tf.ragged.constant([[3, 9, 1], [5, 6, 7, 1]])})
  ds = ds.map(lambda ex: {k: v for k, v in ex.items()})
  converted = seqio.PrefixLMFeatureConverter(pack=False)(ds, {'inputs': 6, 'targets': 4})
  ours = decoding.prefix_lm_rows(jnp.asarray(inputs), jnp.asarray(targets))
  for r, ex in enumerate(converted.as_numpy_iterator()):
    for key, value in ex.items():
      np.testing.assert_array_equal(np.asarray(ours[key][r]), value, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def losses(result):
  return np.array([h['loss'] for h in result.history])


def test_mod_pretraining_on_the_decoder_only_model_lowers_the_loss(tmp_path):
  """The MoD task through PrefixLMFeatureConverter (packed), 40 steps on one batch."""
  batch = next(data_lib.HostBatches(data_lib.make_datasets(
      data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS, batch_size=8), 'train', 0,
      repeat=True, shuffle=False, architecture='decoder_only')))
  assert batch['decoder_target_tokens'].shape == (8, 128)
  assert batch['decoder_causal_attention'].any() and not batch['decoder_loss_weights'].all()
  result = train_setup.run(str(tmp_path), steps=40, model=TINY,
                           batches=iter(lambda: batch, None))
  history = losses(result)
  assert history[-1] < 0.5 * history[0], history


def test_causal_lm_task_trains_the_decoder_only_model(tmp_path):
  result = train_setup.run(str(tmp_path), steps=4, model=TINY, task='causal_lm_gutenberg',
                           lengths={'targets': 64}, checkpoint_every=4,
                           denoiser_eval_batches=1)
  assert np.isfinite(losses(result)).all()
  assert result.history[0]['target_tokens'] > 0.9 * 8 * 64  # every token in the loss
  # The causal LM is measured on the same per-denoiser streams as the MoD models (its rows
  # of 64 hold 32 + 32 tokens of inputs and targets).
  last = result.denoiser_history[-1]
  assert {'denoiser/S(uniform)/loss', 'mode/[NLG]/loss'} <= set(last)
  assert all(np.isfinite(v) for v in last.values())


def test_decoder_only_resume_is_exact(tmp_path):
  model = dataclasses.replace(TINY, dropout_rate=0.1)
  straight = train_setup.run(str(tmp_path / 'straight'), steps=4, model=model,
                             checkpoint_every=2)
  train_setup.run(str(tmp_path / 'resumed'), steps=2, model=model, checkpoint_every=2)
  second = train_setup.run(str(tmp_path / 'resumed'), steps=4, model=model, checkpoint_every=2)
  assert second.start_step == 2
  np.testing.assert_array_equal(losses(second), losses(straight)[2:])
  for x, y in zip(jax.tree.leaves(second.state), jax.tree.leaves(straight.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_decoder_only_on_eight_devices_trains_as_on_one(tmp_path):
  reference = losses(train_setup.run(str(tmp_path / 'one'), steps=3, model=TINY,
                                     devices=jax.devices()[:1]))
  for name, mesh in (('8x1', partitioning.MeshConfig(data=8, model=1)),
                     ('2x4_2d', partitioning.MeshConfig(data=2, model=4,
                                                        parameter_partitioning_dims=2))):
    result = train_setup.run(str(tmp_path / name), steps=3, model=TINY, mesh=mesh)
    np.testing.assert_allclose(losses(result), reference, rtol=1e-5, err_msg=name)


def test_an_encoder_decoder_refuses_a_causal_lm_task(tmp_path):
  with pytest.raises(ValueError, match="no 'inputs': an encoder-decoder needs inputs"):
    train_setup.run(str(tmp_path), steps=1, task='causal_lm_gutenberg',
                    lengths={'targets': 64})


def test_hf_export_says_there_is_no_hf_class():
  with pytest.raises(ValueError, match='no T5-style relative-position decoder-only class'):
    interop.hf_config(CFG)


# ---------------------------------------------------------------------------------------------
# Checkpoints and the scripts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('layout', ['tensorstore', 'orbax'])
def test_t5x_decoder_only_checkpoint_round_trip(tmp_path, layout):
  """T5X's layout of a decoder-only model: `target/decoder/...`, read back bitwise; an
  encoder-decoder config refuses it naming what is missing."""
  params = params_of(seed=8)
  folder = interop.save_t5x(params, CFG, str(tmp_path), 3, layout=layout)
  assert folder.endswith('checkpoint_3')
  back = interop.load_t5x(str(tmp_path), CFG)
  flat, flat_back = network.flatten_params(params), network.flatten_params(back)
  assert sorted(flat_back) == T5X_NAMES
  for name in flat:
    np.testing.assert_array_equal(np.asarray(flat_back[name]), np.asarray(flat[name]))
  encoder_decoder = dataclasses.replace(CFG, architecture='encoder_decoder')
  with pytest.raises(ValueError, match='do not match the model config'):
    interop.load_t5x(str(tmp_path), encoder_decoder)


@pytest.mark.slow
def test_the_same_scripts_pretrain_fine_tune_evaluate_and_export_a_decoder_only_model(
    tmp_path, capsys):
  """MODEL_ARCH='decoder_only' is the only change: train.py pretrains with the MoD, fine-tunes
  on CB (task metrics and best.json on the way), eval.py scores it by decoding and by rank,
  infer.py generates and scores, export_t5x.py writes T5X's layout; export_hf.py refuses."""
  import eval as eval_script
  import export_hf as export_hf_script
  import export_t5x as export_t5x_script
  import infer as infer_script
  import train as train_script

  pretrained, finetuned = tmp_path / 'pretrained', tmp_path / 'finetuned'
  arch = "--gin.MODEL_ARCH='decoder_only'"
  train_script.main([
      '--gin_file=models/tiny.gin', '--gin_file=runs/pretrain.gin', arch,
      "--gin.MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
      '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=8', f"--gin.MODEL_DIR='{pretrained}'",
      '--gin.EVAL_EVERY=2', '--gin.train.TrainConfig.eval_batches=1'])
  assert json.loads((pretrained / 'model_config.json').read_text())['architecture'] == \
      'decoder_only'
  train_script.main([
      '--gin_file=models/tiny.gin', '--gin_file=runs/finetune.gin', arch,
      "--gin.MIXTURE_OR_TASK_NAME='superglue_cb'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 256, 'targets': 8}",
      f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained}'", '--gin.TRAIN_STEPS=2',
      '--gin.BATCH_SIZE=8', f"--gin.MODEL_DIR='{finetuned}'", '--gin.EVAL_EVERY=2',
      '--gin.METRICS_EVERY=2', '--gin.CHECKPOINT_EVERY=2',
      '--gin.train.TrainConfig.eval_batches=1', '--gin.train.TrainConfig.metrics_examples=8'])
  assert json.loads((finetuned / 'best.json').read_text())['metric'] == 'average'
  capsys.readouterr()
  for method in ('decode', 'rank'):
    results, _ = eval_script.main([
        '--checkpoint', str(finetuned), '--tasks', 'cb', '--method', method,
        '--inputs_length', '256', '--targets_length', '8', '--batch_size', '8',
        '--max_examples', '8'])
    assert results[0]['examples'] == 8 and 0 <= results[0]['metrics']['accuracy'] <= 100
  text = infer_script.main(['--checkpoint', str(finetuned), '--input', 'Hello there',
                            '--mode', '[S2S]', '--max_length', '5'], out=io.StringIO())
  assert isinstance(text, str)
  value = infer_script.main(['--checkpoint', str(finetuned), '--input', 'Hello there',
                             '--score', 'general Kenobi', '--mode', '[S2S]'], out=io.StringIO())
  assert np.isfinite(float(value)) and float(value) < 0
  export_t5x_script.main(['--checkpoint', str(finetuned), '--output', str(tmp_path / 't5x')])
  params = interop.load_t5x(str(tmp_path / 't5x'), dataclasses.replace(
      TINY, num_decoder_layers=2))
  assert 'token_embedder' in params['decoder'] and 'encoder' not in params
  with pytest.raises(ValueError, match='no T5-style relative-position decoder-only class'):
    export_hf_script.main(['--checkpoint', str(finetuned), '--output', str(tmp_path / 'hf')])
