"""For T5X users: ul2's gin files inside T5X's runs, and T5X's model gins read by ul2.

The references are T5X's and flaxformer's own gin files (`t5x_reference/gins/`, copied from
google-research/t5x cc342d4 and google/flaxformer 399ea3a) and the parameter names of T5X's
configurables read from T5X's code (`t5x_reference/make_gin_fixtures.py`).
"""

import dataclasses
import importlib
import json
import os

import pytest
import seqio
from gin import config_parser

import gin_cli
from ul2 import network, vocabulary

REFERENCE = os.path.join(os.path.dirname(__file__), 't5x_reference')
GINS = os.path.join(REFERENCE, 'gins')
T5X_T5_1_1 = os.path.join(GINS, 't5x', 'examples', 't5', 't5_1_1')
CONFIGURABLES = json.load(open(os.path.join(REFERENCE, 'fixtures', 't5x_configurables.json')))
UL2_T5X = os.path.join(gin_cli.GIN_DIR, 't5x')


def ul2_model(name, **changes):
  return dataclasses.replace(gin_cli.model_config([f'models/{name}.gin']), **changes)


# ---------------------------------------------------------------------------------------------
# T5X model gins read by ul2
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', ['small', 'base', 'large', 'xl', 'xxl'])
def test_t5x_t5_1_1_gins_give_ul2s_models(size):
  """T5X's t5_1_1/<size>.gin (which sets dtype bfloat16) as --gin_file gives ul2's
  models/<size>.gin network; the converter prints an equivalent ul2 gin."""
  path = os.path.join(T5X_T5_1_1, f'{size}.gin')
  assert gin_cli.is_t5x_model_gin(path)
  from_t5x = gin_cli.model_config([path])
  assert from_t5x.dtype == 'bfloat16' and not from_t5x.scan_layers
  # ul2's large and up scan their layers: how to run them, not what they are.
  assert from_t5x == ul2_model(size, dtype='bfloat16', scan_layers=False, remat_policy='none')
  import convert_t5x_gin
  converted = convert_t5x_gin.main([path])
  assert "include 'models/t5_1_1.gin'" in converted
  copy = os.path.join(os.path.dirname(gin_cli._write_temporary(path, converted)), f'{size}.gin')
  assert gin_cli.model_config([copy]) == from_t5x


def test_t5x_dropout_stays_a_macro_for_the_run_gin():
  """T5X's T5 1.1 gins leave DROPOUT_RATE required; through ul2 it is ul2's macro (0.0 for
  pretraining), which runs/finetune.gin sets to 0.1."""
  path = os.path.join(T5X_T5_1_1, 'base.gin')
  assert 'DROPOUT_RATE' not in gin_cli.read_t5x_model_gin(path)
  assert gin_cli.model_config([path]).dropout_rate == 0.0
  assert gin_cli.model_config([path], ['DROPOUT_RATE=0.1']).dropout_rate == 0.1


def test_t5x_decoder_only_gin_gives_the_decoder_only_model():
  cfg = gin_cli.model_config([os.path.join(GINS, 't5x', 'examples', 'decoder_only', 'models',
                                           'base.gin')])
  assert cfg.architecture == 'decoder_only' and cfg.num_decoder_layers == 12
  assert cfg.logits_via_embedding and not cfg.prefix_lm  # T5X: tied, causal by default
  assert network.count_parameters(network.param_shapes(cfg)) == (
      32128 * 768 + 12 * 32 + 12 * (2 * 768 + 4 * 768 * 768 + 3 * 768 * 2048) + 768)


def test_flaxformer_t5_1_1_gin_gives_ul2s_base():
  path = os.path.join(GINS, 'flaxformer', 't5x', 'configs', 't5', 'models', 't5_1_1_base.gin')
  assert gin_cli.model_config([path]) == ul2_model('base', dtype='bfloat16')


def test_ul2_20b_settings_in_flaxformer_form_give_ul2s_ul2_20b():
  """The UL2 20B gin's kind (flaxformer size macros, 'swish', output_logits_factory None =
  tied logits) -> models/ul2_20b.gin's network (which adds scan and remat: not in the gin)."""
  cfg = gin_cli.model_config([os.path.join(GINS, 'ul2_20b_flaxformer_style.gin')])
  assert cfg == ul2_model('ul2_20b', scan_layers=False, remat_policy='none')
  assert cfg.mlp_activations == ('silu', 'linear') and cfg.logits_via_embedding


