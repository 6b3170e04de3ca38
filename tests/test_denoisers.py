"""The Mixture-of-Denoisers preprocessor on the real Gutenberg sample and T5 vocabulary."""

import collections
import doctest
import re

import numpy as np
import pytest
import scipy.stats
import seqio
import tensorflow as tf

import ul2_tasks  # noqa: F401  (registers the tasks)
from ul2_tasks import pretrain
from ul2 import denoisers as D
from ul2 import vocabulary as V

VOCAB = V.get_vocabulary()
SENTINEL_LO, SENTINEL_HI = VOCAB.vocab_size - VOCAB.extra_ids, VOCAB.vocab_size  # [32000, 32100)
LENGTHS = {'inputs': 512, 'targets': 512}
EOS = 1


@pytest.fixture(scope='module')
def documents():
  """The bundled Gutenberg train sample tokenized once, as the task does it: a list of int32
  blocks, each 128 consecutive paragraphs concatenated (~430k T5 tokens in ~72 blocks)."""
  task = seqio.get_mixture_or_task('ul2_mod_gutenberg')
  ds = task.source.get_dataset('train', shuffle=False)
  ds = task.preprocess_precache(ds, seed=0)  # lines -> rekey -> tokenize_blocks
  blocks = [ex['targets'] for ex in ds.as_numpy_iterator()]
  assert sum(map(len, blocks)) > 300_000
  return blocks


def test_tokenize_blocks_equals_per_document_tokenization():
  lines = open(pretrain.BUNDLED_GUTENBERG_DIR + '/gutenberg_validation_00.txt').read().split(
      '\n')[:300]
  ds = tf.data.Dataset.from_tensor_slices({'targets': lines})
  features = pretrain.output_features()
  blocks = list(D.tokenize_blocks(ds, features, 128).as_numpy_iterator())
  per_doc = [VOCAB.encode(line) for line in lines]
  assert len(blocks) == 3  # 128 + 128 + 44 lines
  expected = [np.concatenate(per_doc[i:i + 128]) for i in (0, 128, 256)]
  for block, want in zip(blocks, expected):
    np.testing.assert_array_equal(block['targets'], want)
  # The same for documents that are already tokenized.
  tokenized = tf.data.Dataset.from_tensor_slices({'targets': tf.ragged.constant(per_doc)})
  for block, want in zip(D.concatenate_documents(tokenized, 128).as_numpy_iterator(), expected):
    np.testing.assert_array_equal(block['targets'], want)


def test_a_corpus_of_one_huge_line_is_cut_into_blocks_and_denoised(tmp_path):
  """The bundled training text (1.6 MB) as one line, one document of ~400k tokens: its block
  is cut into pieces of at most MAX_BLOCK_TOKENS that together are its tokens (the same as
  tokenizing it in one piece), and the MoD task over it gives examples (a 20 MB line took
  minutes and GBs when the whole block was denoised as one tensor)."""
  text = ' '.join(open(pretrain.BUNDLED_GUTENBERG_DIR + '/gutenberg_train_00.txt').read().split())
  (tmp_path / 'one_line.txt').write_text(text + '\n')
  ds = tf.data.Dataset.from_tensor_slices({'targets': [text]})
  blocks = [b['targets']
            for b in D.tokenize_blocks(ds, pretrain.output_features()).as_numpy_iterator()]
  whole = VOCAB.encode_tf(tf.constant([text])).flat_values.numpy()
  assert len(whole) > 3 * D.MAX_BLOCK_TOKENS
  assert [len(b) for b in blocks] == ([D.MAX_BLOCK_TOKENS] * 3
                                      + [len(whole) - 3 * D.MAX_BLOCK_TOKENS])
  np.testing.assert_array_equal(np.concatenate(blocks), whole)

  pretrain.register_corpus('one_line_test',
                           pretrain.text_files_source(str(tmp_path / 'one_line.txt')))
  try:
    task = seqio.get_mixture_or_task('ul2_mod_one_line_test')
    examples = list(task.get_dataset(LENGTHS, 'train', shuffle=False).take(200)
                    .as_numpy_iterator())
    assert len(examples) == 200 and len({ex['denoiser'] for ex in examples}) > 1
  finally:
    for registry in (seqio.MixtureRegistry, seqio.TaskRegistry):
      for name in list(registry.names()):
        if name.endswith('_one_line_test'):
          registry.remove(name)


