"""One-off: ul2.adafactor against the real t5x.adafactor.Adafactor (standard rules)."""
import jax, jax.numpy as jnp, numpy as np
jax.tree_map = jax.tree.map  # removed from current jax; T5X still calls it
from jax.sharding import PartitionSpec
from t5x import adafactor as t5x_adafactor
from ul2 import network
from ul2 import train as T

for scan in (False, True):
  cfg = network.Config(vocab_size=512, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                       num_encoder_layers=2, num_decoder_layers=2, scan_layers=scan)
  boxed = jax.eval_shape(lambda r: network.init_params(cfg, r, boxed=True), jax.random.key(0))
  axes = jax.tree.map(lambda b: PartitionSpec(*b.names), boxed,
                      is_leaf=lambda x: hasattr(x, 'names'))
  params = network.init_params(cfg, jax.random.key(1))
  params = jax.tree.map(lambda x: x * jnp.asarray(np.random.default_rng(0).uniform(0.1, 10, x.shape[:1]), jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)), params)
  opt = t5x_adafactor.Adafactor(logical_factor_rules=t5x_adafactor.standard_logical_factor_rules())
  opt.set_param_axes(axes)
  hp = opt.hyper_params.replace(learning_rate=0.01)
  t5x_state = opt.init_state(params)
  ours_tx, _ = T.make_optimizer(T.OptimizerConfig(schedule='constant', learning_rate=0.01,
                                                  warmup_steps=0), 10, cfg)
  ours_state = ours_tx.init(params)
  theirs, ours = params, params
  rng = np.random.default_rng(1)
  for step in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    theirs, t5x_state = opt.apply_gradient(hp, theirs, t5x_state, grads)
    updates, ours_state = ours_tx.update(grads, ours_state, ours)
    ours = jax.tree.map(jnp.add, ours, updates)
  worst = 0.0
  for (k, a), (_, b) in zip(network.flatten_params(ours).items(), network.flatten_params(theirs).items()):
    rms = float(np.sqrt(np.mean(np.square(np.asarray(b)))))
    worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / rms)
  print(f'scan_layers={scan}: max |ours - t5x| / rms(param) after 3 steps = {worst:.2e}')
  flat_states = t5x_adafactor.utils.flatten_dict_string_keys(t5x_state.param_states)
  ours_vr = network.flatten_params(ours_state.v_row); ours_vc = network.flatten_params(ours_state.v_col); ours_v = network.flatten_params(ours_state.v)
  bad = [k for k, s in flat_states.items() if (s.v_row.shape, s.v_col.shape, s.v.shape) != (ours_vr[k].shape, ours_vc[k].shape, ours_v[k].shape)]
  print(f'  state shapes differing from T5X: {bad}')
