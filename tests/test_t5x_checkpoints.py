"""T5X's checkpoint layouts, against checkpoints T5X's own code wrote (tests/t5x_reference/:
`t5x.checkpoints.Checkpointer` and `OrbaxCheckpointManagerInterface`, T5X's Adafactor after one
update of a tiny model with our parameter tree): we read them from every path T5X users give,
and what we write has T5X's layout entry for entry."""

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import export_t5x
import train_setup
from ul2 import checkpoints, interop, network
from ul2 import train as T

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 't5x_reference',
                        'fixtures')
# The model of the fixtures (make_fixtures.py): embedding and logits are factored.
CFG = network.Config(vocab_size=128, emb_dim=128, num_heads=2, head_dim=8, mlp_dim=32,
                     num_encoder_layers=2, num_decoder_layers=1)
TENSORSTORE = os.path.join(FIXTURES, 'tensorstore')
ORBAX = os.path.join(FIXTURES, 'orbax')


def t5x_params():
  """The parameters T5X saved (its state after the update), as written beside them."""
  saved = np.load(os.path.join(FIXTURES, 'params.npz'))
  return {name: saved[name] for name in saved.files}


def assert_close_to_saved(got, want, rtol, err_msg=''):
  """`got` within `rtol` of T5X's saved `want`, per entry or of the array's largest magnitude.

  Our Adafactor against T5X's on another CPU: a few float32 ulps apart, which is a large
  relative error only for entries near zero, so the absolute bound scales with the array."""
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max(),
                             err_msg=err_msg)


def assert_params(tree, rtol=0.0):
  got, want = network.flatten_params(tree), t5x_params()
  assert got.keys() == want.keys()
  for name, value in want.items():
    assert_close_to_saved(got[name], value, rtol, err_msg=name)


def msgpack(checkpoint_dir):
  with open(os.path.join(checkpoint_dir, 'checkpoint'), 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


@pytest.mark.parametrize('path', [
    TENSORSTORE, os.path.join(TENSORSTORE, 'checkpoint_1'),
    ORBAX, os.path.join(ORBAX, 'checkpoint_1'), os.path.join(ORBAX, 'checkpoint_1', 'state'),
], ids=['tensorstore_model_dir', 'tensorstore_checkpoint', 'orbax_model_dir',
        'orbax_checkpoint', 'orbax_state'])
def test_checkpoints_t5x_wrote_load_bitwise_from_every_path(path):
  params, config = checkpoints.load(path, CFG)
  assert config == CFG
  assert_params(params)


def test_a_t5x_checkpoint_of_another_architecture_names_the_difference():
  one_layer = dataclasses.replace(CFG, num_encoder_layers=1)  # the checkpoint has layers_1
  with pytest.raises(ValueError, match=r"not in the model \(e\.g\. \['encoder/layers_1/"
                                       r".*--ignore_extra_params"):
    checkpoints.load(TENSORSTORE, one_layer)
  params, _ = checkpoints.load(TENSORSTORE, one_layer, ignore_extra=True)
  assert 'layers_1' not in params['encoder']
  with pytest.raises(ValueError, match=r"missing \(e\.g\. \['decoder/layers_1/"):
    checkpoints.load(ORBAX, dataclasses.replace(CFG, num_decoder_layers=2))
  with pytest.raises(FileNotFoundError, match='--gin_file'):
    checkpoints.load(TENSORSTORE)  # a T5X checkpoint has no model config inside


def our_state_after_t5x_update():
  """Our parameters and Adafactor state after the update the fixture's T5X state had: from
  the same initial parameters, gradient 0.01 everywhere, learning rate 0.01."""
  params = network.init_params(CFG, jax.random.key(0))
  tx, _ = T.make_optimizer(T.OptimizerConfig(schedule='constant', learning_rate=0.01,
                                             warmup_steps=0), 10, CFG)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(lambda x: jnp.full_like(x, 0.01), params), state,
                             params)
  return jax.tree.map(jnp.add, params, updates), state


def test_our_tensorstore_checkpoint_has_t5xs_layout(tmp_path):
  """Entry for entry what T5X's Checkpointer wrote: version 3, the same tree, the same zarr
  specs (driver, dtype, relative path, chunks, gzip level 1) and the same inline entries (step,
  factored statistics, placeholders); the same files with the same .zarray metadata; equal
  values (float32 rounding: our Adafactor against T5X's)."""
  params, opt_state = our_state_after_t5x_update()
  assert_params(params, rtol=1e-6)
  ours = interop.save_t5x(params, CFG, str(tmp_path), 1, opt_state)
  theirs = os.path.join(TENSORSTORE, 'checkpoint_1')
  assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
  ours_tree, theirs_tree = msgpack(ours), msgpack(theirs)
  assert ours_tree['version'] == theirs_tree['version'] == 3
  is_spec = lambda _, x: isinstance(x, dict) and 'driver' in x
  flat_ours = flax.traverse_util.flatten_dict(ours_tree['optimizer'], is_leaf=is_spec)
  flat_theirs = flax.traverse_util.flatten_dict(theirs_tree['optimizer'], is_leaf=is_spec)
  assert flat_ours.keys() == flat_theirs.keys()
  for key, value in flat_theirs.items():
    if isinstance(value, dict):  # a tensorstore spec
      assert flat_ours[key] == value, key
    else:
      assert np.asarray(flat_ours[key]).dtype == value.dtype, key
      assert_close_to_saved(flat_ours[key], value, 1e-6, err_msg=str(key))
  for name in os.listdir(theirs):
    if name == 'checkpoint':
      continue
    zarray = lambda d: json.loads(open(os.path.join(d, name, '.zarray')).read())
    assert zarray(ours) == zarray(theirs), name
  # What T5X reads back (the tree its loader sees) equals what it wrote, to rounding.
  want = t5x_params()['decoder/logits_dense/kernel']
  for path in (str(tmp_path), ours):
    assert_close_to_saved(
        network.flatten_params(checkpoints.load(path, CFG)[0])['decoder/logits_dense/kernel'],
        want, 1e-6)