def test_blocks_of_the_gutenberg_corpus_are_never_cut():
  """MAX_BLOCK_TOKENS leaves the shipped corpus's examples as they were: no block of 128
  documents reaches it."""
  files = [pretrain.BUNDLED_GUTENBERG_DIR + f'/gutenberg_{split}_00.txt'
           for split in ('train', 'validation')]
  ds = tf.data.TextLineDataset(files).map(lambda line: {'targets': line})
  sizes = [len(b['targets']) for b in D.tokenize_blocks(ds, pretrain.output_features())
           .as_numpy_iterator()]
  assert max(sizes) < D.MAX_BLOCK_TOKENS


def run(config, docs, lengths=LENGTHS, seed=0, vocab=VOCAB, limit=None):
  """The preprocessor + seqio's EOS step on token blocks, as numpy examples, seeded like
  get_dataset."""
  ds = tf.data.Dataset.from_tensor_slices(
      {'targets': tf.ragged.constant(docs, dtype=tf.int32)})
  features = pretrain.output_features(vocab)
  with seqio.utils.map_seed_manager(seed):
    ds = D.MixtureOfDenoisers(config)(ds, lengths, features)
  ds = seqio.preprocessors.append_eos_after_trim(ds, output_features=features,
                                                 sequence_length=lengths)
  if limit:
    ds = ds.take(limit)
  return list(ds.as_numpy_iterator())


def strip(ex, config, vocab=VOCAB):
  """(denoiser, inputs body, targets body): mode prompt and EOS checked and removed."""
  d = config.denoisers[ex['denoiser']]
  prompt = D.mode_token_ids(d.mode, config, vocab)
  inputs, targets = list(ex['inputs']), list(ex['targets'])
  assert inputs[:len(prompt)] == prompt, (d.name, inputs[:8])
  assert inputs[-1] == EOS and targets[-1] == EOS
  return d, inputs[len(prompt):-1], targets[:-1]


def is_sentinel(t, vocab=VOCAB):
  return vocab.vocab_size - vocab.extra_ids <= t < vocab.vocab_size


def merge(d, inputs, targets, vocab=VOCAB):
  """Inverse of the denoiser: put each target span back at its sentinel."""
  if d.family == 'S':
    if d.s_sentinel:
      assert inputs[-1] == vocab.vocab_size - 1
      inputs = inputs[:-1]
    assert not any(is_sentinel(t, vocab) for t in inputs + targets)
    return inputs + targets
  spans, current = {}, None
  for t in targets:
    if is_sentinel(t, vocab):
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  assert None not in spans, 'targets must start with a sentinel'
  out = []
  for t in inputs:
    out.extend(spans.pop(t) if is_sentinel(t, vocab) else [t])
  assert not spans, f'sentinels in targets but not inputs: {list(spans)}'
  return out


# ---------------------------------------------------------------------------------------------
# Literal examples: the module docstring's lists
# ---------------------------------------------------------------------------------------------

def docstring_lists():
  """The id lists written in the module docstring, in order: R, X, S (inputs, targets)."""
  doc = D.__doc__
  lists = [[int(x) for x in m.split(',')] for m in re.findall(r'\[(\d+(?:, \d+)+)\]', doc)]
  assert len(lists) == 6
  return {'R': lists[0:2], 'X': lists[2:4], 'S': lists[4:6]}


