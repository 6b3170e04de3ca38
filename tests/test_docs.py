"""The README and docs/ as a newcomer follows them: every relative link resolves, every
`scripts/X.py --flag` they show is a flag of that script, and the README stays short."""

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')
PAGES = sorted(['README.md', 'CHANGELOG.md']
               + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md'))])
LINK = re.compile(r'\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.M | re.S)
INLINE = re.compile(r'`([^`\n]+)`')


def read(page):
  with open(os.path.join(REPO, page), encoding='utf-8') as f:
    return f.read()


def test_the_readme_is_short_and_links_every_guide():
  readme = read('README.md')
  assert len(readme) <= 12_000, len(readme)
  linked = {os.path.normpath(m) for m in LINK.findall(readme)}
  for page in PAGES:
    if page.startswith('docs' + os.sep):
      assert page in linked, f'README.md does not link {page}'


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_resolves(page):
  for target in LINK.findall(read(page)):
    if re.match(r'[a-z]+:', target):  # https:, mailto:
      continue
    path = target.split('#')[0]
    if path:
      resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path))
      assert os.path.exists(resolved), f'{page}: link {target!r} does not resolve'


def _flags_of(function: ast.AST) -> set[str]:
  return {node.args[0].value for node in ast.walk(function)
          if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_argument'
          and node.args and isinstance(node.args[0], ast.Constant)
          and str(node.args[0].value).startswith('--')}


def script_flags(name: str) -> set[str]:
  """The --flags of scripts/<name>.py, read from its argparse calls and the gin_cli helpers
  it calls (add_module_flag, ...); T5X's --gin_file and --gin.NAME where it takes gin."""
  source = open(os.path.join(SCRIPTS, name + '.py'), encoding='utf-8').read()
  tree = ast.parse(source)
  flags = _flags_of(tree) | {'--help'}
  helpers = {node.name: node for node in ast.parse(open(os.path.join(
      SCRIPTS, 'gin_cli.py'), encoding='utf-8').read()).body if isinstance(node, ast.FunctionDef)}
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and getattr(
        node.func.value, 'id', '') == 'gin_cli' and node.func.attr in helpers:
      flags |= _flags_of(helpers[node.func.attr])
  if 'split_argv' in source:
    flags |= {'--gin_file', '--gin'}
  return flags


def commands(text: str) -> list[str]:
  """Command lines shown in a page: code blocks' lines (continuations joined) and inline code."""
  units = []
  for block in FENCE.findall(text):
    units += [u for u in block.replace('\\\n', ' ').splitlines() if u.strip()]
  prose = FENCE.sub('', text)
  units += INLINE.findall(prose)
  return units


SCRIPT_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(SCRIPTS, '*.py'))
                      if not os.path.basename(p).startswith('gin_cli'))
SHOWN = re.compile(r'(?:scripts/)?\b(' + '|'.join(SCRIPT_NAMES) + r')\.py\b(.*?)(?=(?:scripts/)?\b(?:'
                   + '|'.join(SCRIPT_NAMES) + r')\.py\b|\s#|\||&&|;|$)')


def shown_flags(pages=PAGES):
  """(page, script, flag) for every --flag shown after a script's name."""
  return [(page, name, flag) for page in pages for _, name, flag in shown_flags_of(read(page))]


def test_the_flag_reader_reads_flags_and_commands():
  assert {'--checkpoint', '--input_file', '--gin_file', '--module', '--multiprocess',
          '--max_length'} <= script_flags('infer')
  assert '--nonsense' not in script_flags('infer')
  text = ('```bash\npython scripts/infer.py --checkpoint x \\\n  --max_length 5  # --not_a_flag\n'
          '```\nSee `eval.py --tasks cb`.')
  assert [(s, f) for _, s, f in shown_flags_of(text)] == [
      ('infer', '--checkpoint'), ('infer', '--max_length'), ('eval', '--tasks')]


def shown_flags_of(text):
  """('-', script, flag) for every --flag shown after a script's name in `text`."""
  return [('-', name, flag) for unit in commands(text) for name, rest in SHOWN.findall(unit)
          for flag in re.findall(r'(?<![\w-])(--[a-z][\w-]*)', rest)]


def test_every_flag_shown_is_a_flag_of_its_script():
  flags = {name: script_flags(name) for name in SCRIPT_NAMES}
  wrong = sorted({(page, f'scripts/{name}.py {flag}') for page, name, flag in shown_flags()
                  if flag.split('.')[0] not in flags[name]})
  assert not wrong, wrong


@pytest.mark.parametrize('name', SCRIPT_NAMES)
def test_help_texts_keep_their_line_continuations(name):
  """A lone backslash at the end of a line of a (non-raw) docstring joins the lines, so the
  --help example would lose its continuation: they are written `\\\\`."""
  source = open(os.path.join(SCRIPTS, name + '.py'), encoding='utf-8').read()
  doc = source[source.index('"""') + 3:]
  doc = doc[:doc.index('"""')]
  lone = [line for line in doc.splitlines() if re.search(r'(?<!\\)\\$', line)]
  assert not lone, lone
  for line in doc.splitlines():
    if line.endswith('\\\\'):
      assert line[:-1].rstrip('\\') in (ast.get_docstring(ast.parse(source), clean=False) or '')