def test_our_orbax_checkpoint_has_t5xs_layout(tmp_path):
  """As T5X's Orbax manager lays it out: checkpoint_<step>/state/ holding {'target', 'state':
  {'step', 'param_states'}} with T5X's shapes, and _CHECKPOINT_METADATA naming the item."""
  params, opt_state = our_state_after_t5x_update()
  out = interop.save_t5x(params, CFG, str(tmp_path), 1, opt_state, layout='orbax')
  assert out == str(tmp_path / 'checkpoint_1')
  metadata = lambda d: json.loads(open(os.path.join(d, '_CHECKPOINT_METADATA')).read())
  theirs = os.path.join(ORBAX, 'checkpoint_1')
  assert (metadata(out)['item_handlers']['state']
          == metadata(theirs)['item_handlers']['state'])
  shapes = lambda d: {k: tuple(v.shape) for k, v in network.flatten_params(
      interop.read_orbax_tree(os.path.join(d, 'state'))).items()}
  assert shapes(out) == shapes(theirs)
  assert_params(checkpoints.load(str(tmp_path), CFG)[0], rtol=1e-6)


def test_a_runs_own_checkpoint_is_what_t5xs_orbax_manager_writes(tmp_path):
  """The state T5X saved in fixtures/orbax (one update of T5X's Adafactor) and the same state
  saved by a run's own `Checkpoints`: the same step folder, item and handler, the same tree
  (names, shapes, dtypes: 'target', 'state/step', 'state/param_states/.../{m,v,v_col,v_row}'),
  values to float32 rounding (our Adafactor against T5X's). That is what T5X's trainer reads
  when it resumes a ul2 model_dir (tests/t5x_reference/check_t5x_resume.sh)."""
  from ul2 import data as data_lib
  params, opt_state = our_state_after_t5x_update()
  saver = checkpoints.Checkpoints(str(tmp_path), CFG, keep=3)
  saver.save(1, T.TrainState(jnp.asarray(1, jnp.int32), params, opt_state),
             data_lib.HostBatches([]))
  saver.close()
  ours, theirs = tmp_path / 'checkpoint_1', os.path.join(ORBAX, 'checkpoint_1')
  metadata = lambda d: json.loads(open(os.path.join(d, '_CHECKPOINT_METADATA')).read())
  assert (metadata(ours)['item_handlers']['state']
          == metadata(theirs)['item_handlers']['state'])
  assert sorted(os.listdir(ours / 'state')) == sorted(
      os.listdir(os.path.join(theirs, 'state')))  # ocdbt: the same files
  flat = lambda d: network.flatten_params(interop.read_orbax_tree(os.path.join(d, 'state')))
  got, want = flat(ours), flat(theirs)
  assert got.keys() == want.keys()
  assert 'state/param_states/encoder/layers_0/mlp/wi_0/kernel/v_row' in want
  for name, value in want.items():
    assert (np.asarray(got[name]).shape, np.asarray(got[name]).dtype) == (
        value.shape, value.dtype), name
    assert_close_to_saved(got[name], value, 1e-6, err_msg=name)


def test_export_t5x_writes_a_run_as_a_t5x_model_dir(tmp_path):
  """A run of ours (parameters, step, Adafactor state) through the CLI, in both layouts."""
  run_dir = tmp_path / 'run'
  result = train_setup.run(str(run_dir), steps=2, checkpoint_every=2, eval_split=None)
  for layout in ('tensorstore', 'orbax'):
    out = tmp_path / f't5x_{layout}'
    export_t5x.main(['--checkpoint', str(run_dir), '--output', str(out), '--layout', layout])
    assert os.listdir(out) == ['checkpoint_2']
    params, _ = checkpoints.load(str(out), train_setup.TINY)
    for name, value in network.flatten_params(result.state.params).items():
      np.testing.assert_array_equal(network.flatten_params(params)[name], np.asarray(value))
  tree = msgpack(str(tmp_path / 't5x_tensorstore' / 'checkpoint_2'))['optimizer']
  assert int(tree['state']['step']) == 2
  wi = tree['state']['param_states']['encoder']['layers_0']['mlp']['wi_0']['kernel']
  assert sorted(wi) == ['m', 'v', 'v_col', 'v_row'] and wi['v']['kvstore']['path'] == (
      'state.param_states.encoder.layers_0.mlp.wi_0.kernel.v/')


