"""The trainer: learning, exact resume, mesh and process independence, microbatches, gin, errors."""

import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin_cli
import train as train_script
import train_setup
from train_setup import TINY, fixed_batch, run, saved_steps, step_dir
from ul2 import data as data_lib
from ul2 import aot, flops, network, partitioning
from ul2 import losses as losses_lib
from ul2 import records
from ul2 import train as T

TESTS = os.path.dirname(os.path.abspath(__file__))


def losses(result):
  return np.array([h['loss'] for h in result.history])


def assert_params_equal(a, b):
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))




def repeat(batch):
  while True:
    yield batch


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------

def test_a_few_steps_give_finite_metrics_and_write_the_model_dir(tmp_path):
  result = run(str(tmp_path), steps=4, checkpoint_every=2)
  assert len(result.history) == 4 and np.isfinite(losses(result)).all()
  first = result.history[0]
  # An untrained model is near uniform over the 32,128 ids.
  assert abs(first['cross_entropy'] - np.log(32128)) < 1.0
  for key in ('loss', 'accuracy', 'z_loss', 'learning_rate', 'grad_norm', 'tokens_per_s'):
    assert np.isfinite(first[key]), key
  assert first['z_loss'] > 0 and first['learning_rate'] == pytest.approx(0.01)
  assert result.eval_history and result.eval_history[-1]['step'] == 4
  assert saved_steps(tmp_path) == [2, 4]
  assert glob.glob(str(tmp_path / 'train' / 'events.out.tfevents.*'))
  assert glob.glob(str(tmp_path / 'validation' / 'events.out.tfevents.*'))


def test_fifty_steps_on_a_repeated_batch_drive_the_loss_down(tmp_path):
  result = run(str(tmp_path), steps=50, batches=repeat(fixed_batch()), eval_split=None)
  curve = losses(result)
  assert curve[-1] < 0.5 * curve[0], curve[::10]  # from ~10.4 nats to well under half
  assert result.history[-1]['accuracy'] > 0.2


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

def test_resume_is_exact(tmp_path):
  """2N steps straight == N steps, stop, N more: bitwise parameters, identical losses (CPU).

  Dropout on, shuffled seqio input: the restored state, dropout keys and input position must
  all be the uninterrupted run's.
  """
  model = dataclasses.replace(TINY, dropout_rate=0.1)
  straight = run(str(tmp_path / 'straight'), steps=6, model=model, checkpoint_every=3)
  first = run(str(tmp_path / 'resumed'), steps=3, model=model, checkpoint_every=3)
  second = run(str(tmp_path / 'resumed'), steps=6, model=model, checkpoint_every=3)
  assert second.start_step == 3
  np.testing.assert_array_equal(np.concatenate([losses(first), losses(second)]),
                                losses(straight))
  assert_params_equal(second.state.params, straight.state.params)
  assert_params_equal(second.state.opt_state, straight.state.opt_state)
  # Nothing left to do: a third start restores step 6 and returns.
  again = run(str(tmp_path / 'resumed'), steps=6, model=model)
  assert again.start_step == 6 and not again.history


def test_resuming_into_a_changed_input_pipeline_is_refused_or_restarted(tmp_path):
  """A saved input position only means something in the pipeline that produced it."""
  model_dir = str(tmp_path / 'run')
  first = run(model_dir, steps=2, checkpoint_every=2, batch_size=16)
  for change, kwargs in (('batch_size: 16 -> 8', dict(batch_size=8)),
                         ('seed: 0 -> 1', dict(seed=1))):
    with pytest.raises(ValueError, match=f"{change}.*resume_input='restart'"):
      run(model_dir, steps=3, checkpoint_every=2, **kwargs)
  # Refused before anything was written: the checkpoint is intact and resumes as it was.
  again = run(model_dir, steps=2, checkpoint_every=2, batch_size=16)
  assert again.start_step == 2
  assert_params_equal(again.state.params, first.state.params)

  # 'restart': the restored model continues on the new pipeline's first batch. Its first loss
  # is that of the step-2 parameters on that batch, as a run started from them computes it.
  restarted = run(model_dir, steps=3, checkpoint_every=2, batch_size=8, resume_input='restart')
  assert restarted.start_step == 2 and len(restarted.history) == 1
  reference = run(str(tmp_path / 'from_step_2'), steps=1, batch_size=8,
                  init_from=os.path.join(model_dir, 'checkpoint_2'))
  assert restarted.history[0]['loss'] == reference.history[0]['loss']


def test_an_unfinished_checkpoint_is_not_taken_as_valid(tmp_path):
  run(str(tmp_path), steps=2, checkpoint_every=2, async_checkpointing=False)
  # A save interrupted before orbax finalised it leaves a temporary directory behind.
  os.makedirs(tmp_path / 'checkpoint_4.orbax-checkpoint-tmp-0' / 'state')
  resumed = run(str(tmp_path), steps=3, checkpoint_every=10)
  assert resumed.start_step == 2


# ---------------------------------------------------------------------------------------------
# Devices, meshes, processes, microbatches
# ---------------------------------------------------------------------------------------------

