"""Decoding and scoring on the key/value cache: greedy, beam search, sampling, rank scoring.

Every decoder reads the inputs once (an encoder-decoder encodes them; a decoder-only model
fills its cache with them in one pass, `_prefill`), then runs the decoder one token per step
against the cache (`network.init_decoding_cache`) inside one jitted `lax.while_loop` that
stops when every row has produced EOS (1) or `max_decode_length` tokens. Outputs are
[batch, max_decode_length] token ids without the start token: the EOS, then padding (0).
The same functions take either model (`network.build`); `encoder_input_tokens` are the
inputs feature's tokens in both.

    >>> cfg = network.Config(vocab_size=64, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
    ...                      num_encoder_layers=1, num_decoder_layers=1)
    >>> model = network.Transformer(cfg)
    >>> inputs = jnp.array([[5, 6, 7, 1]])
    >>> params = network.init_params(cfg, jax.random.key(0))
    >>> greedy(model, params, inputs, max_decode_length=6).shape
    (1, 6)

Rank classification scores every candidate answer by its log-likelihood under teacher forcing
(`score`) and picks the most likely: the usual zero-/few-shot evaluation of classification.
All functions are pure and jit-compatible. `compile_decode` jits one of them for a file's
fixed batch shape over a device mesh (parameters sharded by the logical-axis rules, rows over
`data`): what `scripts/infer.py` runs and `scripts/compile_tpu.py` compiles for a TPU slice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ul2 import network, partitioning

EOS_ID = network.EOS_ID
PAD_ID = network.PAD_ID
NEG_INF = -1e9


def _step_fn(model: network.Model, params: Any, *, encoded: jax.Array,
             encoder_input_tokens: jax.Array, max_decode_length: int):
  """One cached decoder step: (cache, tokens [rows]) -> (log-probs [rows, vocab], cache)."""
  def step(cache, tokens):
    logits, mutated = model.apply(
        {'params': params, 'cache': cache}, encoded, encoder_input_tokens, tokens[:, None],
        decode=True, max_decode_length=max_decode_length, method='decode', mutable=['cache'])
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), mutated['cache']
  return step


def _encode(model, params, encoder_input_tokens, repeat: int = 1):
  encoded = model.apply({'params': params}, encoder_input_tokens, method='encode')
  if repeat > 1:  # [batch, ...] -> [batch * repeat, ...], each row repeated in place
    encoded = jnp.repeat(encoded, repeat, axis=0)
    encoder_input_tokens = jnp.repeat(encoder_input_tokens, repeat, axis=0)
  return encoded, encoder_input_tokens


def _start(model, params, inputs: jax.Array, max_decode_length: int, repeat: int = 1):
  """What a decoding loop starts from: (step, cache, first tokens [rows]).

  The loop feeds `first` at step 0, then each step's chosen token. Encoder-decoder: the
  inputs are encoded once, the cache is empty and `first` is the start token 0.
  Decoder-only: `_prefill`.
  """
  if isinstance(model, network.DecoderOnly):
    return _prefill(model, params, jnp.repeat(inputs, repeat, axis=0), max_decode_length)
  encoded, enc_tokens = _encode(model, params, inputs, repeat)
  cache = network.init_decoding_cache(model, enc_tokens.shape[0], enc_tokens.shape[1],
                                      max_decode_length)
  cache = network.with_cross_attention_cache(model, params, cache, encoded, enc_tokens,
                                             max_decode_length)
  step = _step_fn(model, params, encoded=encoded, encoder_input_tokens=enc_tokens,
                  max_decode_length=max_decode_length)
  return step, cache, jnp.full((enc_tokens.shape[0],), PAD_ID, jnp.int32)


def _prefill(model: network.DecoderOnly, params: Any, inputs: jax.Array,
             max_decode_length: int):
  """A decoder-only model's prompt, read in one pass into the cache.

  The prompt is what the model reads before the first target in training: the start token 0
  and the inputs (seqio's `PrefixLMFeatureConverter`), e.g. inputs [[5, 6, 1, 0]] (2 tokens,
  EOS, padding) -> prompt [[0, 5, 6, 1, 0]] of length 4. The prefill writes the keys and values
  of all of it, with the training mask (bidirectional over the prompt in a prefix LM), and
  leaves each row's cache index at its last prompt position; step 0 then feeds that last
  prompt token (here 1) again, which gives the first target's log-probabilities with the same
  attention as training. The cache holds prompt + `max_decode_length` positions.
  """
  rows, length = inputs.shape
  prompt = jnp.pad(inputs, ((0, 0), (1, 0)))  # [rows, 1 + inputs]
  lengths = 1 + jnp.sum(inputs > 0, axis=1)  # [rows]
  real = (jnp.arange(length + 1)[None, :] < lengths[:, None]).astype(jnp.int32)
  cache_length = length + 1 + max_decode_length
  cache = network.init_decoding_cache(model, rows, 0, cache_length)
  _, mutated = model.apply({'params': params, 'cache': cache}, prompt, real,
                           decoder_causal_attention=real, decode=True,
                           max_decode_length=cache_length, prefill_lengths=lengths - 1,
                           mutable=['cache'])

  def step(cache, tokens):
    logits, mutated = model.apply({'params': params, 'cache': cache}, tokens[:, None],
                                  tokens[:, None], decode=True, max_decode_length=cache_length,
                                  mutable=['cache'])
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), mutated['cache']
  first = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
  return step, mutated['cache'], first


# ----------------------------------------------------------------------------------------------
# Greedy and sampling
# ----------------------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Keeps the `top_k` most likely tokens and the smallest set whose probability reaches
  `top_p` (nucleus); the rest get -inf. 0 / 1.0 switch a filter off.

  >>> filter_logits(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), top_p=0.7).tolist()[0][2:]
  [-1000000000.0, -1000000000.0]
  """
  if top_k:
    kth = jnp.sort(logits, axis=-1)[..., -top_k][..., None]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # The smallest prefix reaching top_p: a token stays if the mass before it is < top_p.
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