def test_a_spec_pointing_outside_the_checkpoint_is_refused(tmp_path):
  """A crafted msgpack must not make the loader read files elsewhere: absolute paths and
  paths leaving the folder are named and refused."""
  import shutil
  source = os.path.join(TENSORSTORE, 'checkpoint_1')
  for bad_path in ('/etc/passwd.zarr/', '../outside/', 'target.x/../../../elsewhere/'):
    folder = tmp_path / f'crafted_{len(bad_path)}' / 'checkpoint_1'
    shutil.copytree(source, folder)
    tree = msgpack(str(folder))
    tree['optimizer']['target']['decoder']['decoder_norm']['scale']['kvstore']['path'] = bad_path
    with open(folder / 'checkpoint', 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(tree))
    with pytest.raises(ValueError, match='decoder/decoder_norm/scale points outside the '
                                         'checkpoint folder'):
      checkpoints.load(str(folder), CFG)


def crafted(tmp_path, name):
  import shutil
  folder = tmp_path / name / 'checkpoint_1'
  shutil.copytree(os.path.join(TENSORSTORE, 'checkpoint_1'), folder)
  return folder


def test_symbolic_links_out_of_the_checkpoint_are_refused_like_dot_dot(tmp_path):
  """A link is confined like a path: an array folder, or a chunk file in it, that links
  outside the checkpoint is refused, in both of T5X's tensorstore layouts (specs, and the
  older placeholder leaf beside a target.<name>/ folder); a link inside it is read."""
  import shutil
  scale = 'target.decoder.decoder_norm.scale'
  outside = tmp_path / 'outside'
  shutil.copytree(os.path.join(TENSORSTORE, 'checkpoint_1', scale), outside)

  linked_folder = crafted(tmp_path, 'folder')
  shutil.rmtree(linked_folder / scale)
  os.symlink(outside, linked_folder / scale)
  linked_chunk = crafted(tmp_path, 'chunk')
  os.remove(linked_chunk / scale / '0')
  os.symlink(outside / '0', linked_chunk / scale / '0')
  old_layout = crafted(tmp_path, 'old_layout')  # the spec replaced by T5X's older placeholder
  tree = msgpack(str(old_layout))
  tree['optimizer']['target']['decoder']['decoder_norm']['scale'] = 'target.decoder.decoder_norm.scale'
  with open(old_layout / 'checkpoint', 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(tree))
  assert_params_read = lambda folder: np.testing.assert_array_equal(
      network.flatten_params(checkpoints.load(str(folder), CFG)[0])['decoder/decoder_norm/scale'],
      t5x_params()['decoder/decoder_norm/scale'])
  assert_params_read(old_layout)  # the placeholder layout is read
  shutil.rmtree(old_layout / scale)
  os.symlink(outside, old_layout / scale)

  for folder in (linked_folder, linked_chunk, old_layout):
    with pytest.raises(ValueError, match=r'decoder/decoder_norm/scale .*outside the '
                                         r'checkpoint folder; refusing to read it'):
      checkpoints.load(str(folder), CFG)

  inside = crafted(tmp_path, 'inside')  # a link that stays inside (cp -s) is fine
  os.rename(inside / scale, inside / 'scale_copy')
  os.symlink(inside / 'scale_copy', inside / scale)
  assert_params_read(inside)


def test_a_link_out_of_an_orbax_checkpoint_is_refused(tmp_path):
  import shutil
  folder = tmp_path / 'orbax'
  shutil.copytree(ORBAX, folder)
  data = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if '/d/' in
          os.path.join(d, f)]
  victim = data[0]
  shutil.move(victim, tmp_path / 'elsewhere')
  os.symlink(tmp_path / 'elsewhere', victim)
  with pytest.raises(ValueError, match='outside the checkpoint folder; refusing to read it'):
    checkpoints.load(str(folder), CFG)


def test_exports_refuse_a_non_empty_output_unless_told_to_overwrite(tmp_path, capsys):
  import export_hf
  run_dir = tmp_path / 'run'
  train_setup.run(str(run_dir), steps=1, checkpoint_every=1, eval_split=None)
  out = tmp_path / 'hf'
  out.mkdir()
  (out / 'model-00002-of-00002.safetensors').write_text('a stale shard')
  for script in (export_hf, export_t5x):
    with pytest.raises(SystemExit):
      script.main(['--checkpoint', str(run_dir), '--output', str(out)])
    assert 'is not empty; choose another --output or pass --overwrite' in capsys.readouterr().err
    assert (out / 'model-00002-of-00002.safetensors').exists()  # untouched
  export_hf.main(['--checkpoint', str(run_dir), '--output', str(out), '--overwrite'])
  assert sorted(os.listdir(out)) == ['config.json', 'generation_config.json',
                                     'model.safetensors', 'spiece.model',
                                     'tokenizer_config.json']
