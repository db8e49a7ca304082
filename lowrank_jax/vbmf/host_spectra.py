"""The spectra of :mod:`~lowrank_jax.vbmf.batched` computed on the host, for
the CPU backend.

On CPU the spectra program's work is one BLAS product per Gram matrix and
one LAPACK eigenproblem per matrix; XLA adds tracing, lowering and
compiling, which were most of a first :func:`~lowrank_jax.vbmf_ranks` call
(docs/benchmarks_vbmf_stages.md), and its Gram products took 1.8-2.6x
the time of NumPy's (that page, two VMs), which runs ``a @ a.T`` as BLAS
``?syrk`` (half the flops of the general product). :func:`host_spectra`
returns the very arrays of
:func:`~lowrank_jax.vbmf.spectra._network_spectra_impl` (same Gram
matrices, same power-of-two scaling by the largest diagonal entry, same
cut, same zero padding, same flags) from NumPy: float32 products and
``eigvalsh`` (LAPACK ``?syevd`` without eigenvectors), one matrix per core
at a time (NumPy releases the GIL in both), each on one BLAS thread
(:mod:`lowrank_jax.lapack_threads`; with more BLAS threads, fewer at a
time). The EVBMF solve, still one vmapped jnp program, takes them
unchanged, so the ranks agree (tests/test_vbmf.py checks both routes
against each other).

It serves the first pass of a CPU call whose layers are plain kernels or
Tucker-2 cores, under ``'auto'`` and ``'gram'``
(:func:`serves`). The rest stays with the compiled program: other
backends, ``'svd'``, the prescaled redo, layers that must be collapsed to
a kernel first (cp, overparam, svd forms). ``use_host_spectra(False)``
sends every call to the compiled program.
"""

from __future__ import annotations

import concurrent.futures
import os

import jax
import numpy as np

from lowrank_jax import lapack_threads
from lowrank_jax.vbmf.spectra import _bucket

# Whether CPU calls compute their spectra on the host (see use_host_spectra).
_HOST = {'on': True}


def use_host_spectra(enabled: bool = True) -> bool:
  """Computes the spectra of CPU ``vbmf_ranks`` calls on the host (default),
  or always in the compiled spectra program (``False``).

  Both give the same spectra to float32 rounding and the same ranks; the
  host route skips the program's tracing and compiling (the first call of
  a process) and forms the Gram matrices with BLAS ``?syrk``
  (docs/benchmarks_vbmf.md times both). Other backends always run the
  program.

  Args:
    enabled: use the host route where it serves (True) or never (False).

  Returns:
    Whether the host route is now in use.
  """
  _HOST['on'] = bool(enabled)
  return _HOST['on']


def serves(kinds, method: str, prescale: bool, platforms) -> bool:
  """Whether :func:`host_spectra` computes this pass (see the module)."""
  return (_HOST['on'] and set(platforms) == {'cpu'} and not prescale
          and method in ('auto', 'gram')
          and all(source in ('kernel', 'core') for source, _, _ in kinds))


def output_shapes(groups) -> dict:
  """``jax.ShapeDtypeStruct`` s of :func:`host_spectra`'s output, known
  before it runs (so the solve can compile meanwhile)."""
  out = {}
  for dtype, sides in _sides_by_dtype(groups).items():
    n, width = len(sides), _bucket(max(sides))
    f = lambda *shape, d=dtype: jax.ShapeDtypeStruct(shape, np.dtype(d))
    out[dtype] = (f(n, width), f(n), f(n), f(n, d='int32'), f(n, d='bool'),
                  f(n, d='bool'))
  return out


def _sides_by_dtype(groups) -> dict:
  """``{dtype: [L of each matrix, in group order]}``."""
  sides = {}
  for (big_l, _, dtype), members in groups:
    sides.setdefault(dtype, []).extend([big_l] * len(members))
  return sides