def test_literal_examples_match_the_docstring():
  expected = docstring_lists()
  tokens = tf.range(10, 20)
  config = D.MixtureConfig()
  got = {}
  for family, bits in (('R', '0000000011'), ('X', '0111000011'), ('S', '0000001111')):
    mask = tf.constant([int(b) for b in bits]) > 0
    inputs, targets = D.corrupt(tokens, mask, tf.constant([10]), tf.constant([family == 'S']),
                                tf.constant([False]), VOCAB.vocab_size)
    got[family] = [D.mode_token_ids(D.FAMILY_MODES[family], config, VOCAB)
                   + inputs.to_list()[0] + [EOS], targets.to_list()[0] + [EOS]]
  assert got == expected
  # The docstring's span counts are the formulas' for a 10-token chunk.
  assert D.span_counts(10, D.R(3, 0.15)) == (2, 1)
  assert D.span_counts(10, D.X(3, 0.5)) == (5, 2)


def test_s_sentinel_ends_the_inputs_and_targets_carry_none():
  mask = tf.constant([0, 0, 0, 1, 1]) > 0
  inputs, targets = D.corrupt(tf.range(10, 15), mask, tf.constant([5]), tf.constant([True]),
                              tf.constant([True]), VOCAB.vocab_size)
  assert inputs.to_list() == [[10, 11, 12, 32099]] and targets.to_list() == [[13, 14]]


def test_noise_masks_alternate_and_have_the_configured_counts():
  rng = np.random.default_rng(0)
  lengths, noise, spans = [], [], []
  for _ in range(400):
    length = int(rng.integers(2, 300))
    d = D.Denoiser(rng.choice(['R', 'X']), float(rng.choice([3, 8, 64])),
                   float(rng.choice([0.15, 0.5])))
    n, k = D.span_counts(length, d)
    lengths.append(length), noise.append(n), spans.append(k)
  flat = D.noise_masks(tf.constant(lengths), tf.constant(noise), tf.constant(spans),
                       tf.constant([1, 2])).numpy()
  assert len(flat) == sum(lengths)
  offsets = np.cumsum([0] + lengths)
  span_lengths = collections.Counter()
  for i, (length, n, k) in enumerate(zip(lengths, noise, spans)):
    mask = flat[offsets[i]:offsets[i + 1]]
    assert mask.sum() == n
    starts = np.flatnonzero(mask & ~np.pad(mask[:-1], (1, 0)))
    assert len(starts) == k
    assert not mask[0] and mask[-1]  # starts with non-noise, ends with noise
    if (length, n, k) == (lengths[0], noise[0], spans[0]):
      span_lengths[tuple(np.diff(np.append(starts, length)))] += 1
  # Compositions are random: a different seed moves the spans.
  other = D.noise_masks(tf.constant(lengths), tf.constant(noise), tf.constant(spans),
                        tf.constant([3, 4])).numpy()
  assert not np.array_equal(flat, other)


def test_random_compositions_are_uniform():
  """All C(5, 2) = 10 compositions of 6 into 3 parts appear equally often."""
  rows = 20000
  parts = D._random_compositions(tf.fill([rows], 6), tf.fill([rows], 3),
                                 tf.constant([5, 6])).numpy().reshape(rows, 3)
  assert (parts.sum(1) == 6).all() and (parts >= 1).all()
  counts = collections.Counter(map(tuple, parts))
  assert len(counts) == 10
  chi2, p = scipy.stats.chisquare(list(counts.values()))
  assert p > 1e-3, counts


def test_chunk_sizes_reproduce_the_reference_without_prompt():
  """With no mode token, sizing equals the reference `random_spans_helper` table (ref. §1)."""
  vocab = V.get_vocabulary(extra_ids=200)  # enough sentinels for X(3, 0.5)'s 128 spans
  table = [D.Denoiser(f, mu, r, mode='') for f, mu, r in (
      ('R', 3, .15), ('R', 8, .15), ('X', 3, .5), ('X', 8, .5), ('X', 64, .15), ('X', 64, .5))]
  plans = D.plan_chunks(D.MixtureConfig(tuple(table), exact_mean_span=False), LENGTHS, vocab)
  assert [(p.raw_length, p.max_targets) for p in plans] == [
      (568, 114), (588, 100), (766, 512), (908, 512), (600, 92), (1006, 512)]