def test_one_device_and_eight_devices_train_alike(tmp_path):
  """The same run on 1 device, 8x1, 2x4, and 2x4 with 2-D parameters (and activations).

  Sharded reductions add in a different order, so losses agree to float32 rounding, not
  bitwise: 1e-5 relative over 4 steps (observed differences ~1e-7).
  """
  reference = losses(run(str(tmp_path / 'one'), steps=4, devices=jax.devices()[:1],
                         eval_split=None))
  for name, mesh in (('8x1', partitioning.MeshConfig(data=8, model=1)),
                     ('2x4', partitioning.MeshConfig(data=2, model=4)),
                     ('2x4_2d', partitioning.MeshConfig(data=2, model=4,
                                                        parameter_partitioning_dims=2)),
                     ('2x4_2d_activations', partitioning.MeshConfig(
                         data=2, model=4, parameter_partitioning_dims=2,
                         activation_partitioning_dims=2))):
    result = run(str(tmp_path / name), steps=4, mesh=mesh, eval_split=None)
    np.testing.assert_allclose(losses(result), reference, rtol=1e-5, err_msg=name)


def test_a_run_resumes_on_a_different_mesh(tmp_path):
  """Preempted on a 2x4 slice with 2-D partitioning, resumed on 8x1 and then on one device.

  Orbax reshards the restored state to the new mesh; the input position carries over. Losses
  match the uninterrupted one-device run to float32 rounding (as across meshes above).
  """
  straight = run(str(tmp_path / 'straight'), steps=6, devices=jax.devices()[:1])
  model_dir = str(tmp_path / 'moved')
  parts = [run(model_dir, steps=2, checkpoint_every=2, mesh=partitioning.MeshConfig(
               data=2, model=4, parameter_partitioning_dims=2)),
           run(model_dir, steps=4, checkpoint_every=2,
               mesh=partitioning.MeshConfig(data=8, model=1)),
           run(model_dir, steps=6, checkpoint_every=2, devices=jax.devices()[:1])]
  assert [p.start_step for p in parts] == [0, 2, 4]
  np.testing.assert_allclose(np.concatenate([losses(p) for p in parts]), losses(straight),
                             rtol=1e-5)
  final = parts[-1].state.params
  assert {d for x in jax.tree.leaves(final) for d in x.devices()} == {jax.devices()[0]}
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(straight.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_checkpoint_from_a_sharded_run_loads_on_one_device(tmp_path):
  """Fine-tuning, eval and export often run on fewer devices than pretraining did."""
  model_dir = str(tmp_path / 'run')
  result = run(model_dir, steps=2, mesh=partitioning.MeshConfig(
      data=2, model=4, parameter_partitioning_dims=2))
  code = ('import sys, jax, numpy as np\n'
          'from ul2 import checkpoints, network\n'
          'assert jax.device_count() == 1\n'
          'params, _ = checkpoints.load(sys.argv[1])\n'
          'flat = network.flatten_params(params)\n'
          'np.savez(sys.argv[2], **flat)\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = tmp_path / 'params.npz'
  proc = subprocess.run([sys.executable, '-c', code, model_dir, str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for warning in ('Sharding info not provided', 'Metadata file does not exist'):
    assert warning not in proc.stderr, proc.stderr[-3000:]
  loaded = np.load(out)
  expected = {'/'.join(k): np.asarray(v) for k, v in
              flax.traverse_util.flatten_dict(result.state.params).items()}
  assert sorted(loaded.files) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process(tmp_path):
  """jax.distributed with gloo CPU collectives, 4 devices per process, each process reading
  its own input shard; the single process reads both shards (input_shards=2)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  out = tmp_path / 'result.json'
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([TESTS, os.path.dirname(TESTS)])}
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, os.path.join(TESTS, 'multiprocess_train.py'),
                             str(i), port, str(tmp_path / 'multi'), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(log[-3000:] for log in logs)
  multi = json.loads(out.read_text())
  single = run(str(tmp_path / 'single'), steps=4, input_shards=2)
  np.testing.assert_allclose(multi['losses'], losses(single), rtol=1e-5)
  assert multi['param_sum'] == pytest.approx(train_setup.param_checksum(single.state.params),
                                             rel=1e-5)
  # Each process saved its own input position next to the shared checkpoint.
  assert sorted(os.listdir(tmp_path / 'multi' / 'data' / '4')) == [
      'process_0.data-00000-of-00001', 'process_0.index', 'process_0.layout.json',
      'process_0.manifest.json', 'process_1.data-00000-of-00001', 'process_1.index',
      'process_1.layout.json', 'process_1.manifest.json']
  layouts = [json.loads((tmp_path / 'multi' / 'data' / '4' / f'process_{i}.layout.json')
                        .read_text()) for i in range(2)]
  assert [(l['processes'], l['input_shards'], l['shards_of_this_process']) for l in layouts] == [
      (2, 2, [0]), (2, 2, [1])]


def test_two_processes_refuse_a_model_dir_only_a_local_copy_could_serve(tmp_path):
  """ram:// (a scheme orbax does not write, served through a local copy of the checkpoints)
  with two jax.distributed processes: each stops with the one-line reason before training."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = str(s.getsockname()[1])
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([TESTS, os.path.dirname(TESTS)])}
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, os.path.join(TESTS, 'multiprocess_train.py'),
                             str(i), port, 'ram://bucket/two_processes',
                             str(tmp_path / 'result.json')],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for proc, log in zip(procs, logs):
    assert proc.returncode != 0, log[-3000:]
    assert ('CheckpointError: model_dir ram://bucket/two_processes: orbax cannot write ram:// '
            'itself, and the local copy that stands in for it serves one process') in log, (
                log[-3000:])
  assert not (tmp_path / 'result.json').exists()


def test_microbatches_equal_one_full_batch(tmp_path):
  batch = fixed_batch(32)  # 4 microbatches of 8 rows: one per data shard
  full = run(str(tmp_path / 'full'), steps=3, batches=repeat(batch), eval_split=None,
             batch_size=32)
  micro = run(str(tmp_path / 'micro'), steps=3, batches=repeat(batch), eval_split=None,
              batch_size=32, microbatches=4)
  # Sums of per-token losses and gradients are split 4 ways and re-added: float32 rounding.
  np.testing.assert_allclose(losses(micro), losses(full), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(micro.state.params), jax.tree.leaves(full.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('vocab', [32128, 32000, 251, 7])
def test_the_loss_is_jax_logsumexp_with_the_max_bit_for_bit(vocab):
  """loss_sums takes the vocabulary max in two passes on CPU (`vocab_max`): the max is the
  bits jnp.max gives, the loss sums and their gradients jax.nn.logsumexp's to float32
  rounding, on one device and with the vocabulary split over a 2 x 4 mesh."""
  rng = np.random.default_rng(vocab)
  logits = rng.normal(size=(4, 6, vocab)).astype(np.float32) * 8
  logits[0, 0] = -np.inf  # a row with nothing allowed
  targets = rng.integers(0, vocab, (4, 6)).astype(np.int32)
  weights = np.ones((4, 6), np.float32)
  weights[0, :2] = 0.0

  def reference(x):
    log_z = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return {'cross_entropy': jnp.sum((log_z - picked) * weights),
            'z_loss': jnp.sum(1e-4 * jnp.square(log_z) * weights),
            'correct': jnp.sum((picked >= jnp.max(x, axis=-1)) * weights),
            'weight': jnp.sum(weights)}

  def total(fn):  # the finite rows' loss, as train_step sums it, and its gradient
    def f(x):
      sums = fn(x.at[0, 0].set(0.0))
      return sums['cross_entropy'] + sums['z_loss'], sums
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  want_max = np.asarray(jax.jit(lambda x: jnp.max(x, axis=-1))(logits))
  ours = lambda x: losses_lib.loss_sums(x, targets, weights, 1e-4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
  split = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data', None, 'model' if vocab % 4 == 0 else None))
  (want, want_sums), want_grad = total(reference)(logits)
  for x in (jnp.asarray(logits), jax.device_put(logits, split)):
    np.testing.assert_array_equal(np.asarray(jax.jit(losses_lib.vocab_max)(x)), want_max)
    (got, got_sums), got_grad = total(ours)(x)
    # XLA may order the float32 sums of two different programs differently: rounding only.
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for key in ('cross_entropy', 'z_loss'):
      np.testing.assert_allclose(float(got_sums[key]), float(want_sums[key]), rtol=1e-6)
    for key in ('correct', 'weight'):
      assert float(got_sums[key]) == float(want_sums[key]), key
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-5,
                               atol=1e-9)
  assert want_max[0, 0] == -np.inf
  # A NaN logit is a NaN loss, which the loop stops on (XLA's maxima over a row holding a NaN
  # are not NaN, and differ between the one- and two-pass forms: the loss does not use them).
  poisoned = logits.copy()
  poisoned[1, 1, vocab // 2] = np.nan
  assert np.isnan(float(jax.jit(ours)(poisoned)['cross_entropy']))
  # On CPU the max takes two passes, kept apart by barriers, where a block count divides it.
  lowered = jax.jit(losses_lib.vocab_max).lower(jnp.asarray(logits)).as_text()
  assert ('optimization_barrier' in lowered) == (vocab in (32128, 32000))  # 251, 7: prime


def test_flop_count_matches_a_hand_count():
  cfg = network.Config(vocab_size=10, emb_dim=2, num_heads=1, head_dim=2, mlp_dim=4,
                       num_encoder_layers=1, num_decoder_layers=1)
  # Encoder, per input token: qkvo 4*2*2=16, scores+values 2*3*2=12, MLP 3*2*4=24 -> 52 x 3.
  # Decoder, per target token: self 16 + 2*2*2=8, cross q,o 8 + scores 2*3*2=12, MLP 24,
  # logits 2*10=20 -> 88 x 2; cross k,v per input token: 8 x 3.
  macs = 52 * 3 + 88 * 2 + 8 * 3
  assert flops.flops_per_step(cfg, 1, 3, 2) == 6 * macs


# ---------------------------------------------------------------------------------------------
# Gin files and the CLI
# ---------------------------------------------------------------------------------------------

# Training runs (the inference recipes, *_infer_*.gin, are test_aot.py's).
RUN_FILES = sorted(p for p in glob.glob(os.path.join(gin_cli.GIN_DIR, 'experiments', '*.gin'))
                   if '_infer_' not in p) + [
    os.path.join(gin_cli.GIN_DIR, 'quickstart.gin'),
    os.path.join(gin_cli.GIN_DIR, 'quickstart_finetune.gin'),
    os.path.join(gin_cli.GIN_DIR, 'quickstart_decoder_only.gin')]


def bound_configs():
  return {name: gin.get_configurable(cls)() for name, cls in (
      ('data', data_lib.DataConfig), ('run', T.TrainConfig), ('optimizer', T.OptimizerConfig),
      ('mesh', partitioning.MeshConfig))}


@pytest.mark.parametrize('path', RUN_FILES, ids=os.path.basename)
def test_every_experiment_gin_file_parses_and_binds(path):
  gin_cli.parse([path])
  model = gin_cli.macro('MODEL_CONFIG')
  assert isinstance(model, network.Config)
  configs = bound_configs()
  seqio = __import__('seqio')
  assert configs['data'].task in (set(seqio.TaskRegistry.names())
                                  | set(seqio.MixtureRegistry.names()))
  assert configs['run'].steps > 0 and configs['data'].batch_size > 0
  if configs['mesh'].model > 1:
    assert model.num_heads % configs['mesh'].model == 0


def test_run_file_lists_its_required_macros():
  with pytest.raises(SystemExit, match='^error: gin: the macro MIXTURE_OR_TASK_NAME is required: '
                     r'pass --gin.MIXTURE_OR_TASK_NAME=\.\.\.$'):
    gin_cli.parse(['models/tiny.gin', 'runs/pretrain.gin'])


def test_train_cli_writes_config_checkpoints_and_logs(tmp_path, capsys):
  model_dir = tmp_path / 'cli'
  train_script.main([
      '--gin_file=models/tiny.gin', '--gin_file=runs/pretrain.gin',
      "--gin.MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
      '--gin.TRAIN_STEPS=3', '--gin.BATCH_SIZE=8', f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.EVAL_EVERY=3', '--gin.train.TrainConfig.eval_batches=1'])
  config = (model_dir / 'config.gin').read_text()
  assert "MIXTURE_OR_TASK_NAME = 'ul2_mod_gutenberg'" in config
  operative = (model_dir / 'operative_config.gin').read_text()
  assert 'train.TrainConfig' in operative and 'network.Config' in operative
  assert saved_steps(model_dir) == [3]
  assert glob.glob(str(model_dir / 'train' / 'events.out.tfevents.*'))
  # Output that is no terminal (pytest's capture, a SLURM log) gets plain lines: what is being
  # done, then step, loss, throughput, learning rate and ETA.
  out = capsys.readouterr().out
  assert 'Building the input pipeline of ul2_mod_gutenberg (validation: its validation split)' in out
  assert 'Compiling the train step and training steps 1-3...' in out
  import re
  assert re.search(r'step 3/3: loss \d+\.\d{4}, [\d,]+ tokens/s, learning rate 0\.01, ETA 0s',
                   out), out
  rows = [json.loads(line) for line in (model_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['split'], r['step']) for r in rows] == [('train', 1), ('train', 2), ('train', 3),
                                                     ('validation', 3), ('validation', 3)]
  # The second validation row: loss and token accuracy per denoiser and per mode.
  assert {'denoiser/X(64,0.5)/loss', 'mode/[NLU]/accuracy'} <= set(rows[-1])
  assert 'step 3: validation loss by denoiser R(3,0.15) ' in out
  assert {'loss', 'accuracy', 'learning_rate', 'tokens_per_s'} <= set(rows[0])
  assert (model_dir / 'metrics.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert f'plotted in {model_dir / "metrics.png"}' in out
  # A run that fails to start (here: a batch the 8 data shards cannot split) leaves the
  # existing run's files as they were.
  with pytest.raises(ValueError, match='Batch size 7 must be divisible'):
    train_script.main([
        '--gin_file=models/tiny.gin', '--gin_file=runs/pretrain.gin',
        "--gin.MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
        '--gin.TRAIN_STEPS=6', '--gin.BATCH_SIZE=7', f"--gin.MODEL_DIR='{model_dir}'"])
  assert (model_dir / 'config.gin').read_text() == config
  assert (model_dir / 'operative_config.gin').read_text() == operative


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------

def test_batch_size_not_divisible_by_data_shards(tmp_path):
  with pytest.raises(ValueError, match='Batch size 30 must be divisible by the 8 data shards; '
                                       'set BATCH_SIZE to a multiple of 8'):
    run(str(tmp_path), steps=1, batch_size=30)


def test_mesh_that_does_not_match_the_devices(tmp_path):
  with pytest.raises(ValueError, match='needs 12 devices but 8 are available'):
    run(str(tmp_path), steps=1, mesh=partitioning.MeshConfig(data=3, model=4))


def test_unknown_task(tmp_path):
  with pytest.raises(ValueError, match="Unknown task or mixture 'no_such_task'.*"
                                       "ul2_mod_gutenberg"):
    T.train(model=TINY, data=data_lib.DataConfig('no_such_task', train_setup.LENGTHS,
                                                 batch_size=8),
            run=T.TrainConfig(str(tmp_path), steps=1, progress_bar=False), log=lambda _: None)


def test_feature_lengths_too_short_for_a_denoiser(tmp_path):
  with pytest.raises(ValueError, match='too short for denoiser'):
    T.train(model=TINY, data=data_lib.DataConfig('ul2_mod_gutenberg',
                                                 {'inputs': 6, 'targets': 6}, batch_size=8),
            run=T.TrainConfig(str(tmp_path), steps=1, progress_bar=False), log=lambda _: None)


def test_microbatches_that_do_not_split_the_batch(tmp_path):
  with pytest.raises(ValueError, match='must split into 3 microbatches'):
    run(str(tmp_path), steps=1, microbatches=3)


@pytest.mark.parametrize('module', [T, losses_lib, records, data_lib, flops, aot],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
  import doctest
  result = doctest.testmod(module)
  assert result.attempted > 0 and result.failed == 0


def test_bench_train_synthetic_runs_without_tensorflow_or_seqio(tmp_path):
  """The GPU benchmark path: an image with JAX but no TensorFlow or seqio must run it."""
  out = tmp_path / 'bench.json'
  env = {**os.environ, 'PYTHONPATH': os.path.join(os.path.dirname(TESTS), 'scripts')}
  env.pop('XLA_FLAGS', None)
  code = ('import sys, builtins\n'
          'real_import = builtins.__import__\n'
          'def guard(name, *args, **kwargs):\n'
          '  if name.split(".")[0] in ("tensorflow", "seqio", "tensorflow_text"):\n'
          '    raise ImportError("no " + name + " on this image")\n'
          '  return real_import(name, *args, **kwargs)\n'
          'builtins.__import__ = guard\n'
          'import bench_train\n'
          f'bench_train.main(["--model=tiny", "--steps=2", "--warmup=1", "--synthetic", '
          f'"--no_torch", "--dtypes=float32,bfloat16", "--json={out}"])\n'
          # The decoder-only model through the same script (its own synthetic rows).
          f'bench_train.main(["--model=tiny", "--gin.MODEL_ARCH=\'decoder_only\'", '
          f'"--steps=2", "--warmup=1", "--synthetic", "--dtypes=float32", '
          f'"--json={out}.decoder_only"])\n')
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  for dtype in ('float32', 'bfloat16'):
    jax_run = report['runs'][dtype]['jax']
    assert jax_run['tokens_per_s'] > 0 and np.isfinite(jax_run['final_loss'])
  # Alternating rounds: each side's median over them, and the machine's load around it all.
  assert len(report['runs']['float32']['jax']['rounds']) == 5
  assert report['load_start']['cores'] == report['load_end']['cores'] == os.cpu_count()
  assert 'load average at start: ' in proc.stdout
  # Which form network.dot gave the bfloat16 products, and why (the CPU's instructions).
  from ul2 import network
  assert report['cpu_bfloat16'] == {
      'instructions': sorted(set(network.NATIVE_BFLOAT16_FEATURES) & network.cpu_features()),
      'network_dot': network.cpu_bfloat16_products()}
  decoder_only = json.loads((tmp_path / 'bench.json.decoder_only').read_text())
  assert np.isfinite(decoder_only['runs']['float32']['jax']['final_loss'])
  assert 'No PyTorch peer for a decoder_only model' in proc.stdout


def test_bench_train_alternates_jax_and_pytorch_rounds():
  """Both sides in one run, round for round; the ratio is that of the two medians."""
  import bench_train
  report = bench_train.main(['--model=tiny', '--steps=1', '--rounds=3', '--warmup=1',
                             '--dtypes=float32', '--batch_size=8',
                             '--inputs_length=32', '--targets_length=32'])
  entry = report['runs']['float32']
  for side in ('jax', 'torch'):
    rounds = entry[side]['rounds']
    assert len(rounds) == 3 and entry[side]['seconds_per_step'] == np.median(rounds)
    assert np.isfinite(entry[side]['final_loss'])
  assert entry['jax_over_torch'] == pytest.approx(
      entry['torch']['seconds_per_step'] / entry['jax']['seconds_per_step'])
  # The same step: the same parameters (an untied logits kernel, one input embedding), from
  # ul2's initial weights, so the first losses agree.
  assert entry['torch']['parameters'] == entry['jax']['parameters']
  assert entry['torch']['first_loss'] == pytest.approx(entry['jax']['first_loss'], rel=1e-5)
  # Each side's peak resident memory is its own: PyTorch runs in a process of its own.
  assert entry['jax']['pid'] == os.getpid() != entry['torch']['pid']
  assert all(0.1 < entry[side]['peak_rss_gib'] < 64 for side in ('jax', 'torch'))


def test_bench_train_can_give_pytorch_t5x_float32_logits():
  """--torch_float32_logits: under bfloat16 autocast the PyTorch peer's logits product is
  float32 (T5X's logits_dense, as ul2 computes it); HF's own runs it in bfloat16. The peer
  flushes subnormals to zero, as XLA:CPU does."""
  import torch
  import bench_train
  cfg = bench_train.model_config('tiny', 'bfloat16')
  for flag, dtype in (([], torch.bfloat16), (['--torch_float32_logits'], torch.float32)):
    args = bench_train.parse_args(['--model=tiny', '--batch_size=2', '--inputs_length=16',
                                   '--targets_length=16', *flag])
    side = bench_train.TorchSide(cfg, args, bench_train.make_batches(args, cfg, 1), 'bfloat16')
    hidden = torch.randn(2, 16, cfg.emb_dim)
    with torch.autocast('cpu', dtype=torch.bfloat16):
      logits = side.model.lm_head(hidden)
    assert logits.dtype == dtype and logits.shape == (2, 16, cfg.vocab_size)
    expected = hidden.to(dtype).float() @ side.model.lm_head.weight.to(dtype).float().T
    torch.testing.assert_close(logits.float(), expected, rtol=2e-2, atol=2e-2)
    assert side.round(1) > 0 and np.isfinite(side.loss)
  # Subnormals flush to zero in the peer, as in XLA:CPU (jnp: 1e-39 * 1.5 == 0).
  assert float(jax.jit(lambda x: x * 1.5)(np.float32(1e-39))) == 0.0
  assert (torch.tensor([1e-39]) * 1.5).item() == 0.0
  torch.set_flush_denormal(False)  # the process's other tests: PyTorch's default
  assert (torch.tensor([1e-39]) * 1.5).item() != 0.0


def test_bench_train_stops_with_a_message_when_the_pytorch_process_dies():
  """A PyTorch process killed mid-run (here SIGKILL, as the OOM killer sends) ends the
  benchmark with one message instead of leaving it waiting on the pipe forever."""
  import signal
  import bench_train
  args = bench_train.parse_args(['--model=tiny', '--batch_size=2', '--inputs_length=16',
                                 '--targets_length=16'])
  cfg = bench_train.model_config('tiny', 'float32')
  side = bench_train.TorchProcess(cfg, args, bench_train.make_batches(args, cfg, 1), 'float32')
  assert side.round(1) > 0
  os.kill(side.process.pid, signal.SIGKILL)
  side.process.join()
  with pytest.raises(RuntimeError, match=r'PyTorch process exited \(code -9\)'):
    side.round(1)


def test_bench_matmul_reports_every_side_and_what_xla_multiplies(tmp_path):
  """scripts/bench_matmul.py: both dtypes for the plain product, `network.dot`'s library form
  and PyTorch, and the element types of the three products in XLA's optimized HLO: float32 on
  float32 operands; bfloat16 converted to float32 for the plain product, kept bfloat16 by the
  library form; and which form `network.dot` takes on this CPU."""
  import bench_matmul

  from ul2 import network
  report = bench_matmul.main(['--m', '64', '--k', '32', '--n', '48', '--rounds', '1',
                              '--calls', '1', '--json', str(tmp_path / 'matmul.json')])
  assert report['shape'] == [64, 32, 48]
  types = report['xla_dot_operand_types']
  assert types['xla']['float32'] == types['library']['float32'] == ['f32/f32']
  assert types['xla']['bfloat16'] == ['f32/f32']
  assert types['library']['bfloat16'] == ['bf16/bf16']
  assert report['network_dot_on_this_cpu'] == network.cpu_bfloat16_products()
  assert network.CPU_BFLOAT16_PRODUCTS_ENV not in os.environ  # the benchmark's choice undone
  for dtype in ('float32', 'bfloat16'):
    entry = report['runs'][dtype]
    assert min(entry[side]['gflops'] for side in ('xla', 'library', 'torch')) > 0
    assert entry['library_over_torch'] == pytest.approx(
        entry['torch']['seconds'] / entry['library']['seconds'])
  assert json.loads((tmp_path / 'matmul.json').read_text())['shape'] == [64, 32, 48]


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------

def cli_command(model_dir, steps):
  return [sys.executable, os.path.join(os.path.dirname(TESTS), 'scripts', 'train.py'),
          '--gin_file=models/tiny.gin', '--gin_file=runs/pretrain.gin',
          "--gin.MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
          f'--gin.TRAIN_STEPS={steps}', '--gin.BATCH_SIZE=8', f"--gin.MODEL_DIR='{model_dir}'",
          '--gin.EVAL_EVERY=100000', '--gin.CHECKPOINT_EVERY=100000',
          '--gin.train.TrainConfig.log_every=1', "--gin.DROPOUT_RATE=0.1",
          '--gin.train.TrainConfig.denoiser_eval_batches=0']


def cli_env():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
  env.pop('XLA_FLAGS', None)
  return env


SIGNAL_RUN_STEPS = 120


@pytest.fixture(scope='module')
def uninterrupted_cli_run(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('straight')
  straight = subprocess.run(cli_command(model_dir, SIGNAL_RUN_STEPS), env=cli_env(),
                            capture_output=True, text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-3000:]
  return model_dir


@pytest.mark.slow
def test_a_signal_checkpoints_the_current_step_and_the_run_resumes_exactly(
    tmp_path, uninterrupted_cli_run):
  """A real SIGTERM to a real training process mid-run: it saves the step it is at (model,
  optimizer, input position), says so in one line, exits 0; the same command finishes the
  run, whose parameters equal an uninterrupted run's bitwise. (SIGINT has the same handler;
  test_recovery's retention test stops and resumes a run with it.)"""
  import re
  import time
  steps, signum = SIGNAL_RUN_STEPS, signal.SIGTERM
  stopped_dir = tmp_path / 'stopped'
  proc = subprocess.Popen(cli_command(stopped_dir, steps), env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  progress, deadline = b'', time.time() + 300
  while time.time() < deadline:  # progress lines (stdout is no terminal) show the steps
    chunk = proc.stdout.read1(4096)
    progress += chunk
    done = [int(n) for n in re.findall(rb'step (\d+)/%d:' % steps, progress)]
    if (done and max(done) >= 5) or not chunk:
      break
  assert done and 5 <= max(done) < steps, progress[-500:]
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  lines = [line for line in out.decode().splitlines() if line.startswith('Stopped by')]
  assert len(lines) == 1, out.decode()
  stopped_at = int(re.search(r'at step (\d+)', lines[0]).group(1))
  assert signal.Signals(signum).name in lines[0] and max(done) <= stopped_at < steps
  assert saved_steps(stopped_dir) == [stopped_at]

  resumed = subprocess.run(cli_command(stopped_dir, steps), env=cli_env(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout
  from ul2 import checkpoints
  ours, _ = checkpoints.load(str(stopped_dir))
  theirs, _ = checkpoints.load(str(uninterrupted_cli_run))
  assert_params_equal(ours, theirs)


@pytest.mark.slow
def test_metrics_up_to_a_checkpoint_survive_a_kill(tmp_path):
  """SIGKILL right after the step-5 checkpoint of a run that logs only every 1000 steps: the
  TensorBoard file still holds the loss of steps 1-5, written when the checkpoint was."""
  import time
  import tensorflow as tf
  model_dir = tmp_path / 'killed'
  command = [arg for arg in cli_command(model_dir, 400) if 'CHECKPOINT_EVERY' not in arg
             and 'log_every' not in arg]
  proc = subprocess.Popen(command + ['--gin.CHECKPOINT_EVERY=5',
                                     '--gin.train.TrainConfig.log_every=1000'],
                          env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not step_dir(model_dir, 5).is_dir():
    time.sleep(0.2)
  proc.kill()
  proc.wait(timeout=60)
  assert step_dir(model_dir, 5).is_dir()
  steps = set()
  for path in glob.glob(str(model_dir / 'train' / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      if any(v.tag == 'loss' for v in event.summary.value):
        steps.add(event.step)
  assert set(range(1, 6)) <= steps


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_on_sigterm(tmp_path):
  """A preemption of a two-process run (SIGTERM to both, as SLURM or a TPU maintenance event
  sends it): JAX's preemption sync point makes both stop after the same step, both save their
  input positions for it, both exit 0 with one line; the same commands resume from it."""
  import re
  import time
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  model_dir = tmp_path / 'run'

  def start(steps, port):
    return [subprocess.Popen(cli_command(model_dir, steps) + [
        f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]

  procs = start(400, port)
  progress, deadline, done = b'', time.time() + 300, []
  while time.time() < deadline:  # the chief's progress lines show steps being taken
    chunk = procs[0].stdout.read1(4096)
    progress += chunk
    done = [int(n) for n in re.findall(rb'step (\d+)/400:', progress)]
    if (done and max(done) >= 5) or not chunk:
      break
  assert done and max(done) >= 5, progress[-500:]
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  stopped = [re.findall(r'Stopped by .* at step (\d+)', out.decode())
             for out, _ in [(progress + outs[0][0], b''), outs[1]]]
  assert len(stopped[0]) == 1 and stopped[0] == stopped[1], outs
  step = int(stopped[0][0])
  assert max(done) <= step < 400
  assert saved_steps(model_dir) == [step]
  assert {'process_0.index', 'process_1.index', 'process_0.manifest.json',
          'process_1.manifest.json'} <= set(os.listdir(model_dir / 'data' / str(step)))

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = start(step + 2, port)
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert all(f'/checkpoint_{step} (step {step})' in out.decode() for out, _ in outs)
  assert saved_steps(model_dir) == [step, step + 2]


def test_gin_mistakes_are_one_line_errors(tmp_path):
  """A misspelt macro would otherwise be ignored (the run trains the default steps)."""
  base = ['--gin_file=models/tiny.gin', '--gin_file=runs/pretrain.gin',
          "--gin.MIXTURE_OR_TASK_NAME='ul2_mod_gutenberg'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
          f"--gin.MODEL_DIR='{tmp_path}'"]
  with pytest.raises(SystemExit, match=r'^error: gin: --gin.BATCH_SIZES=8: no gin file uses '
                     r'the macro BATCH_SIZES; did you mean BATCH_SIZE\?$'):
    train_script.main(base + ['--gin.TRAIN_STEPS=3', '--gin.BATCH_SIZES=8'])
  with pytest.raises(SystemExit, match=r'^error: gin: the macro TRAIN_STEPS is required: pass '
                     r'--gin.TRAIN_STEPS=... \(you set TRAIN_STEP: a typo\?\)$'):
    train_script.main(base + ['--gin.TRAIN_STEP=3'])
  with pytest.raises(SystemExit, match=r"^error: gin: .*log_evry") as error:
    train_script.main(base + ['--gin.TRAIN_STEPS=3', '--gin.train.TrainConfig.log_evry=1'])
  assert '\n' not in str(error.value)
  assert not os.listdir(tmp_path)  # nothing was started


@pytest.mark.slow
def test_a_user_tasks_module_and_gin_file_need_no_project_imports(tmp_path):
  """T5X's way: a tasks.py of the user's on PYTHONPATH registering a corpus, named by
  MIXTURE_OR_TASK_MODULE in a gin file that imports nothing; the project's own tasks package
  (ul2_tasks) is not shadowed; inspect_task sees the task through --module."""
  from ul2 import vocabulary
  book = sorted(glob.glob(os.path.join(vocabulary.DATA_DIR, 'gutenberg_sample',
                                       'gutenberg_validation_*')))[0]
  (tmp_path / 'tasks.py').write_text(
      'from ul2_tasks import pretrain\n'
      f'pretrain.register_corpus("my_books", pretrain.text_files_source({book!r}, {book!r}))\n')
  (tmp_path / 'my_run.gin').write_text(
      "include 'models/tiny.gin'\ninclude 'runs/pretrain.gin'\n"
      "MIXTURE_OR_TASK_MODULE = 'tasks'\nMIXTURE_OR_TASK_NAME = 'ul2_mod_my_books'\n"
      "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 64}\nTRAIN_STEPS = 2\nBATCH_SIZE = 8\n"
      f"MODEL_DIR = '{tmp_path / 'run'}'\ntrain.TrainConfig.log_every = 1\n")
  env = {**cli_env(), 'PYTHONPATH': str(tmp_path)}
  scripts = os.path.join(os.path.dirname(TESTS), 'scripts')
  done = subprocess.run([sys.executable, os.path.join(scripts, 'train.py'),
                         '--gin_file=my_run.gin'], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'step 2/2: loss' in done.stdout and saved_steps(tmp_path / 'run') == [2]
  assert 'log_every = 1' in (tmp_path / 'run' / 'operative_config.gin').read_text()
  shown = subprocess.run([sys.executable, os.path.join(scripts, 'inspect_task.py'),
                          '--module', 'tasks', '--task', 'ul2_mod_my_books', '--num_examples',
                          '2', '--inputs_length', '64', '--targets_length', '64'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert '[NLU]' in shown.stdout or '[NLG]' in shown.stdout or '[S2S]' in shown.stdout
  bench = subprocess.run([sys.executable, os.path.join(scripts, 'bench_data.py'), '--module',
                          'tasks', '--task', 'ul2_mod_my_books', '--baseline',
                          't5_span_corruption_my_books', '--rows', '16', '--warmup', '0',
                          '--batch_size', '8', '--repeats', '1', '--inputs_length', '64',
                          '--targets_length', '64', '--json'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert bench.returncode == 0, bench.stderr[-3000:]
  report = json.loads(bench.stdout[bench.stdout.index('{'):])
  assert report['text']['mod']['rows_per_s'] > 0 and report['cached']['span_corruption']
  # The T5 library's own span_corruption on the same documents (scripts/test.sh installs it).
  assert report['text']['t5_library']['examples_per_s'] > 0
  assert report['cached']['mod_over_t5_library']['examples_per_s'] > 0
  # The machine's load at start and end, also in the report (on stderr with --json).
  assert 'load average at start: ' in bench.stderr and 'load average at end: ' in bench.stderr
  assert report['load_end']['cores'] == os.cpu_count()
  missing = subprocess.run([sys.executable, os.path.join(scripts, 'inspect_task.py'),
                            '--module', 'no_such_module', '--task', 'x'], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
  assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith(
      "error: --module no_such_module: cannot import it")


def test_every_script_has_full_help_without_loading_tensorflow():
  """`--help`: the whole docstring (its examples) and a help text with a default for every
  flag, before TensorFlow, seqio or torch are imported (so it comes at once)."""
  import re
  scripts = os.path.join(os.path.dirname(TESTS), 'scripts')
  for name in ('train', 'eval', 'infer', 'inspect_task', 'bench_data', 'bench_train',
               'export_hf', 'export_t5x', 'convert_t5x_gin', 'ablate', 'bench_decode',
               'bench_matmul', 'compile_tpu'):
    code = ('import contextlib, io, runpy, sys\n'
            f'sys.argv = [{name!r}, "--help"]; sys.path.insert(0, {scripts!r})\n'
            'out = io.StringIO()\n'
            'try:\n'
            '  with contextlib.redirect_stdout(out):\n'
            f'    runpy.run_path({os.path.join(scripts, name + ".py")!r}, run_name="__main__")\n'
            'except SystemExit:\n  pass\n'
            'print(out.getvalue())\n'
            'print("LOADED", [m for m in ("tensorflow", "seqio", "torch") if m in sys.modules])\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=cli_env(), timeout=120)
    text = done.stdout
    assert 'LOADED []' in text, (name, text[-300:])
    doc = open(os.path.join(scripts, name + '.py')).read().split('"""')[1]
    example = next(line for line in doc.splitlines() if 'python scripts/' in line
                   or 'bash scripts/' in line)
    assert example.strip().replace('\\\\', '\\') in text, (name, example)
    options = text[text.index('options:'):].splitlines()[1:]
    for i, line in enumerate(options):
      flag = re.match(r'^  (-\w, )?(--[\w.]+)', line)
      if not flag or flag.group(2) == '--help':
        continue
      same_line = re.match(r'^  \S.*?\s{2,}\S', line)
      next_line = i + 1 < len(options) and options[i + 1].startswith(' ' * 10)
      assert same_line or next_line, (name, line)


_FAULTS = '''
import json, resource, sys
import jax, jax.numpy as jnp
from ul2 import partitioning
applied = partitioning.reuse_freed_memory() if sys.argv[1] == 'reuse' else False
# A step with a 64 MiB buffer (the transpose's operand), allocated and freed by each call.
f = jax.jit(lambda x: (jnp.tanh(x * 2.0)[::-1] + jnp.cos(x)).reshape(4096, -1).T.sum(0))
x = jnp.linspace(-1.0, 1.0, 16 * 2**20)
for _ in range(3):
  f(x).block_until_ready()
faults, values = [], []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  values.append(f(x).tolist())
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'applied': applied, 'faults': faults, 'values': values,
                  'async': jax.config.read("jax_cpu_enable_async_dispatch")}))
'''


def test_reuse_freed_memory_ends_the_page_faults_of_steps_that_free_large_buffers():
  """glibc hands a freed 64 MiB buffer back to the kernel, so the next call faults its 16,384
  pages in again; `partitioning.reuse_freed_memory` (what the scripts call before JAX starts)
  keeps it for the next call. Real processes, real page-fault counts, the same results."""
  env = {**os.environ}
  env.pop('XLA_FLAGS', None)
  runs = {}
  for mode in ('release', 'reuse'):
    proc = subprocess.run([sys.executable, '-c', _FAULTS, mode], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
  release, reuse = runs['release'], runs['reuse']
  assert reuse['applied'] and not reuse['async'] and release['async']
  # Per call, medians: a reusing heap may still grow once, when a block that outlives a call
  # lands in the freed buffer's place (one call then faults a new buffer in).
  release_faults, reuse_faults = np.median(release['faults']), np.median(reuse['faults'])
  assert release_faults > 16 * 2**20 * 4 / 4096 / 2  # at least half the buffer's pages
  assert reuse_faults < release_faults / 10
  assert reuse['values'] == release['values']
  # Once JAX has started (as in this process) the dispatch mode is fixed: nothing changes.
  jax.devices()
  assert partitioning.reuse_freed_memory() is False
  assert jax.config.read('jax_cpu_enable_async_dispatch')


def test_the_scripts_reuse_freed_memory_unless_told_to_release_it():
  parser = gin_cli.argument_parser('')
  gin_cli.add_memory_flag(parser)
  assert parser.parse_args([]).release_freed_memory is False
  assert gin_cli.reuse_freed_memory(parser.parse_args(['--release_freed_memory'])) is False
