"""Gin at the edge: the one place that parses gin files and flags (T5X's conventions).

The library (`ul2/`) never imports gin. Gin files use `dynamic_registration`, so they configure
`ul2` functions and dataclasses directly; scripts call `parse` and then read the macros they need.

    python scripts/train.py --gin_file=quickstart.gin --gin.TRAIN_STEPS=1000
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
import tempfile
import tokenize
import warnings
from typing import Any, Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, 'gin_configs')
# Gin files whose old name said something they were not: the name a command gives -> the new.
RENAMED = {
    'models/decoder_only_base.gin': "ul2's decoder-only prefix LM (untied logits, 134.3M) is "
    'models/prefix_lm_base.gin; T5X\'s decoder-only base (tied, causal, 109.6M) is '
    'models/t5x_decoder_only_base.gin.',
    'models/decoder_only_large.gin': 'it is models/prefix_lm_large.gin (a prefix LM).',
}

_format_warning = warnings.formatwarning


def _note(message, category, filename, lineno, line=None) -> str:
  """The project's own warnings (a setting worth knowing about, not a fault) as one plain
  line; other libraries' keep Python's format with their source line."""
  if issubclass(category, UserWarning) and os.path.basename(os.path.dirname(
      os.path.abspath(filename))) in ('ul2', 'tasks', 'ul2_tasks'):
    return f'note: {message}\n'
  return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _note


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
  """The whole docstring as written (its examples), and every flag's default."""


GIN_FLAGS_HELP = (
    "gin (T5X's flags): --gin_file=F (repeatable; a path, or relative to gin_configs/) and "
    '--gin.NAME=VALUE (a macro, e.g. --gin.TRAIN_STEPS=1000, or a parameter, e.g. '
    '--gin.train.TrainConfig.log_every=50). A macro no gin file uses is an error.')


def argument_parser(doc: str, gin_flags: bool = False) -> argparse.ArgumentParser:
  """A script's parser: `--help` prints its whole docstring and every flag with its default
  (and, with `gin_flags`, how to pass gin files and bindings)."""
  return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter,
                                 epilog=GIN_FLAGS_HELP if gin_flags else None)


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          read_by_script: Sequence[str] = ()) -> None:
  """Parses gin files (paths, or relative to `gin_configs/`) and `NAME=VALUE` bindings.

  A mistake is one line naming it (SystemExit): a macro binding that nothing uses (a typo
  such as `--gin.TRAIN_STEP=70` would otherwise be ignored) with the closest macro in use, a
  required macro left unset, an unknown configurable or parameter. `read_by_script`: macros
  the script reads itself (`macro()`) besides those the gin files use.
  """
  gin.clear_config()
  # Resolve `include 'runs/pretrain.gin'` in gin_configs/ first. Gin's own order tries the
  # working directory, then a Python package of that name, and a directory such as runs/ in
  # the working directory (the quickstart's model dir) would be taken for a package and crash.
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  if GIN_DIR in prefixes:
    prefixes.remove(GIN_DIR)
  prefixes.insert(0, GIN_DIR)
  resolved = []
  for path in gin_files:
    if not os.path.exists(path) and os.path.exists(os.path.join(GIN_DIR, path)):
      path = os.path.join(GIN_DIR, path)
    if not os.path.exists(path) and os.path.normpath(path) in RENAMED:
      raise FileNotFoundError(f'gin file {path!r} was renamed: {RENAMED[os.path.normpath(path)]}')
    if not os.path.exists(path):
      raise FileNotFoundError(f'gin file {path!r} not found, neither as given nor under '
                              f'{GIN_DIR}; pass e.g. --gin_file=models/tiny.gin')
    if is_t5x_model_gin(path):  # T5X's (or flaxformer's) model gin: its ul2 equivalent
      resolved.append(_write_temporary(path, t5x_model_gin_as_ul2(path)))
      continue
    resolved.append(path if os.path.dirname(os.path.abspath(path)) == GIN_DIR
                    or os.path.abspath(path).startswith(GIN_DIR + os.sep) else _with_imports(path))
  for binding in bindings:  # a value gin cannot parse: usually an unquoted string
    name, _, value = binding.partition('=')
    try:
      gin.config_parser.ConfigParser(value, _ParseOnly()).parse_value()
    except (SyntaxError, ValueError):
      raise SystemExit(f'error: gin: --gin.{binding}: {value!r} is not a gin value; a string '
                       f'is quoted inside the flag: --gin.{name.strip()}="\'{value.strip()}\'"'
                       ) from None
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings))
  except SyntaxError as e:  # in a gin file (or a binding): its file and line, in one line
    where, line = e.filename or 'the --gin bindings', e.lineno
    if where in _COPIES:
      where, at, added = _COPIES[where]
      line = line - added if line and line > at else line
    for original, copy in zip(gin_files, resolved):
      where = original if where == copy else where
    raise SystemExit(f'error: gin: {where}:{line}: {e.msg}'
                     + (f' in {e.text.strip()!r}' if e.text and e.text.strip() else '')) from None
  except tokenize.TokenError:  # an unclosed bracket or string runs to the end of the input
    raise SystemExit(f'error: gin: {", ".join(gin_files) or "the --gin bindings"}: a bracket '
                     'or string opened and never closed.') from None
  except (ValueError, NameError, AttributeError, ImportError) as e:
    message = _explain(e, bindings)
    for original, copy in zip(gin_files, resolved):
      message = message.replace(copy, original)
    raise SystemExit(f'error: gin: {message}') from None
  _check_macro_bindings(bindings, read_by_script)