def host_spectra(sources, kinds, groups) -> dict:
  """The spectra program's output, ``{dtype: (lam (N, P), L (N,), M (N,),
  e (N,), finite (N,), rescale (N,))}``, as NumPy arrays (see
  :func:`~lowrank_jax.vbmf.spectra._network_spectra_impl`; ``finite`` is
  all True: a matrix with NaN / Inf entries has a NaN diagonal and is
  flagged for the prescaled pass, as there)."""
  kernels = {}
  out = {}
  for dtype, sides in _sides_by_dtype(groups).items():
    width = _bucket(max(sides))
    rows = []  # (L, M, kernel, mode) per matrix, in group order
    for (big_l, big_m, d), members in groups:
      for i, m in members if d == dtype else ():
        if i not in kernels:  # once per layer (a bfloat16 one is converted)
          kernels[i] = np.asarray(sources[i], dtype)
        rows.append((big_l, big_m, kernels[i], kinds[i][1][m]))
    lam = np.zeros((len(rows), width), dtype)
    e = np.zeros(len(rows), np.int32)
    ok = np.zeros(len(rows), bool)

    def one(j):
      big_l, _, kernel, mode = rows[j]
      # A product that overflows is flagged below (its diagonal is Inf).
      with np.errstate(over='ignore', invalid='ignore'):
        lam[j, :big_l], e[j], ok[j] = _scaled_eigenvalues(
            _mode_gram(kernel, mode))

    # NumPy's BLAS and LAPACK calls release the GIL: as many matrices at a
    # time as the cores hold BLAS calls (one per core at the default one
    # BLAS thread, lapack_threads), the largest first.
    order = sorted(range(len(rows)), key=lambda j: -rows[j][0])
    workers = max(1, _cores() // lapack_threads.blas_threads())
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(one, order))
    big_l, big_m = (np.asarray([r[k] for r in rows], dtype) for k in (0, 1))
    out[dtype] = (lam, big_l, big_m, e, np.ones(len(rows), bool), ~ok)
  return out


def _cores() -> int:
  """The cores this process may run on."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _mode_gram(kernel: np.ndarray, mode: str) -> np.ndarray:
  """The L x L Gram matrix of the mode's matrix (as
  :func:`~lowrank_jax.vbmf.spectra._mode_gram`): ``a @ a.T``, which NumPy
  runs as BLAS ``?syrk`` (half the flops of the general product). The
  'out' matrix is a view of the kernel, the 'in' one a transposed copy."""
  if mode == 'in':  # rows C_in, columns (kh kw, C_out)
    x = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])
    mat = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(x.shape[1], -1)
  else:  # rows (everything but C_out), columns C_out
    mat = kernel.reshape(-1, kernel.shape[-1]).T
  if mat.shape[0] > mat.shape[1]:
    mat = mat.T
  return mat @ mat.T


def _scaled_eigenvalues(gram: np.ndarray):
  """``(gamma^2 * 2**-2e largest first, e, ok)`` of one Gram matrix.

  The scaling of :func:`~lowrank_jax.vbmf.spectra._diagonal_scale` (the
  power of two of the largest diagonal entry; ``ok`` False, e 0 and zero
  eigenvalues outside its range, NaN / Inf included) and the cut of
  :func:`~lowrank_jax.vbmf.spectra._bucket_spectra` (below ``L eps
  lambda_max``). A LAPACK failure gives NaN, as in the program.
  """
  finfo = np.finfo(gram.dtype)
  d = np.max(np.diagonal(gram))
  if not np.sqrt(finfo.tiny) <= d <= np.sqrt(finfo.max):
    return 0.0, 0, False
  e = (int(np.frexp(d)[1]) + 1) // 2
  gram = np.ldexp(gram, -2 * e)
  try:
    lam = np.linalg.eigvalsh(gram)[::-1]  # LAPACK ?syevd, no vectors
  except np.linalg.LinAlgError:
    return np.nan, e, True
  tol = len(lam) * finfo.eps * lam[0]
  return np.where(lam > tol, lam, 0.0), e, True
