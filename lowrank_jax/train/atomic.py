"""Files replaced whole or not at all: written beside, then renamed."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def replacing(path: str):
  """A temporary path beside ``path``, renamed onto ``path`` after the block.

  If the block or the rename raises, the temporary file is removed and
  ``path`` keeps what it held: a failed write (a full disk, a plot that
  cannot be saved, a directory in the way) neither cuts ``path`` nor
  leaves ``path + '.tmp'`` behind. A killed process may leave the
  ``.tmp``, never a cut ``path``.
  """
  tmp = f'{path}.tmp'
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Replaces ``path`` with ``text`` (UTF-8), whole or not at all."""
  with replacing(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
