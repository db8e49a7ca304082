"""The spectra program of :mod:`~lowrank_jax.vbmf.batched`: every planned
matrix's squared singular values, in one jitted program per backend.

:func:`_program_inputs` turns the layer plans into the program's
arguments; :func:`_network_spectra_impl` forms each matrix's L x L Gram
matrix from its kernel (or, prescaled, the matrices themselves), scales it
by a power of two, zero-pads it to a few size buckets (:func:`_bucket`) so
that a network compiles a few eigensolver loops, and takes eigenvalues
without eigenvectors. It is compiled at XLA optimization level 0 on CPU
(``_SPECTRA_CPU_OPTIONS``); the EVBMF solve of its output is a separate
program (:func:`lowrank_jax.vbmf.batched._network_solve`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import forms
from lowrank_jax.vbmf import linalg
from lowrank_jax.vbmf.linalg import _compute_dtype

def _svd_core(v):
  """``R_u @ R_v.T`` (R x R) from QRs of an SVD layer's factors.

  ``u @ v = Q_u R_u R_v^T Q_v^T`` with orthonormal ``Q``s, so the core has
  exactly the nonzero singular values of the layer's matrix.
  """
  u = v['u'].reshape(-1, v['u'].shape[-1])
  r_u = jnp.linalg.qr(u, mode='r')
  r_v = jnp.linalg.qr(v['v'].T, mode='r')
  return r_u @ r_v.T


def _matrix(kernel, mode):
  """A matrix with the singular values of the mode's unfolding, L <= M."""
  if mode == 'in':  # C_in x (kh kw C_out) unfolding, transposed.
    mat = jnp.swapaxes(kernel, -1, -2).reshape(-1, kernel.shape[-2])
  else:  # 'out' / 'mat': (everything but C_out) x C_out.
    mat = kernel.reshape(-1, kernel.shape[-1])
  return mat.T if mat.shape[0] > mat.shape[1] else mat


def _bucket(big_l: int) -> int:
  """Side of the eigenproblem an L x L Gram matrix is zero-padded to.

  The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 3 * 2^(k-1)) that
  holds L: a network's L values fall into a few buckets (ResNet-50: 6, was
  15 shape groups), each one compiled eigensolver loop, and the padding
  costs at most (3/2)^3 = 3.4x one eigenproblem (none for power-of-two
  widths).
  """
  size = 16
  while size < big_l:
    size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
  return size


def _bucket_spectra(grams, big_l):
  """gamma^2 (N, P), largest first, of zero-padded Gram matrices (N, P, P).

  ``Y Y^T`` padded with zero rows and columns is block-diagonal, ``diag(G,
  0)``: its eigenvalues are G's plus P - L zeros. The Gram route's cut
  (below ``L eps lambda_max``, with the true L) zeroes every eigenvalue of
  the padding, so the first L entries are G's spectrum and the rest are
  zeros, as the solver expects (entries from L on never count). LAPACK's
  reductions leave a zero trailing block zero, so the padded and unpadded
  eigenproblems agree to rounding (tests/test_vbmf.py checks the ranks
  against unpadded EVBMF).
  """
  # lax.map, not vmap: jaxlib 0.10.2's batched CPU eigh fans its batch out
  # into XLA's intra-op thread pool and blocks the worker until it is
  # done; two such calls at once (independent groups) wedged a 2-thread
  # pool for good. One matrix per call runs inline.
  lam = jax.lax.map(linalg._gram_eigenvalues, grams)
  tol = big_l * jnp.finfo(lam.dtype).eps * lam[:, :1]
  return jnp.where(lam > tol, lam, 0.0)


