"""The model directory: one `checkpoints.load` for every folder a user points at, and the layout
a run writes."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_setup
from train_setup import TINY
from ul2 import checkpoints, interop, network


def assert_trees_equal(a, b):
  fa, fb = network.flatten_params(a), network.flatten_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """A 3-step run with checkpoints at steps 2 and 3: (model_dir, final parameters)."""
  path = str(tmp_path_factory.mktemp('run'))
  result = train_setup.run(path, steps=3, checkpoint_every=2, eval_split=None)
  return path, jax.device_get(result.state.params)


def test_a_run_writes_the_documented_layout(model_dir):
  path, _ = model_dir
  assert train_setup.saved_steps(path) == [2, 3]  # T5X's layout: checkpoint_<step>/state/
  assert not os.path.exists(os.path.join(path, checkpoints.CHECKPOINTS))
  step = os.path.join(path, 'checkpoint_3')
  assert sorted(os.listdir(step)) == ['_CHECKPOINT_METADATA', 'commit_success.txt', 'state']
  metadata = json.loads(open(os.path.join(step, '_CHECKPOINT_METADATA')).read())
  assert metadata['custom_metadata'] == {'writer': 'ul2'}
  assert sorted(os.listdir(os.path.join(path, checkpoints.DATA))) == [
      '2', '3', checkpoints.MANIFESTS_MARKER]
  assert not os.path.exists(os.path.join(path, checkpoints.LEASE))  # released at the end
  assert sorted(os.listdir(os.path.join(path, checkpoints.DATA, '3'))) == [
      'process_0.data-00000-of-00001', 'process_0.index', 'process_0.layout.json',
      'process_0.manifest.json']
  saved = json.loads(open(os.path.join(path, checkpoints.MODEL_CONFIG)).read())
  assert network.Config(**saved) == TINY


def test_every_way_to_name_a_run_loads_its_latest_parameters(model_dir):
  path, params = model_dir
  for name in (path, os.path.join(path, 'checkpoint_3'), os.path.join(path, 'checkpoint_3',
                                                                     'state')):
    loaded, config = checkpoints.load(name)
    assert config == TINY, name
    assert_trees_equal(loaded, params)
  older, _ = checkpoints.load(os.path.join(path, 'checkpoint_2'))
  assert not np.array_equal(older['encoder']['encoder_norm']['scale'],
                            params['encoder']['encoder_norm']['scale'])


def test_a_scanned_config_gets_scanned_parameters(model_dir):
  """Checkpoints hold per-layer names; `load` hands back the layout the config asks for."""
  path, params = model_dir
  scanned = dataclasses.replace(TINY, scan_layers=True)
  loaded, config = checkpoints.load(path, scanned)
  assert config == scanned
  assert loaded['encoder']['layers']['mlp']['wo']['kernel'].shape[0] == TINY.num_encoder_layers
  assert_trees_equal(loaded, network.stack_layers(params, scanned))


def test_exported_formats_load_through_the_same_function(model_dir, tmp_path):
  path, params = model_dir
  interop.save_hf(params, TINY, str(tmp_path / 'hf'))
  loaded, config = checkpoints.load(str(tmp_path / 'hf'))
  assert config == TINY
  assert_trees_equal(loaded, params)
  t5x = interop.save_t5x(params, TINY, str(tmp_path / 't5x'), 3)
  loaded, config = checkpoints.load(t5x, TINY)
  assert_trees_equal(loaded, params)
  with pytest.raises(FileNotFoundError, match='--gin_file=models/<size>.gin'):
    checkpoints.load(t5x)  # a T5X folder says nothing about the network
  ocp.PyTreeCheckpointer().save(str(tmp_path / 'checkpoint_3'), {'target': params})
  assert_trees_equal(checkpoints.load(str(tmp_path / 'checkpoint_3'), TINY)[0], params)


def test_the_wrong_config_or_a_missing_folder_is_refused(model_dir, tmp_path):
  path, _ = model_dir
  with pytest.raises(ValueError, match='parameters do not match the model config'):
    checkpoints.load(path, dataclasses.replace(TINY, mlp_dim=128))
  with pytest.raises(FileNotFoundError, match='No checkpoint at'):
    checkpoints.load(str(tmp_path / 'nowhere'))


def test_load_model_is_ready_for_inference(model_dir):
  path, params = model_dir
  model, loaded = checkpoints.load_model(path, dataclasses.replace(TINY, dropout_rate=0.1))
  assert model.config == TINY  # dropout off
  assert_trees_equal(loaded, params)


def test_best_parameters_round_trip(tmp_path):
  params = network.init_params(TINY, jax.random.key(3))
  assert checkpoints.read_best(str(tmp_path)) is None
  checkpoints.write_model_config(str(tmp_path), TINY)
  record = checkpoints.save_best(str(tmp_path), 7, 'accuracy', {'accuracy': 75.0, 'f1': 60.0},
                                 params, TINY, {'method': 'decode', 'mode': '[NLU]'})
  assert record == checkpoints.read_best(str(tmp_path)) == {
      'step': 7, 'metric': 'accuracy', 'value': 75.0,
      'metrics': {'accuracy': 75.0, 'f1': 60.0},
      'selection': {'method': 'decode', 'mode': '[NLU]'}}
  assert checkpoints.read_best(str(tmp_path / checkpoints.BEST)) == record
  loaded, config = checkpoints.load(str(tmp_path / checkpoints.BEST))
  assert config == TINY
  assert_trees_equal(loaded, params)


def test_checkpoints_docstring_examples():
  import doctest
  result = doctest.testmod(checkpoints)
  assert result.attempted >= 5 and result.failed == 0


def other_run(heartbeat_age_s=0.0):
  import time
  return json.dumps({'host': 'host-b', 'pid': 4242, 'started': 1.0,
                     'heartbeat': time.time() - heartbeat_age_s})


def test_a_lease_on_a_url_is_read_back_and_the_overwritten_racer_refuses(tmp_path):
  """gfile has no create-if-absent: of two runs that both found no lease, the one whose record
  is overwritten within the settle time refuses, naming the other."""
  import threading
  url = f'file://{tmp_path}'
  lease = checkpoints.Lease(url, settle_s=1.0)
  outcome = {}
  racer = threading.Thread(target=lambda: outcome.setdefault('error', _refusal(lease)))
  racer.start()
  path = tmp_path / checkpoints.LEASE
  while not (path.exists() and path.read_text()):
    pass
  path.write_text(other_run())  # the other run writes just after us
  racer.join()
  assert str(outcome['error']).startswith(
      f'{url} is being written by process 4242 on host-b (heartbeat 1 s ago)'), outcome
  assert json.loads(path.read_text())['host'] == 'host-b' and not lease.held


def _refusal(lease):
  try:
    lease.acquire()
  except checkpoints.CheckpointError as e:
    return e
  return None


def test_a_run_whose_lease_another_run_took_stops_and_leaves_it(tmp_path):
  """Two writes further apart than the settle time both pass; each heartbeat reads the lease
  first, and the run that finds another's record stops at its next step (`check`) without
  overwriting it or removing it when it ends."""
  import time
  url = f'file://{tmp_path}'
  lease = checkpoints.Lease(url, heartbeat_s=0.05, settle_s=0.0).acquire()
  lease.check()  # ours: nothing to say
  (tmp_path / checkpoints.LEASE).write_text(other_run())
  deadline = time.time() + 30
  while lease.lost is None and time.time() < deadline:
    time.sleep(0.05)
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf'^{url} is now written by process 4242 on host-b, which took the '
                           'lease; this run stops'):
    lease.check()
  lease.release()
  assert json.loads((tmp_path / checkpoints.LEASE).read_text())['pid'] == 4242


# ---------------------------------------------------------------------------------------------
# Two layouts: T5X's (what runs write) and the earlier checkpoints/<step>
# ---------------------------------------------------------------------------------------------

def earlier_layout_run(path, steps, monkeypatch, **kwargs):
  """A run writing model_dir/checkpoints/<step>/ ({'step', 'params', 'opt_state'}), as ul2
  did before it wrote T5X's layout: the same writer, told the model_dir is of that layout."""
  with monkeypatch.context() as m:
    m.setattr(checkpoints, '_t5x_layout', lambda model_dir: False)
    return train_setup.run(str(path), steps=steps, eval_split=None, **kwargs)


