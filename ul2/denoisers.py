"""The UL2 Mixture-of-Denoisers as seqio preprocessors (TensorFlow ops only, no JAX).

Every denoiser is span corruption (reference §1). R and X denoisers replace random noise spans
by unique sentinels; S is a prefix LM: the input is a prefix, the target the rest. A mode token
(`[NLU]` for R, `[S2S]` for S, `[NLG]` for X) is prepended to the inputs. A worked example with
the 32,100-id T5 vocabulary (`<extra_id_0>` = 32099, `<extra_id_1>` = 32098, EOS = 1), a raw
chunk of ten word pieces `a b c d e f g h i j` = [10 .. 19]:

  R (mu=3, r=0.15 -> 2 noise tokens in 1 span; noise mask 0000000011: noise and non-noise
     spans alternate, starting with non-noise and ending with noise, as in T5):
    inputs   [NLU] a b c d e f g h <extra_id_0> EOS
             [784, 567, 9138, 908, 10, 11, 12, 13, 14, 15, 16, 17, 32099, 1]
    targets  <extra_id_0> i j EOS          [32099, 18, 19, 1]

  X (mu=3, r=0.5 -> 5 noise tokens in 2 spans; noise mask 0111000011):
    inputs   [NLG] a <extra_id_0> e f g h <extra_id_1> EOS
             [784, 18207, 517, 908, 10, 32099, 14, 15, 16, 17, 32098, 1]
    targets  <extra_id_0> b c d <extra_id_1> i j EOS   [32099, 11, 12, 13, 32098, 18, 19, 1]

  S (prefix of 6 tokens):
    inputs   [S2S] a b c d e f EOS
             [784, 134, 357, 134, 908, 10, 11, 12, 13, 14, 15, 1]
    targets  g h i j EOS                   [16, 17, 18, 19, 1]

`tests/test_denoisers.py` checks these exact lists. Merging inputs (without the mode token) and
targets by their sentinels always gives the raw chunk back.

Three pitfalls of the reference `ul2_objective` are handled here (reference §1):
  1. Sentinel overflow: a denoiser that could need more spans than the vocabulary has sentinels
     (X(3, 0.5) at 512 inputs: 127 of 100) takes fewer raw tokens, so that its spans fit and it
     keeps its (mu, r) (`sentinel_overflow='shrink'`, the default); or its span count is capped
     (`'cap'`: spans get longer than mu); or it is rejected when the preprocessor is built
     (`'error'`). Never are ordinary word pieces used as sentinels. Likewise a denoiser whose
     integer span count would miss mu by more than 5% (X(64, 0.15) at 512: one span of ~89)
     takes a shorter chunk (`exact_mean_span`).
  2. Prompt overflow: each denoiser's raw chunk length is chosen so that mode token + corrupted
     inputs + EOS and targets + EOS fit the feature lengths; nothing is trimmed afterwards.
  3. The S sentinel: `Denoiser.s_sentinel` appends `<extra_id_0>` to S inputs (model cards).

Data flow (seqio preprocessors, in a task's order):

  text documents -> `tokenize_blocks`: 128 consecutive documents tokenized in one op and
                    concatenated into one block (T5's reduce_concat_tokens), so short documents
                    fill windows; `concatenate_documents` does the same for tokenized ones;
                    a block over MAX_BLOCK_TOKENS (one huge document) is cut into pieces
  blocks         -> `MixtureOfDenoisers`: each block cut into chunks, each chunk's denoiser
                    drawn by the mixing rates and the chunk cut to that denoiser's raw length
                    (nothing wasted); all chunks of a block denoised by one set of ops:
                    {'inputs', 'targets', 'denoiser'} (EOS added by seqio afterwards)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from ul2 import vocabulary

# Each family's mode token (paper §3.1.2); the tokens themselves live in `ul2.vocabulary`.
FAMILY_MODES = {'R': vocabulary.NLU, 'S': vocabulary.S2S, 'X': vocabulary.NLG}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoiser. R/X: span corruption (mean span length, corruption rate); S: prefix LM.

  S options: `s_split='uniform'` draws the prefix length uniformly in [1, L-1] (the reference
  code, mean target fraction 1/2); `s_split='fixed'` makes the target `corruption_rate` of the
  chunk (the paper: 0.25). `s_sentinel` ends S inputs with `<extra_id_0>`.
  """

  family: str  # 'R', 'S' or 'X'
  mean_span_length: float = 3.0
  corruption_rate: float = 0.15
  mode: str | None = None  # None: the family's mode token
  s_split: str = 'uniform'
  s_sentinel: bool = False

  def __post_init__(self):
    if self.family not in FAMILY_MODES:
      raise ValueError(f"Denoiser.family must be 'R', 'S' or 'X', got {self.family!r}.")
    if self.mode is None:
      object.__setattr__(self, 'mode', FAMILY_MODES[self.family])
    vocabulary.check_mode(self.mode, f'Denoiser {self.name} mode')
    if self.family != 'S' and self.mean_span_length < 1:
      raise ValueError(f'Denoiser {self.name}: mean_span_length must be >= 1, got '
                       f'{self.mean_span_length}.')
    if not 0.0 < self.corruption_rate < 1.0:
      raise ValueError(f'Denoiser {self.name}: corruption_rate must be in (0, 1), got '
                       f'{self.corruption_rate}.')
    if self.s_split not in ('uniform', 'fixed'):
      raise ValueError(f"Denoiser {self.name}: s_split must be 'uniform' or 'fixed', got "
                       f'{self.s_split!r}.')

  @property
  def name(self) -> str:
    """A short label: 'R(3,0.15)', 'X(64,0.5)', 'S(uniform)' or 'S(0.25)'."""
    if self.family == 'S':
      return 'S(uniform)' if self.s_split == 'uniform' else f'S({self.corruption_rate:g})'
    return f'{self.family}({self.mean_span_length:g},{self.corruption_rate:g})'


