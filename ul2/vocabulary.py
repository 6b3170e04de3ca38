"""The T5 SentencePiece vocabulary with 100 sentinels, and decoding that shows them.

    >>> vocab = get_vocabulary()
    >>> vocab.vocab_size, vocab.encode('[NLU]')
    (32100, [784, 567, 9138, 908])
    >>> render([784, 567, 9138, 908, 8, 32099, 5, 1], vocab)
    '[NLU] the <extra_id_0> . <EOS>'

The bundled model (`data/t5_vocab/spiece.model`, see `data/README.md`) is the one the released
T5 v1.1 and UL2 checkpoints use: 32,000 pieces, pad 0, EOS 1, unk 2; `<extra_id_0>` = 32099
down to `<extra_id_99>` = 32000; the embedding is padded to 32,128 rows.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

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


@functools.cache
def get_vocabulary(spm_path: str = SPM_PATH, extra_ids: int = EXTRA_IDS
                   ) -> seqio.SentencePieceVocabulary:
  if not os.path.exists(spm_path):
    raise FileNotFoundError(f'SentencePiece model {spm_path} not found. The T5 model ships in '
                            'the repository\'s data/t5_vocab/: install ul2 from a full checkout '
                            '(pip install -e . or pip install .), or pass spm_path.')
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
