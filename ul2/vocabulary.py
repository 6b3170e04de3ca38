"""The T5 SentencePiece vocabulary with 100 sentinels, UL2's mode tokens, and decoding that
shows them.

    >>> vocab = get_vocabulary()
    >>> vocab.vocab_size, vocab.encode('[NLU]')
    (32100, [784, 567, 9138, 908])
    >>> render([784, 567, 9138, 908, 8, 32099, 5, 1], vocab)
    '[NLU] the <extra_id_0> . <EOS>'

The bundled model (`data/t5_vocab/spiece.model`, see `data/README.md`) is the one the released
T5 v1.1 and UL2 checkpoints use: 32,000 pieces, pad 0, EOS 1, unk 2; `<extra_id_0>` = 32099
down to `<extra_id_99>` = 32000; the embedding is padded to 32,128 rows.

Mode tokens (paper §3.1.2) say which paradigm a model is asked for: `[NLU]` (the R-denoisers,
understanding), `[S2S]` (the S-denoiser, sequence-to-sequence) and `[NLG]` (the X-denoisers,
generation). They are written as text before the input, as the released UL2 checkpoints read
them; `''` means no mode token. Every setting that chooses one (pretraining denoisers,
SuperGLUE tasks, `eval.py --mode`, `infer.py --mode`) goes through `check_mode`:

    >>> with_mode('cb hypothesis: It was wet.', check_mode('[NLU]'))
    '[NLU] cb hypothesis: It was wet.'
    >>> split_mode('[S2S] It was a dark and')
    ('[S2S]', 'It was a dark and')
    >>> check_mode('NLU', 'eval.py --mode')
    Traceback (most recent call last):
    ...
    ValueError: eval.py --mode: 'NLU' is not a mode token; use one of '[NLU]', '[S2S]', '[NLG]' or '' (none).
"""

from __future__ import annotations

import functools
import os
import re
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # seqio (and TensorFlow) load with the first vocabulary, not with this module
  import seqio


def _bundled_data_dir() -> str:
  """The repository's `data/`: installed as `ul2/data/` by a wheel, read in place otherwise.

  A regular `pip install .` copies `data/` into the package (pyproject's `package-dir`); an
  editable install or a source checkout reads it beside `ul2/`. The package copy is looked at
  first so that a stray top-level `data/` in site-packages is never taken for ours.
  """
  package = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(package, 'data')
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), 'data')


DATA_DIR = _bundled_data_dir()
SPM_PATH = os.path.join(DATA_DIR, 't5_vocab', 'spiece.model')
EXTRA_IDS = 100

NLU, S2S, NLG = '[NLU]', '[S2S]', '[NLG]'
MODE_TOKENS = (NLU, S2S, NLG)
# One id per mode instead of the text (`denoisers.MixtureConfig.mode_token_ids`): unused rows
# of the 32,128-row embedding just above the 32,100 vocabulary ids, as ports with dedicated
# mode ids do.
DEDICATED_MODE_IDS = {NLU: 32100, S2S: 32101, NLG: 32102}


def check_mode(mode: str | None, setting: str = 'mode') -> str:
  """`mode` if it is a mode token or '' (None also means none); else one line naming `setting`."""
  if not mode:
    return ''
  if mode not in MODE_TOKENS:
    choices = ', '.join(repr(m) for m in MODE_TOKENS)
    raise ValueError(f"{setting}: {mode!r} is not a mode token; use one of {choices} or '' "
                     '(none).')
  return mode


def with_mode(text: str, mode: str) -> str:
  """`text` with the mode token and a space before it (unchanged for mode '')."""
  return f'{mode} {text}' if mode else text


def split_mode(text: str) -> tuple[str, str]:
  """(mode token, rest) of a text that may start with one; ('', text) if it does not."""
  for mode in MODE_TOKENS:
    if text.startswith(mode + ' '):
      return mode, text[len(mode) + 1:]
  return '', text


@functools.cache
def get_vocabulary(spm_path: str = SPM_PATH, extra_ids: int = EXTRA_IDS
                   ) -> seqio.SentencePieceVocabulary:
  if not os.path.exists(spm_path):
    raise FileNotFoundError(f'SentencePiece model {spm_path} not found. The T5 model ships in '
                            'the repository\'s data/t5_vocab/: install ul2 from a full checkout '
                            '(pip install -e . or pip install .), or pass spm_path.')
  import seqio
  return seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)


def render(ids: Sequence[int], vocabulary: seqio.Vocabulary,
           special_ids: Mapping[int, str] | None = None) -> str:
  """Decodes ids with sentinels, EOS and dedicated mode ids visible (for people, not models).

  Runs of ordinary pieces are decoded together so spacing is SentencePiece's own.
  """
  base = vocabulary.vocab_size - vocabulary.extra_ids  # first sentinel id (<extra_id_99>)
  special = dict(special_ids or {})
  words, run = [], []

  def flush():
    if run:
      words.append(vocabulary.decode(run))
      run.clear()

  for i in map(int, ids):
    if i == 0:
      continue  # padding
    if i in special:
      flush(); words.append(special[i])
    elif i == 1:
      flush(); words.append('<EOS>')
    elif base <= i < vocabulary.vocab_size:
      flush(); words.append(f'<extra_id_{vocabulary.vocab_size - 1 - i}>')
    elif i >= vocabulary.vocab_size:
      flush(); words.append(f'<id_{i}>')
    else:
      run.append(i)
  flush()
  return ' '.join(w for w in words if w)


def without_sentinels(text: str) -> str:
  """Generated text for people: sentinel markers (as `render` and the vocabulary's decode
  write them) dropped and the spacing around them closed up.

  >>> without_sentinels('<extra_id_0> the cat <extra_id_1> sat.<extra_id_2>')
  'the cat sat.'
  """
  return ' '.join(re.sub(r'<extra_id_\d+>', ' ', text).split())