# Opt level 0 for the spectra program on CPU, measured in fresh processes on
# the ResNet-50 planted kernels of bench/bench_vbmf.py (70 matrices; 2 cores
# shared with a training run, OPENBLAS_NUM_THREADS=1, jax 0.10.2): XLA
# compiled the spectra in 0.8 s instead of 2.7-3.4 s and ran them 6% slower
# (1.01 s instead of 0.95 s: their time is in library calls, YNNPACK Gram
# products and LAPACK eigh), while the EVBMF solve ran 6x slower at level 0
# (0.39 s instead of 0.06 s: exp / log1p over a 128-point grid of every
# matrix, which LLVM vectorizes only when optimizing), so the solve is its
# own program with the default options (0.75 s to compile, mostly while
# the spectra run). Other backends keep their defaults.
_SPECTRA_CPU_OPTIONS = {'xla_backend_optimization_level': 0}
_SPECTRA_STATIC = ('kinds', 'groups', 'method', 'prescale', 'lapack')
# What the solve tells the host to redo (see evbmf_per_mode).
_REDO_SVD, _REDO_PRESCALED = 1, 2


def _network_spectra_impl(sources, kinds, groups, method, prescale,
                          lapack=False):
  """Spectra of all matrices of a network, in one program.

  The static arguments hold no layer paths, so networks with the same shapes
  and forms share one compiled program.

  Per (L, M) shape group, the L x L Gram matrices are formed (one product
  per matrix, straight from its kernel: no stacked copies of the matrices)
  and the eigenproblems run per size bucket (:func:`_bucket`), the Gram
  matrices zero-padded to it, so a network compiles a few eigensolver
  loops, not one per shape. Without ``prescale`` each Gram matrix is
  scaled by the power of two of its largest diagonal entry
  (:func:`_diagonal_scale`), exact unless that entry lies outside the
  range where the unscaled products are exact enough; such matrices are
  flagged for the prescaled pass. With ``prescale`` (and for ``'svd'``,
  which runs per shape group) the matrices are stacked and scaled first
  (:func:`_scale_stacks`).

  Args:
    sources: per layer, the kernel / core array or the variables to collapse.
    kinds: per layer ``(source, modes, compute dtype name)``.
    groups: tuple of ``((L, M, dtype), ((layer index, mode index), ...))``,
      sorted by L within each dtype (:func:`_program_inputs`).
    method: 'auto', 'gram' or 'svd'.
    prescale: scale the matrices before their Gram products (the redo).
    lapack: the switch of :func:`use_lapack_eigenvalues` (on by default;
      read at trace time; a static argument so that each setting has its
      own program).

  Returns:
    ``{dtype: (lam (N, P), L (N,), M (N,), e (N,), finite (N,), rescale
    (N,))}`` for the N matrices of that dtype in group order: gamma^2 of
    the matrix times ``2**-2e``, largest first, zero-padded to P.
    ``finite`` is False for a (prescaled) matrix with NaN / Inf entries
    (its lam is zero, its e 0); ``rescale`` marks the matrices the
    prescaled pass must redo.
  """
  del lapack  # read by _gram_eigenvalues through _LAPACK while tracing
  kernels = [_kernel(src, source).astype(dtype)
             for (source, _, dtype), src in zip(kinds, sources)]
  by_dtype = {}  # dtype -> [(L, M, (kernel, mode) pairs)] in group order
  for (big_l, big_m, dtype), members in groups:
    by_dtype.setdefault(dtype, []).append((big_l, big_m, [
        (kernels[i], kinds[i][1][m]) for i, m in members]))
  return {dtype: _dtype_spectra(items, method, prescale)
          for dtype, items in by_dtype.items()}


def _kernel(src, source):
  """The kernel / core array a layer's matrices come from."""
  if source == 'to_kernel':
    return forms.to_kernel(src)
  if source == 'svd_core':
    return _svd_core(src)
  return src


def _dtype_spectra(items, method, prescale):
  """One dtype's ``(lam, L, M, e, finite, rescale)``, see the caller."""
  sides = [big_l for big_l, _, _ in items]
  counts = [len(mats) for _, _, mats in items]
  if method == 'svd' or prescale:
    ys, e = _scale_stacks([jnp.stack([_matrix(*y) for y in mats])
                           for _, _, mats in items])
    if method == 'svd':
      lams, finite = _svd_spectra(ys)
    else:
      grams = [_gram(y) for y in ys]
      lams, finite, _ = _gram_spectra(grams, sides, by_diagonal=False)
    e = jnp.where(finite, e, 0)
    rescale = jnp.zeros_like(finite)
  else:
    grams = [jnp.stack([_mode_gram(*y) for y in mats]) for _, _, mats in items]
    lams, ok, e = _gram_spectra(grams, sides, by_diagonal=True)
    finite, rescale = jnp.ones_like(ok), ~ok
  width = max(lam.shape[1] for lam in lams)
  lam = jnp.concatenate([jnp.pad(lam, ((0, 0), (0, width - lam.shape[1])))
                         for lam in lams])
  big_l, big_m = (jnp.asarray(np.repeat([it[k] for it in items], counts),
                              lam.dtype) for k in (0, 1))
  return lam, big_l, big_m, e, finite, rescale