def R(mu: float, r: float, **kw) -> Denoiser:  # noqa: N802  (the paper's notation)
  return Denoiser('R', mu, r, **kw)


def X(mu: float, r: float, **kw) -> Denoiser:  # noqa: N802
  return Denoiser('X', mu, r, **kw)


def S(split: str = 'uniform', r: float = 0.25, **kw) -> Denoiser:  # noqa: N802
  return Denoiser('S', 1.0, r, s_split=split, **kw)


# The paper's seven denoisers, mixed uniformly per example (the reference code's rates=None).
UL2_DENOISERS = (R(3, 0.15), R(8, 0.15), S(), X(3, 0.5), X(8, 0.5), X(64, 0.15), X(64, 0.5))
# UL2R / U-PaLM: 50% S, 25% R (3, 0.15), 25% X (32, 0.5).
UL2R_DENOISERS, UL2R_RATES = (R(3, 0.15), X(32, 0.5), S()), (0.25, 0.25, 0.5)
# NeMo: one third per family, split evenly inside each family.
NEMO_RATES = (1 / 6, 1 / 6, 1 / 3, 1 / 12, 1 / 12, 1 / 12, 1 / 12)
T5_SPAN_CORRUPTION = (R(3, 0.15),)
PREFIX_LM = (S(),)


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
  """A mixture of denoisers and how its examples are built.

  >>> MixtureConfig(UL2R_DENOISERS, UL2R_RATES).normalized_rates()
  (0.25, 0.25, 0.5)
  """

  denoisers: tuple[Denoiser, ...] = UL2_DENOISERS
  rates: tuple[float, ...] | None = None  # None: uniform over the denoisers, per example
  # More possible spans than sentinel ids: 'shrink' (default: the denoiser takes fewer raw
  # tokens, as many as keep its spans within the sentinels; mu and r stay exact), 'cap' (cap
  # the span count at the number of sentinels; spans get longer than mu), or 'error' (refuse
  # to build, say what to do).
  sentinel_overflow: str = 'shrink'
  # T5's span count is round(noise / mu), an integer, so a short chunk can miss mu by far
  # (X(64, 0.15) in ~600 tokens: 89 noise tokens in 1 span). True: such a denoiser takes the
  # longest chunk whose mean span is within MEAN_SPAN_TOLERANCE of mu (X(64, 0.15) at 512:
  # 449 tokens, one span of 67). False, or with 'cap': the reference's sizing.
  exact_mean_span: bool = True
  # None: mode tokens as text ('[NLU]' -> [784, 567, 9138, 908]), as the released UL2
  # checkpoints use them. Or one id per mode, e.g. vocabulary.DEDICATED_MODE_IDS.
  mode_token_ids: Mapping[str, int] | None = None

  def __post_init__(self):
    object.__setattr__(self, 'denoisers', tuple(self.denoisers))
    if not self.denoisers:
      raise ValueError('MixtureConfig.denoisers is empty; give at least one Denoiser.')
    if self.rates is not None:
      object.__setattr__(self, 'rates', tuple(float(r) for r in self.rates))
      if len(self.rates) != len(self.denoisers) or min(self.rates) < 0 or sum(self.rates) <= 0:
        raise ValueError(f'MixtureConfig.rates {self.rates} must be {len(self.denoisers)} '
                         'non-negative numbers (one per denoiser) with a positive sum.')
    if self.sentinel_overflow not in ('shrink', 'cap', 'error'):
      raise ValueError("MixtureConfig.sentinel_overflow must be 'shrink', 'cap' or 'error', "
                       f'got {self.sentinel_overflow!r}.')
    if self.mode_token_ids is not None:
      missing = {d.mode for d in self.denoisers} - set(self.mode_token_ids)
      if missing:
        raise ValueError(f'MixtureConfig.mode_token_ids has no id for {sorted(missing)}.')

  def normalized_rates(self) -> tuple[float, ...]:
    rates = self.rates or (1.0,) * len(self.denoisers)
    total = sum(rates)
    return tuple(r / total for r in rates)


