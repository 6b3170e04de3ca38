"""HF transformers export/import and T5X checkpoint layouts, against the real libraries."""

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
import torch
import transformers

import export_hf
import train_setup
from ul2 import checkpoints, decoding, interop, losses, network
from ul2 import data as data_lib

BASE = network.Config(vocab_size=512, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                      num_encoder_layers=2, num_decoder_layers=2)
VARIANTS = {
    'gelu_untied': BASE,
    'silu_tied': dataclasses.replace(BASE, mlp_activations=('silu', 'linear'),
                                     logits_via_embedding=True),
    'unequal_depths_wide_heads': dataclasses.replace(BASE, num_encoder_layers=3,
                                                     num_decoder_layers=1, num_heads=2,
                                                     head_dim=24),
}


def init(cfg, seed=0):
  return jax.tree.map(np.asarray, network.init_params(cfg, jax.random.key(seed)))


def batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(3, 11))
  enc[0, 7:] = 0
  targets = rng.integers(2, vocab, size=(3, 9))
  return enc, targets, np.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def hf_logits(directory, enc, dec_in):
  model = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec_in)).logits.numpy()


def assert_trees_equal(a, b):
  fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize('name', list(VARIANTS))
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, name):
  cfg = VARIANTS[name]
  params = init(cfg)
  interop.save_hf(params, cfg, str(tmp_path))
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['feed_forward_proj'] == ('gated-silu' if 'silu' in name else 'gated-gelu')
  assert saved['tie_word_embeddings'] == cfg.logits_via_embedding
  enc, targets, dec_in = batch(cfg.vocab_size)
  ours = np.asarray(network.Transformer(cfg).apply({'params': params}, enc, dec_in, targets))
  theirs = hf_logits(str(tmp_path), enc, dec_in)
  assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
  if not cfg.logits_via_embedding:
    # transformers 5.x reads tie_word_embeddings false as "T5 v1.1: no decoder-output
    # scaling" and sets the flag itself back to True; the weights stay untied (they differ),
    # hence its warning: harmless, as the logits above show (docs/interop.md).
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path))
    assert model.config.scale_decoder_outputs is False
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
  # The tokenizer files load too, with the 100 sentinels at the top of the vocabulary.
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tokenizer.convert_tokens_to_ids('<extra_id_0>') == 32099


@pytest.mark.parametrize('name', list(VARIANTS))
def test_import_of_export_is_bitwise_identity(tmp_path, name):
  cfg = VARIANTS[name]
  params = init(cfg, seed=1)
  interop.save_hf(params, cfg, str(tmp_path))
  loaded, loaded_cfg = interop.load_hf(str(tmp_path))
  assert loaded_cfg == dataclasses.replace(cfg, dropout_rate=0.0)
  assert_trees_equal(loaded, params)
  # eval.py / infer.py: the config from config.json alone, the weights read once.
  model, eval_params = checkpoints.load_model(str(tmp_path))
  assert model.config == loaded_cfg
  assert_trees_equal(eval_params, params)


def test_scanned_parameters_export_like_per_layer_ones(tmp_path):
  cfg = dataclasses.replace(BASE, scan_layers=True)
  per_layer = init(BASE)
  tensors = interop.to_hf_state_dict(network.stack_layers(per_layer, cfg), cfg)
  for name, value in interop.to_hf_state_dict(per_layer, BASE).items():
    np.testing.assert_array_equal(tensors[name], value)


def test_hf_generate_equals_our_greedy_decoding(tmp_path):
  cfg = BASE
  params = init(cfg, seed=2)
  # Make EOS likely so that some rows stop early and padding after EOS is compared too.
  kernel = params['decoder']['logits_dense']['kernel']
  params['decoder']['logits_dense']['kernel'] = kernel * np.where(np.arange(512) == 1, 4.0, 1.0)
  interop.save_hf(params, cfg, str(tmp_path))
  enc, _, _ = batch(cfg.vocab_size, seed=3)
  ours = np.asarray(decoding.greedy(network.Transformer(cfg), params, jnp.asarray(enc), 10))
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                            max_new_tokens=10, do_sample=False, num_beams=1).numpy()
  theirs = theirs[:, 1:]  # drop the decoder start token
  theirs = np.pad(theirs, ((0, 0), (0, 10 - theirs.shape[1])))
  np.testing.assert_array_equal(ours, theirs)
  assert (ours == 1).any()