# What run gin files bind (`train.TrainConfig.log_every = 50`): a user's gin file may use them
# without importing them (and without `from __gin__ import dynamic_registration`).
PROJECT_MODULES = ('data', 'decoding', 'network', 'partitioning', 'train')


def _with_imports(path: str) -> str:
  """`path`, or a copy of it with the `from ul2 import <module>` lines its bindings need.

  >>> import tempfile; f = tempfile.NamedTemporaryFile('w', suffix='.gin', delete=False)
  >>> _ = f.write("include 'quickstart.gin'\\ntrain.TrainConfig.log_every = 7\\n"); f.close()
  >>> print(open(_with_imports(f.name)).read())
  from __gin__ import dynamic_registration
  from ul2 import train
  include 'quickstart.gin'
  train.TrainConfig.log_every = 7
  <BLANKLINE>
  """
  with open(path, encoding='utf-8') as f:
    text = f.read()
  missing = [m for m in PROJECT_MODULES
             if re.search(rf'(^|@)\s*{m}\.[A-Za-z_]', text, re.M)
             and not re.search(rf'^\s*from\s+ul2\s+import\s+.*\b{m}\b', text, re.M)]
  if not missing:
    return path
  lines = text.splitlines(keepends=True)
  registration = [i for i, line in enumerate(lines) if 'dynamic_registration' in line]
  at = registration[0] + 1 if registration else 0
  added = ([] if registration else ['from __gin__ import dynamic_registration\n']) + [
      f'from ul2 import {m}\n' for m in missing]
  copy = _write_temporary(path, ''.join(lines[:at] + added + lines[at:]))
  _COPIES[copy] = (path, at, len(added))
  return copy


# A temporary copy of a user's gin file -> (that file, the line imports were inserted at, how
# many): gin's syntax errors then name the user's file and line, not the copy's.
_COPIES: dict[str, tuple[str, int, int]] = {}


def _write_temporary(path: str, text: str) -> str:
  """A temporary gin file named like `path` holding `text`."""
  copy = os.path.join(tempfile.mkdtemp(prefix='ul2_gin_'), os.path.basename(path))
  with open(copy, 'w', encoding='utf-8') as f:
    f.write(text)
  return copy


# ----------------------------------------------------------------------------------------------
# T5X model gins read as ul2 model configs
# ----------------------------------------------------------------------------------------------

# T5X's `network.T5Config` (t5x/examples/t5, scalable_t5) and `network.TransformerConfig`
# (t5x/examples/decoder_only) fields with the same name and meaning in `network.Config`.
_T5X_SAME_FIELDS = ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim',
                    'num_encoder_layers', 'num_decoder_layers', 'mlp_activations',
                    'logits_via_embedding', 'float32_attention_logits', 'scan_layers',
                    'remat_policy')