# ----------------------------------------------------------------------------------------------
# Sizing: the raw chunk each denoiser can take (pure Python, at build time)
# ----------------------------------------------------------------------------------------------

def _round(x) -> int:
  # Same arithmetic as the TF graph: float32 product, round half to even.
  return int(np.round(np.float32(x)))


def span_counts(length: int, denoiser: Denoiser, max_spans: int | None = None) -> tuple[int, int]:
  """(noise tokens, noise spans) of a raw chunk: the reference code's formulas.

  num_noise = clamp(round(L * r), 1, L - 1); num_spans = max(round(num_noise / mu), 1),
  at most `max_spans` and never more than the non-noise tokens that separate the spans.

  >>> span_counts(568, R(3, 0.15))
  (85, 28)
  >>> span_counts(10, X(3, 0.5))
  (5, 2)
  """
  num_noise = min(max(_round(np.float32(length) * np.float32(denoiser.corruption_rate)), 1),
                  length - 1)
  num_spans = max(_round(np.float32(num_noise) / np.float32(denoiser.mean_span_length)), 1)
  if max_spans is not None:
    num_spans = min(num_spans, max_spans)
  return num_noise, min(num_spans, length - num_noise)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How one denoiser fills the feature lengths: its raw chunk and worst-case outputs."""

  denoiser: Denoiser
  raw_length: int       # tokens taken from the corpus per example
  prompt_length: int    # mode-token ids prepended to the inputs
  max_inputs: int       # longest inputs incl. prompt and EOS (<= inputs feature length)
  max_targets: int      # longest targets incl. EOS (<= targets feature length)
  max_spans: int        # most sentinels one example uses


def plan_chunks(config: MixtureConfig, feature_lengths: Mapping[str, int],
                vocabulary: seqio.Vocabulary) -> list[ChunkPlan]:
  """Sizes every denoiser's raw chunk to fit `feature_lengths` and the sentinels.

  For every chunk length up to the chosen one (the last chunk of a block is shorter), mode
  token + inputs + EOS fit `inputs` and targets + EOS fit `targets`: nothing is trimmed. With
  `sentinel_overflow='shrink'` the chunk is also no longer than keeps its noise spans within
  the vocabulary's sentinels:

  >>> from ul2 import vocabulary
  >>> lengths = {'inputs': 512, 'targets': 512}
  >>> [(p.raw_length, p.max_spans) for p in plan_chunks(
  ...     MixtureConfig((X(3, 0.5),)), lengths, vocabulary.get_vocabulary())]
  [(602, 100)]
  >>> [(p.raw_length, p.max_spans) for p in plan_chunks(
  ...     MixtureConfig((X(3, 0.5),), sentinel_overflow='cap'), lengths,
  ...     vocabulary.get_vocabulary())]
  [(815, 100)]

  With inputs 512 and no prompt this gives the reference's `random_spans_helper` numbers
  (R(3,0.15): 568 raw tokens); here the 4-5 mode-token pieces are reserved too.
  """
  missing = {'inputs', 'targets'} - set(feature_lengths)
  if missing:
    raise ValueError(f'Feature lengths {dict(feature_lengths)} lack {sorted(missing)}; pass '
                     "e.g. {'inputs': 512, 'targets': 512}.")
  num_sentinels = vocabulary.extra_ids
  plans, short = [], []
  for d in config.denoisers:
    prompt = len(mode_token_ids(d.mode, config, vocabulary))
    room_in = feature_lengths['inputs'] - prompt - 1  # EOS
    room_tgt = feature_lengths['targets'] - 1         # EOS
    if d.family == 'S':
      if d.s_sentinel and num_sentinels < 1:
        raise ValueError(f'{d.name} ends its inputs with <extra_id_0> but the vocabulary has '
                         'no extra ids; build it with extra_ids=100.')
      room_in -= int(d.s_sentinel)
      length, worst = _largest_fitting(lambda n: _s_lengths(n, d), room_in, room_tgt)
      spans = 1 if d.s_sentinel else 0
    else:
      cap = num_sentinels if config.sentinel_overflow == 'cap' else None

      def lengths(n, d=d, cap=cap):
        if config.sentinel_overflow == 'shrink' and span_counts(n, d)[1] > num_sentinels:
          return room_in + 1, room_tgt + 1  # too many spans: does not fit
        return _span_corruption_lengths(n, d, cap)
      length, worst = _largest_fitting(lengths, room_in, room_tgt)
      if config.exact_mean_span and config.sentinel_overflow != 'cap' and length >= 2:
        length = _exact_mean_span_length(length, d, cap)
        worst = tuple(map(max, zip(*(lengths(n) for n in range(2, length + 1)))))
        noise, count = span_counts(length, d, cap)
        if abs(noise / count / d.mean_span_length - 1) > MEAN_SPAN_TOLERANCE:
          short.append(f'{d.name} ({length}-token chunks, spans of {noise / count:.1f} tokens '
                       f'instead of {d.mean_span_length:g})')
      spans = max(span_counts(n, d, cap)[1] for n in range(2, length + 1)) if length >= 2 else 0
      if spans > num_sentinels:
        raise ValueError(
            f'Sentinel overflow: denoiser {d.name} makes up to {spans} noise spans at feature '
            f'lengths {dict(feature_lengths)}, but the vocabulary has {num_sentinels} sentinel '
            'ids. Choose one: MixtureConfig(sentinel_overflow=\'shrink\') (the default) '
            'gives it fewer raw tokens; sentinel_overflow=\'cap\' caps the span count '
            f'(spans get longer than {d.mean_span_length:g}); a vocabulary with more extra '
            f'ids (seqio.SentencePieceVocabulary(..., extra_ids={spans})); or shorter '
            'feature lengths.')
    if length < 2:
      raise ValueError(
          f'Feature lengths {dict(feature_lengths)} are too short for denoiser {d.name}: with '
          f'its {prompt}-token mode prompt and EOS no chunk of 2 tokens fits. Use longer '
          "'inputs'/'targets' lengths (UL2 uses 512/512).")
    plans.append(ChunkPlan(d, length, prompt, worst[0] + prompt + 1, worst[1] + 1, spans))
  if short:  # one note for the mixture: harmless in a smoke run, not what UL2 trains on
    warnings.warn(f'Feature lengths {dict(feature_lengths)} are too short for the mean spans '
                  f'of {", ".join(short)}; UL2 uses 512/512.', stacklevel=2)
  return plans


MEAN_SPAN_TOLERANCE = 0.05


def _exact_mean_span_length(longest: int, d: Denoiser, cap: int | None) -> int:
  """The longest chunk up to `longest` whose mean span is within MEAN_SPAN_TOLERANCE of mu
  (`longest` itself where none is).

  >>> _exact_mean_span_length(596, X(64, 0.15), None), span_counts(449, X(64, 0.15))
  (449, (67, 1))
  """
  for n in range(longest, 1, -1):
    noise, spans = span_counts(n, d, cap)
    if abs(noise / spans / d.mean_span_length - 1) <= MEAN_SPAN_TOLERANCE:
      return n
  return longest


def _span_corruption_lengths(n: int, d: Denoiser, cap: int | None) -> tuple[int, int]:
  noise, spans = span_counts(n, d, cap)
  return n - noise + spans, noise + spans  # (inputs, targets) before prompt and EOS


def _s_lengths(n: int, d: Denoiser) -> tuple[int, int]:
  if d.s_split == 'uniform':  # prefix anywhere in [1, n-1]: worst cases at both ends
    return n - 1 + int(d.s_sentinel), n - 1
  suffix = min(max(_round(np.float32(n) * np.float32(d.corruption_rate)), 1), n - 1)
  return n - suffix + int(d.s_sentinel), suffix


def _largest_fitting(lengths_fn, room_in: int, room_tgt: int) -> tuple[int, tuple[int, int]]:
  """Largest n such that every n' in [2, n] fits; with the worst (inputs, targets) seen."""
  n, worst = 1, (0, 0)
  while True:
    inputs, targets = lengths_fn(n + 1)
    if inputs > room_in or targets > room_tgt:
      return n, worst
    n, worst = n + 1, (max(worst[0], inputs), max(worst[1], targets))