def _mode_gram(kernel, mode):
  """The L x L Gram matrix of the mode's matrix (:func:`_matrix`), formed
  from the kernel without copying the matrix: ``X^T X`` or ``X X^T``
  contracting the kernel's other axes in place."""
  if mode == 'in':  # rows C_in, columns (kh kw, C_out)
    x = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])
    if x.shape[1] <= x.shape[0] * x.shape[2]:
      dims = (((0, 2), (0, 2)), ((), ()))
    else:
      dims = (((1,), (1,)), ((), ()))
  else:  # rows (everything but C_out), columns C_out
    x = kernel.reshape(-1, kernel.shape[-1])
    dims = ((((0,), (0,)) if x.shape[1] <= x.shape[0] else ((1,), (1,))),
            ((), ()))
  g = jax.lax.dot_general(x, x, dims, precision=jax.lax.Precision.HIGHEST)
  side = int(np.sqrt(g.size))
  return g.reshape(side, side)


def _gram(y):
  """``Y Y^T`` of a matrix (L, M) or a stack (n, L, M), full float32."""
  return jnp.matmul(y, jnp.swapaxes(y, -1, -2),
                    precision=jax.lax.Precision.HIGHEST)


def _gram_spectra(grams, sides, by_diagonal):
  """``(lams, ok, e)``: gamma^2 per size bucket (a list of (n, P)).

  ``grams``: Gram stacks (n, L, L) in group order, ``sides`` their L.
  Groups are sorted by L, so each bucket's matrices are contiguous and the
  buckets' rows, concatenated, are in group order. ``by_diagonal``: scale
  each by :func:`_diagonal_scale` (``e`` (N,) and ``ok`` from there); else
  ``ok`` says the Gram matrix is finite (``e`` None).
  """
  buckets = {}  # P -> [(padded grams (n, P, P), L)]
  for gram, big_l in zip(grams, sides):
    size = _bucket(big_l)
    if buckets and size not in buckets and size < max(buckets):
      raise AssertionError('shape groups must be sorted by L')
    pad = size - big_l
    buckets.setdefault(size, []).append(
        (jnp.pad(gram, ((0, 0), (0, pad), (0, pad))), big_l))
  lams, oks, es = [], [], []
  for items in buckets.values():
    grams = jnp.concatenate([g for g, _ in items])
    if by_diagonal:
      grams, e, ok = _diagonal_scale(grams)
      es.append(e)
    else:
      # |y| <= 1, so a finite matrix has a finite Gram sum (at most L^2 M);
      # a NaN / Inf entry makes its diagonal entry NaN / Inf. (XLA:CPU's
      # max reduction skips NaN, so the peak of _scale_stacks does not
      # tell.)
      ok = jnp.isfinite(jnp.sum(grams, axis=(1, 2)))
    grams = jnp.where(ok[:, None, None], grams, 0.0)  # LAPACK never sees NaN
    big_l = jnp.asarray(np.repeat([l for _, l in items],
                                  [g.shape[0] for g, _ in items]),
                        grams.dtype)
    lams.append(_bucket_spectra(grams, big_l[:, None]))
    oks.append(ok)
  return lams, jnp.concatenate(oks), (jnp.concatenate(es) if es else None)