def test_prompt_room_is_reserved():
  plans = D.plan_chunks(pretrain.OBJECTIVES['ul2_mod'], LENGTHS, VOCAB)
  by_name = {p.denoiser.name: p for p in plans}
  assert by_name['R(3,0.15)'].prompt_length == 4 and by_name['R(3,0.15)'].raw_length == 564
  assert by_name['S(uniform)'].prompt_length == 5
  assert all(p.max_inputs <= 512 and p.max_targets <= 512 for p in plans)


# ---------------------------------------------------------------------------------------------
# Sentinel overflow and bad settings
# ---------------------------------------------------------------------------------------------

def test_sentinel_overflow_is_an_error_when_asked():
  with pytest.raises(ValueError, match=r"X\(3,0.5\) makes up to 127 noise spans.*100 sentinel "
                                       r"ids.*'shrink'.*sentinel_overflow='cap'.*extra_ids=127"):
    D.plan_chunks(D.MixtureConfig(D.UL2_DENOISERS, sentinel_overflow='error'), LENGTHS, VOCAB)


def test_sentinel_overflow_shrinks_the_chunk_by_default(documents):
  """X(3, 0.5) at 512/512 takes at most 602 raw tokens: 100 spans of mean length 3."""
  shrunk = D.MixtureConfig((D.X(3, 0.5),))
  [plan] = D.plan_chunks(shrunk, LENGTHS, VOCAB)
  assert (plan.raw_length, plan.max_spans) == (602, 100)
  assert D.span_counts(603, D.X(3, 0.5)) == (302, 101)  # one token more would overflow
  noise = spans = 0
  for ex in run(shrunk, documents[:25]):
    _, inputs, targets = strip(ex, shrunk)
    count = sum(is_sentinel(t) for t in inputs)
    assert count <= 100
    noise, spans = noise + len(targets) - count, spans + count
  assert noise / spans == pytest.approx(3.0, rel=0.05)


def test_sentinel_overflow_cap_and_more_extra_ids(documents):
  capped = D.MixtureConfig((D.X(3, 0.5),), sentinel_overflow='cap')
  [plan] = D.plan_chunks(capped, LENGTHS, VOCAB)
  assert plan.max_spans == 100
  examples = run(capped, documents[:25])
  spans = [sum(is_sentinel(t) for t in strip(ex, capped)[1]) for ex in examples]
  assert max(spans) == 100
  # More extra ids: the spans are not capped, and sentinels stay above the word pieces.
  vocab = V.get_vocabulary(extra_ids=128)
  plain = D.MixtureConfig((D.X(3, 0.5),))
  [plan] = D.plan_chunks(plain, LENGTHS, vocab)
  assert plan.max_spans == 127
  most = 0
  for ex in run(plain, documents[:25], vocab=vocab):
    d, inputs, targets = strip(ex, plain, vocab)
    merge(d, inputs, targets, vocab)
    sentinels = [t for t in inputs if t >= SENTINEL_LO]  # word pieces are all below 32000
    assert sentinels == list(range(vocab.vocab_size - 1, vocab.vocab_size - 1 - len(sentinels),
                                   -1))
    most = max(most, len(sentinels))
  assert 100 < most <= 127


@pytest.mark.parametrize('kwargs, message', [
    ({'denoisers': ()}, 'empty'),
    ({'rates': (1.0,)}, 'one per denoiser'),
    ({'sentinel_overflow': 'wrap'}, 'sentinel_overflow'),
    ({'mode_token_ids': {'[NLU]': 32100}}, r"no id for \['\[NLG\]', '\[S2S\]'\]"),
])
def test_mixture_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    D.MixtureConfig(**kwargs)


