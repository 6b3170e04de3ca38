"""T5X's own restore path (utils.create_checkpoint_manager_and_restore, as t5x.train calls it) on
a run of ours: its own model_dir (T5X's orbax layout, as the run wrote it), and, when they
exist, its exports by scripts/export_t5x.py in /tmp/t5xout/ts and /tmp/t5xout/orbax:

    python scripts/export_t5x.py --checkpoint RUN --output /tmp/t5xout/ts
    python scripts/export_t5x.py --checkpoint RUN --output /tmp/t5xout/orbax --layout orbax
    PYTHONPATH=T5X_CHECKOUT:STUBS:REPO python check_restore.py RUN

Prints one line per restore: the step and the largest difference of the parameters and of the
Adafactor statistics from ul2's own reading of the run (0.0: bitwise).
"""
import os
import sys
import jax, numpy as np
jax.tree_map = jax.tree.map
import flax
from flax.linen import partitioning as flax_partitioning
from t5x import adafactor, partitioning, utils, checkpoints
from ul2 import checkpoints as ul2_checkpoints, network

run_dir = sys.argv[1]
cfg = ul2_checkpoints.read_model_config(run_dir)
params_ours, _ = ul2_checkpoints.load(run_dir)
opt_ours, step_ours = ul2_checkpoints.read_optimizer_state(run_dir)

class Model:
  def get_initial_variables(self, rng, input_shapes, input_types=None):
    boxed = network.init_params(cfg, rng, boxed=True)
    flat = flax.traverse_util.flatten_dict(boxed, is_leaf=lambda k, x: hasattr(x, 'names'))
    axes = flax.traverse_util.unflatten_dict({k[:-1] + (k[-1] + '_axes',): flax_partitioning.AxisMetadata(names=tuple(v.names)) for k, v in flat.items()})
    return {'params': flax.linen.meta.unbox(boxed), 'params_axes': axes}

partitioner = partitioning.PjitPartitioner(num_partitions=1)
init = utils.TrainStateInitializer(
    adafactor.Adafactor(logical_factor_rules=adafactor.standard_logical_factor_rules()),
    Model().get_initial_variables, {'encoder_input_tokens': (1, 1)}, partitioner)

def compare(state, with_opt):
  got = {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(state.params).items()}
  want = network.flatten_params(params_ours)
  assert got.keys() == want.keys()
  worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
  out = {'step': int(state.step), 'param_max_abs_diff': worst}
  if with_opt:
    ps = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.state_dict()['state']['param_states']))
    ours = {}
    for name in ('v_row', 'v_col', 'v'):
      for k, v in network.flatten_params(getattr(opt_ours, name)).items():
        ours[tuple(k.split('/')) + (name,)] = v
    out['opt_max_abs_diff'] = max(float(np.max(np.abs(np.asarray(ps[k]) - np.asarray(v)))) for k, v in ours.items())
  return out

def t5x_train_restore(cfg, use_orbax):
  """What t5x.train does with a restore config (train.py: get_first_valid_restore_config_and_
  paths, then create_checkpoint_manager_and_restore)."""
  valid, paths = utils.get_first_valid_restore_config_and_paths([cfg])
  state, _ = utils.create_checkpoint_manager_and_restore(
      init, partitioner, valid, paths[0] if paths else None, jax.random.PRNGKey(0),
      model_dir='/tmp/t5x_train_model_dir', use_orbax=use_orbax)
  return state

# The run's own model_dir, as t5x.train resumes it (MODEL_DIR = the run: its latest step).
state = t5x_train_restore(utils.RestoreCheckpointConfig(path=run_dir, mode='latest'), True)
print('model_dir use_orbax True latest  :', compare(state, True))
if not os.path.isdir('/tmp/t5xout'):
  sys.exit(0)

for layout in ('ts', 'orbax'):
  for use_orbax in (False, True):
    try:
      state = t5x_train_restore(utils.RestoreCheckpointConfig(path=f'/tmp/t5xout/{layout}', mode='latest'), use_orbax)
      print(layout, 'use_orbax', use_orbax, 'latest  :', compare(state, True))
    except Exception as e:
      print(layout, 'use_orbax', use_orbax, 'latest  : FAILED', type(e).__name__, str(e)[:200])
    try:
      state = t5x_train_restore(utils.RestoreCheckpointConfig(
          path=f'/tmp/t5xout/{layout}/checkpoint_{step_ours}', mode='specific',
          assignment_map=(('state/param_states.*', None),), fallback_to_scratch=True), use_orbax)
      print(layout, 'use_orbax', use_orbax, 'specific:', compare(state, False))
    except Exception as e:
      print(layout, 'use_orbax', use_orbax, 'specific: FAILED', type(e).__name__, str(e)[:300])
# And the loader T5X offers for checkpoints without a model: load_t5x_checkpoint.
d = checkpoints.load_t5x_checkpoint(f'/tmp/t5xout/ts/checkpoint_{step_ours}')
print('load_t5x_checkpoint keys:', sorted(d), sorted(d['state']))
