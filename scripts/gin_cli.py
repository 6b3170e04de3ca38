"""Gin at the edge: the one place that parses gin files and flags (T5X's conventions).

The library (`ul2/`) never imports gin. Gin files use `dynamic_registration`, so they configure
`ul2` functions and dataclasses directly; scripts call `parse` and then read the macros they need.

    python scripts/train.py --gin_file=quickstart.gin --gin.TRAIN_STEPS=1000
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, 'gin_configs')


def parse(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
  """Parses gin files (paths, or relative to `gin_configs/`) and `NAME=VALUE` bindings."""
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
    if not os.path.exists(path):
      raise FileNotFoundError(f'gin file {path!r} not found, neither as given nor under '
                              f'{GIN_DIR}; pass e.g. --gin_file=models/tiny.gin')
    resolved.append(path)
  gin.parse_config_files_and_bindings(resolved, list(bindings))


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


def model_config(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """The `network.Config` that model gin files (`models/<size>.gin`) set as MODEL_CONFIG, or
  None without files: the checkpoint's own config is used then."""
  if not gin_files:
    return None
  parse(gin_files, bindings)
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
