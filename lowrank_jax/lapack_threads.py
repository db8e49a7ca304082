"""Host BLAS threads while the library's LAPACK work runs on CPU.

On CPU, jaxlib runs LAPACK (the eigendecompositions, SVDs and solves of
the splits and the EVBMF spectra) as custom calls on XLA's worker threads,
through SciPy's OpenBLAS, whose own thread pool then competes with XLA's
for the same cores. With one BLAS thread the warm calls of
docs/benchmarks_lapack_threads.md ran 1.0-4.5x faster next to a training
run in another process (2 cores), and 1.0-1.6x idle.

:func:`lowrank_jax.vbmf_ranks` computes its spectra on CPU with NumPy's
BLAS and LAPACK (:mod:`lowrank_jax.vbmf.host_spectra`), one matrix per core
in Python threads, each call under the same limit.

So the library's LAPACK calls (:func:`lowrank_jax.vbmf_ranks`,
:func:`lowrank_jax.evbmf` called eagerly, and the factors of the tucker2,
svd, cp and overparam forms, which the split transforms and
:func:`lowrank_jax.overparameterize` build) run inside :func:`limited`;
under a user's ``jax.jit`` the LAPACK calls run later, outside it. The
host BLAS libraries are limited to
:func:`set_lapack_threads` threads (default 1: XLA's pool already runs the
work in parallel) through threadpoolctl, and restored when the call
returns. Nothing is set at import. Other backends run no host LAPACK; the
limit then only holds the host's BLAS for the call. The limit is process
wide while it holds, and OpenBLAS (pthreads build) honours it when set from
the main thread; set from another Python thread it may not hold, which
threadpoolctl documents as its own limit.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

import jax

_SETTING = {'threads': 1}
_LOCK = threading.Lock()
# Calls inside limited() now (threads may nest them) and the libraries'
# thread counts to restore when the last one leaves.
_ACTIVE = {'depth': 0, 'saved': ()}


def set_lapack_threads(threads: Optional[int] = 1) -> Optional[int]:
  """Sets the host BLAS threads of the library's LAPACK calls on CPU.

  Args:
    threads: the most BLAS threads while :func:`lowrank_jax.vbmf_ranks` or
      a split's factorization runs (default 1; a library already set lower
      stays lower), or None to leave the host BLAS as it is.

  Returns:
    The setting now in use.

  Raises:
    ValueError: ``threads`` is neither None nor a positive int.
  """
  if threads is not None and (isinstance(threads, bool) or
                              not isinstance(threads, int) or threads < 1):
    raise ValueError('set_lapack_threads: threads must be a positive int or '
                     f'None, got {threads!r}')
  _SETTING['threads'] = threads
  return threads


@functools.lru_cache(maxsize=None)
def _blas_libraries() -> tuple:
  """threadpoolctl's controllers of the loaded BLAS libraries.

  SciPy's BLAS is imported first: jaxlib's CPU LAPACK calls go through it.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  import scipy.linalg
  import threadpoolctl
  controller = threadpoolctl.ThreadpoolController()
  return tuple(controller.select(user_api='blas').lib_controllers)


def blas_threads() -> int:
  """The most threads any loaded host BLAS library uses now (1 inside
  :func:`limited` at the default setting)."""
  return max([lib.get_num_threads() for lib in _blas_libraries()] or [1])


@contextlib.contextmanager
def limited():
  """Holds the host BLAS at :func:`set_lapack_threads` threads (reentrant,
  and shared by threads: the first call in sets the limit, the last one out
  restores the libraries' own counts)."""
  threads = _SETTING['threads']
  if threads is None:
    yield
    return
  with _LOCK:
    if _ACTIVE['depth'] == 0:
      saved = tuple((lib, lib.get_num_threads()) for lib in _blas_libraries())
      for lib, n in saved:
        lib.set_num_threads(min(n, threads))
      _ACTIVE['saved'] = saved
    _ACTIVE['depth'] += 1
  try:
    yield
  finally:
    with _LOCK:
      _ACTIVE['depth'] -= 1
      if _ACTIVE['depth'] == 0:
        for lib, n in _ACTIVE['saved']:
          lib.set_num_threads(n)
        _ACTIVE['saved'] = ()


def limits_threads(fn):
  """Runs ``fn`` inside :func:`limited` and waits for its arrays there (jax
  dispatches asynchronously: the LAPACK calls run after ``fn`` returns)."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with limited():
      return jax.block_until_ready(fn(*args, **kwargs))
  return call
