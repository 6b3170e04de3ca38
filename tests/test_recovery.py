"""Recovery: damaged checkpoints, non-finite states, failed saves, TensorBoard on resume, and
model directories given as URLs.

Damage is done to real orbax checkpoints on disk (flipped, cut and deleted files, a valid
checkpoint with another step's arrays, an altered input position), the failed save is a real
write error (a file-size limit on a real training process), URLs go through TensorFlow's gfile
(its in-memory ram:// filesystem).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_setup
from train_setup import TINY, saved_steps, step_dir
from ul2 import checkpoints, records
from ul2 import data as data_lib
from ul2 import train as T

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def largest_file(folder):
  files = [p for p in glob.glob(os.path.join(folder, '**'), recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def run_logged(model_dir, steps, **kwargs):
  lines = []
  eval_split = kwargs.pop('eval_split', None)
  optimizer = kwargs.pop('optimizer', train_setup.OPTIMIZER)
  kwargs.setdefault('denoiser_eval_batches', 0)
  result = T.train(
      model=TINY,
      data=data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS, batch_size=8,
                               eval_split=eval_split),
      run=T.TrainConfig(str(model_dir), steps=steps, progress_bar=False, **kwargs),
      optimizer=optimizer, log=lines.append)
  return result, lines


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_damaged_checkpoint_is_moved_aside_and_the_newest_intact_one_resumes(tmp_path):
  """Six checkpoints, five of them damaged in a different way, and an empty step folder: the
  resumed run names each, moves it to quarantine/ (nothing deleted), resumes from step 1 and
  ends with the parameters of the undamaged run, bitwise."""
  model_dir = tmp_path / 'run'
  straight, _ = run_logged(model_dir, 6, checkpoint_every=1, keep_checkpoints=10,
                           async_checkpointing=False)
  ckpt = lambda step: step_dir(model_dir, step)
  assert saved_steps(model_dir) == [1, 2, 3, 4, 5, 6]

  ckpt(7).mkdir()  # an empty step folder (a copy cut short, a stray mkdir)
  # 6: a valid orbax checkpoint holding step 5's arrays: only the manifest can tell.
  shutil.rmtree(ckpt(6) / 'state')
  shutil.copytree(ckpt(5) / 'state', ckpt(6) / 'state')
  with open(largest_file(ckpt(5)), 'r+b') as f:  # 5: 64 bytes flipped in the array data
    f.seek(os.path.getsize(f.name) // 2)
    chunk = f.read(64)
    f.seek(-64, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))
  with open(largest_file(ckpt(4)), 'r+b') as f:  # 4: cut short
    f.truncate(os.path.getsize(f.name) // 3)
  os.remove(largest_file(ckpt(3)))  # 3: a file deleted
  position = model_dir / 'data' / '2' / 'process_0.data-00000-of-00001'
  position.write_bytes(position.read_bytes()[:-8] + bytes(8))  # 2: the input position altered
  sizes = {step: sum(os.path.getsize(p) for p in glob.glob(str(ckpt(step) / '**'),
                                                            recursive=True)) for step in '23456'}

  resumed, lines = run_logged(model_dir, 6, checkpoint_every=1, keep_checkpoints=10,
                              async_checkpointing=False)
  assert resumed.start_step == 1
  assert_trees_equal(resumed.state.params, straight.state.params)
  warnings = [line for line in lines if line.startswith('WARNING: checkpoint step')]
  assert [int(line.split()[3]) for line in warnings] == [7, 6, 5, 4, 3, 2], lines
  assert 'differ from their manifest checksums' in warnings[1]
  assert 'input position file process_0.data-00000-of-00001' in warnings[5]
  assert all(line.count('\n') == 0 and 'quarantine' in line for line in warnings)
  quarantine = model_dir / 'quarantine'
  assert sorted(os.listdir(quarantine)) == ['2', '3', '4', '5', '6', '7']
  for step, size in sizes.items():  # moved whole, not deleted
    moved = glob.glob(str(quarantine / step / 'checkpoints' / '**'), recursive=True)
    assert sum(os.path.getsize(p) for p in moved) == size, step
  assert (quarantine / '2' / 'data' / 'process_0.index').exists()


def test_a_missing_or_malformed_manifest_is_damage_in_a_model_dir_that_writes_them(tmp_path):
  """Step 3's manifest deleted and its arrays altered, step 2's manifest without its
  checksums: both are named, quarantined, and the run resumes from step 1. A model_dir without
  the MANIFESTS marker (checkpoints from before manifests) is read without them."""
  model_dir = tmp_path / 'run'
  straight, _ = run_logged(model_dir, 3, checkpoint_every=1, keep_checkpoints=10,
                           async_checkpointing=False)
  data = model_dir / 'data'
  assert (data / checkpoints.MANIFESTS_MARKER).exists()
  os.remove(data / '3' / 'process_0.manifest.json')
  with open(largest_file(step_dir(model_dir, 3)), 'r+b') as f:
    f.seek(os.path.getsize(f.name) // 2)
    chunk = f.read(64)
    f.seek(-64, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))
  (data / '2' / 'process_0.manifest.json').write_text('{"step": 2}')
  resumed, lines = run_logged(model_dir, 3, checkpoint_every=1, keep_checkpoints=10,
                              async_checkpointing=False)
  warnings = [line for line in lines if line.startswith('WARNING: checkpoint step')]
  assert len(warnings) == 2 and 'manifest' in warnings[0] and 'is missing' in warnings[0]
  assert 'is malformed' in warnings[1], warnings
  assert resumed.start_step == 1 and sorted(os.listdir(model_dir / 'quarantine')) == ['2', '3']
  assert_trees_equal(resumed.state.params, straight.state.params)

  # Before manifests: no marker, no manifest: the newest step is read as it is.
  os.remove(data / checkpoints.MANIFESTS_MARKER)
  os.remove(data / '3' / 'process_0.manifest.json')
  again, lines = run_logged(model_dir, 3, checkpoint_every=1, keep_checkpoints=10,
                            async_checkpointing=False)
  assert again.start_step == 3 and not [l for l in lines if l.startswith('WARNING')]


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_and_another_model_is_not_damage(tmp_path):
  model_dir = tmp_path / 'run'
  run_logged(model_dir, 2, checkpoint_every=2, async_checkpointing=False)
  other = TINY.__class__(**{**TINY.__dict__, 'mlp_dim': 96})
  config = data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS, batch_size=8,
                               eval_split=None)
  with pytest.raises(checkpoints.CheckpointError, match=r'step 2 .* holds another model .*'
                     r'mlp.*\(32, 64\).*\(32, 96\)'):
    T.train(model=other, data=config, run=T.TrainConfig(str(model_dir), steps=4),
            optimizer=train_setup.OPTIMIZER, log=lambda _: None)
  assert saved_steps(model_dir) == [2]  # a config mistake moves nothing

  os.remove(largest_file(step_dir(model_dir, 2)))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'No intact checkpoint .*: steps \[2\] are damaged .*quarantine'):
    run_logged(model_dir, 4)
  assert os.listdir(model_dir / 'quarantine') == ['2']


@pytest.mark.slow
def test_the_step_a_run_resumed_from_is_kept_until_enough_newer_ones_exist(tmp_path):
  """keep_checkpoints=2: the step resumed from stays while fewer than 2 newer steps exist,
  and goes once they do; resumes never leave more than 2 behind."""
  model_dir = tmp_path / 'run'
  steps = lambda: saved_steps(model_dir)
  run_logged(model_dir, 2, checkpoint_every=2, keep_checkpoints=2)
  run_logged(model_dir, 4, checkpoint_every=2, keep_checkpoints=2)
  assert steps() == [2, 4]
  run_logged(model_dir, 6, checkpoint_every=2, keep_checkpoints=1)
  assert steps() == [6]  # resumed from 4: kept until step 6 existed, then rotated out
  run_logged(model_dir, 12, checkpoint_every=2, keep_checkpoints=2)
  assert steps() == [10, 12]
  # One step too many, as a kill between a save's commit and the rotation leaves them: the
  # next run trims them when it resumes, before it saves anything (here it has nothing to do).
  run_logged(model_dir, 16, checkpoint_every=2, keep_checkpoints=3)
  assert steps() == [12, 14, 16]
  run_logged(model_dir, 16, checkpoint_every=2, keep_checkpoints=2)
  assert steps() == [14, 16]
  assert sorted(int(s) for s in os.listdir(model_dir / 'data') if s.isdigit()) == [14, 16]


# ---------------------------------------------------------------------------------------------
# Non-finite states
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_non_finite_state_is_never_saved(tmp_path):
  """A learning rate that overflows the parameters: the run stops at the first NaN loss,
  naming it and the last good checkpoint, which stays the latest."""
  model_dir = tmp_path / 'run'
  run_logged(model_dir, 2, checkpoint_every=2, log_every=1)
  exploding = T.OptimizerConfig(schedule='constant', learning_rate=1e38, warmup_steps=0)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'Step \d+: the loss is (nan|inf)') as error:
    run_logged(model_dir, 8, checkpoint_every=1, log_every=1, optimizer=exploding)
  bad = int(re.match(r'Step (\d+)', str(error.value)).group(1))
  assert f'the last good checkpoint is step {bad - 1} in ' in str(error.value)
  saved = saved_steps(model_dir)
  assert saved == list(range(2, bad))
  for step in saved:  # every state saved is finite
    params, _ = checkpoints.load(str(step_dir(model_dir, step)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))

  # The state check itself, without a loss: NaN parameters are refused by `save`.
  compiled = T.compile_run(TINY, T.OptimizerConfig(), T.TrainConfig(str(model_dir), 1),
                           train_setup.partitioning.MeshConfig())
  state = compiled.init(jax.random.key(0))
  state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
  saver = checkpoints.Checkpoints(str(model_dir), TINY, keep=3)
  with pytest.raises(checkpoints.CheckpointError, match='Step 9: the parameters or optimizer '
                     f'state are not finite .* last good checkpoint is step {bad - 1}'):
    saver.save(9, state, data_lib.HostBatches([]))
  assert saver.all_steps() == saved and not (model_dir / 'data' / '9').exists()


@pytest.mark.slow
def test_retention_holds_through_signal_stops_kills_and_resumes(tmp_path):
  """keep_checkpoints=2 through one run's whole life, in real processes: a fresh start, a
  SIGTERM stop, a resume stopped by SIGINT, a resume killed (SIGKILL) after a checkpoint, a
  resume to the end. After each, the directory holds at most 2 steps besides the step that
  process resumed from, and that one only while fewer than 2 newer steps exist; at the end
  exactly the 2 newest. (The step resumed from used to stay for good: 14 of 14 steps were
  kept through such a life.)"""
  import signal
  from test_train import cli_command, cli_env
  model_dir, total, keep = tmp_path / 'run', 400, 2
  command = [a for a in cli_command(model_dir, total) if 'CHECKPOINT_EVERY' not in a] + [
      '--gin.CHECKPOINT_EVERY=3', f'--gin.train.TrainConfig.keep_checkpoints={keep}']

  def saved(folder=None):
    if folder is None:
      return saved_steps(model_dir)
    return sorted(int(n) for n in os.listdir(model_dir / folder) if n.isdigit())

  def check(resumed_from, killed=False):
    steps = saved()
    others = [s for s in steps if s != resumed_from]
    # A kill between a save's commit and the removal of the oldest step leaves one extra.
    assert len(others) <= keep + killed, (steps, resumed_from)
    if resumed_from in steps:
      assert len([s for s in steps if s > resumed_from]) < keep, (steps, resumed_from)
    assert all(s >= min(steps) for s in saved('data')), (saved('data'), steps)

  def run_until(condition, signum):
    """Starts the command, sends `signum` once `condition(step reached)` holds; the step
    it resumed from (None for a fresh run)."""
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    progress, deadline = b'', time.time() + 300
    while time.time() < deadline:
      chunk = proc.stdout.read1(4096)
      progress += chunk
      done = [int(n) for n in re.findall(rb'step (\d+)/%d:' % total, progress)]
      if (done and condition(max(done))) or not chunk:
        break
    assert done and condition(max(done)) and max(done) < total, progress[-500:]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    resumed = re.search(rb'Resumed from \S+ \(step (\d+)\)', progress + out)
    if signum != signal.SIGKILL:
      assert proc.returncode == 0 and b'Stopped by' in out, err[-3000:]
    return int(resumed.group(1)) if resumed else None

  first = run_until(lambda step: step >= 10, signal.SIGTERM)
  assert first is None
  check(None)
  stopped = saved()[-1]  # the stop saved the step it was at
  resumed = run_until(lambda step: step >= stopped + 4, signal.SIGINT)
  assert resumed == stopped
  check(resumed)
  stopped = saved()[-1]
  before_kill = saved()
  resumed = run_until(lambda step: saved()[-1] >= stopped + 6, signal.SIGKILL)
  assert resumed == stopped and saved() != before_kill
  check(resumed, killed=True)
  last = subprocess.run([a.replace(f'TRAIN_STEPS={total}', f'TRAIN_STEPS={saved()[-1] + 9}')
                         for a in command], env=cli_env(), capture_output=True, text=True,
                        timeout=600)
  assert last.returncode == 0, last.stderr[-3000:]
  final = saved()
  assert len(final) == keep and final[-1] == int(re.search(r'TRAIN_STEPS=(\d+)', ' '.join(
      last.args)).group(1)), final


# ---------------------------------------------------------------------------------------------
# A failed save (the disk full, a quota): a real write error in a real training process
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_save_stops_the_run_at_once_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
  """Orbax writes a checkpoint in the background; when that write fails, the run stops at the
  next step boundary (not at the next checkpoint), naming the step that failed, the file and
  the cause, with no traceback; the last good checkpoint is intact and the run resumes."""
  from test_train import cli_command, cli_env
  model_dir = tmp_path / 'run'
  command = [a for a in cli_command(model_dir, 20) if 'CHECKPOINT_EVERY' not in a]
  command.append('--gin.CHECKPOINT_EVERY=20')
  first = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]

  # At most 2,000 KiB per file (`ulimit -f`, what a full quota looks like to a writer): the
  # input position (~1 MB) is written, then orbax's largest array file (~8 MB, in its
  # background thread) fails with EFBIG ("File too large").
  limited = ['bash', '-c', 'ulimit -f 2000 && exec "$@"', 'bash'] + [
      a.replace('TRAIN_STEPS=20', 'TRAIN_STEPS=200') for a in command]
  full = subprocess.run(limited, env=cli_env(), capture_output=True, text=True, timeout=600)
  assert full.returncode == 1
  assert 'Traceback' not in full.stderr and 'ERROR:' not in full.stderr, full.stderr[-3000:]
  lines = full.stderr.strip().splitlines()
  assert [l.startswith('error: ') for l in lines].count(True) == 1, full.stderr[-3000:]
  error = lines[-1]
  assert re.match(rf'error: Saving checkpoint step 40 to {model_dir} failed writing '
                  rf'{model_dir}/checkpoint_40\S*: File too large\. ', error), error
  assert 'the last good checkpoint is step 20 in ' in error, error
  # Stopped a step or a few after 40, when the background write ended (a second, however
  # loaded the machine), not at the next checkpoint (60), where the failure used to surface.
  trained = [json.loads(l)['step'] for l in open(model_dir / 'metrics.jsonl')
             if '"train"' in l]
  assert 40 <= max(trained) < 60, trained
  assert saved_steps(model_dir) == [20]
  assert sorted(os.listdir(model_dir / 'data')) == ['20', 'MANIFESTS']

  again = subprocess.run([a.replace('TRAIN_STEPS=20', 'TRAIN_STEPS=40') for a in command],
                         env=cli_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from' in again.stdout and 'WARNING' not in again.stdout
  assert saved_steps(model_dir) == [20, 40]  # the partial 40 gone
  assert not [n for n in os.listdir(model_dir) if 'tmp' in n]


def test_a_write_error_is_named_by_its_file_and_cause():
  too_large = ValueError(
      'OUT_OF_RANGE: Error writing "opt_state.v_col.x/0" in OCDBT database at local file '
      '"/r/checkpoints/6.orbax-checkpoint-tmp/default/ocdbt.process_0/": Failed writing: '
      '"/r/checkpoints/6.orbax-checkpoint-tmp/default/ocdbt.process_0/d/832b": Failed to write '
      "6041600 bytes to file 7: File too large [os_error_code='27']")
  assert checkpoints._write_cause(too_large) == (
      ' writing /r/checkpoints/6.orbax-checkpoint-tmp/default/ocdbt.process_0/d/832b: File too large')
  tf_error = RuntimeError('{{function_node __wrapped__SaveV2_dtypes_2_device_/job:localhost/'
                          'replica:0/task:0/device:CPU:0}} /r/data/6/process_0_temp/part-0.data;'
                          ' No space left on device [Op:SaveV2]')
  assert checkpoints._write_cause(tf_error) == (
      ' writing /r/data/6/process_0_temp/part-0.data: No space left on device')
  try:
    open('/proc/version/x', 'w')
  except OSError as e:
    assert checkpoints._write_cause(e) == f' writing /proc/version/x: {e.strerror}'
  assert checkpoints._write_cause(RuntimeError('bucket gone')) == ': bucket gone'


# ---------------------------------------------------------------------------------------------
# TensorBoard on resume
# ---------------------------------------------------------------------------------------------

def scalar_steps(folder, tag):
  import tensorflow as tf
  found = []
  for path in sorted(tf.io.gfile.glob(checkpoints.join(folder, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          found.append((event.step, float(tf.make_ndarray(value.tensor))))
  return found


@pytest.mark.slow
def test_a_resumed_run_writes_each_step_once(tmp_path):
  """Steps 1-4 logged, but the run died before checkpointing step 4 (its checkpoint removed
  here): the resumed run recomputes 3 and 4 (the same values, resume is exact) and writes
  only 5 and 6."""
  model_dir = tmp_path / 'run'
  run_logged(model_dir, 4, checkpoint_every=2, log_every=1, async_checkpointing=False)
  shutil.rmtree(step_dir(model_dir, 4))
  shutil.rmtree(model_dir / 'data' / '4')
  resumed, _ = run_logged(model_dir, 6, checkpoint_every=2, log_every=1)
  assert resumed.start_step == 2
  logged = scalar_steps(str(model_dir / 'train'), 'loss')
  assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
  recomputed = {h['step']: h['loss'] for h in resumed.history}
  assert {s: v for s, v in logged if s in (3, 4)} == pytest.approx(
      {3: recomputed[3], 4: recomputed[4]}, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Model directories as URLs
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def silent_metadata_server():
  """A real local server that accepts connections and never answers: what TensorFlow's GCS
  client meets when it asks for credentials where there are none (it retries for minutes)."""
  import socket
  import threading
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(16)
  held = []
  def accept():
    while True:
      try:
        held.append(server.accept()[0])
      except OSError:
        return
  threading.Thread(target=accept, daemon=True).start()
  yield f'127.0.0.1:{server.getsockname()[1]}'
  server.close()
  for connection in held:
    connection.close()


@pytest.mark.slow
def test_an_unreachable_cloud_model_dir_stops_in_one_line_within_seconds(
    tmp_path, silent_metadata_server):
  from test_train import cli_command, cli_env
  env = {**cli_env(), 'GCE_METADATA_HOST': silent_metadata_server,
         'GOOGLE_APPLICATION_CREDENTIALS': '', 'CLOUDSDK_CONFIG': str(tmp_path)}
  command = [a for a in cli_command('gs://ul2-test-bucket/run', 3)]
  # A timeout only to end a hang: before this check, TensorFlow retried for over 5 minutes.
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert 'Traceback' not in done.stderr, done.stderr[-3000:]
  error = done.stderr.strip().splitlines()[-1]
  assert error == (
      'error: model_dir or checkpoint gs://ul2-test-bucket/run: gs://ul2-test-bucket did not '
      'answer within 5 s; most likely there are no credentials (the client is still waiting '
      'for a token from the metadata server: set GOOGLE_APPLICATION_CREDENTIALS or run '
      '`gcloud auth application-default login`) or no network.'), error
  assert not (tmp_path / 'gs:').exists() and not os.path.exists('gs:')


def test_a_url_that_answers_passes_the_reachability_check():
  import tensorflow as tf
  tf.io.gfile.makedirs('ram://reachable/run')
  checkpoints.check_reachable('ram://reachable/run')  # answers: nothing raised
  checkpoints.check_reachable(str(os.getcwd()))  # local: nothing to check


def test_gs_urls_stay_urls_on_their_way_to_orbax():
  url = 'gs://bucket/runs/base'
  assert checkpoints.join(url, checkpoints.CHECKPOINTS, '300') == 'gs://bucket/runs/base/checkpoints/300'
  assert checkpoints.absolute(url) == url and os.path.abspath(url) != url
  assert checkpoints.parent(checkpoints.join(url, 'data', '3')) == 'gs://bucket/runs/base/data'
  orbax_dir = checkpoints._orbax_path(checkpoints.join(url, checkpoints.CHECKPOINTS))
  assert str(orbax_dir) == 'gs://bucket/runs/base/checkpoints'
  assert type(orbax_dir).__module__.startswith('etils.epath')
  assert checkpoints.orbax_writes(url) and not checkpoints.orbax_writes('ram://bucket/run')


def test_what_goes_through_gfile_works_on_a_non_local_filesystem():
  """TensorFlow's ram:// filesystem: config files, input positions with their manifest,
  best.json and TensorBoard, read back through the same functions a run uses."""
  import tensorflow as tf
  model_dir = 'ram://bucket/runs/tiny'
  checkpoints.write_model_config(model_dir, TINY)
  path = checkpoints.write_gin_config(model_dir, "MODEL_DIR = 'ram://bucket/runs/tiny'\n")
  assert path == 'ram://bucket/runs/tiny/config.gin'
  assert checkpoints.read_model_config(checkpoints.join(model_dir, 'checkpoint_3', 'state')) == TINY
  assert not os.path.exists('ram:')  # nothing landed in a local folder named after the URL

  data = data_lib.DataConfig('ul2_mod_gutenberg', train_setup.LENGTHS, batch_size=8)
  make = lambda: data_lib.HostBatches(
      data_lib.make_datasets(data, 'train', 0, repeat=True, shuffle=True),
      data_lib.input_layout(data, 0))
  batches = make()
  next(batches)
  position = checkpoints.join(model_dir, 'data', '1', 'process_0')
  batches.save(position)
  expected = next(batches)
  digests = checkpoints._file_digests(position)
  assert sorted(digests) == ['process_0.data-00000-of-00001', 'process_0.index',
                             'process_0.layout.json']
  restored = make()
  assert data_lib.HostBatches.saved(position) and not restored.layout_changes(position)
  restored.restore(position)
  for key, value in next(restored).items():
    np.testing.assert_array_equal(value, expected[key])

  writer = tf.summary.create_file_writer(checkpoints.join(model_dir, 'train'))
  with writer.as_default(step=7):
    tf.summary.scalar('loss', 1.5)
  writer.flush()
  assert records._last_logged_step(checkpoints.join(model_dir, 'train')) == 7
  assert checkpoints.read_best(model_dir) is None


def ram_files(folder):
  """{path relative to `folder`: bytes} of every file under a ram:// folder."""
  import tensorflow as tf
  found = {}
  for root, _, files in tf.io.gfile.walk(folder):
    for name in files:
      path = checkpoints.join(root, name)
      with tf.io.gfile.GFile(path, 'rb') as f:
        found[path[len(folder):].lstrip('/')] = f.read()
  return found


