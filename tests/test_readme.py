"""The README's Python snippets run as written."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


@pytest.mark.parametrize('index', range(len(_snippets())))
def test_readme_snippet_runs(index, tmp_path):
  code = _snippets()[index]
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip(), 'every README snippet prints what it shows'


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, 'README.md')) as f:
    commands = re.findall(r'```bash\n(.*?)```', f.read(), flags=re.S)
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read().strip().splitlines()[-1]
  assert 'pytest' in commands[1], 'the second command runs the tests'
  assert ci == commands[1].strip(), '.ci/run and the README differ'