def test_a_model_dir_of_the_earlier_layout_loads_and_resumes_in_it(tmp_path, monkeypatch):
  path = tmp_path / 'run'
  first = earlier_layout_run(path, 2, monkeypatch, checkpoint_every=2)
  assert os.listdir(path / checkpoints.CHECKPOINTS) == ['2']
  loaded, _ = checkpoints.load(str(path))
  assert_trees_equal(loaded, jax.device_get(first.state.params))
  assert checkpoints.read_optimizer_state(str(path))[1] == 2
  resumed = train_setup.run(str(path), steps=4, checkpoint_every=2, eval_split=None)
  assert resumed.start_step == 2
  assert sorted(os.listdir(path / checkpoints.CHECKPOINTS)) == ['2', '4']
  assert train_setup.saved_steps(path) == []  # the model_dir keeps its layout
  straight = train_setup.run(str(tmp_path / 'straight'), steps=4, eval_split=None)
  assert_trees_equal(resumed.state.params, straight.state.params)


def test_two_kinds_of_checkpoint_in_one_model_dir_are_named_never_picked(tmp_path, monkeypatch):
  """T5X pointed at a model_dir of the earlier layout trains from scratch and writes
  checkpoint_<step> beside checkpoints/<step>: loading or resuming names both."""
  path = tmp_path / 'run'
  first = earlier_layout_run(path, 2, monkeypatch, checkpoint_every=2)
  interop.save_t5x(jax.device_get(first.state.params), TINY, str(path), 6, layout='orbax')
  both = (rf'{path} holds two kinds of checkpoints: {path}/checkpoints/2 \(ul2\'s earlier '
          rf'layout, steps \[2\]\) and {path}/checkpoint_6 \(T5X\'s layout, steps \[6\]')
  for call in (lambda: checkpoints.load(str(path)),
               lambda: checkpoints.read_optimizer_state(str(path)),
               lambda: checkpoints.resolve_checkpoint(str(path)),
               lambda: train_setup.run(str(path), steps=4, eval_split=None)):
    with pytest.raises(checkpoints.CheckpointError, match=both):
      call()
  # Each step folder named on its own still loads.
  assert checkpoints.load(str(path / 'checkpoint_6'), TINY)[0].keys() == first.state.params.keys()
  assert_trees_equal(checkpoints.load(str(path / 'checkpoints' / '2'))[0],
                     jax.device_get(first.state.params))