def test_denoiser_errors():
  with pytest.raises(ValueError, match="family must be 'R', 'S' or 'X'"):
    D.Denoiser('Q')
  with pytest.raises(ValueError, match='corruption_rate'):
    D.R(3, 1.5)


def test_feature_lengths_too_short_for_a_denoiser():
  with pytest.raises(ValueError, match=r'too short for denoiser S\(uniform\)'):
    D.plan_chunks(D.MixtureConfig(D.PREFIX_LM), {'inputs': 6, 'targets': 8}, VOCAB)
  with pytest.raises(ValueError, match='lack'):
    D.plan_chunks(D.MixtureConfig(), {'targets': 8}, VOCAB)


# ---------------------------------------------------------------------------------------------
# Exact reconstruction, lengths, sentinels, mode tokens
# ---------------------------------------------------------------------------------------------

ALL_DENOISERS = D.UL2_DENOISERS + (D.X(32, 0.5), D.S('fixed', 0.25), D.S(s_sentinel=True))


def test_every_denoiser_reconstructs_the_corpus_stream_exactly(documents):
  """Merging inputs and targets by their sentinels gives back each raw chunk; the chunks are
  consecutive pieces of the concatenated corpus (a block's last chunk is dropped only when it
  is a single token)."""
  stream = np.concatenate(documents)
  total = 0
  for d in ALL_DENOISERS:
    config = D.MixtureConfig((d,), sentinel_overflow='cap')
    examples = run(config, documents)
    position, skipped = 0, 0
    for ex in examples:
      chunk = merge(*strip(ex, config))
      n = len(chunk)
      if not np.array_equal(stream[position:position + n], chunk):
        position += 1  # a dropped 1-token tail of a block
        skipped += 1
        assert np.array_equal(stream[position:position + n], chunk), (d.name, position)
      position += n
    assert len(stream) - position <= 1
    assert skipped <= len(documents)
    total += len(examples)
  assert total > 5000


@pytest.mark.parametrize('lengths', [LENGTHS, {'inputs': 128, 'targets': 32},
                                     {'inputs': 64, 'targets': 256}])
def test_outputs_fit_feature_lengths_start_with_mode_and_use_only_sentinels(documents,
                                                                           lengths):
  config = pretrain.OBJECTIVES['ul2_mod']
  examples = run(config, documents[:20], lengths)
  assert len(examples) > 100
  seen = set()
  for ex in examples:
    assert len(ex['inputs']) <= lengths['inputs'] and len(ex['targets']) <= lengths['targets']
    d, inputs, targets = strip(ex, config)  # asserts the mode prompt and EOS
    seen.add(d.name)
    merge(d, inputs, targets)  # every sentinel in one has its span in the other
    # No sentinel on an ordinary word piece: every id at or above the first sentinel id is a
    # sentinel, and every id below it is an ordinary piece the tokenizer produced.
    ids = np.array(inputs + targets)
    assert ids.max() < SENTINEL_HI
    sentinels = ids[ids >= SENTINEL_LO]
    if d.family != 'S':
      in_sentinels = [t for t in inputs if is_sentinel(t)]
      assert in_sentinels == list(range(SENTINEL_HI - 1, SENTINEL_HI - 1 - len(in_sentinels),
                                        -1))
      assert len(sentinels) == 2 * len(in_sentinels)
  assert len(seen) == 7


def test_dedicated_mode_token_ids(documents):
  config = D.MixtureConfig(D.UL2R_DENOISERS, D.UL2R_RATES,
                           mode_token_ids=V.DEDICATED_MODE_IDS)
  for ex in run(config, documents[:8], limit=50):
    d = config.denoisers[ex['denoiser']]
    assert ex['inputs'][0] == V.DEDICATED_MODE_IDS[d.mode]
    assert ex['inputs'][1] < SENTINEL_LO or d.family != 'S'


# ---------------------------------------------------------------------------------------------
# Statistics over >= 2,000 examples per denoiser
# ---------------------------------------------------------------------------------------------