def _diagonal_scale(grams):
  """``(grams * 2**-2e, e, ok)`` for unscaled Gram matrices (N, P, P).

  ``e`` (N,) from the largest diagonal entry d (the largest squared row
  norm), so the scaled one lies in [1/4, 1): the same scaling by a power of
  two as scaling the matrix first (:func:`_scale_stacks`, a pass over every
  weight, and its copy), done on the small Gram matrix instead. It is
  exact where the unscaled products are: ``ok`` is False (and e 0) unless
  ``sqrt(tiny) <= d <= sqrt(max)`` of the dtype, so that products flushed
  to zero below ``tiny`` lie far below ``eps d`` and nothing overflows;
  NaN / Inf, an all-zero matrix and extreme scales fail it and go to the
  prescaled pass.
  """
  d = jnp.max(jnp.diagonal(grams, axis1=1, axis2=2), axis=1)
  finfo = jnp.finfo(grams.dtype)
  ok = (d >= np.sqrt(finfo.tiny)) & (d <= np.sqrt(finfo.max))
  _, k = jnp.frexp(jnp.where(ok, d, 1.0))
  e = (k + 1) // 2
  scale = linalg._pow2(-2 * e, grams.dtype)
  return grams * scale[:, None, None], jnp.where(ok, e, 0), ok


def _svd_spectra(ys):
  """gamma^2 per shape group (a list of (n, L)) and ``finite`` (N,)."""
  lams, finite = [], []
  for y in ys:
    ok = jnp.isfinite(jnp.sum(y * y, axis=(1, 2)))  # |y| <= 1: see above
    y = jnp.where(ok[:, None, None], y, 0.0)
    # lax.map for the reason given in _bucket_spectra.
    lams.append(jax.lax.map(
        functools.partial(linalg._squared_singular_values, method='svd'), y))
    finite.append(ok)
  return lams, jnp.concatenate(finite)


def _scale_stacks(stacks):
  """Each matrix of the stacks (n, L, M) times ``2**-e``, and ``e`` (N,).

  The same scaled matrices and exponents as :func:`~lowrank_jax.vbmf.solver.
  _prepare` for finite matrices (``e``: ``frexp`` exponent of the largest
  absolute entry; a power of two scales exactly), but the per-matrix
  scalars are computed once for all stacks (of one dtype), not per shape
  group: that cut the spectra program's trace and lowering from 0.35 s to
  0.1 s and its XLA compile by about 1 s (ResNet-50, 15 shape groups).
  ``2**-e`` is applied as two factors in the normal range, both scaling in
  one direction, so no product under- or overflows before the result does.
  A matrix with NaN / Inf entries gets some ``e``; the caller zeroes it.
  """
  peak = jnp.concatenate([jnp.max(jnp.abs(s), axis=(1, 2)) for s in stacks])
  _, e = jnp.frexp(jnp.where(jnp.isfinite(peak), peak, 0.0))
  half = -e // 2
  low = linalg._pow2(half, peak.dtype)
  high = linalg._pow2(-e - half, peak.dtype)
  scaled, start = [], 0
  for s in stacks:
    part = slice(start, start + s.shape[0])
    start += s.shape[0]
    scaled.append(s * low[part, None, None] * high[part, None, None])
  return scaled, e


_network_spectra = {
    'cpu': jax.jit(_network_spectra_impl, static_argnames=_SPECTRA_STATIC,
                   compiler_options=_SPECTRA_CPU_OPTIONS),
    None: jax.jit(_network_spectra_impl, static_argnames=_SPECTRA_STATIC)}


def _program_inputs(plan, all_layers):
  """``(sources, kinds, groups)``: the spectra program's arguments."""
  sources = []
  for layer in plan:
    v = all_layers[layer.path]
    if layer.source in ('to_kernel', 'svd_core'):
      sources.append({k: a for k, a in v.items() if k != 'bias'})
    else:
      sources.append(v[layer.source])
  by_shape: dict[tuple, list] = {}
  for i, layer in enumerate(plan):
    for m, (rows, cols) in enumerate(layer.matrices):
      key = (min(rows, cols), max(rows, cols),
             _compute_dtype(layer.dtype).name)
      by_shape.setdefault(key, []).append((i, m))
  # Sorted by L: each size bucket's groups are then contiguous within a
  # dtype (_gram_spectra relies on it).
  groups = tuple((key, tuple(members))
                 for key, members in sorted(by_shape.items()))
  kinds = tuple((l.source, l.modes, _compute_dtype(l.dtype).name)
                for l in plan)
  return tuple(sources), kinds, groups