def write_t5x_tensorstore_checkpoint(params, directory, step):
  """T5X's older layout, written here directly with tensorstore (independent of interop):
  checkpoint_N/checkpoint (msgpack with a tensorstore spec per array) + target.<path>/ zarr."""
  out = os.path.join(directory, f'checkpoint_{step}')
  specs = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    name = 'target.' + '.'.join(path)
    store = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                   'path': os.path.join(out, name)}},
                    create=True, dtype=ts.float32, shape=value.shape,
                    chunk_layout=ts.ChunkLayout(chunk_shape=value.shape)).result()
    store.write(np.asarray(value, np.float32)).result()
    specs[path] = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': name}}
  state = {'optimizer': {'target': flax.traverse_util.unflatten_dict(specs),
                         'state': {'step': np.int32(step), 'param_states': {}}}}
  with open(os.path.join(out, 'checkpoint'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(state))
  return out


def test_t5x_tensorstore_layout_loads(tmp_path):
  params = init(BASE, seed=4)
  path = write_t5x_tensorstore_checkpoint(params, str(tmp_path), 1000)
  assert os.path.isdir(os.path.join(path, 'target.encoder.layers_0.attention.key.kernel'))
  assert_trees_equal(interop.load_t5x(path, BASE), params)
  # Our writer produces the same layout, read back bitwise.
  ours = interop.save_t5x(params, BASE, str(tmp_path / 'ours'), 7)
  assert_trees_equal(interop.load_t5x(ours, BASE), params)


def test_t5x_orbax_layout_loads(tmp_path):
  import orbax.checkpoint as ocp
  params = init(BASE, seed=5)
  ocp.PyTreeCheckpointer().save(str(tmp_path / 'checkpoint_5'),
                                {'target': params, 'state': {'step': np.int32(5)}})
  assert_trees_equal(interop.load_t5x(str(tmp_path / 'checkpoint_5'), BASE), params)


def test_a_mismatched_checkpoint_is_refused(tmp_path):
  params = init(BASE)
  path = write_t5x_tensorstore_checkpoint(params, str(tmp_path), 1)
  with pytest.raises(ValueError, match='do not match the model config'):
    interop.load_t5x(path, dataclasses.replace(BASE, mlp_dim=128))
  with pytest.raises(FileNotFoundError, match='config.json'):
    interop.load_hf(str(tmp_path))


def test_training_starts_from_hf_weights_and_exports_back(tmp_path):
  """init_from an HF directory -> the first step's loss is the loaded weights' loss; the
  trained checkpoint exports through the CLI and transformers reproduces its logits."""
  cfg = train_setup.TINY
  params = init(cfg, seed=6)
  interop.save_hf(params, cfg, str(tmp_path / 'hf_in'))
  fixed = next(iter(data_lib.HostBatches(data_lib.make_datasets(
      data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS, batch_size=8),
      'train', 0, repeat=True, shuffle=False))))
  logits = network.Transformer(cfg).apply({'params': params}, **network.model_inputs(fixed))
  sums = losses.loss_sums(logits, fixed['decoder_target_tokens'],
                                 fixed['decoder_loss_weights'], 1e-4)
  expected = float((sums['cross_entropy'] + sums['z_loss']) / sums['weight'])

  def repeat():
    while True:
      yield fixed

  model_dir = tmp_path / 'run'
  result = train_setup.T.train(
      model=cfg, data=data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS,
                                          batch_size=8, eval_split=None),
      run=train_setup.T.TrainConfig(str(model_dir), steps=2, progress_bar=False,
                                    init_from=str(tmp_path / 'hf_in'), checkpoint_every=2),
      optimizer=train_setup.OPTIMIZER, batches=repeat(), log=lambda _: None)
  assert result.history[0]['loss'] == pytest.approx(expected, rel=1e-5)
  # Synthetic batches do not checkpoint; train on the task to get one, from the same weights.
  train_setup.T.train(
      model=cfg, data=data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS,
                                          batch_size=8, eval_split=None),
      run=train_setup.T.TrainConfig(str(model_dir), steps=2, progress_bar=False,
                                    init_from=str(tmp_path / 'hf_in')),
      optimizer=train_setup.OPTIMIZER, log=lambda _: None)
  export_hf.main(['--checkpoint', str(model_dir), '--output', str(tmp_path / 'hf_out')])
  exported, _ = interop.load_hf(str(tmp_path / 'hf_out'))
  enc, targets, dec_in = batch(cfg.vocab_size, seed=7)
  ours = np.asarray(network.Transformer(cfg).apply({'params': exported}, enc, dec_in, targets))
  assert np.abs(ours - hf_logits(str(tmp_path / 'hf_out'), enc, dec_in)).max() <= 1e-4
  trained, _ = checkpoints.load(str(model_dir), cfg)
  assert_trees_equal(trained, exported)
  assert not np.array_equal(trained['decoder']['logits_dense']['kernel'],
                            params['decoder']['logits_dense']['kernel'])


TRANSFORMERS4 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __import__('sys').executable))), 'transformers4')


@pytest.mark.parametrize('name', ['gelu_untied', 'silu_tied'])
def test_exported_model_loads_in_transformers_4_with_the_same_logits(tmp_path, name):
  """transformers 4.57 (installed beside the venv by scripts/test.sh) in a subprocess."""
  import subprocess
  import sys
  assert os.path.isdir(TRANSFORMERS4), (
      f'{TRANSFORMERS4} is missing: scripts/test.sh installs transformers 4.x there.')
  cfg = VARIANTS[name]
  params = init(cfg, seed=8)
  interop.save_hf(params, cfg, str(tmp_path / 'hf'))
  enc, targets, dec_in = batch(cfg.vocab_size, seed=9)
  np.save(tmp_path / 'enc.npy', enc)
  np.save(tmp_path / 'dec_in.npy', dec_in)
  code = (
      'import sys, numpy as np, torch, transformers\n'
      'assert transformers.__version__.startswith("4."), transformers.__version__\n'
      f'd = "{tmp_path}"\n'
      'enc, dec_in = np.load(d + "/enc.npy"), np.load(d + "/dec_in.npy")\n'
      'm = transformers.T5ForConditionalGeneration.from_pretrained(d + "/hf").eval()\n'
      'with torch.no_grad():\n'
      '  out = m(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),\n'
      '          decoder_input_ids=torch.tensor(dec_in)).logits.numpy()\n'
      'np.save(d + "/logits4.npy", out)\n')
  env = {**os.environ, 'PYTHONPATH': TRANSFORMERS4}
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours = np.asarray(network.Transformer(cfg).apply({'params': params}, enc, dec_in, targets))
  theirs = np.load(tmp_path / 'logits4.npy')
  assert np.abs(ours - theirs).max() <= 1e-4
  # And 5.x gives the same.
  assert np.abs(theirs - hf_logits(str(tmp_path / 'hf'), enc, dec_in)).max() <= 1e-4