def mode_token_ids(mode: str, config: MixtureConfig, vocabulary: seqio.Vocabulary) -> list[int]:
  """The ids prepended for `mode`: the encoded text, or the dedicated id.

  >>> vocab = vocabulary.get_vocabulary()
  >>> mode_token_ids('[S2S]', MixtureConfig(), vocab)
  [784, 134, 357, 134, 908]
  >>> mode_token_ids('[S2S]', MixtureConfig(mode_token_ids=vocabulary.DEDICATED_MODE_IDS), vocab)
  [32101]
  """
  if not mode:
    return []
  if config.mode_token_ids is not None:
    return [int(config.mode_token_ids[mode])]
  return list(vocabulary.encode(mode))


# ----------------------------------------------------------------------------------------------
# TensorFlow, vectorised over the chunks of a block: one set of ops for ~30 examples, because
# per-op overhead, not arithmetic, bounds a per-example pipeline on a 2-core host.
# Flat tensors hold all chunks back to back; `row_ids` says which chunk a token belongs to.
# ----------------------------------------------------------------------------------------------

def _within_row_cumsum(x: tf.Tensor, row_ids: tf.Tensor, num_rows: tf.Tensor) -> tf.Tensor:
  """Inclusive cumulative sum of x restarting at each row (rows are contiguous)."""
  total = tf.cumsum(x)
  row_totals = tf.math.unsorted_segment_sum(x, row_ids, num_rows)
  row_offsets = tf.cumsum(row_totals, exclusive=True)
  return total - tf.gather(row_offsets, row_ids)


