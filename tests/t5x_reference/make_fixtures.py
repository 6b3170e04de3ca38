"""Writes the T5X checkpoints in fixtures/ with T5X's own code: a tiny model with ul2's parameter
tree (T5X's names), T5X's Adafactor after one update, saved by `t5x.checkpoints.Checkpointer`
(tensorstore layout, version 3) and `OrbaxCheckpointManagerInterface` (orbax layout).

    PYTHONPATH=T5X_CHECKOUT:STUBS:REPO python make_fixtures.py tests/t5x_reference/fixtures

(README.md beside this file: how T5X was run here, and what the tests compare.)"""
import os, sys, shutil
import jax, jax.numpy as jnp, numpy as np
jax.tree_map = jax.tree.map
import flax
from flax.linen import partitioning as flax_partitioning
from t5x import adafactor, checkpoints, partitioning, train_state as train_state_lib
from ul2 import network

out = sys.argv[1]
# The embedding and logits (128 x 128) are factored by T5X's heuristic, the rest is not.
cfg = network.Config(vocab_size=128, emb_dim=128, num_heads=2, head_dim=8, mlp_dim=32,
                     num_encoder_layers=2, num_decoder_layers=1)
boxed = network.init_params(cfg, jax.random.key(0), boxed=True)
params = flax.linen.meta.unbox(boxed)
flat = flax.traverse_util.flatten_dict(boxed, is_leaf=lambda k, x: hasattr(x, 'names'))
axes = flax.traverse_util.unflatten_dict({k[:-1] + (k[-1] + '_axes',): flax_partitioning.AxisMetadata(names=tuple(v.names)) for k, v in flat.items()})
opt = adafactor.Adafactor(logical_factor_rules=adafactor.standard_logical_factor_rules())
state = train_state_lib.FlaxOptimTrainState.create(opt, flax.core.freeze({'params': params, 'params_axes': axes}))
# One real update so that the Adafactor statistics are not zeros.
grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
state = state.apply_gradient(grads, learning_rate=0.01)
partitioner = partitioning.PjitPartitioner(num_partitions=1)
shutil.rmtree(out, ignore_errors=True)
checkpoints.Checkpointer(state, partitioner, os.path.join(out, 'tensorstore')).save(state)
os.makedirs(os.path.join(out, 'orbax'))
manager = checkpoints.OrbaxCheckpointManagerInterface(os.path.join(out, 'orbax'), state,
                                                      partitioner)
manager.save(state)
manager.wait_until_finished()
np.savez(os.path.join(out, 'params.npz'), **{
    '/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(state.params).items()})
print('step', int(state.step))
