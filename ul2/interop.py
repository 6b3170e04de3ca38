"""Interoperability: Hugging Face transformers T5 directories and T5X checkpoints.

Our parameter tree has T5X's names (`network` docstring), so:
  * HF export/import is a renaming with transposes (reference §2):
        token_embedder/embedding                      shared.weight
        encoder/layers_i/attention/query/kernel       encoder.block.i.layer.0.SelfAttention.q.weight (.T)
        encoder/relpos_bias/rel_embedding             encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight (.T)
        encoder/layers_i/mlp/wi_0/kernel              encoder.block.i.layer.1.DenseReluDense.wi_0.weight (.T)
        decoder/layers_i/encoder_decoder_attention/*  decoder.block.i.layer.1.EncDecAttention.*
        decoder/layers_i/mlp/*                        decoder.block.i.layer.2.DenseReluDense.*
        decoder/logits_dense/kernel                   lm_head.weight (.T)   (untied only)
  * T5X checkpoints hold the same tree under `target` (T5X's older tensorstore layout:
    `checkpoint_N/checkpoint` msgpack plus one zarr array per parameter in
    `checkpoint_N/target.<dotted.path>/`; or orbax), so they load directly, and ours can be
    written in that layout for T5X to restore.

Pitfall (transformers 5.x): `T5Config` ties `lm_head` to `shared` on construction even when told
not to, so building a model and calling `load_state_dict` silently gives wrong logits. We write
`model.safetensors` with distinct `shared.weight` and `lm_head.weight` and a `config.json` with
`"tie_word_embeddings": false`; load it with `from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import flax
import jax
import numpy as np

from ul2 import adafactor, network, vocabulary

_HF_ACTIVATIONS = {('gelu', 'linear'): 'gated-gelu', ('silu', 'linear'): 'gated-silu',
                   ('swish', 'linear'): 'gated-silu', ('relu',): 'relu', ('gelu',): 'gelu'}
# HF's name -> ours; 'swish' is jax's alias of 'silu', which is the name we read back.
_FROM_HF_ACTIVATIONS = {hf: ours for ours, hf in _HF_ACTIVATIONS.items() if ours[0] != 'swish'}
_ATTENTION = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def _check_hf_architecture(config: network.Config) -> None:
  if config.architecture != 'encoder_decoder':
    raise ValueError(f'No Hugging Face export for a {config.architecture} model: transformers '
                     'has no T5-style relative-position decoder-only class (T5 attention with '
                     'relative-position buckets in a causal/prefix LM). Export it in T5X\'s '
                     'layout instead: scripts/export_t5x.py.')


def hf_config(config: network.Config) -> dict[str, Any]:
  """The `config.json` of a `T5ForConditionalGeneration` with this architecture."""
  _check_hf_architecture(config)
  try:
    feed_forward_proj = _HF_ACTIVATIONS[tuple(config.mlp_activations)]
  except KeyError:
    raise ValueError(f'No HF T5 feed_forward_proj for mlp_activations '
                     f'{config.mlp_activations}; HF supports gated-gelu, gated-silu, relu, '
                     'gelu.') from None
  # d_kv is explicit in HF T5, so heads x head_dim may differ from d_model (UL2 20B).
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'vocab_size': config.vocab_size,
      'd_model': config.emb_dim,
      'd_kv': config.head_dim,
      'd_ff': config.mlp_dim,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'num_heads': config.num_heads,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate,
      'layer_norm_epsilon': config.layer_norm_epsilon,
      'initializer_factor': 1.0,
      # Must be written: the activation cannot be inferred from the weights.
      'feed_forward_proj': feed_forward_proj,
      'is_encoder_decoder': True,
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'decoder_start_token_id': network.PAD_ID,
      'pad_token_id': network.PAD_ID,
      'eos_token_id': network.EOS_ID,
      'use_cache': True,
  }


def config_from_hf(hf: Mapping[str, Any], **overrides) -> network.Config:
  """A `network.Config` from an HF T5 `config.json` (T5 v1.1, UL2, flan-t5 ...)."""
  proj = hf.get('feed_forward_proj', 'relu')
  if proj not in _FROM_HF_ACTIVATIONS:
    raise ValueError(f"config.json feed_forward_proj {proj!r} is not supported; expected one "
                     f'of {sorted(_FROM_HF_ACTIVATIONS)}.')
  fields = dict(
      vocab_size=hf['vocab_size'], emb_dim=hf['d_model'], num_heads=hf['num_heads'],
      head_dim=hf['d_kv'], mlp_dim=hf['d_ff'], num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
      mlp_activations=_FROM_HF_ACTIVATIONS[proj],
      logits_via_embedding=bool(hf.get('tie_word_embeddings', True)),
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6))
  fields.update(overrides)
  return network.Config(**fields)


# ----------------------------------------------------------------------------------------------
# Parameter mapping
# ----------------------------------------------------------------------------------------------

def _hf_names(config: network.Config) -> dict[tuple[str, ...], tuple[str, bool]]:
  """Our parameter path -> (HF name, transpose?)."""
  _check_hf_architecture(config)
  names = {('token_embedder', 'embedding'): ('shared.weight', False)}
  mlp_names = ['wi_0', 'wi_1'] if len(config.mlp_activations) > 1 else ['wi']
  for stack, layers in (('encoder', config.num_encoder_layers),
                        ('decoder', config.num_decoder_layers)):
    names[(stack, 'relpos_bias', 'rel_embedding')] = (
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True)
    names[(stack, f'{stack}_norm', 'scale')] = (f'{stack}.final_layer_norm.weight', False)
    for i in range(layers):
      block = f'{stack}.block.{i}.layer'
      if stack == 'encoder':
        sublayers = [('attention', 'pre_attention_layer_norm', f'{block}.0.SelfAttention',
                      f'{block}.0.layer_norm')]
        mlp_layer = 1
      else:
        sublayers = [('self_attention', 'pre_self_attention_layer_norm',
                      f'{block}.0.SelfAttention', f'{block}.0.layer_norm'),
                     ('encoder_decoder_attention', 'pre_cross_attention_layer_norm',
                      f'{block}.1.EncDecAttention', f'{block}.1.layer_norm')]
        mlp_layer = 2
      for ours, norm, theirs, their_norm in sublayers:
        names[(stack, f'layers_{i}', norm, 'scale')] = (f'{their_norm}.weight', False)
        for proj, p in _ATTENTION.items():
          names[(stack, f'layers_{i}', ours, proj, 'kernel')] = (f'{theirs}.{p}.weight', True)
      names[(stack, f'layers_{i}', 'pre_mlp_layer_norm', 'scale')] = (
          f'{block}.{mlp_layer}.layer_norm.weight', False)
      for m in mlp_names + ['wo']:
        names[(stack, f'layers_{i}', 'mlp', m, 'kernel')] = (
            f'{block}.{mlp_layer}.DenseReluDense.{m}.weight', True)
  if not config.logits_via_embedding:
    names[('decoder', 'logits_dense', 'kernel')] = ('lm_head.weight', True)
  return names


def to_hf_state_dict(params: Any, config: network.Config) -> dict[str, np.ndarray]:
  """Our parameters (per-layer or scanned) -> HF T5 tensors (float32 numpy)."""
  flat = flax.traverse_util.flatten_dict(network.unstack_layers(params, config))
  names = _hf_names(config)
  if set(flat) != set(names):
    raise ValueError(f'Parameter tree does not match the config: missing '
                     f'{sorted(set(names) - set(flat))[:3]}, unexpected '
                     f'{sorted(set(flat) - set(names))[:3]}.')
  out = {}
  for path, (name, transpose) in names.items():
    value = np.asarray(flat[path], np.float32)
    out[name] = np.ascontiguousarray(value.T if transpose else value)
  return out


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], config: network.Config) -> dict:
  """HF T5 tensors -> our per-layer parameter tree (float32 numpy)."""
  names = _hf_names(config)
  missing = [name for name, _ in names.values() if name not in tensors]
  if missing:
    raise ValueError(f'The HF checkpoint lacks {missing[:3]} ({len(missing)} tensors) that '
                     'this config needs; check num_layers / feed_forward_proj / '
                     'tie_word_embeddings in config.json.')
  flat = {}
  for path, (name, transpose) in names.items():
    value = np.asarray(tensors[name], np.float32)
    flat[path] = np.ascontiguousarray(value.T if transpose else value)
  return flax.traverse_util.unflatten_dict(flat)


def prepare_export_dir(path: str, overwrite: bool = False) -> None:
  """An empty folder to export into: refuses one with files in it (stale weight shards would
  mix with the new ones) unless `overwrite`, which clears it first."""
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise ValueError(f'{path} is not empty; choose another --output or pass --overwrite '
                       'to replace its contents.')
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)


class MissingExtra(ImportError):
  """An optional dependency is not installed; the message is one line naming the extra."""


def _safetensors_numpy(what: str):
  try:
    import safetensors.numpy
  except ImportError:
    raise MissingExtra(f"{what} needs safetensors (the hf extra): pip install -e '.[hf]'"
                       ) from None
  return safetensors.numpy


def save_hf(params: Any, config: network.Config, output_dir: str,
            spm_path: str = vocabulary.SPM_PATH) -> None:
  """Writes a `T5ForConditionalGeneration` directory: config.json, model.safetensors and the
  SentencePiece tokenizer files (T5Tokenizer with 100 extra ids)."""
  save_file = _safetensors_numpy('Writing an HF checkpoint').save_file
  os.makedirs(output_dir, exist_ok=True)
  tensors = to_hf_state_dict(params, config)
  save_file(tensors, os.path.join(output_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(output_dir, 'config.json'), 'w') as f:
    json.dump(hf_config(config), f, indent=2)
  with open(os.path.join(output_dir, 'generation_config.json'), 'w') as f:
    json.dump({'decoder_start_token_id': network.PAD_ID, 'eos_token_id': network.EOS_ID,
               'pad_token_id': network.PAD_ID}, f, indent=2)
  shutil.copyfile(spm_path, os.path.join(output_dir, 'spiece.model'))
  with open(os.path.join(output_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'T5Tokenizer', 'extra_ids': vocabulary.EXTRA_IDS,
               'model_max_length': 512, 'eos_token': '</s>', 'unk_token': '<unk>',
               'pad_token': '<pad>'}, f, indent=2)


def read_hf_config(directory: str, **overrides) -> network.Config:
  """The config of an HF T5 / UL2 directory on disk (its config.json), without the weights."""
  config_path = os.path.join(directory, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: expected a Hugging Face model directory '
                            '(config.json + model.safetensors).')
  with open(config_path) as f:
    return config_from_hf(json.load(f), **overrides)


def is_hf_directory(path: str) -> bool:
  """A Hugging Face model directory: config.json beside *.safetensors weights."""
  return os.path.isfile(os.path.join(path, 'config.json')) and any(
      f.endswith('.safetensors') for f in os.listdir(path))


def load_hf(directory: str, **overrides) -> tuple[dict, network.Config]:
  """An HF T5 / UL2 directory on disk (safetensors) -> (our parameters, config). No hub."""
  load_file = _safetensors_numpy(f'Reading the HF checkpoint {directory}').load_file

  config = read_hf_config(directory, **overrides)
  files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'No *.safetensors in {directory}; convert pytorch_model.bin with '
                            'transformers (save_pretrained(safe_serialization=True)) first.')
  tensors = {}
  for name in files:  # single file or shards
    tensors.update(load_file(os.path.join(directory, name)))
  if 'shared.weight' not in tensors and 'encoder.embed_tokens.weight' in tensors:
    tensors['shared.weight'] = tensors['encoder.embed_tokens.weight']
  return from_hf_state_dict(tensors, config), config


# ----------------------------------------------------------------------------------------------
# T5X checkpoints
# ----------------------------------------------------------------------------------------------

# T5X's layouts, as `t5x/checkpoints.py` writes them (checked against T5X's own writer and
# reader: tests/data/t5x/README.md):
#   MODEL_DIR/checkpoint_<step>/checkpoint     tensorstore layout: msgpack {'version': 3,
#                                              'optimizer': {'target': ..., 'state': {'step',
#                                              'param_states'}}}, each partitioned array
#                                              replaced by its zarr spec
#   MODEL_DIR/checkpoint_<step>/<dotted.name>/ one zarr array each ('target.encoder.layers_0...')
#   MODEL_DIR/checkpoint_<step>/state/         orbax layout: the same tree (without 'version'
#                                              and 'optimizer') as an orbax PyTree, beside
#                                              checkpoint_<step>/_CHECKPOINT_METADATA
T5X_VERSION = 3
T5X_STATE = 'state'
T5X_STEP_PREFIX = 'checkpoint'  # MODEL_DIR/checkpoint_<step>/
_T5X_STEP = re.compile(rf'{T5X_STEP_PREFIX}_(\d+)')
_CHUNK_BYTES = 64 * 1024 * 1024  # T5X's desired zarr chunk size


def t5x_step(name: str) -> int | None:
  """The step of a T5X step folder's name, else None.

  >>> t5x_step('checkpoint_300'), t5x_step('checkpoints')
  (300, None)
  """
  match = _T5X_STEP.fullmatch(name)
  return int(match.group(1)) if match else None


def t5x_state_dict(params: Any, config: network.Config, step: Any,
                   opt_state: Any = None) -> dict:
  """T5X's train-state dict of a state of ours, the arrays as given (host or sharded):
  {'target': the parameters per layer, 'state': {'step', and with an Adafactor state,
  'param_states'}}. T5X's Adafactor keeps, per parameter, 'v_row', 'v_col', 'v' and the
  unused momentum 'm'; a scanned model's statistics are per layer too (its stacks factor each
  layer on its own, as T5X's per-layer model does), so T5X's T5 1.1 models resume either.

  >>> cfg = network.Config(num_encoder_layers=1, num_decoder_layers=1)
  >>> tree = t5x_state_dict({'encoder': {'layers_0': {'mlp': {'wo': {'kernel': 'w'}}}}}, cfg,
  ...                       7, adafactor.AdafactorState(7, *[{'encoder': {'layers_0': {'mlp':
  ...                           {'wo': {'kernel': name}}}}} for name in ('r', 'c', 'v')]))
  >>> tree['state']['param_states']['encoder']['layers_0']['mlp']['wo']['kernel']['v_row']
  'r'
  """
  state = {'step': step}
  if opt_state is not None:
    v_row, v_col, v = (network.unstack_layers(getattr(opt_state, name), config,
                                              placeholders=True)
                       for name in ('v_row', 'v_col', 'v'))
    unused = np.zeros((1,), np.float32)
    state['param_states'] = jax.tree.map(
        lambda r, c, x: {'m': unused, 'v': x, 'v_col': c, 'v_row': r}, v_row, v_col, v)
  return {'target': network.unstack_layers(params, config), 'state': state}


def adafactor_from_t5x(state: Mapping[str, Any], config: network.Config | None = None
                       ) -> adafactor.AdafactorState:
  """The Adafactor state in T5X's `state` (`t5x_state_dict`'s 'state': 'step' and
  'param_states'), laid out as `config` runs (scanned or per layer; None: per layer); its
  count is the step (T5X's Adafactor counts its updates by the train state's step)."""
  per_parameter = lambda x: isinstance(x, Mapping) and 'v_row' in x
  stats = []
  for name in ('v_row', 'v_col', 'v'):
    tree = jax.tree.map(lambda p, n=name: p[n], dict(state['param_states']),
                        is_leaf=per_parameter)
    if config is not None and config.scan_layers:
      tree = network.stack_layers(tree, config, placeholders=True)
    stats.append(tree)
  return adafactor.AdafactorState(state['step'], *stats)


def t5x_train_state(params: Any, config: network.Config, step: int,
                    opt_state: Any = None) -> dict:
  """`t5x_state_dict` as host float32 arrays (the step int32), for writing an export."""
  tree = t5x_state_dict(_numpy_tree(params), config, np.asarray(step, np.int32), opt_state)
  if 'param_states' in tree['state']:
    tree['state']['param_states'] = _numpy_tree(tree['state']['param_states'])
  return tree


def save_t5x(params: Any, config: network.Config, directory: str, step: int,
             opt_state: Any = None, layout: str = 'tensorstore') -> str:
  """Writes `checkpoint_<step>/` of a T5X model directory, which T5X restores: its
  tensorstore layout (what `t5x.checkpoints.Checkpointer` writes) or its orbax one
  (`OrbaxCheckpointManagerInterface`). An Adafactor state goes in as T5X's `param_states`
  (unscanned models). Returns the checkpoint folder."""
  if layout not in ('tensorstore', 'orbax'):
    raise ValueError(f"layout must be 'tensorstore' or 'orbax', got {layout!r}.")
  tree = t5x_train_state(params, config, step, opt_state)
  out = os.path.join(directory, f'checkpoint_{step}')
  if layout == 'orbax':
    _save_t5x_orbax(tree, directory, step)
    return out
  import tensorstore as ts

  os.makedirs(out, exist_ok=True)
  written = {}
  for path, value in flax.traverse_util.flatten_dict(tree).items():
    if not _t5x_partitioned(path, value):
      written[path] = value  # T5X keeps replicated entries in the msgpack itself
      continue
    name = _dotted(path)
    spec = {'driver': 'zarr', 'dtype': 'float32',
            'kvstore': {'driver': 'file', 'path': name + '/'},
            'metadata': {'chunks': _chunk_shape(value.shape, _CHUNK_BYTES // 4),
                         'compressor': {'id': 'gzip', 'level': 1},
                         'shape': list(value.shape)}}
    absolute = json.loads(json.dumps(spec))
    absolute['kvstore']['path'] = os.path.join(out, name) + '/'
    ts.open(absolute, create=True, delete_existing=True).result().write(value).result()
    written[path] = spec
  with open(os.path.join(out, 'checkpoint'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(
        {'version': T5X_VERSION, 'optimizer': flax.traverse_util.unflatten_dict(written)}))
  return out


def _t5x_partitioned(path: tuple[str, ...], value: np.ndarray) -> bool:
  """Whether T5X writes this entry as a zarr array: the parameters and statistics shaped like
  them ('v'); the step, factored row/column statistics and placeholders stay inline."""
  if path[0] == 'target':
    return True
  return path[-1] == 'v' and value.shape != (1,)


def _chunk_shape(shape: Sequence[int], max_elements: int) -> list[int]:
  """The whole array, or for one over `max_elements` a chunk that divides it, its largest
  axis split first (T5X's rule).

  >>> _chunk_shape((32128, 4096), 16 * 1024 * 1024)
  [4016, 4096]
  """
  chunks = list(shape)
  while int(np.prod(chunks)) > max_elements:
    axis = int(np.argmax(chunks))
    chunks[axis] = max(d for d in range(1, chunks[axis]) if shape[axis] % d == 0)
  return chunks


def _save_t5x_orbax(tree: dict, directory: str, step: int) -> None:
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={T5X_STATE: ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
      options=ocp.CheckpointManagerOptions(step_prefix=T5X_STEP_PREFIX, create=True))
  manager.save(step, args=ocp.args.Composite(**{T5X_STATE: ocp.args.PyTreeSave(tree)}),
               force=True)
  manager.wait_until_finished()
  manager.close()


def _numpy_tree(tree: Any) -> Any:
  flat = flax.traverse_util.flatten_dict(dict(tree))
  return flax.traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in flat.items()})


def _dotted(path: tuple[str, ...]) -> str:
  return '.'.join(path)


def find_t5x_checkpoint(path: str) -> str | None:
  """The checkpoint a T5X path names, or None if it is none of T5X's: a model directory (its
  latest `checkpoint_<step>`), a `checkpoint_<step>` folder, or its `state/` folder (any
  orbax PyTree folder)."""
  if os.path.isfile(os.path.join(path, 'checkpoint')):
    return path  # tensorstore layout
  if os.path.isdir(os.path.join(path, T5X_STATE)):
    return os.path.join(path, T5X_STATE)  # orbax layout
  if os.path.isfile(os.path.join(path, '_METADATA')):
    return path  # an orbax PyTree: the state/ folder itself, or an older bare one
  if os.path.isdir(path):
    steps = [s for s in map(t5x_step, os.listdir(path)) if s is not None]
    if steps:
      return find_t5x_checkpoint(os.path.join(path, f'{T5X_STEP_PREFIX}_{max(steps)}'))
  return None


def load_t5x(path: str, config: network.Config, ignore_extra: bool = False) -> dict:
  """Parameters from a T5X checkpoint (`find_t5x_checkpoint`: model directory,
  `checkpoint_<step>` or its `state/`; tensorstore or orbax layout), checked against `config`.

  Entries the config does not have (e.g. another architecture's) are named in the error;
  `ignore_extra=True` drops them instead. Missing entries are always an error.
  """
  found = find_t5x_checkpoint(path)
  if found is None:
    raise FileNotFoundError(f'{path}: no T5X checkpoint (a model directory with '
                            'checkpoint_<step>/, a checkpoint_<step>/ folder or its state/).')
  if os.path.isfile(os.path.join(found, 'checkpoint')):
    params = _load_t5x_tensorstore(found)
  else:
    params = read_orbax_params(found)
  return match_params(params, config, found, ignore_extra)


def match_params(params: dict, config: network.Config, where: str,
                 ignore_extra: bool = False) -> dict:
  """`params` checked against `config`'s per-layer tree: missing entries, and entries it does
  not have unless `ignore_extra` drops them, are named in one error; shapes are checked."""
  expected = network.flatten_params(network.param_shapes(
      dataclasses.replace(config, scan_layers=False)))
  got = network.flatten_params(params)
  extra = sorted(set(got) - set(expected))
  missing = sorted(set(expected) - set(got))
  if missing or (extra and not ignore_extra):
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing (e.g. {missing[:3]})')
    if extra:
      parts.append(f'{len(extra)} not in the model (e.g. {extra[:3]}; to drop them: '
                   '--ignore_extra_params for eval/infer/export, '
                   '--gin.train.TrainConfig.init_from_ignore_extra=True for init_from)')
    raise ValueError(f"{where}: the checkpoint's parameters do not match the model config: "
                     + '; '.join(parts) + '.')
  wrong = [(k, tuple(got[k].shape), tuple(v.shape)) for k, v in sorted(expected.items())
           if tuple(got[k].shape) != tuple(v.shape)]
  if wrong:
    raise ValueError(f'{where}: parameters do not match the model config ({len(wrong)} '
                     f'differences, e.g. {wrong[:3]} as (name, checkpoint, config)).')
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in got.items() if k in expected})


def read_orbax_params(path: str) -> dict:
  """The parameter tree of an orbax checkpoint folder, as host float32 numpy arrays.

  T5X's orbax layout keeps it under `target` (or `optimizer/target`); ours, which is the
  same tree by design, under `params`.
  """
  restored = read_orbax_tree(path)
  for key in ('target', 'params'):
    if key in restored:
      params = restored[key]
      break
  else:
    params = restored.get('optimizer', {}).get('target')
    if params is None:
      raise ValueError(f'{path} has no target/params tree (keys: {sorted(restored)}).')
  return _numpy_tree(params)


def read_orbax_tree(path: str) -> dict:
  """Everything in an orbax PyTree checkpoint folder, as host numpy arrays (the item of a
  CheckpointManager step, in its `default/`, is read too)."""
  import orbax.checkpoint as ocp
  from etils import epath

  if os.path.isdir(os.path.join(path, 'default')):
    path = os.path.join(path, 'default')
  _links_inside(path, path, 'the orbax checkpoint')
  # Restore as host numpy arrays: the saved shardings name the devices of the run that wrote
  # the checkpoint (a 2x4 mesh, a pod), which need not exist in this process. The handler,
  # not a Checkpointer: that would also look for step metadata, which the item folder of a
  # CheckpointManager step does not hold, and warn.
  handler, item = ocp.PyTreeCheckpointHandler(), epath.Path(os.path.abspath(path))
  return handler.restore(item, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), handler.metadata(item).tree)))


def _load_t5x_tensorstore(path: str) -> dict:
  import tensorstore as ts

  with open(os.path.join(path, 'checkpoint'), 'rb') as f:
    state = flax.serialization.msgpack_restore(f.read())
  target = state.get('optimizer', state).get('target')
  if target is None:
    raise ValueError(f'{path}/checkpoint has no optimizer.target (or target) tree.')
  flat = {}
  for key, leaf in flax.traverse_util.flatten_dict(
      target, is_leaf=lambda _, x: _is_ts_spec(x)).items():
    if _is_ts_spec(leaf):
      spec = {'driver': leaf['driver'], 'kvstore': {
          'driver': 'file', 'path': _spec_path(path, leaf, '/'.join(key))}}
      flat[key] = ts.open(spec, open=True).result().read().result()  # as written
    elif isinstance(leaf, str) and os.path.isdir(os.path.join(path, 'target.' + _dotted(key))):
      # Older T5X: the leaf is a placeholder and the array is target.<dotted name>/ (zarr).
      flat[key] = ts.open({'driver': 'zarr', 'kvstore': {
          'driver': 'file', 'path': _confined(path, 'target.' + _dotted(key), '/'.join(key))}},
          open=True).result().read().result()
    else:
      flat[key] = leaf
  return flax.traverse_util.unflatten_dict(
      {key: np.asarray(value, np.float32) for key, value in flat.items()})


def _spec_path(checkpoint_dir: str, spec: Mapping[str, Any], name: str) -> str:
  """The local path of a tensorstore spec's array (`_confined` to `checkpoint_dir`).

  T5X writes paths relative to the checkpoint (`target.encoder.layers_0...`), with the file
  driver, or with the gcs driver and the relative path beside it when written to a bucket
  (T5X reads those locally the same way). Any other kvstore is refused.
  """
  kvstore = spec.get('kvstore', {})
  relative = kvstore.get('path') if kvstore.get('driver') == 'file' else spec.get('path')
  if kvstore.get('driver') not in ('file', 'gcs') or not relative:
    raise ValueError(f'{checkpoint_dir}/checkpoint: {name} is stored with kvstore '
                     f'{kvstore!r}; only files inside the checkpoint folder are read.')
  return _confined(checkpoint_dir, relative, name)


def _confined(checkpoint_dir: str, relative: str, name: str) -> str:
  """`checkpoint_dir`/`relative`, refused (ValueError naming `name`) unless it lies inside
  `checkpoint_dir` with every symbolic link under it resolved: a foreign checkpoint must not
  make the loader read elsewhere, by an absolute path, by `..` or by a link.

  >>> _confined('/ckpt', '../elsewhere/', 'decoder/decoder_norm/scale')
  Traceback (most recent call last):
  ValueError: /ckpt/checkpoint: decoder/decoder_norm/scale points outside the checkpoint folder ('../elsewhere/'); refusing to read it.
  """
  root = os.path.realpath(checkpoint_dir)
  lexical = os.path.normpath(os.path.join(root, relative))
  if os.path.isabs(relative) or os.path.commonpath([root, lexical]) != root:
    raise ValueError(f'{checkpoint_dir}/checkpoint: {name} points outside the checkpoint '
                     f'folder ({relative!r}); refusing to read it.')
  full = os.path.realpath(lexical)
  if os.path.commonpath([root, full]) != root:
    raise ValueError(f'{checkpoint_dir}/checkpoint: {name} ({relative!r}) is a symbolic link '
                     f'to {full}, outside the checkpoint folder; refusing to read it.')
  _links_inside(checkpoint_dir, full, name)
  return full


def _links_inside(checkpoint_dir: str, folder: str, name: str) -> None:
  """Refuses (ValueError) a symbolic link under `folder` that resolves outside
  `checkpoint_dir` (a link inside it is fine: copies made with `cp -s`)."""
  root = os.path.realpath(checkpoint_dir)
  for where, dirs, files in os.walk(folder):
    for entry in dirs + files:
      path = os.path.join(where, entry)
      if os.path.islink(path):
        target = os.path.realpath(path)
        if os.path.commonpath([root, target]) != root:
          raise ValueError(
              f'{checkpoint_dir}: {name} has a symbolic link {os.path.relpath(path, root)} -> '
              f'{target}, outside the checkpoint folder; refusing to read it.')


def _is_ts_spec(x) -> bool:
  return isinstance(x, dict) and 'driver' in x and 'kvstore' in x