# Settings of how T5X partitions or runs a model, not of the model itself.
_T5X_IGNORED_FIELDS = ('spmd_annotations',)
# Flaxformer's architecture gins (the UL2 20B gin's kind) set the sizes as macros.
_FLAXFORMER_MACROS = {'NUM_ENCODER_LAYERS': 'num_encoder_layers',
                      'NUM_DECODER_LAYERS': 'num_decoder_layers', 'NUM_HEADS': 'num_heads',
                      'HEAD_DIM': 'head_dim', 'EMBED_DIM': 'emb_dim', 'MLP_DIM': 'mlp_dim',
                      'NUM_EMBEDDINGS': 'vocab_size'}


class _Reference(tuple):
  """A gin `@name()` / `@name` (kind '@') or `%NAME` (kind '%') in a parsed T5X gin file."""


class _ParseOnly:
  """gin's parser delegate that records references instead of resolving them: T5X, flaxformer
  and their configurables need not be importable to read their gin files."""

  def configurable_reference(self, name, evaluate):
    return _Reference(('@', name, evaluate))

  def macro(self, name):
    return _Reference(('%', name))


def is_t5x_model_gin(path: str) -> bool:
  """Whether `path` is a T5X model gin (it configures T5X's or flaxformer's networks)."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  return bool(re.search(r'\b(T5Config|TransformerConfig)\b|\bt5_architecture\.'
                        r'|^\s*include\s+.(t5x/examples|flaxformer)/', text, re.M))


def _t5x_statements(path: str, roots: Sequence[str], seen: tuple[str, ...] = ()):
  """The binding statements of a T5X gin file, includes expanded in place. An include such as
  't5x/examples/t5/t5_1_1/base.gin' is looked up under `roots` and under every folder above
  `path` (a T5X or flaxformer checkout's root)."""
  from gin import config_parser

  with open(path, encoding='utf-8') as f:
    text = f.read()
  for statement in config_parser.ConfigParser(text, _ParseOnly()):
    if isinstance(statement, config_parser.IncludeStatement):
      above = [os.path.dirname(os.path.abspath(path))]
      while os.path.dirname(above[-1]) != above[-1]:
        above.append(os.path.dirname(above[-1]))
      found = [os.path.join(r, statement.filename) for r in (*roots, *above)
               if os.path.isfile(os.path.join(r, statement.filename))]
      if not found:
        raise SystemExit(f"error: {path}: include '{statement.filename}' not found under the "
                         'folders above it; read the gin file where it lies in its T5X or '
                         'flaxformer checkout (includes are looked up from there).')
      if found[0] in seen:
        raise SystemExit(f'error: {path}: includes {found[0]} in a cycle.')
      yield from _t5x_statements(found[0], roots, seen + (found[0],))
    elif isinstance(statement, config_parser.BindingStatement):
      yield statement


def read_t5x_model_gin(path: str, roots: Sequence[str] = ()) -> dict[str, Any]:
  r"""The `network.Config` fields a T5X model gin sets, plus 'DROPOUT_RATE' and
  'ACTIVATION_DTYPE' when it sets them to values (ul2's macros of the same names).

  Reads T5X's `t5x/examples/t5/*/*.gin` (`network.T5Config`), the decoder-only example's
  (`network.TransformerConfig`, `models.DecoderOnlyModel.inputs_bidirectional_attention`) and
  flaxformer's (the UL2 20B gin's kind: size macros, `dense.MlpBlock.activations`, tied logits
  when `t5_architecture.Decoder.output_logits_factory` is None). Later bindings win, as in gin.

  >>> import tempfile; f = tempfile.NamedTemporaryFile('w', suffix='.gin', delete=False)
  >>> _ = f.write("from t5x.examples.t5 import network\nDROPOUT_RATE = %gin.REQUIRED\n"
  ...             "network.T5Config:\n  emb_dim = 512\n  mlp_activations = ('swish', 'linear')"
  ...             "\n  dropout_rate = %DROPOUT_RATE\n  dtype = 'bfloat16'\n"); f.close()
  >>> read_t5x_model_gin(f.name)
  {'emb_dim': 512, 'mlp_activations': ('silu', 'linear'), 'ACTIVATION_DTYPE': 'bfloat16'}
  """
  macros, params = {}, {}
  for st in _t5x_statements(path, roots):
    if not st.arg_name and '.' not in st.selector:
      macros[st.selector] = st.value
    else:
      params[(st.selector.rsplit('.', 1)[-1], st.arg_name)] = st.value

  def value(v, depth=0):
    while isinstance(v, _Reference) and v[0] == '%' and v[1] != 'gin.REQUIRED' and depth < 50:
      v, depth = macros.get(v[1], _Reference(('%', 'gin.REQUIRED'))), depth + 1
    return None if isinstance(v, _Reference) and v[0] == '%' else v

  out: dict[str, Any] = {}
  decoder_only = any(k[0] == 'TransformerConfig' for k in params)
  config = 'TransformerConfig' if decoder_only else 'T5Config'
  for (selector, name), v in params.items():
    if selector != config:
      continue
    v = value(v)
    if name in _T5X_SAME_FIELDS:
      out[name] = v
    elif name == 'num_layers' and decoder_only:
      out['num_decoder_layers'] = v
    elif name == 'dropout_rate':
      if v is not None:
        out['DROPOUT_RATE'] = v
    elif name == 'dtype':
      out['ACTIVATION_DTYPE'] = v
    elif name not in _T5X_IGNORED_FIELDS:
      raise SystemExit(f'error: {path}: {config}.{name} = {v!r} has no ul2 counterpart; '
                       'remove it or write a gin_configs/models/*.gin by hand.')
  for macro_name, field in _FLAXFORMER_MACROS.items():
    if macro_name in macros and value(macros[macro_name]) is not None:
      out[field] = value(macros[macro_name])
  if any(k in macros for k in _FLAXFORMER_MACROS):
    for macro_name, key in (('DROPOUT_RATE', 'DROPOUT_RATE'),
                            ('ACTIVATION_DTYPE', 'ACTIVATION_DTYPE')):
      if value(macros.get(macro_name)) is not None:
        out[key] = value(macros[macro_name])
    if ('MlpBlock', 'activations') in params:
      out['mlp_activations'] = value(params[('MlpBlock', 'activations')])
    out['logits_via_embedding'] = value(params.get(('Decoder', 'output_logits_factory'))) is None
  if decoder_only:
    out['architecture'] = 'decoder_only'
    out['prefix_lm'] = bool(value(params.get(('DecoderOnlyModel',
                                              'inputs_bidirectional_attention'))))
  if not out:
    raise SystemExit(f'error: {path}: no T5X model settings found (network.T5Config / '
                     'TransformerConfig bindings or flaxformer size macros); is it a run gin?')
  if 'mlp_activations' in out:  # T5X spells SiLU 'swish'
    out['mlp_activations'] = tuple('silu' if a == 'swish' else a for a in out['mlp_activations'])
  return out


def t5x_model_gin_as_ul2(path: str, roots: Sequence[str] = ()) -> str:
  """The gin_configs/models/*.gin text equivalent to a T5X model gin (`read_t5x_model_gin`)."""
  fields = read_t5x_model_gin(path, roots)
  macros = {k: fields.pop(k) for k in ('DROPOUT_RATE', 'ACTIVATION_DTYPE', 'architecture')
            if k in fields}
  lines = [f'# ul2 equivalent of the T5X model gin {path}', "include 'models/t5_1_1.gin'", '']
  if 'architecture' in macros:
    lines.append(f"MODEL_ARCH = {macros.pop('architecture')!r}")
  lines += [f'{k} = {v!r}' for k, v in macros.items()]
  lines += ['', 'network.Config:'] + [f'  {k} = {v!r}' for k, v in fields.items()]
  return '\n'.join(lines) + '\n'


def import_modules(names: Sequence[str]) -> None:
  """Imports modules that register seqio tasks (`--module`, T5X's MIXTURE_OR_TASK_MODULE),
  looked up on PYTHONPATH and in the working directory."""
  if os.getcwd() not in sys.path:
    sys.path.append(os.getcwd())
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise SystemExit(f'error: --module {name}: cannot import it ({e}); put the folder that '
                       'holds it on PYTHONPATH or run from there.') from None
    except SyntaxError as e:  # the user's own module: where, not a traceback
      raise SystemExit(f'error: --module {name}: {e.msg} at {e.filename}:{e.lineno}.') from None


def add_module_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--module', action='append', default=[], metavar='NAME',
                      help='import this module first: it registers your seqio tasks '
                      '(repeatable; like T5X\'s MIXTURE_OR_TASK_MODULE)')


