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