def collect(config, documents, minimum):
  """Examples from successive seeds until every denoiser has at least `minimum`."""
  by_denoiser = collections.defaultdict(list)
  seed = 0
  while min((len(by_denoiser[i]) for i in range(len(config.denoisers))), default=0) < minimum:
    for ex in run(config, documents, seed=seed):
      by_denoiser[int(ex['denoiser'])].append(strip(ex, config))
    seed += 1
  return by_denoiser


@pytest.mark.parametrize('denoiser', [d for d in ALL_DENOISERS if d.family != 'S'],
                         ids=lambda d: d.name)
def test_corruption_rate_and_mean_span_length(documents, denoiser):
  """With the default sizing every denoiser keeps its (mu, r), X(3, 0.5) at 512 included."""
  config = D.MixtureConfig((denoiser,))
  [plan] = D.plan_chunks(config, LENGTHS, VOCAB)
  examples = collect(config, documents, 2000)[0]
  assert len(examples) >= 2000
  noise = spans = raw = 0
  for d, inputs, targets in examples:
    n_spans = sum(is_sentinel(t) for t in inputs)
    n_noise = len(targets) - n_spans
    length = len(inputs) - n_spans + n_noise
    # Each example follows the formulas exactly (counts are deterministic given the length).
    assert (n_noise, n_spans) == D.span_counts(length, denoiser, VOCAB.extra_ids)
    noise, spans, raw = noise + n_noise, spans + n_spans, raw + length
  # Corruption rate: round(L * r) is off by at most half a token per example, and full chunks
  # hold >= 500 tokens, so the pooled rate is within 0.5/500 = 0.001 of r; 0.003 allows for a
  # block's shorter last chunks.
  assert abs(noise / raw - denoiser.corruption_rate) < 0.003
  # Mean span length: the span count is round(noise / mu), an integer, so a full chunk with k
  # spans has a mean span length within mu * 0.5 / k of mu (k = 28 for R(3, .15): 1.8%; k = 1
  # for X(64, .15): 50%).
  full_noise, full_spans = D.span_counts(plan.raw_length, denoiser)
  assert plan.max_spans == full_spans <= VOCAB.extra_ids
  tolerance = 0.5 / full_spans + 0.01
  assert abs(noise / spans / denoiser.mean_span_length - 1) <= tolerance, noise / spans


def test_s_denoiser_target_fractions(documents):
  for denoiser, expected in ((D.S(), 0.5), (D.S('fixed', 0.25), 0.25)):
    config = D.MixtureConfig((denoiser,))
    examples = collect(config, documents, 2000)[0]
    fractions = np.array([len(t) / (len(i) + len(t)) for _, i, t in examples])
    if denoiser.s_split == 'uniform':
      # prefix ~ U[1, L-1]: mean 1/2, per-example std ~0.29: 4 standard errors ~0.026.
      assert abs(fractions.mean() - expected) < 4 * 0.29 / np.sqrt(len(fractions))
      assert fractions.min() < 0.05 and fractions.max() > 0.95
    else:
      for _, inputs, targets in examples:  # exactly round(L * r) target tokens
        length = len(inputs) + len(targets)
        assert len(targets) == min(max(round(length * expected), 1), length - 1)
      # Rounding moves a full (~500-token) chunk's fraction by at most 0.001.
      pooled = sum(len(t) for _, _, t in examples) / sum(len(i) + len(t) for _, i, t in examples)
      assert abs(pooled - expected) < 0.002


@pytest.mark.parametrize('objective', ['ul2_mod', 'ul2r'])
def test_mixing_proportions_follow_the_rates(documents, objective):
  config = pretrain.OBJECTIVES[objective]
  counts = np.zeros(len(config.denoisers))
  seed = 0
  while counts.sum() < 6000:
    for ex in run(config, documents, seed=seed):
      counts[ex['denoiser']] += 1
    seed += 1
  expected = counts.sum() * np.array(config.normalized_rates())
  chi2, p = scipy.stats.chisquare(counts, expected)
  # Denoisers are drawn i.i.d. per chunk; a correct sampler fails this 1 time in 1,000.
  assert p > 1e-3, (counts, expected, chi2)