def test_a_t5x_setting_without_counterpart_is_one_line(tmp_path):
  path = tmp_path / 'custom.gin'
  path.write_text("from t5x.examples.t5 import network\n"
                  "network.T5Config:\n  emb_dim = 64\n  use_rotary_embedding = True\n")
  with pytest.raises(SystemExit, match=r"^error: .*custom\.gin: T5Config\.use_rotary_embedding = "
                     r"True has no ul2 counterpart"):
    gin_cli.read_t5x_model_gin(str(path))
  path.write_text("include 't5x/examples/t5/t5_1_1/nowhere.gin'\n")
  with pytest.raises(SystemExit, match="include 't5x/examples/t5/t5_1_1/nowhere.gin' not found"):
    gin_cli.read_t5x_model_gin(str(path))


def test_a_t5x_checkpoint_evaluates_in_ul2_with_its_t5x_model_gin(tmp_path):
  """What a T5X user does after training with T5X: ul2's loaders take the T5X model dir and
  T5X's model gin (here a checkpoint T5X's layout holds, written by ul2's exporter)."""
  from ul2 import checkpoints, interop
  import jax

  text = open(os.path.join(T5X_T5_1_1, 'base.gin')).read()  # T5X's base.gin, made tiny
  for old, new in (('emb_dim = 768', 'emb_dim = 16'), ('num_heads = 12', 'num_heads = 2'),
                   ('num_encoder_layers = 12', 'num_encoder_layers = 1'),
                   ('num_decoder_layers = 12', 'num_decoder_layers = 1'),
                   ('mlp_dim = 2048', 'mlp_dim = 32')):
    assert old in text
    text = text.replace(old, new)
  path = tmp_path / 'tiny.gin'
  path.write_text(text)
  cfg = gin_cli.model_config([str(path)])
  assert (cfg.emb_dim, cfg.num_encoder_layers, cfg.head_dim) == (16, 1, 64)
  params = network.init_params(cfg, jax.random.key(0))
  interop.save_t5x(params, cfg, str(tmp_path / 't5x_run'), 7)
  loaded, loaded_cfg = checkpoints.load(str(tmp_path / 't5x_run'), cfg)
  assert loaded_cfg == cfg
  flat, back = network.flatten_params(params), network.flatten_params(loaded)
  assert all((flat[k] == back[k]).all() for k in flat)


# ---------------------------------------------------------------------------------------------
# ul2's gin files inside T5X's runs
# ---------------------------------------------------------------------------------------------

class _Delegate(config_parser.ParserDelegate):
  def configurable_reference(self, name, evaluate):
    return ('@', name)

  def macro(self, name):
    return ('%', name)


def statements(path):
  """Binding, import and include statements of a gin file, includes expanded (T5X resolves
  them on its --gin_search_paths: T5X's checkout and ul2's gin_configs/)."""
  text = open(path).read()
  for st in config_parser.ConfigParser(text, _Delegate()):
    if isinstance(st, config_parser.IncludeStatement):
      for root in (GINS, gin_cli.GIN_DIR):
        if os.path.exists(os.path.join(root, st.filename)):
          yield from statements(os.path.join(root, st.filename))
          break
      else:
        raise AssertionError(f'{path}: include {st.filename} not found')
    elif not isinstance(st, config_parser.BlockDeclaration):
      yield st


def t5x_run(*files):
  """Macros, parameter bindings and imports after T5X parses `files` in order."""
  macros, params, imports = {}, {}, set()
  for f in files:
    for st in statements(f):
      if isinstance(st, config_parser.ImportStatement):
        imports.add(st.module)
      elif not st.arg_name and '.' not in st.selector:
        macros[st.selector] = st.value
      else:
        params[(st.scope, st.selector, st.arg_name)] = st.value
  return macros, params, imports


def used_macros(macros, params):
  used = set()

  def walk(v):
    if isinstance(v, tuple) and len(v) == 2 and v[0] == '%':
      used.add(v[1])
    elif isinstance(v, (list, tuple, dict)):
      for x in (v.values() if isinstance(v, dict) else v):
        walk(x)
  for v in list(macros.values()) + list(params.values()):
    walk(v)
  return used