def _random_compositions(num_items: tf.Tensor, num_parts: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """For each row, a uniformly random composition of num_items[i] into num_parts[i] positive
  parts (T5's `_random_segmentation`: k-1 cut points among the n-1 gaps, uniformly).

  Returns the part lengths of all rows back to back: [sum(num_parts)].
  """
  rows = tf.size(num_items)
  gaps = tf.maximum(num_items - 1, 0)
  gap_rows = tf.repeat(tf.range(rows), gaps)
  gap_offsets = tf.cumsum(gaps, exclusive=True)
  item_offsets = tf.cumsum(num_items, exclusive=True)
  # Sorting row + key keeps rows together and orders each row's gaps randomly; a gap is a cut
  # when its rank inside the row is below k - 1.
  keys = tf.random.stateless_uniform([tf.reduce_sum(gaps)], seed, dtype=tf.float64)
  order = tf.argsort(tf.cast(gap_rows, tf.float64) + keys)
  rank_in_row = tf.math.invert_permutation(order) - tf.gather(gap_offsets, gap_rows)
  is_cut = rank_in_row < tf.gather(num_parts, gap_rows) - 1
  # Gap g of a row sits before its item g + 1; parts start at each row's item 0 and at cuts.
  gap_items = tf.gather(item_offsets, gap_rows) + tf.range(tf.size(gap_rows)) - tf.gather(
      gap_offsets, gap_rows) + 1
  part_starts = tf.sort(tf.concat([item_offsets, tf.boolean_mask(gap_items, is_cut)], 0))
  return tf.experimental.numpy.diff(
      tf.concat([part_starts, [tf.reduce_sum(num_items)]], 0))


def noise_masks(lengths: tf.Tensor, num_noise: tf.Tensor, num_spans: tf.Tensor,
                seed: tf.Tensor) -> tf.Tensor:
  """Flat boolean noise mask for chunks of `lengths` tokens, back to back.

  Chunk i gets num_spans[i] noise spans holding num_noise[i] tokens, alternating with as many
  non-noise spans, starting with non-noise and ending with noise; span lengths are uniformly
  random compositions (T5's `random_spans_noise_mask`, for a batch of chunks).

  >>> noise_masks(tf.constant([10]), tf.constant([2]), tf.constant([1]),
  ...             tf.constant([0, 0])).numpy().astype(int).tolist()
  [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
  """
  noise_seed, nonnoise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  noise_lengths = _random_compositions(num_noise, num_spans, noise_seed)
  nonnoise_lengths = _random_compositions(lengths - num_noise, num_spans, nonnoise_seed)
  interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  values = tf.tile([False, True], [tf.reduce_sum(num_spans)])
  return tf.repeat(values, interleaved)


def corrupt(tokens: tf.Tensor, noise_mask: tf.Tensor, row_lengths: tf.Tensor,
            is_prefix_lm: tf.Tensor, s_sentinel: tf.Tensor,
            vocab_size: int) -> tuple[tf.RaggedTensor, tf.RaggedTensor]:
  """(inputs, targets) per chunk, before mode token and EOS.

  R/X: each noise span becomes one sentinel in the inputs, counting down from
  `vocab_size - 1` (<extra_id_0>); the targets are the mirror image (T5's
  `noise_span_to_unique_sentinel` and `nonnoise_span_to_unique_sentinel`).
  S (`is_prefix_lm`, mask = the suffix): inputs are the prefix, plus <extra_id_0> when
  `s_sentinel`; targets are the suffix.

  >>> mask = tf.constant([0, 1, 1, 1, 0, 0, 0, 0, 1, 1]) > 0
  >>> inputs, targets = corrupt(tf.range(10, 20), mask, tf.constant([10]),
  ...                           tf.constant([False]), tf.constant([False]), 32100)
  >>> inputs.to_list(), targets.to_list()
  ([[10, 32099, 14, 15, 16, 17, 32098]], [[32099, 11, 12, 13, 32098, 18, 19]])
  """
  num_rows = tf.size(row_lengths)
  row_ids = tf.repeat(tf.range(num_rows), row_lengths)
  # Chunks start with non-noise and end with noise, so across a chunk boundary the previous
  # token is always noise: the first token of every chunk starts a non-noise span.
  prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]], constant_values=True)
  first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
  first_nonnoise = tf.logical_and(tf.logical_not(noise_mask), prev_is_noise)
  # The k-th span of a chunk (noise spans in inputs, non-noise spans in targets) -> sentinel k.
  input_sentinels = vocab_size - _within_row_cumsum(tf.cast(first_noise, tf.int32), row_ids,
                                                    num_rows)
  target_sentinels = vocab_size - _within_row_cumsum(tf.cast(first_nonnoise, tf.int32),
                                                     row_ids, num_rows)
  token_is_s = tf.gather(is_prefix_lm, row_ids)
  keep_inputs = tf.logical_or(
      tf.logical_not(noise_mask),
      tf.logical_and(first_noise, tf.logical_or(tf.logical_not(token_is_s),
                                                tf.gather(s_sentinel, row_ids))))
  keep_targets = tf.logical_or(noise_mask, tf.logical_and(first_nonnoise,
                                                          tf.logical_not(token_is_s)))
  inputs = tf.where(first_noise, input_sentinels, tokens)
  targets = tf.where(first_nonnoise, target_sentinels, tokens)

  def ragged(values, keep):
    return tf.RaggedTensor.from_value_rowids(tf.boolean_mask(values, keep),
                                             tf.boolean_mask(row_ids, keep), nrows=num_rows)
  return ragged(inputs, keep_inputs), ragged(targets, keep_targets)