@pytest.mark.slow
def test_a_run_trains_resumes_and_recovers_on_a_non_local_filesystem(tmp_path):
  """A whole run on TensorFlow's in-memory ram:// filesystem (orbax writes a local copy and
  each committed step is copied there): checkpoints, input positions, TensorBoard; the newest
  checkpoint damaged in place; the resumed run quarantines it there, resumes from the step
  before and ends bitwise equal to an uninterrupted local run, each step logged once; the
  model reads back from the URL, and so do best/ parameters."""
  straight, _ = run_logged(tmp_path / 'local', 6, checkpoint_every=2, keep_checkpoints=2)
  url = f'ram://bucket-{tmp_path.name}/runs/tiny'
  run_logged(url, 4, checkpoint_every=2, keep_checkpoints=2, log_every=1)
  assert not os.path.exists('ram:') and not os.path.exists(os.path.join(os.getcwd(), 'ram:'))
  assert checkpoints.checkpoint_kinds(url) == ([2, 4], [])
  assert checkpoints.exists(checkpoints.join(url, 'data', '4', 'process_0.manifest.json'))
  assert checkpoints.read_model_config(url) == TINY

  step4 = checkpoints.join(url, 'checkpoint_4')
  before = ram_files(step4)
  largest = max(before, key=lambda k: len(before[k]))
  damaged = bytearray(before[largest])
  middle = len(damaged) // 2
  damaged[middle:middle + 64] = bytes(b ^ 0xFF for b in damaged[middle:middle + 64])
  with checkpoints.open_file(checkpoints.join(step4, largest), 'wb') as f:
    f.write(bytes(damaged))

  resumed, lines = run_logged(url, 6, checkpoint_every=2, keep_checkpoints=2, log_every=1)
  assert resumed.start_step == 2, lines
  assert_trees_equal(resumed.state.params, straight.state.params)
  warnings = [line for line in lines if line.startswith('WARNING')]
  assert len(warnings) == 1 and warnings[0].startswith('WARNING: checkpoint step 4 is damaged')
  assert f'moved to {url}/quarantine/4' in warnings[0]
  moved = ram_files(checkpoints.join(url, 'quarantine', '4', 'checkpoints'))
  assert moved.keys() == before.keys() and moved[largest] == bytes(damaged)  # byte for byte
  steps, _ = checkpoints.checkpoint_kinds(url)
  assert {4, 6} <= set(steps) and not set(steps) - {2, 4, 6}
  assert [s for s, _ in scalar_steps(checkpoints.join(url, 'train'), 'loss')] == [1, 2, 3, 4, 5,
                                                                                  6]

  params, config = checkpoints.load(url)
  assert config == TINY
  assert_trees_equal(params, resumed.state.params)
  opt_state, step = checkpoints.read_optimizer_state(url)
  assert step == 6
  assert_trees_equal(opt_state, resumed.state.opt_state)
  checkpoints.save_best(url, 6, 'loss', {'loss': 1.0}, params, TINY)
  checkpoints.save_best(url, 6, 'loss', {'loss': 0.5}, params, TINY)  # replaces the first
  assert checkpoints.read_best(url)['value'] == 0.5
  assert_trees_equal(checkpoints.load(checkpoints.join(url, 'best'))[0], params)


