"""Adafactor against T5X's `t5x/adafactor.py` (its `apply_param_gradient` with
`standard_logical_factor_rules`), and scanned stacks updated layer by layer."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_setup
from ul2 import adafactor, network, partitioning
from ul2 import train as T


def t5x_step(param, grad, state, step, rule, lr, decay_rate=0.8, clip=1.0, eps1=1e-30,
             eps2=1e-3, min_dim=128):
  """One parameter's update as t5x.adafactor.Adafactor.apply_param_gradient computes it, in
  numpy float64, written from T5X's source: `_parse_rule` (explicit rule or, for rank <= 2
  without BATCH axes, the size heuristic `_factored_dims`), then v_row / v_col / v, the
  rescaled update, clipping by its RMS over the non-BATCH axes, and parameter scaling by the
  parameter's RMS over the same axes (minimum epsilon2). Returns (new param, state)."""
  param, grad = np.asarray(param, np.float64), np.asarray(grad, np.float64)
  ndim = param.ndim
  if rule == 'heuristic':
    averaging = tuple(range(ndim))
    factored = None
    if ndim >= 2:
      order = np.argsort(param.shape)
      if param.shape[order[-2]] >= min_dim:
        factored = ((int(order[-2]),), (int(order[-1]),))
  else:
    rows = tuple(i for i, r in enumerate(rule) if r == 'row')
    cols = tuple(i for i, r in enumerate(rule) if r == 'col')
    averaging = tuple(i for i, r in enumerate(rule) if r != 'batch')
    factored = (rows, cols) if rows or cols else None
  decay = 1.0 - (step + 1.0) ** -decay_rate
  scale = lr * np.maximum(np.sqrt(np.mean(param * param, axis=averaging, keepdims=True)), eps2)
  grad_sqr = grad * grad + eps1
  if factored is not None:
    d1, d0 = factored
    v_row = decay * state['v_row'] + (1 - decay) * grad_sqr.mean(axis=d0)
    v_col = decay * state['v_col'] + (1 - decay) * grad_sqr.mean(axis=d1)
    reduced_d1 = tuple(d - len([e for e in d0 if e < d]) for d in d1)
    row_factor = (v_row / v_row.mean(axis=reduced_d1, keepdims=True)) ** -0.5
    y = grad * np.expand_dims(row_factor, d0) * np.expand_dims(v_col ** -0.5, d1)
    state = {'v_row': v_row, 'v_col': v_col}
  else:
    v = decay * state['v'] + (1 - decay) * grad_sqr
    y = grad * v ** -0.5
    state = {'v': v}
  y = y / np.maximum(1.0, np.sqrt(np.mean(y * y, axis=averaging, keepdims=True)) / clip)
  return param - scale * y, state


def t5x_init(shape, rule, min_dim=128):
  plan = adafactor._plan(rule, shape, min_dim)
  if plan.factored is None:
    return {'v': np.zeros(shape)}
  rows, cols = plan.factored
  return {'v_row': np.zeros(np.delete(shape, cols)), 'v_col': np.zeros(np.delete(shape, rows))}