# ---------------------------------------------------------------------------------------------
# Determinism, tasks and packing
# ---------------------------------------------------------------------------------------------

def task_examples(name, seed, n=40, split='train'):
  ds = seqio.get_mixture_or_task(name).get_dataset(LENGTHS, split=split, shuffle=False,
                                                    seed=seed)
  return [(ex['inputs'].tolist(), ex['targets'].tolist()) for ex in ds.take(n).as_numpy_iterator()]


def test_same_seed_same_stream_different_seed_different_stream():
  a, b, c = (task_examples('ul2_mod_gutenberg', s) for s in (7, 7, 8))
  assert a == b
  assert a != c
  # The chunk stream is the same text, only the noise and denoiser draws differ.
  assert len(a) == len(c) == 40


def test_every_registered_objective_runs_on_both_splits():
  for objective in pretrain.OBJECTIVES:
    for split in ('train', 'validation'):
      examples = task_examples(f'{objective}_gutenberg', 0, n=5, split=split)
      assert len(examples) == 5


def test_packed_batches_have_correct_segment_ids_and_positions():
  task = seqio.get_mixture_or_task('ul2_mod_gutenberg')
  ds = task.get_dataset(LENGTHS, split='validation', shuffle=False, seed=3)
  examples = [(ex['inputs'].tolist(), ex['targets'].tolist())
              for ex in ds.take(60).as_numpy_iterator()]
  # Every denoiser fills the 512 inputs, so rows twice as long hold two examples or more.
  packed = seqio.EncDecFeatureConverter(pack=True)(ds.take(60), {'inputs': 1024,
                                                                 'targets': 1024})
  rows = list(packed.as_numpy_iterator())
  assert len(rows) <= 0.6 * len(examples)
  segments = []
  for row in rows:
    assert 'denoiser' not in row
    for key in ('encoder', 'decoder'):
      ids, pos = row[f'{key}_segment_ids'], row[f'{key}_positions']
      for s in range(1, ids.max() + 1):
        where = np.flatnonzero(ids == s)
        assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
        assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart at 0
      assert (pos[ids == 0] == 0).all()
    for s in range(1, row['encoder_segment_ids'].max() + 1):
      enc = row['encoder_input_tokens'][row['encoder_segment_ids'] == s].tolist()
      dec_mask = row['decoder_segment_ids'] == s
      targets = row['decoder_target_tokens'][dec_mask].tolist()
      decoder_inputs = row['decoder_input_tokens'][dec_mask].tolist()
      assert decoder_inputs == [0] + targets[:-1]  # shifted right inside the segment
      assert (row['decoder_loss_weights'][dec_mask] == 1).all()
      segments.append((enc, targets))
  assert segments == examples


def test_c4_task_is_built_offline_and_its_preprocessing_runs():
  task = seqio.get_mixture_or_task('ul2_mod_c4')
  assert isinstance(task.source, seqio.TfdsDataSource)
  assert task.source.tfds_dataset.name == 'c4/en:3.1.0'
  assert set(task.source.splits) == {'train', 'validation'}
  # C4 records as TFDS yields them; everything after the source runs for real.
  texts = [open(pretrain.BUNDLED_GUTENBERG_DIR + '/gutenberg_validation_00.txt').read()[:20000]]
  ds = tf.data.Dataset.from_tensor_slices(
      {'text': texts, 'url': ['http://example.com'], 'timestamp': ['2019-04-25']})
  ds = task.preprocess_postcache(task.preprocess_precache(ds, seed=0), LENGTHS, seed=0)
  examples = list(ds.as_numpy_iterator())
  assert len(examples) >= 5
  for ex in examples:
    strip(ex, pretrain.OBJECTIVES['ul2_mod'])


@pytest.mark.parametrize('module', [D, V], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module)
  assert result.attempted > 0 and result.failed == 0