@functools.partial(jax.jit, static_argnames=('model', 'max_decode_length', 'temperature',
                                             'top_k', 'top_p'))
def _decode_loop(model, params, encoder_input_tokens, *, rng, max_decode_length: int,
                 temperature: float, top_k: int, top_p: float):
  batch = encoder_input_tokens.shape[0]
  step, cache, first = _start(model, params, encoder_input_tokens, max_decode_length)

  def cond(carry):
    t, _, _, done, _ = carry
    return jnp.logical_and(t < max_decode_length, jnp.logical_not(jnp.all(done)))

  def body(carry):
    t, cache, tokens, done, rng = carry
    previous = jnp.where(t == 0, first, tokens[:, jnp.maximum(t - 1, 0)])
    log_probs, cache = step(cache, previous)
    if temperature == 0.0:
      chosen = jnp.argmax(log_probs, axis=-1)
    else:
      rng, key = jax.random.split(rng)
      logits = filter_logits(log_probs / temperature, top_k, top_p)
      chosen = jax.random.categorical(key, logits, axis=-1)
    chosen = jnp.where(done, PAD_ID, chosen).astype(jnp.int32)
    tokens = tokens.at[:, t].set(chosen)
    return t + 1, cache, tokens, jnp.logical_or(done, chosen == EOS_ID), rng

  tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
  init = (jnp.int32(0), cache, tokens, jnp.zeros((batch,), bool), rng)
  return jax.lax.while_loop(cond, body, init)[2]


def greedy(model: network.Model, params: Any, encoder_input_tokens: jax.Array,
           max_decode_length: int) -> jax.Array:
  """Most likely token at every step: [batch, inputs] -> [batch, max_decode_length]."""
  return _decode_loop(model, params, encoder_input_tokens, rng=jax.random.key(0),
                      max_decode_length=max_decode_length, temperature=0.0, top_k=0, top_p=1.0)


def sample(model: network.Model, params: Any, encoder_input_tokens: jax.Array,
           rng: jax.Array, max_decode_length: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Ancestral sampling with temperature, top-k and top-p (nucleus) filtering."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0 for sampling (use greedy for 0), got '
                     f'{temperature}.')
  return _decode_loop(model, params, encoder_input_tokens, rng=rng,
                      max_decode_length=max_decode_length, temperature=float(temperature),
                      top_k=int(top_k), top_p=float(top_p))


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------