# ----------------------------------------------------------------------------------------------
# The preprocessor
# ----------------------------------------------------------------------------------------------

DOCS_PER_BLOCK = 128  # as T5's reduce_concat_tokens(batch_size=128)
# A block is cut into pieces of at most this many tokens: one document of a whole book (a 20 MB
# line, 5M tokens) would otherwise be denoised as one tensor of every chunk at once (GBs).
# Gutenberg's and C4's blocks of 128 documents are shorter (Gutenberg's longest: 78,328), so
# their examples are unchanged.
MAX_BLOCK_TOKENS = 2**17


def split_long_blocks(dataset: tf.data.Dataset,
                      max_tokens: int = MAX_BLOCK_TOKENS) -> tf.data.Dataset:
  """Blocks longer than `max_tokens` -> consecutive pieces of `max_tokens` (the last keeps
  the rest); shorter blocks pass as they are.

  >>> ds = tf.data.Dataset.from_tensor_slices({'targets': tf.ragged.constant([[1, 2, 3, 4, 5], [6]])})
  >>> [ex['targets'].tolist() for ex in split_long_blocks(ds, 2).as_numpy_iterator()]
  [[1, 2], [3, 4], [5], [6]]
  """
  def pieces(ex):
    tokens = ex['targets']
    size = tf.size(tokens, out_type=tf.int64)
    full = size // max_tokens
    lengths = tf.concat([tf.fill([full], tf.constant(max_tokens, tf.int64)),
                         tf.reshape(size - full * max_tokens, [1])], 0)
    lengths = tf.boolean_mask(lengths, lengths > 0)
    return tf.data.Dataset.from_tensor_slices(
        {'targets': tf.RaggedTensor.from_row_lengths(tokens, lengths)})
  return dataset.flat_map(pieces)


