"""ul2: UL2 (Tay et al., 2022) in JAX/Flax.

Read in data-flow order: `vocabulary` -> `denoisers` -> `data` -> `network` -> `flops` ->
`partitioning` -> `adafactor` -> `losses` -> `records` -> `train` -> `checkpoints` -> `decoding`
-> `evaluation` -> `aot` -> `interop`
(docs/architecture.md says what each owns).
"""

import importlib.metadata as _metadata
import os as _os

# XLA:CPU in jaxlib 0.10.2 hands each attention block (both batched products and the softmax
# between them) to YNNPACK as one fusion, which runs it about 1.5x slower than the parts
# (T5 1.1 small's encoder, 8 x 256 tokens: 0.55 s against 0.37 s; PyTorch 0.39 s). Fusing
# single products only keeps the library where it is fast. XLA reads XLA_FLAGS when JAX
# starts its CPU client, after this import; a flag already in XLA_FLAGS is left as it is,
# and UL2_XLA_CPU_DEFAULTS=0 leaves XLA_FLAGS alone. Only for the jaxlib measured: another
# would abort on a flag it does not know.
XLA_CPU_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
XLA_CPU_FLAGS_JAXLIB = '0.10.2'


def _set_xla_cpu_flags() -> None:
  if _os.environ.get('UL2_XLA_CPU_DEFAULTS', '1') == '0':
    return
  try:
    if _metadata.version('jaxlib') != XLA_CPU_FLAGS_JAXLIB:
      return
  except _metadata.PackageNotFoundError:
    return
  flags = _os.environ.get('XLA_FLAGS', '')
  added = [f'--{name}={value}' for name, value in XLA_CPU_FLAGS.items()
           if f'--{name}=' not in flags]
  if added:
    _os.environ['XLA_FLAGS'] = ' '.join([flags, *added]).strip()


_set_xla_cpu_flags()