def add_memory_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--release_freed_memory', action='store_true',
                      help="give each step's freed memory back to the kernel (glibc's "
                      'default) instead of reusing it: on CPU, slower steps (page faults), '
                      'about the same peak memory')


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """--multiprocess and the explicit coordinator flags of a multi-host job."""
  parser.add_argument('--multiprocess', action='store_true',
                      help='call jax.distributed.initialize() (auto-detected cluster)')
  parser.add_argument('--coordinator_address', default=os.environ.get('UL2_COORDINATOR_ADDRESS'),
                      help='HOST:PORT of process 0 (env UL2_COORDINATOR_ADDRESS)')
  parser.add_argument('--num_processes', type=int,
                      default=int(os.environ['UL2_NUM_PROCESSES'])
                      if 'UL2_NUM_PROCESSES' in os.environ else None,
                      help='processes in the job (env UL2_NUM_PROCESSES)')
  parser.add_argument('--process_id', type=int,
                      default=int(os.environ['UL2_PROCESS_ID'])
                      if 'UL2_PROCESS_ID' in os.environ else None,
                      help="this process's index (env UL2_PROCESS_ID)")


def initialize_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize() when the flags ask for it (before any other JAX call)."""
  import jax

  explicit = args.coordinator_address is not None
  if not (args.multiprocess or explicit):
    return
  if explicit and (args.num_processes is None or args.process_id is None):
    raise SystemExit('--coordinator_address needs --num_processes and --process_id (or '
                     'UL2_NUM_PROCESSES and UL2_PROCESS_ID).')
  # Several CPU processes (tests, laptops) exchange collectives over gloo; accelerators use
  # their own (NCCL, ICI) whatever this says.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=args.coordinator_address,
                  num_processes=args.num_processes, process_id=args.process_id)
  jax.distributed.initialize(**kwargs)


def reuse_freed_memory(args: argparse.Namespace) -> bool:
  """`partitioning.reuse_freed_memory()` unless --release_freed_memory; before JAX starts."""
  if args.release_freed_memory:
    return False
  from ul2 import partitioning
  return partitioning.reuse_freed_memory()


def _explain(error: Exception, bindings: Sequence[str]) -> str:
  """gin's message in one line; for a required macro left unset, the flag that sets it and a
  near-miss binding the user may have meant."""
  text = ' '.join(str(error).strip().split('\n')[:2]) if isinstance(error, NameError) \
      else str(error).strip().splitlines()[0]
  required = re.match(r'(\w+)/macro\.value set to `%gin\.REQUIRED`', text)
  if not required:
    return text + _did_you_mean(text)
  name = required.group(1)
  given = [b.split('=', 1)[0].strip() for b in bindings]
  close = difflib.get_close_matches(name, given, n=1)
  return (f'the macro {name} is required: pass --gin.{name}=...'
          + (f' (you set {close[0]}: a typo?)' if close else ''))


def _did_you_mean(message: str) -> str:
  """' Did you mean ...?' for gin's unknown parameter or configurable ('' when nothing is
  close): the parameters of that configurable, or the configurables gin knows."""
  import inspect
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  parameter = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'",
                        message)
  if parameter:
    match = registry.get_match(parameter.group(1))
    names = list(inspect.signature(match.wrapped).parameters) if match else []
    near = difflib.get_close_matches(parameter.group(2), names, n=2)
  else:
    unknown = re.search(r"No configurable matching '([\w.]+)'", message)
    if not unknown:
      return ''
    known = {'.'.join(selector.split('.')[-2:]) for selector, _ in registry.items()
             if not selector.startswith('gin.')}  # as gin files name them: train.TrainConfig
    near = difflib.get_close_matches(unknown.group(1), sorted(known), n=2)
  return f" Did you mean {' or '.join(near)}?" if near else ''


def _macro_references(value: Any, out: set[str]) -> set[str]:
  if isinstance(value, gin.config.ConfigurableReference):
    if value.scoped_selector.endswith('/gin.macro'):
      out.add(value.scoped_selector.split('/')[0])
  elif isinstance(value, dict):
    for v in value.values():
      _macro_references(v, out)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _macro_references(v, out)
  return out


def _check_macro_bindings(bindings: Sequence[str], read_by_script: Sequence[str]) -> None:
  used = set(read_by_script)
  for params in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for value in params.values():
      _macro_references(value, used)
  for binding in bindings:
    name = binding.split('=', 1)[0].strip()
    if '.' in name or '/' in name or name in used:  # a parameter (gin checks those) or in use
      continue
    close = difflib.get_close_matches(name, sorted(used), n=1)
    raise SystemExit(f'error: gin: --gin.{binding}: no gin file uses the macro {name}'
                     + (f'; did you mean {close[0]}?' if close else
                        f'; the macros in use are {", ".join(sorted(used))}.'))


def macro(name: str) -> Any:
  """The value of `%NAME`, with any `@configurable()` reference evaluated."""
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError as e:
    raise ValueError(f'The gin macro {name} is not set: include a gin file that sets it (e.g. '
                     f'a models/*.gin for MODEL_CONFIG) or pass --gin.{name}=...') from e
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


def check_checkpoint(path: str, flag: str = '--checkpoint') -> None:
  """A local checkpoint path that does not exist stops in one line, with the closest names
  beside it, before any heavy import (URLs are left to the loader)."""
  if '://' in path or os.path.exists(path):
    return
  parent = os.path.dirname(os.path.abspath(path))
  near = difflib.get_close_matches(os.path.basename(os.path.normpath(path)),
                                   sorted(os.listdir(parent)), n=3, cutoff=0.6
                                   ) if os.path.isdir(parent) else []
  hint = (' Did you mean ' + ' or '.join(os.path.join(os.path.dirname(path), n)
                                         for n in near) + '?') if near else (
      ' Give a model_dir, its checkpoint_<step> or best/, an HF or a T5X checkpoint '
      'directory.')
  raise SystemExit(f'error: No checkpoint at {path} ({flag}): no such file or directory.{hint}')


def require_extra(extra: str, module: str, what: str) -> None:
  """Stops in one line naming the extra when `module` (an optional dependency) is missing;
  before any heavy import."""
  import importlib.util
  try:
    found = importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a module blocked as None in sys.modules
    found = False
  if not found:
    raise SystemExit(f"error: {what} needs {module} (the {extra} extra): pip install -e "
                     f"'.[{extra}]'")


def exit_on_user_error(main, *args):
  """Runs a script's `main`: a mistake in what the user gave (a ValueError or a missing file,
  also raised inside a TensorFlow input pipeline) ends in one line `error: ...` and exit
  status 1. UL2_TRACEBACK=1 shows the traceback instead."""
  try:
    return main(*args)
  except ImportError as e:  # an optional dependency missing: ul2.interop.MissingExtra
    if os.environ.get('UL2_TRACEBACK') or type(e).__name__ != 'MissingExtra':
      raise
    raise SystemExit(f'error: {e}') from None
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:
    if os.environ.get('UL2_TRACEBACK'):
      raise
    raise SystemExit(f'error: {str(e).strip().splitlines()[0]}') from None
  except Exception as e:  # TensorFlow wraps what a data generator raised into an OpError
    reason = re.search(r'(ValueError|FileNotFoundError): (.+)', str(e))
    if os.environ.get('UL2_TRACEBACK') or type(e).__module__.split('.')[0] != 'tensorflow' \
        or not reason:
      raise
    raise SystemExit(f'error: {reason.group(2).strip()}') from None


def has_macro(name: str) -> bool:
  try:
    gin.query_parameter(f'%{name}')
    return True
  except ValueError:
    return False


def model_config(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """The `network.Config` that model gin files (`models/<size>.gin`) set as MODEL_CONFIG, or
  None without files: the checkpoint's own config is used then."""
  if not gin_files:
    return None
  parse(gin_files, bindings, read_by_script=('MODEL_CONFIG',))
  return macro('MODEL_CONFIG')


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """T5X's flags: `--gin_file=F` (repeatable) and `--gin.NAME=VALUE` -> (files, bindings, rest).

  >>> split_argv(['--gin_file=models/tiny.gin', "--gin.DROPOUT_RATE=0.1", '--steps=3'])
  (['models/tiny.gin'], ['DROPOUT_RATE=0.1'], ['--steps=3'])
  """
  files, bindings, rest = [], [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == '--gin_file' and args:
      arg = f'{arg}={args.pop(0)}'
    if arg.startswith('--gin_file='):
      files.append(arg.split('=', 1)[1])
    elif arg.startswith('--gin.'):
      bindings.append(arg[len('--gin.'):])
    else:
      rest.append(arg)
  return files, bindings, rest