def test_a_run_into_a_url_no_filesystem_here_knows_says_so_in_one_line():
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'^foo://bucket/run: no filesystem for foo:// here') as e:
    run_logged('foo://bucket/run', 1)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('through', ['local', 'gfile'])
@pytest.mark.slow
def test_one_writer_per_model_dir(tmp_path, through):
  """A second run on a model_dir another process is writing refuses in one line naming it;
  once that process is gone (killed), the next run takes the lease over with a note, and a
  run that ends releases it. Also for a model_dir given as a URL (file://, through
  TensorFlow's gfile as gs:// goes, orbax working on a local copy)."""
  import socket
  model_dir = tmp_path / 'run'
  given = f'file://{model_dir}' if through == 'gfile' else str(model_dir)
  command = [sys.executable, os.path.join(SCRIPTS, 'train.py'), '--gin_file=models/tiny.gin',
             '--gin_file=runs/pretrain.gin', "--gin.MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}", '--gin.BATCH_SIZE=8',
             f"--gin.MODEL_DIR='{given}'", '--gin.EVAL_EVERY=100000',
             '--gin.CHECKPOINT_EVERY=5', '--gin.train.TrainConfig.denoiser_eval_batches=0']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  first = subprocess.Popen(command + ['--gin.TRAIN_STEPS=100000'], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lease = model_dir / checkpoints.LEASE
    for _ in range(600):
      if lease.exists() and lease.read_text().strip():
        break
      assert first.poll() is None
      time.sleep(0.2)
    second = subprocess.run(command + ['--gin.TRAIN_STEPS=10'], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(
        f'error: {given} is being written by process {first.pid} on '
        f'{socket.gethostname()} (heartbeat ')
    assert 'delete' in second.stderr and 'Traceback' not in second.stderr
  finally:
    first.kill()
    first.wait()
  third = subprocess.run(command + ['--gin.TRAIN_STEPS=2'], env=env, capture_output=True,
                         text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-2000:]
  assert f'process {first.pid} on this host has ended' in third.stdout
  assert not (model_dir / checkpoints.LEASE).exists()  # released at the end
