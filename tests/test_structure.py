"""The layout's rules, read from the source: imports go scripts -> tasks -> ul2 only, scripts
never import each other, gin stays at the edge, and the mode tokens have one home."""

import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(REPO, 'scripts', '*.py'))}
SHARED_SCRIPT_MODULES = {'gin_cli'}  # the one module scripts share


def sources(folder):
  return sorted(glob.glob(os.path.join(REPO, folder, '*.py')))


def imported_modules(path):
  """Top-level names of every module `path` imports, at any depth of the file."""
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {alias.name.split('.')[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split('.')[0])
  return names


def test_the_layout_has_the_modules_the_readme_maps():
  assert SCRIPTS >= {'train', 'eval', 'infer', 'export_hf', 'export_t5x', 'gin_cli'}
  modules = {os.path.basename(p) for p in sources('ul2')}
  assert modules >= {'data.py', 'checkpoints.py', 'flops.py', 'vocabulary.py', 'network.py',
                     'denoisers.py', 'partitioning.py', 'train.py', 'decoding.py',
                     'evaluation.py', 'interop.py'}


@pytest.mark.parametrize('path', sources('scripts'), ids=os.path.basename)
def test_scripts_import_no_other_script(path):
  others = SCRIPTS - SHARED_SCRIPT_MODULES - {os.path.splitext(os.path.basename(path))[0]}
  assert not imported_modules(path) & others


@pytest.mark.parametrize('path', sources('ul2') + sources('tasks'), ids=os.path.basename)
def test_library_and_tasks_never_import_upward(path):
  upward = set(SCRIPTS) | ({'ul2_tasks'} if '/ul2/' in path else set())
  assert not imported_modules(path) & upward
  assert 'gin' not in imported_modules(path), 'gin belongs at the edge (scripts/gin_cli.py)'


@pytest.mark.parametrize('path', [p for p in sources('ul2') + sources('tasks') + sources('scripts')
                                  if not p.endswith(os.path.join('ul2', 'vocabulary.py'))],
                         ids=os.path.basename)
def test_mode_tokens_are_spelled_only_in_the_vocabulary_module(path):
  tree = ast.parse(open(path).read())
  literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
  assert not literals & {'[NLU]', '[S2S]', '[NLG]'}
