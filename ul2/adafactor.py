"""Adafactor as T5X runs it (`t5x.adafactor.Adafactor` with `standard_logical_factor_rules`), as
an optax `GradientTransformation`.

T5X decides per parameter, from its logical axis names, how to factor the second moments and
over which axes to take the root-mean-squares of update clipping and parameter scaling:

    embed -> ROW, vocab / mlp / heads / kv / joined_kv -> COLUMN, layers -> BATCH, others NONE

    >>> factor_rule(('embed', 'mlp'))            # rank <= 2, no batch axis: T5X's heuristic
    'heuristic'
    >>> factor_rule(('layers', 'embed', 'mlp'))  # a scanned stack: per-layer statistics
    ('batch', 'row', 'col')
    >>> factor_rule(('layers', 'embed'))         # a scanned norm scale: unfactored, per layer
    ('batch', None)

The heuristic (T5X's default for rank <= 2) factors the two largest axes when the smaller of
them has at least `min_dim_size_to_factor` entries, and takes the RMSs over the whole array.
An explicit rule factors its ROW and COLUMN axes whatever their size and takes the RMSs over
every axis but the BATCH ones, so each layer of a scanned stack is updated exactly as the same
layer unscanned would be (when the heuristic factors it too). Per parameter, with g its
gradient and t the step:

    decay  = 1 - (t + 1) ** -decay_rate
    v      = decay * v + (1 - decay) * (g**2 + epsilon1)     (or its row and column means)
    y      = g / sqrt(v)                                      (factored: v ~ row x col / mean)
    y     /= max(1, rms(y) / clipping_threshold)
    update = -learning_rate * max(rms(param), epsilon2) * y   (parameter scaling)

Parameter scaling applies to every parameter, `relpos_bias` included, as in T5X's default.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROW, COLUMN, BATCH = 'row', 'col', 'batch'
HEURISTIC = 'heuristic'
# T5X's `standard_logical_factor_rules`, for the logical axes our parameters carry.
LOGICAL_FACTOR_RULES = {
    'vocab': COLUMN, 'embed': ROW, 'mlp': COLUMN, 'heads': COLUMN, 'kv': COLUMN,
    'joined_kv': COLUMN, 'relpos_buckets': None, 'layers': BATCH,
}

Rule = str | tuple[str | None, ...]


def factor_rule(axes: Sequence[str]) -> Rule:
  """A parameter's rule from its logical axis names: a tuple of ROW / COLUMN / BATCH / None
  per axis, or HEURISTIC where T5X falls back to its size heuristic."""
  try:
    rule = tuple(LOGICAL_FACTOR_RULES[name] for name in axes)
  except KeyError as e:
    raise ValueError(f'No Adafactor factor rule for the logical axis {e.args[0]!r} of a '
                     f'parameter with axes {tuple(axes)}.') from None
  if ROW not in rule or COLUMN not in rule:  # partly factored: keep only the BATCH marks
    rule = tuple(BATCH if r == BATCH else None for r in rule)
  if len(rule) <= 2 and BATCH not in rule:
    return HEURISTIC
  return rule


class _Plan(NamedTuple):
  """How one parameter is treated: the axes its RMSs average over, and its factored axes
  (rows, columns), or None for an unfactored second moment."""
  averaging: tuple[int, ...]
  factored: tuple[tuple[int, ...], tuple[int, ...]] | None


def _plan(rule: Rule, shape: Sequence[int], min_dim_size_to_factor: int) -> _Plan:
  """
  >>> _plan(HEURISTIC, (512, 2048), 128)
  _Plan(averaging=(0, 1), factored=((0,), (1,)))
  >>> _plan(HEURISTIC, (64, 32), 128)
  _Plan(averaging=(0, 1), factored=None)
  >>> _plan(('batch', 'row', 'col'), (2, 32, 64), 128)
  _Plan(averaging=(1, 2), factored=((1,), (2,)))
  """
  if rule == HEURISTIC:
    everything = tuple(range(len(shape)))
    if len(shape) < 2:
      return _Plan(everything, None)
    by_size = np.argsort(shape, kind='stable')
    if shape[by_size[-2]] < min_dim_size_to_factor:
      return _Plan(everything, None)
    return _Plan(everything, ((int(by_size[-2]),), (int(by_size[-1]),)))
  rows = tuple(i for i, r in enumerate(rule) if r == ROW)
  cols = tuple(i for i, r in enumerate(rule) if r == COLUMN)
  averaging = tuple(i for i, r in enumerate(rule) if r != BATCH)
  return _Plan(averaging, (rows, cols) if rows or cols else None)


class AdafactorState(NamedTuple):
  """Second-moment statistics per parameter, trees shaped like the parameters. Unused
  entries are zeros of shape (1,), as in T5X: `v_row`/`v_col` (a factored parameter's shape
  without its columns / rows), `v` (an unfactored one's own shape)."""
  count: jax.Array  # int32 scalar: updates applied
  v_row: Any
  v_col: Any
  v: Any


def adafactor(learning_rate: Callable[[jax.Array], jax.Array], rules: Any, *,
              decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30, epsilon2: float = 1e-3
              ) -> optax.GradientTransformation:
  """T5X's Adafactor (no momentum, no weight decay). `rules`: a tree like the parameters
  with each parameter's `factor_rule`. Updates are to be added to the parameters."""

  def plans(params):
    return jax.tree.map(lambda rule, p: _plan(rule, p.shape, min_dim_size_to_factor),
                        rules, params, is_leaf=_is_rule)

  def init(params):
    def zeros(plan, p):
      unused = (1,)
      if plan.factored is None:
        shapes = unused, unused, p.shape
      else:
        rows, cols = plan.factored
        shapes = np.delete(p.shape, cols), np.delete(p.shape, rows), unused
      # Distinct arrays, never one shared: a donated state must not hold a buffer twice.
      return tuple(jnp.zeros(tuple(shape), jnp.float32) for shape in shapes)
    v_row, v_col, v = _unzip(jax.tree.map(zeros, plans(params), params, is_leaf=_is_plan),
                             params)
    return AdafactorState(jnp.zeros((), jnp.int32), v_row, v_col, v)

  def update(grads, state, params):
    decay = 1.0 - (state.count.astype(jnp.float32) + 1.0) ** -decay_rate
    step_size = learning_rate(state.count)

    def one(plan, g, p, v_row, v_col, v):
      g = g.astype(jnp.float32)
      g_sqr = g * g + epsilon1
      if plan.factored is None:
        v = decay * v + (1.0 - decay) * g_sqr
        y = g * jax.lax.rsqrt(v)
      else:
        rows, cols = plan.factored
        v_row = decay * v_row + (1.0 - decay) * jnp.mean(g_sqr, axis=cols)
        v_col = decay * v_col + (1.0 - decay) * jnp.mean(g_sqr, axis=rows)
        # The rows' axes in v_row, which lacks the column axes.
        row_axes = tuple(r - sum(c < r for c in cols) for r in rows)
        row_scale = v_row / jnp.mean(v_row, axis=row_axes, keepdims=True)
        y = (g * jnp.expand_dims(jax.lax.rsqrt(row_scale), cols)
             * jnp.expand_dims(jax.lax.rsqrt(v_col), rows))
      if clipping_threshold is not None:
        rms = jnp.sqrt(jnp.mean(y * y, axis=plan.averaging, keepdims=True))
        y = y / jnp.maximum(1.0, rms / clipping_threshold)
      scale = step_size
      if multiply_by_parameter_scale:
        p32 = p.astype(jnp.float32)
        scale = scale * jnp.maximum(
            jnp.sqrt(jnp.mean(p32 * p32, axis=plan.averaging, keepdims=True)), epsilon2)
      return (-scale * y).astype(p.dtype), v_row, v_col, v

    out = jax.tree.map(one, plans(params), grads, params, state.v_row, state.v_col, state.v,
                       is_leaf=_is_plan)
    updates, v_row, v_col, v = _unzip(out, params)
    return updates, AdafactorState(state.count + 1, v_row, v_col, v)

  return optax.GradientTransformation(init, update)


def logical_factor_rules(boxed_params: Any) -> Any:
  """Each parameter's `factor_rule`, from a tree of `nn.LogicallyPartitioned` boxes (what
  `network.init_params(config, rng, boxed=True)` returns, or its `jax.eval_shape`)."""
  return jax.tree.map(lambda box: factor_rule(box.names), boxed_params,
                      is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))


def _is_rule(x) -> bool:
  return x == HEURISTIC or isinstance(x, tuple)


def _is_plan(x) -> bool:
  return isinstance(x, _Plan)


def _unzip(tree: Any, like: Any) -> tuple[Any, ...]:
  """A tree (shaped like `like`) of n-tuples -> n trees."""
  structure = jax.tree.structure(like)
  parts = structure.flatten_up_to(tree)
  return tuple(structure.unflatten([p[i] for p in parts]) for i in range(len(parts[0])))


def state_shardings(state: AdafactorState, param_shardings: Any, replicated: Any
                    ) -> AdafactorState:
  """As T5X partitions it: an unfactored `v` like its parameter, everything else replicated."""
  def v_sharding(v, sharding):  # (1,): the placeholder of a factored parameter
    return replicated if tuple(v.shape) == (1,) else sharding
  return AdafactorState(
      replicated, jax.tree.map(lambda _: replicated, state.v_row),
      jax.tree.map(lambda _: replicated, state.v_col),
      jax.tree.map(v_sharding, state.v, param_shardings))