def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's ((5 + length) / 6) ** alpha, as T5X's beam search uses it; 0 turns it off."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree: Any, indices: jax.Array, batch: int, beams: int, axis: int) -> Any:
  """Picks beam rows ([batch * beams] on `axis`) of every array: new beam j of batch row b is
  old beam `indices[b, j]`. The cross-attention cache is the same for every beam of a row
  (the row's encoding, repeated), so it stays as it is."""
  def gather(path, x):
    if (x.ndim <= axis or x.shape[axis] != batch * beams
        or getattr(path[-1], 'key', None) in network.CROSS_ATTENTION_CACHE):
      return x
    shape = x.shape
    x = x.reshape(shape[:axis] + (batch, beams) + shape[axis + 1:])
    idx = indices.reshape((1,) * axis + (batch, beams) + (1,) * (x.ndim - axis - 2))
    return jnp.take_along_axis(x, idx, axis=axis + 1).reshape(shape)
  return jax.tree_util.tree_map_with_path(gather, tree)


def _top(scores: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest of each row, in ascending order of score (T5X keeps its beams
  so, and the order decides ties in later steps)."""
  return jax.lax.top_k(scores, k)[1][:, ::-1]


def _take(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x [batch, n, ...], indices [batch, k] -> [batch, k, ...]."""
  return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


# T5X's "minus infinity" for beam scores: finite, so that dead beams still sort among
# themselves exactly as T5X sorts them.
BEAM_NEG_INF = -1.0e7


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_decode_length',
                                             'alpha'))