def test_a_step_another_trainer_wrote_resumes_with_a_warning(tmp_path):
  """T5X resumed a run and wrote checkpoint_4 (no ul2 metadata, no manifest, no input
  position): ul2 resumes from it, says it cannot verify it and that the input restarts, and
  takes its parameters, optimizer state and step as they are."""
  path = tmp_path / 'run'
  lines = []
  first = train_setup.run(str(path), steps=2, checkpoint_every=2, eval_split=None)
  params, opt_state = jax.device_get((first.state.params, first.state.opt_state))
  moved = jax.tree.map(lambda x: x * 1.5, params)  # what T5X's two steps would have done
  interop.save_t5x(moved, TINY, str(path), 4, opt_state, layout='orbax')
  resumed = train_setup.run(str(path), steps=4, eval_split=None, checkpoint_every=2,
                            log=lines.append)
  assert resumed.start_step == 4
  assert_trees_equal(resumed.state.params, moved)
  assert [l for l in lines if l.startswith('WARNING')] == [
      f'WARNING: {path}/checkpoint_4 was not written by ul2 (no ul2 metadata or manifest: T5X '
      'resumed this run?): its arrays are not verified, and it has no input position, so the '
      'input pipeline starts from its beginning.']
  assert f'Resumed from {path}/checkpoint_4 (step 4).' in lines


def test_a_scanned_runs_resume_through_t5xs_layout_is_exact(tmp_path):
  """2 + 2 steps through a checkpoint equal 4 straight, bitwise, with the model's layers
  scanned: its Adafactor statistics are saved per layer and stacked back (per-layer runs
  resume through the same layout in every other resume test)."""
  model = dataclasses.replace(TINY, scan_layers=True)
  straight = train_setup.run(str(tmp_path / 'straight'), steps=4, model=model, eval_split=None)
  train_setup.run(str(tmp_path / 'run'), steps=2, checkpoint_every=2, model=model,
                  eval_split=None)
  resumed = train_setup.run(str(tmp_path / 'run'), steps=4, checkpoint_every=2, model=model,
                            eval_split=None)
  assert resumed.start_step == 2
  assert_trees_equal(resumed.state.params, straight.state.params)
  for got, want in zip(jax.tree.leaves(resumed.state.opt_state),
                       jax.tree.leaves(straight.state.opt_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