@pytest.mark.parametrize('shape, rule', [
    ((256, 384), 'heuristic'),              # factored: both axes >= 128
    ((384, 256), 'heuristic'),              # the larger axis first
    ((64, 32), 'heuristic'),                # unfactored: an axis < 128
    ((8, 32), 'heuristic'),                 # relpos_bias (heads, buckets): scaled too
    ((48,), 'heuristic'),                   # a norm scale
    ((3, 16, 40), ('batch', 'row', 'col')),  # a scanned kernel: factored whatever its size
    ((3, 40, 16), ('batch', 'col', 'row')),  # a scanned `wo` / `out`
    ((3, 24), ('batch', None)),              # a scanned norm scale
])
def test_updates_equal_t5x_for_every_kind_of_parameter(shape, rule):
  rng = np.random.default_rng(0)
  param = rng.normal(size=shape).astype(np.float32)
  # Rows of very different scales, so that any RMS over the wrong axes shows.
  param *= np.geomspace(0.01, 10, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
  lr = lambda step: 0.01 / jnp.sqrt(jnp.maximum(step, 1).astype(jnp.float32))
  tx = adafactor.adafactor(lr, {'w': rule})
  params = {'w': jnp.asarray(param)}
  state = tx.init(params)
  reference, ref_state = param.astype(np.float64), t5x_init(shape, rule)
  for step in range(4):
    grad = rng.normal(size=shape).astype(np.float32) * (step + 1)
    updates, state = tx.update({'w': jnp.asarray(grad)}, state, params)
    params = {'w': params['w'] + updates['w']}
    reference, ref_state = t5x_step(reference, grad, ref_state, step, rule,
                                    float(lr(jnp.asarray(step))))
    np.testing.assert_allclose(np.asarray(params['w']), reference, rtol=2e-5, atol=1e-7,
                               err_msg=f'step {step}')
  for name, value in ref_state.items():
    assert getattr(state, name)['w'].shape == value.shape, name


def test_rules_come_from_the_logical_axes_as_t5x_reads_them():
  cfg = dataclasses.replace(train_setup.TINY, scan_layers=True)
  boxed = jax.eval_shape(lambda r: network.init_params(cfg, r, boxed=True), jax.random.key(0))
  rules = network.flatten_params(adafactor.logical_factor_rules(boxed))
  assert rules['encoder/layers/mlp/wi_0/kernel'] == ('batch', 'row', 'col')
  assert rules['encoder/layers/mlp/wo/kernel'] == ('batch', 'col', 'row')
  assert rules['encoder/layers/attention/out/kernel'] == ('batch', 'col', 'row')
  assert rules['decoder/layers/pre_mlp_layer_norm/scale'] == ('batch', None)
  assert rules['encoder/relpos_bias/rel_embedding'] == 'heuristic'
  assert rules['token_embedder/embedding'] == 'heuristic'
  assert rules['encoder/encoder_norm/scale'] == 'heuristic'


# A model whose every matrix axis is >= 128, so T5X's heuristic factors the per-layer
# parameters exactly where the explicit rule factors the scanned ones.
WIDE = network.Config(vocab_size=32128, emb_dim=128, num_heads=4, head_dim=32, mlp_dim=256,
                      num_encoder_layers=2, num_decoder_layers=2)


def _state(compiled, params, optimizer):
  # Copies: the train step donates its state, which must not share buffers with another.
  params = jax.device_put(jax.tree.map(np.array, params), compiled.shardings.params)
  return T.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def test_a_scanned_stack_is_updated_layer_by_layer():
  """The same gradients through both layouts, one layer of each stack 10x the other (a
  whole-stack RMS would scale both layers' updates alike): equal updates, to the float32
  rounding of the factored statistics (1e-6 of each parameter's RMS), over 3 steps."""
  scanned_cfg = dataclasses.replace(WIDE, scan_layers=True)
  opt = T.OptimizerConfig(schedule='constant', learning_rate=0.01, warmup_steps=0)
  per_layer_tx, _ = T.make_optimizer(opt, 10, WIDE)
  scanned_tx, _ = T.make_optimizer(opt, 10, scanned_cfg)
  params = network.init_params(WIDE, jax.random.key(0))
  for stack in ('encoder', 'decoder'):
    params[stack]['layers_1'] = jax.tree.map(lambda x: 10 * x, params[stack]['layers_1'])
  per_layer, scanned = params, network.stack_layers(params, scanned_cfg)
  per_layer_state, scanned_state = per_layer_tx.init(per_layer), scanned_tx.init(scanned)
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, per_layer_state = per_layer_tx.update(grads, per_layer_state, per_layer)
    per_layer = jax.tree.map(jnp.add, per_layer, updates)
    updates, scanned_state = scanned_tx.update(network.stack_layers(grads, scanned_cfg),
                                               scanned_state, scanned)
    scanned = jax.tree.map(jnp.add, scanned, updates)
  got = network.flatten_params(network.unstack_layers(scanned, scanned_cfg))
  want = network.flatten_params(per_layer)
  for name, value in want.items():
    rms = float(np.sqrt(np.mean(np.square(value))))
    np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6 * rms, err_msg=name)


def test_a_scanned_model_trains_like_the_same_model_per_layer():
  """Same initial parameters, same batch, 4 steps, learning rate 1e-3: the scanned model's
  parameters end where the per-layer model's do, to 1e-4 of the distance each parameter moved
  (observed ~2e-5; a whole-stack RMS was ~2e-2 off). Elementwise equality is not to be had:
  Adafactor divides each gradient by its own RMS statistics, so float32 rounding in gradient
  entries near zero grows into visible differences of those entries. The scanned optimiser
  state holds per-layer statistics."""
  opt = T.OptimizerConfig(schedule='constant', learning_rate=1e-3, warmup_steps=0)
  run = T.TrainConfig('/tmp/unused', steps=10)
  devices = jax.devices()[:1]
  per_layer_run = T.compile_run(WIDE, opt, run, partitioning.MeshConfig(), devices)
  scanned_cfg = dataclasses.replace(WIDE, scan_layers=True)
  scanned_run = T.compile_run(scanned_cfg, opt, run, partitioning.MeshConfig(), devices)
  params = network.init_params(WIDE, jax.random.key(0))
  per_layer = _state(per_layer_run, params, per_layer_run.optimizer)
  scanned = _state(scanned_run, network.stack_layers(params, scanned_cfg),
                   scanned_run.optimizer)

  wi = network.flatten_params(scanned.opt_state.v_row)['encoder/layers/mlp/wi_0/kernel']
  assert wi.shape == (2, 128)  # [layers, embed]: per layer, its columns averaged away
  assert network.flatten_params(scanned.opt_state.v_col)[
      'encoder/layers/mlp/wi_0/kernel'].shape == (2, 256)  # [layers, mlp]
  assert network.flatten_params(per_layer.opt_state.v_row)[
      'encoder/layers_0/mlp/wi_0/kernel'].shape == (128,)

  batch = train_setup.fixed_batch(8)
  for _ in range(4):
    per_layer, per_layer_metrics = per_layer_run.train_step(
        per_layer, partitioning.global_batch(batch, per_layer_run.mesh))
    scanned, scanned_metrics = scanned_run.train_step(
        scanned, partitioning.global_batch(batch, scanned_run.mesh))
    assert float(scanned_metrics['loss']) == pytest.approx(float(per_layer_metrics['loss']),
                                                           rel=1e-6)
  got = network.flatten_params(network.unstack_layers(scanned.params, scanned_cfg))
  want = network.flatten_params(per_layer.params)
  initial = network.flatten_params(params)
  assert got.keys() == want.keys()
  for name in want:
    moved = np.linalg.norm(np.asarray(want[name]) - np.asarray(initial[name]))
    assert moved > 0, name
    assert np.linalg.norm(np.asarray(got[name]) - np.asarray(want[name])) <= 1e-4 * moved, name


def test_docstring_examples():
  result = doctest.testmod(adafactor)
  assert result.attempted > 0 and result.failed == 0
