"""A regular (non-editable) install: the wheel must carry the bundled data and use it."""

import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_with_the_bundled_data(tmp_path):
  # Build from a copy so that setuptools' build/ and egg-info never land in the checkout.
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src / name)
  for name in ('ul2', 'tasks', 'data'):
    shutil.copytree(os.path.join(REPO, name), src / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  build = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
       '-w', str(tmp_path / 'dist'), str(src)], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
  assert 'BuildBackendWarning' not in build.stdout + build.stderr, build.stderr[-3000:]
  [wheel] = list((tmp_path / 'dist').glob('ul2-*.whl'))

  with zipfile.ZipFile(wheel) as z:
    shipped = set(z.namelist())
  for root, _, files in os.walk(os.path.join(REPO, 'data')):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), os.path.join(REPO, 'data'))
      assert f'ul2/data/{rel}' in shipped, f'data/{rel} is missing from the wheel'

  site = tmp_path / 'site'
  install = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '--target', str(site),
       str(wheel)], capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]

  # Run away from the checkout with the installed copy first on the path: the editable
  # install's finder comes after PYTHONPATH, so this imports and reads only the wheel's files.
  code = '\n'.join([
      'import tasks',  # a user's own tasks.py (T5X's convention) beside the project's
      'import ul2, ul2_tasks, seqio',
      'from ul2 import vocabulary',
      'from ul2_tasks import pretrain, superglue',
      f'site = {str(site)!r}',
      'assert tasks.MINE and ul2_tasks.__file__.startswith(site)',
      'for path in (ul2.__file__, ul2_tasks.__file__, vocabulary.SPM_PATH,',
      '             pretrain.BUNDLED_GUTENBERG_DIR, superglue.BUNDLED_DIR):',
      '  assert path.startswith(site), path',
      'print(vocabulary.get_vocabulary().encode("[NLU]"))',
      'lengths = {"inputs": 128, "targets": 128}',
      'for name in ("ul2_mod_gutenberg", "superglue_cb"):',
      '  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="validation",',
      '                                                   shuffle=False)',
      '  print(name, len(list(ds.take(3))))',
  ])
  (tmp_path / 'tasks.py').write_text('import ul2_tasks  # registers the project\'s tasks\n'
                                     'MINE = True\n')
  env = {**os.environ, 'PYTHONPATH': str(site), 'TF_CPP_MIN_LOG_LEVEL': '3'}
  run = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split('\n')[:3] == ['[784, 567, 9138, 908]', 'ul2_mod_gutenberg 3',
                                        'superglue_cb 3'], run.stdout