def beam_search(model: network.Model, params: Any, encoder_input_tokens: jax.Array,
                beam_size: int, max_decode_length: int, alpha: float = 0.6
                ) -> tuple[jax.Array, jax.Array]:
  """T5X's beam search (`t5x.decoding.beam_search`): -> (sequences [batch, beam_size,
  max_decode_length], scores [batch, beam_size]), best first (T5X returns them best last).

  Each step extends the `beam_size` live hypotheses by every token and keeps the best
  2 x beam_size by log-probability; of those, the ones ending in EOS enter a separate pool of
  `beam_size` finished hypotheses, scored log p / length_penalty(length with EOS, alpha), and
  the best `beam_size` others stay live. The search stops at `max_decode_length` or once no
  live hypothesis, even with the most lenient length penalty (that of max_decode_length + 1,
  as T5X has it), could beat the worst of a full finished pool. The finished pool is returned;
  a row where nothing finished returns its live hypotheses with their unpenalised
  log-probabilities. Slots of a pool that never filled score about BEAM_NEG_INF.
  """
  batch = encoder_input_tokens.shape[0]
  rows = batch * beam_size
  step, cache, first = _start(model, params, encoder_input_tokens, max_decode_length, beam_size)
  cache_axis = 1 if model.config.scan_layers else 0
  vocab = model.config.vocab_size
  best_possible_penalty = length_penalty(max_decode_length + 1.0, alpha)

  def cond(carry):
    t, _, _, live_log_prob, _, finished_score, finished = carry
    best_live = live_log_prob[:, -1:] / best_possible_penalty  # kept in ascending order
    worst_finished = jnp.where(finished, jnp.min(finished_score, axis=1, keepdims=True),
                               BEAM_NEG_INF)
    return jnp.logical_and(t < max_decode_length,
                           jnp.logical_not(jnp.all(worst_finished > best_live)))

  def body(carry):
    t, cache, live, live_log_prob, finished_seqs, finished_score, finished = carry
    previous = jnp.where(t == 0, first, live[..., jnp.maximum(t - 1, 0)].reshape(rows))
    step_log_probs, cache = step(cache, previous)
    # [batch, beam, vocab] -> the 2 x beam best extensions: [batch, 2 * beam]
    candidates = (step_log_probs.reshape(batch, beam_size, vocab)
                  + live_log_prob[..., None]).reshape(batch, beam_size * vocab)
    log_prob, flat = jax.lax.top_k(candidates, 2 * beam_size)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = _take(live, parent).at[..., t].set(token)  # [batch, 2 * beam, length]
    ends = token == EOS_ID

    keep = _top(log_prob + ends * BEAM_NEG_INF, beam_size)  # the best that go on
    live, live_log_prob = _take(seqs, keep), _take(log_prob + ends * BEAM_NEG_INF, keep)
    cache = _gather_beams(cache, _take(parent, keep), batch, beam_size, cache_axis)

    score = log_prob / length_penalty(t + 1.0, alpha) + (~ends) * BEAM_NEG_INF
    pool_seqs = jnp.concatenate([finished_seqs, seqs], axis=1)  # [batch, 3 * beam, length]
    pool_score = jnp.concatenate([finished_score, score], axis=1)
    pool_finished = jnp.concatenate([finished, ends], axis=1)
    best = _top(pool_score, beam_size)
    return (t + 1, cache, live, live_log_prob, _take(pool_seqs, best),
            _take(pool_score, best), _take(pool_finished, best))

  first_beam_only = jnp.where(jnp.arange(beam_size) == 0, 0.0, BEAM_NEG_INF)
  empty = jnp.zeros((batch, beam_size, max_decode_length), jnp.int32)
  init = (jnp.int32(0), cache, empty, jnp.tile(first_beam_only, (batch, 1)), empty,
          jnp.full((batch, beam_size), BEAM_NEG_INF), jnp.zeros((batch, beam_size), bool))
  _, _, live, live_log_prob, finished_seqs, finished_score, finished = jax.lax.while_loop(
      cond, body, init)
  any_finished = jnp.any(finished, axis=1)
  sequences = jnp.where(any_finished[:, None, None], finished_seqs, live)
  scores = jnp.where(any_finished[:, None], finished_score, live_log_prob)
  return sequences[:, ::-1], scores[:, ::-1]  # best first


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def _teacher_forced_log_likelihood(model, params, encoded, encoder_input_tokens, targets):
  """[rows, Lt] targets given the rows' encodings -> [rows] natural-log likelihoods."""
  decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  logits = model.apply({'params': params}, encoded, encoder_input_tokens, decoder_inputs,
                       targets, method='decode')
  return network.sequence_log_likelihood(logits, targets)