def tokenize_blocks(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                    docs_per_block: int = DOCS_PER_BLOCK) -> tf.data.Dataset:
  """Text documents in `targets` -> token blocks of `docs_per_block` documents concatenated.

  One tokenizer call per block instead of per document: Gutenberg paragraphs are ~47 tokens,
  and per-element overhead, not SentencePiece, bounded a per-document pipeline.

  >>> ds = tf.data.Dataset.from_tensor_slices({'targets': ['The cat.', '', 'A dog']})
  >>> features = {'targets': seqio.Feature(vocabulary.get_vocabulary())}
  >>> [ex['targets'].tolist() for ex in tokenize_blocks(ds, features, 2).as_numpy_iterator()]
  [[37, 1712, 5], [71, 1782]]
  """
  vocab = output_features['targets'].vocabulary
  dataset = dataset.map(lambda ex: ex['targets'], num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(docs_per_block)
  dataset = dataset.map(lambda texts: {'targets': vocab.encode_tf(texts).flat_values},
                        num_parallel_calls=tf.data.AUTOTUNE)
  return split_long_blocks(dataset.filter(lambda ex: tf.size(ex['targets']) > 0))


def concatenate_documents(dataset: tf.data.Dataset,
                          docs_per_block: int = DOCS_PER_BLOCK) -> tf.data.Dataset:
  """Tokenized documents in `targets` -> blocks of `docs_per_block` concatenated documents."""
  dataset = dataset.map(lambda ex: {'targets': ex['targets']},
                        num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.ragged_batch(docs_per_block)
  dataset = dataset.map(lambda ex: {'targets': ex['targets'].flat_values},
                        num_parallel_calls=tf.data.AUTOTUNE)
  return split_long_blocks(dataset.filter(lambda ex: tf.size(ex['targets']) > 0))


def causal_lm_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int]
                     ) -> tf.data.Dataset:
  """Token blocks -> consecutive chunks of `targets` length - 1 (room for the EOS): the
  causal-LM baseline's examples, for a decoder-only model (no inputs, no mode token, every
  token in the loss). The last chunk of a block keeps what is left.

  >>> ds = tf.data.Dataset.from_tensor_slices({'targets': [[10, 11, 12, 13, 14]]})
  >>> [ex['targets'].tolist()
  ...  for ex in causal_lm_chunks(ds, {'targets': 3}).as_numpy_iterator()]
  [[10, 11], [12, 13], [14]]
  """
  size = sequence_length['targets'] - 1
  if size < 1:
    raise ValueError(f"feature_lengths['targets'] must be at least 2 for a causal LM, got "
                     f"{sequence_length['targets']}.")

  def chunks(ex):
    n = tf.size(ex['targets'], out_type=tf.int64)
    lengths = tf.concat([tf.fill([n // size], tf.cast(size, tf.int64)),
                         tf.boolean_mask([n % size], [n % size > 0])], axis=0)
    return tf.data.Dataset.from_tensor_slices(
        {'targets': tf.RaggedTensor.from_row_lengths(ex['targets'], lengths)})
  return dataset.flat_map(chunks)


class MixtureOfDenoisers:
  """A seqio preprocessor: token blocks in `targets` -> denoised examples.

  Each incoming element is chunked on its own: concatenate short documents first
  (`tokenize_blocks` or `concatenate_documents`) so chunks are full.

  Output features: `inputs` and `targets` (int32, without EOS: put
  `seqio.preprocessors.append_eos_after_trim` after it) and `denoiser` (the index into
  `config.denoisers`, kept for statistics; feature converters drop it).

  Randomness comes from seqio's per-map seeds (`get_dataset(seed=...)`): the same seed gives
  the same stream, a different seed a different one.
  """

  def __init__(self, config: MixtureConfig = MixtureConfig()):
    self.config = config

  def __call__(self, dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
               output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    if sequence_length is None:
      raise ValueError('The Mixture-of-Denoisers preprocessor needs feature lengths: call '
                       "get_dataset(sequence_length={'inputs': 512, 'targets': 512}, ...).")
    vocabulary = output_features['targets'].vocabulary
    plans = plan_chunks(self.config, sequence_length, vocabulary)
    dataset = dataset.map(lambda ex: {'targets': ex['targets']},
                          num_parallel_calls=tf.data.AUTOTUNE)
    return self._denoise_blocks(dataset, plans, vocabulary).unbatch()

  def _denoise_blocks(self, dataset: tf.data.Dataset, plans: Sequence[ChunkPlan],
                      vocabulary: seqio.Vocabulary) -> tf.data.Dataset:
    cfg = self.config
    vocab_size = vocabulary.vocab_size  # <extra_id_0> = vocab_size - 1
    cap = vocabulary.extra_ids if cfg.sentinel_overflow == 'cap' else np.iinfo(np.int32).max
    table = cfg.denoisers
    raw_lengths = tf.constant([p.raw_length for p in plans], tf.int32)
    min_length = min(p.raw_length for p in plans)
    logits = tf.math.log(tf.constant([cfg.normalized_rates()], tf.float32))
    is_s = tf.constant([d.family == 'S' for d in table])
    mean_span = tf.constant([d.mean_span_length for d in table], tf.float32)
    rate = tf.constant([d.corruption_rate for d in table], tf.float32)
    s_uniform = tf.constant([d.s_split == 'uniform' for d in table])
    s_sentinel = tf.constant([d.s_sentinel for d in table])
    prompts = tf.ragged.constant([mode_token_ids(d.mode, cfg, vocabulary) for d in table],
                                 dtype=tf.int32, ragged_rank=1, row_splits_dtype=tf.int32)

    @seqio.map_over_dataset(num_seeds=1)
    def denoise_block(block, seed):
      tokens = block['targets']  # [block_length]
      n = tf.size(tokens)
      draw_seed, noise_seed, prefix_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 3))
      # Chunks: draw a denoiser per chunk (i.i.d. by the rates), cut its raw length. Keep those
      # that start in the block with >= 2 tokens (a span needs a non-noise neighbour); only a
      # block's last chunk can be shorter than its denoiser's raw length.
      ids = tf.random.stateless_categorical(logits, n // min_length + 1, draw_seed,
                                            dtype=tf.int32)[0]
      ends = tf.cumsum(tf.gather(raw_lengths, ids))
      starts = ends - tf.gather(raw_lengths, ids)
      lengths = tf.minimum(ends, n) - starts
      keep = tf.logical_and(starts < n, lengths >= 2)
      ids, lengths = tf.boolean_mask(ids, keep), tf.boolean_mask(lengths, keep)
      tokens = tokens[:tf.reduce_sum(lengths)]  # [chunk tokens], chunks back to back

      # Noise counts per chunk: the reference formulas for R/X; one suffix "span" for S.
      length_f = tf.cast(lengths, tf.float32)
      num_noise = tf.cast(tf.round(length_f * tf.gather(rate, ids)), tf.int32)
      num_noise = tf.minimum(tf.maximum(num_noise, 1), lengths - 1)
      num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / tf.gather(mean_span, ids)),
                          tf.int32)
      num_spans = tf.minimum(tf.minimum(tf.maximum(num_spans, 1), cap), lengths - num_noise)
      uniform_prefix = 1 + tf.cast(tf.floor(tf.random.stateless_uniform(
          tf.shape(lengths), prefix_seed) * tf.cast(lengths - 1, tf.float32)), tf.int32)
      uniform_prefix = tf.minimum(uniform_prefix, lengths - 1)
      chunk_is_s = tf.gather(is_s, ids)
      s_noise = tf.where(tf.gather(s_uniform, ids), lengths - uniform_prefix, num_noise)
      num_noise = tf.where(chunk_is_s, s_noise, num_noise)
      num_spans = tf.where(chunk_is_s, 1, num_spans)

      mask = noise_masks(lengths, num_noise, num_spans, noise_seed)
      inputs, targets = corrupt(tokens, mask, lengths, chunk_is_s, tf.gather(s_sentinel, ids),
                                vocab_size)
      inputs = tf.concat([tf.gather(prompts, ids), inputs], axis=1)
      return {'inputs': inputs, 'targets': targets, 'denoiser': ids}

    return denoise_block(dataset)