RUNS = {
    'pretrain': ('t5x/configs/runs/pretrain.gin', ('ul2_pretrain.gin',), {'MODEL_DIR'}),
    'pretrain_cpu': ('t5x/configs/runs/pretrain.gin', ('ul2_pretrain.gin', 'ul2_cpu.gin'),
                     {'MODEL_DIR'}),
    'finetune': ('t5x/configs/runs/finetune.gin', ('ul2_finetune_superglue.gin',),
                 {'MODEL_DIR', 'INITIAL_CHECKPOINT_PATH'}),
    'finetune_cpu': ('t5x/configs/runs/finetune.gin',
                     ('ul2_finetune_superglue.gin', 'ul2_cpu.gin'),
                     {'MODEL_DIR', 'INITIAL_CHECKPOINT_PATH'}),
}


@pytest.mark.parametrize('run', sorted(RUNS))
def test_ul2_gin_files_complete_t5xs_runs(run):
  """T5X's small.gin + T5X's run gin + ul2's: every parameter bound exists in T5X's code, every
  macro ul2 sets is read by T5X's files, and only the macros a user passes stay required."""
  t5x_run_gin, ul2_gins, user_passes = RUNS[run]
  macros, params, imports = t5x_run(os.path.join(T5X_T5_1_1, 'small.gin'),
                                    os.path.join(GINS, t5x_run_gin),
                                    *[os.path.join(UL2_T5X, g) for g in ul2_gins])
  for (_, selector, name), _ in params.items():
    if selector in CONFIGURABLES:
      assert name in CONFIGURABLES[selector], f'{selector}.{name} is not a T5X parameter'
  ours = {st.selector for g in ul2_gins for st in statements(os.path.join(UL2_T5X, g))
          if isinstance(st, config_parser.BindingStatement) and not st.arg_name}
  theirs_use = used_macros(*t5x_run(os.path.join(T5X_T5_1_1, 'small.gin'),
                                    os.path.join(GINS, t5x_run_gin))[:2])
  assert ours <= theirs_use, f'macros T5X never reads: {sorted(ours - theirs_use)}'
  required = {k for k, v in macros.items() if v == ('%', 'gin.REQUIRED')}
  assert required == user_passes
  # The vocabulary: the model's is the tasks' (T5X checks they are equal).
  assert macros['VOCABULARY'] == ('@', 'vocabulary.get_vocabulary')
  assert {'ul2.vocabulary', 'ul2_tasks'} <= imports
  assert macros['MIXTURE_OR_TASK_MODULE'] == 'ul2_tasks' and macros['USE_CACHED_TASKS'] is False
  importlib.import_module(macros['MIXTURE_OR_TASK_MODULE'])  # what T5X's DatasetConfig does
  task = seqio.get_mixture_or_task(macros['MIXTURE_OR_TASK_NAME'])
  for feature in ('inputs', 'targets'):
    assert task.output_features[feature].vocabulary == vocabulary.get_vocabulary()
  assert vocabulary.get_vocabulary() == seqio.SentencePieceVocabulary(
      vocabulary.SPM_PATH, extra_ids=100)
  assert isinstance(macros['DROPOUT_RATE'], float)
  # T5X's BATCH_SIZE = 128 (pretrain.gin) replaced on a CPU: the run fits in memory.
  assert macros['BATCH_SIZE'] == (8 if run.endswith('_cpu') else
                                  {'pretrain': 128, 'finetune': macros['BATCH_SIZE']}[run])


def test_t5x_decoder_only_base_in_ul2_is_t5xs_exactly():
  """models/t5x_decoder_only_base.gin is T5X's decoder-only base (tied, causal, 109.6M);
  models/prefix_lm_base.gin, the UL2 paper's baseline, is not, and its name says so."""
  theirs = gin_cli.model_config([os.path.join(GINS, 't5x', 'examples', 'decoder_only', 'models',
                                              'base.gin')])
  ours = gin_cli.model_config(['models/t5x_decoder_only_base.gin'])
  assert ours == theirs
  assert network.count_parameters(network.param_shapes(ours)) == 109_628_544
  prefix_lm = gin_cli.model_config(['models/prefix_lm_base.gin'])
  assert prefix_lm.prefix_lm and not prefix_lm.logits_via_embedding
  assert network.count_parameters(network.param_shapes(prefix_lm)) == 134_302_848


def test_a_renamed_model_gin_says_what_it_became():
  with pytest.raises(FileNotFoundError, match=r"'models/decoder_only_base.gin' was renamed: .*"
                     r'models/prefix_lm_base.gin; .* models/t5x_decoder_only_base.gin'):
    gin_cli.model_config(['models/decoder_only_base.gin'])