def prefix_lm_rows(inputs: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """Rows of inputs [rows, Li] and targets [rows, Lt] as seqio's `PrefixLMFeatureConverter`
  (unpacked) makes them: each row's inputs, without their padding, then its targets.

  >>> rows = prefix_lm_rows(jnp.array([[9, 4, 1, 0]]), jnp.array([[3, 1]]))
  >>> {k: v.tolist()[0] for k, v in rows.items()}  # doctest: +NORMALIZE_WHITESPACE
  {'decoder_target_tokens': [9, 4, 1, 3, 1, 0], 'decoder_input_tokens': [0, 9, 4, 1, 3, 1],
   'decoder_loss_weights': [0, 0, 0, 1, 1, 0], 'decoder_causal_attention': [1, 1, 1, 1, 0, 0]}
  """
  if inputs.shape[1] == 0:  # no inputs at all (a causal LM): one padding column
    inputs = jnp.zeros((inputs.shape[0], 1), jnp.int32)
  li, lt = inputs.shape[1], targets.shape[1]
  n = jnp.sum(inputs > 0, axis=1, keepdims=True)  # [rows, 1]
  pos = jnp.arange(li + lt)[None, :]
  from_inputs = jnp.take_along_axis(inputs, jnp.minimum(pos, li - 1).repeat(len(inputs), 0),
                                    axis=1)
  t = pos - n
  from_targets = jnp.take_along_axis(targets, jnp.clip(t, 0, lt - 1), axis=1)
  seq = jnp.where(pos < n, from_inputs, jnp.where(t < lt, from_targets, 0)).astype(jnp.int32)
  return {'decoder_target_tokens': seq,
          'decoder_input_tokens': jnp.pad(seq, ((0, 0), (1, 0)))[:, :-1],
          'decoder_loss_weights': ((pos >= n) & (seq > 0)).astype(jnp.int32),
          'decoder_causal_attention': (pos <= n).astype(jnp.int32)}


def _log_likelihood(model, params, inputs, targets, repeat: int = 1):
  """log p(targets | inputs) of rows whose inputs are `inputs` repeated `repeat` times."""
  if isinstance(model, network.DecoderOnly):
    rows = prefix_lm_rows(jnp.repeat(inputs, repeat, axis=0), targets)
    weights = rows.pop('decoder_loss_weights')
    logits = model.apply({'params': params}, **rows)
    return network.sequence_log_likelihood(logits, rows['decoder_target_tokens'], weights)
  # Each input is encoded once; its encodings are repeated for its rows.
  encoded, inputs = _encode(model, params, inputs, repeat)
  return _teacher_forced_log_likelihood(model, params, encoded, inputs, targets)


@functools.partial(jax.jit, static_argnames=('model',))
def score(model: network.Model, params: Any, encoder_input_tokens: jax.Array,
          targets: jax.Array) -> jax.Array:
  """Natural-log likelihood of each row's `targets` (EOS included, padding excluded)."""
  return _log_likelihood(model, params, encoder_input_tokens, targets)


@functools.partial(jax.jit, static_argnames=('model',))
def rank_classification(model: network.Model, params: Any,
                        encoder_input_tokens: jax.Array, candidates: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Scores each input's candidate answers: inputs [batch, Li], candidates [batch, C, Lt]
  (token ids ending in EOS, padded with 0) -> (log-likelihoods [batch, C], best [batch])."""
  batch, count, length = candidates.shape
  scores = _log_likelihood(model, params, encoder_input_tokens,
                           candidates.reshape(batch * count, length), count)
  scores = scores.reshape(batch, count)
  return scores, jnp.argmax(scores, axis=-1)


# ----------------------------------------------------------------------------------------------
# A file's decoding, compiled once over a mesh
# ----------------------------------------------------------------------------------------------

METHODS = ('greedy', 'beam', 'sample')
_PARAMS_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How a file is decoded: the method and the one batch shape compiled for it.

  `params_dtype='bfloat16'` casts the parameters once they are read, as T5X's inference
  (`runs/infer.gin`: `RestoreCheckpointConfig.dtype = 'bfloat16'`) does: half the memory.
  """

  method: str = 'greedy'  # one of METHODS
  batch_size: int = 16  # inputs per batch (the last batch is padded with copies)
  max_input_length: int = 512  # input tokens kept; longer inputs lose their end
  max_decode_length: int = 64  # generated tokens at most
  beam_size: int = 4  # method 'beam'
  alpha: float = 0.6  # beam length penalty
  temperature: float = 1.0  # method 'sample'
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  params_dtype: str = 'float32'

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'DecodeConfig.method must be one of {", ".join(METHODS)}, got '
                       f'{self.method!r}.')
    if self.params_dtype not in _PARAMS_DTYPES:
      raise ValueError(f'DecodeConfig.params_dtype must be one of '
                       f'{", ".join(_PARAMS_DTYPES)}, got {self.params_dtype!r}.')
    for name in ('batch_size', 'max_input_length', 'max_decode_length', 'beam_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'DecodeConfig.{name} must be >= 1, got {getattr(self, name)}.')
    if self.method == 'sample' and self.temperature <= 0:
      raise ValueError(f'DecodeConfig.temperature must be > 0 for sampling (greedy is 0), '
                       f'got {self.temperature}.')


def generate(model: network.Model, params: Any, encoder_input_tokens: jax.Array,
             config: DecodeConfig) -> jax.Array:
  """[batch, inputs] -> [batch, max_decode_length] token ids by `config.method` (beam: the
  best hypothesis). Sampling draws with `config.seed`'s key."""
  length = config.max_decode_length
  if config.method == 'greedy':
    return greedy(model, params, encoder_input_tokens, max_decode_length=length)
  if config.method == 'beam':
    sequences, _ = beam_search(model, params, encoder_input_tokens, beam_size=config.beam_size,
                               max_decode_length=length, alpha=config.alpha)
    return sequences[:, 0]
  return sample(model, params, encoder_input_tokens, jax.random.key(config.seed),
                max_decode_length=length, temperature=config.temperature, top_k=config.top_k,
                top_p=config.top_p)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """`generate` and `score` jitted over a mesh for batches of `config.batch_size` rows.

  Take parameters and batches through `place_params` / `place_batch` (sharded global
  arrays); outputs come back replicated, whole on every process. The compiled batch has
  `rows` rows: `config.batch_size` rounded up to a multiple of the `data` shards, so any
  batch runs on any mesh; `place_batch` pads what it is given with copies of the last row
  (their outputs are for the caller to drop).
  """

  mesh: jax.sharding.Mesh
  rows: int
  model: network.Model
  config: DecodeConfig
  param_shardings: Any
  generate: partitioning.InMesh  # (params, inputs [batch, Li]) -> [batch, max_decode_length]
  score: partitioning.InMesh  # (params, inputs [batch, Li], targets [batch, Lt]) -> [batch]

  def place_params(self, params: Any) -> Any:
    dtype = _PARAMS_DTYPES[self.config.params_dtype]
    cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, params)
    return partitioning.place(cast, self.param_shardings)

  def place_batch(self, tokens: Any) -> jax.Array:
    """[n <= rows, length] token ids (whole on every process) -> [rows, length] sharded over
    `data`, padded with copies of the last row."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if not 0 < tokens.shape[0] <= self.rows:
      raise ValueError(f'A batch of {tokens.shape[0]} rows; this decoder takes 1 to '
                       f'{self.rows}.')
    tokens = jnp.concatenate([tokens, jnp.repeat(tokens[-1:], self.rows - len(tokens), 0)])
    return partitioning.place(tokens, partitioning.data_sharding(self.mesh))

  def abstract_params(self) -> Any:
    """The placed parameters as sharded `jax.ShapeDtypeStruct`s (to compile ahead of time)."""
    dtype = _PARAMS_DTYPES[self.config.params_dtype]
    shapes = network.param_shapes(self.model.config)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                        shapes, self.param_shardings)

  def abstract_batch(self, length: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.rows, length), jnp.int32,
                                sharding=partitioning.data_sharding(self.mesh))


def compile_decode(model_config: network.Config, config: DecodeConfig,
                   mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
                   devices: Any = None) -> Decoder:
  """The `Decoder` of a model over `mesh` (all devices, or `devices`: abstract TPU chips to
  compile for another machine).

      >>> cfg = network.Config(vocab_size=64, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
      ...                      num_encoder_layers=1, num_decoder_layers=1)
      >>> decoder = compile_decode(cfg, DecodeConfig(batch_size=2, max_decode_length=5),
      ...                          devices=jax.devices()[:1])
      >>> params = decoder.place_params(network.init_params(cfg, jax.random.key(0)))
      >>> decoder.generate(params, decoder.place_batch([[5, 6, 1], [7, 1, 0]])).shape
      (2, 5)

  On 8 devices (`data` 8) the same decoder compiles 8 rows, 2 of them given.
  """
  model_config = dataclasses.replace(model_config, dropout_rate=0.0)
  device_mesh = partitioning.make_mesh(mesh, devices)
  shards = device_mesh.shape['data']
  rules = mesh.rules()
  shardings = partitioning.param_shardings(model_config, device_mesh, rules)
  rows = partitioning.data_sharding(device_mesh)
  whole = partitioning.replicated(device_mesh)
  model = network.build(model_config)

  def in_mesh(fn, arguments):
    return partitioning.InMesh(jax.jit(fn, in_shardings=(shardings,) + (rows,) * arguments,
                                       out_shardings=whole), device_mesh, rules)

  return Decoder(
      mesh=device_mesh, rows=-(-config.batch_size // shards) * shards, model=model,
      config=config, param_shardings=shardings,
      generate=in_mesh(lambda p, x: generate(model, p, x, config), 1),
      score=in_mesh(lambda p, x, t: score(model, p, x, t), 2))
