"""docs/walkthrough.ipynb runs top to bottom (smoke settings, real data)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'docs', 'walkthrough.ipynb')


def test_walkthrough_is_current_and_executes(fmnist, monkeypatch):
  del fmnist  # Skips without the Debian data.
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  import sys
  sys.path.insert(0, os.path.join(ROOT, 'docs'))
  import make_walkthrough  # pylint: disable=g-import-not-at-top
  on_disk = nbformat.read(NOTEBOOK, as_version=4)
  built = make_walkthrough.build()
  assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], (
      'docs/walkthrough.ipynb is stale: run python docs/make_walkthrough.py')
  monkeypatch.setenv('WALKTHROUGH_SMOKE', '1')
  client = nbclient.NotebookClient(on_disk, timeout=600,
                                   kernel_name='python3',
                                   resources={'metadata': {'path': ROOT}})
  executed = client.execute()
  outputs = '\n'.join(
      o.get('text', '') for c in executed.cells if c.cell_type == 'code'
      for o in c.get('outputs', []))
  assert 'same function:' in outputs
  assert 'after fine-tuning' in outputs
  errors = [o for c in executed.cells if c.cell_type == 'code'
            for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors
