"""The classic Python EVBMF port, loaded from musco-pytorch for the benches.

MUSCO's ``musco/pytorch/compressor/rank_selection/vbmf.py`` (a port of
Nakajima's EVBMF.m: NumPy SVD + SciPy's bounded ``minimize_scalar`` on the raw
sigma^2 scale) is the EVBMF most Python compression code copies. It needs only
NumPy and SciPy; the rest of the musco package imports torch, so this loads
that one file by path and never imports ``musco``. lowrank_jax never imports
it.

Install (once, into the venv): ``pip install --no-deps musco-pytorch``.
``--no-deps`` is needed: musco-pytorch 1.0.6 requires tensorly==0.4.5,
flopco-pytorch (which imports torch) and scikit-tensor-py3 (which pins
numpy==1.16 and scipy==1.3), so pip cannot resolve it next to NumPy 2.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Callable, Optional

import numpy as np

PATH_IN_DIST = 'musco/pytorch/compressor/rank_selection/vbmf.py'
INSTALL = 'pip install --no-deps musco-pytorch'


def load() -> Optional[object]:
  """The classic ``vbmf`` module, or None when musco-pytorch is absent."""
  try:
    dist = importlib.metadata.distribution('musco-pytorch')
  except importlib.metadata.PackageNotFoundError:
    return None
  path = dist.locate_file(PATH_IN_DIST)
  spec = importlib.util.spec_from_file_location('_classic_vbmf', str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def version() -> str:
  return importlib.metadata.version('musco-pytorch')


def classic_rank(module) -> Callable[[np.ndarray], int]:
  """``y -> rank`` by the classic ``EVBMF(y)`` exactly as MUSCO calls it.

  MUSCO passes the unfolding as it comes (no transpose; the port requires
  L <= M and fails otherwise) and reads the rank off the shrunk diagonal.
  """
  def rank(y):
    _, diag, _, _ = module.EVBMF(np.asarray(y))
    return int(diag.shape[0])
  return rank
