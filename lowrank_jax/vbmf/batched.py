"""EVBMF of all matrices of a network in two compiled programs.

:func:`evbmf_per_mode` takes the layer plans of
:mod:`~lowrank_jax.vbmf.network` and returns every (layer, mode)'s EVBMF
rank, sigma^2, threshold and spectrum from one call of two jitted programs:
the spectra (:func:`_network_spectra_impl`: the matrices are built from
their sources inside the program, their L x L Gram matrices zero-padded to a
few size buckets, :func:`_bucket`, so that a network compiles a few
eigensolver loops) and one vmapped EVBMF solve of them all
(:func:`_network_solve`). They are two programs so that each is compiled
with the options that suit it (see ``_SPECTRA_CPU_OPTIONS``). Under
``'auto'``, the matrices whose spectrum the Gram route cannot resolve are
redone with the SVD in a second pair of programs. ``compilation_cache=DIR``
turns JAX's persistent compilation cache on for that call only
(:func:`_persistent_cache`).

References:
  Nakajima et al., JMLR 14, 2013 (EVBMF).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import forms
from lowrank_jax.vbmf import linalg
from lowrank_jax.vbmf.linalg import _compute_dtype, _host_ldexp, _ldexp
from lowrank_jax.vbmf.solver import _evbmf_sq, _gram_unsure

if TYPE_CHECKING:
  from lowrank_jax.vbmf.network import _Layer


def evbmf_per_mode(plan: tuple[_Layer, ...], all_layers, method: str, *,
                   compilation_cache=None) -> dict[tuple[int, int], tuple]:
  """EVBMF of every mode's matrix of the planned layers, on the host.

  Args:
    plan: the layers' plans (:func:`lowrank_jax.vbmf.network._plan`).
    all_layers: ``{path: variables}`` of the network (the plans' sources).
    method: 'auto', 'gram' or 'svd'.
    compilation_cache: None, or a directory for JAX's persistent compilation
      cache during this call.

  Returns:
    ``{(layer index, mode index): (rank, sigma2, threshold, gamma)}``:
    sigma2 and the threshold Python floats rescaled in float64, gamma a
    numpy array of the L singular values, largest first.

  Raises:
    ValueError: a matrix came out non-finite although its layer's variables
      are finite.
  """
  with _persistent_cache(compilation_cache):
    per_mode, unsure = _run(plan, all_layers, method)
    if unsure:
      # 'auto': matrices whose spectra span more than the Gram route
      # resolves, redone with the SVD in a second pair of programs
      # (compiled only for networks that have such a matrix).
      redo = sorted({i for i, _ in unsure})
      again, _ = _run(tuple(plan[i] for i in redo), all_layers, 'svd')
      for j, i in enumerate(redo):
        for m in range(len(plan[i].modes)):
          if (i, m) in unsure:
            per_mode[(i, m)] = again[(j, m)]
  return per_mode


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


def _bucket_spectra(grams, big_l, method):
  """gamma^2 (N, P), largest first, of zero-padded Gram matrices (N, P, P).

  ``Y Y^T`` padded with zero rows and columns is block-diagonal, ``diag(G,
  0)``: its eigenvalues are G's plus P - L zeros. The Gram route's cut
  (below ``L eps lambda_max``, with the true L) zeroes every eigenvalue of
  the padding, so the first L entries are G's spectrum and the rest are
  zeros, as the solver expects (entries from L on never count). LAPACK's
  Householder reduction leaves a zero trailing block zero, so the padded
  and unpadded eigenproblems agree to rounding (tests/test_vbmf.py checks
  the ranks against unpadded EVBMF).
  """
  del method
  # lax.map, not vmap: jaxlib 0.10.2's batched CPU eigh fans its batch out
  # into XLA's intra-op thread pool and blocks the worker until it is
  # done; two such calls at once (independent groups) wedged a 2-thread
  # pool for good. One matrix per call runs inline.
  lam = jax.lax.map(linalg._eigvalsh, grams)[:, ::-1]
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
_SPECTRA_STATIC = ('kinds', 'groups', 'method', 'lapack')


def _network_spectra_impl(sources, kinds, groups, method, lapack=False):
  """Spectra of all matrices of a network, in one program.

  The static arguments hold no layer paths, so networks with the same shapes
  and forms share one compiled program.

  Per (L, M) shape group, the matrices are stacked, scaled (see
  :func:`_scale_stacks`) and, on the Gram route, their L x L Gram matrices
  formed in one batched product. The eigenproblems then run per size bucket
  (:func:`_bucket`), the Gram matrices zero-padded to it, so a network
  compiles a few eigensolver loops, not one per shape (the compilation, not
  the run, dominated the first call). ``'svd'`` runs per shape group.

  Args:
    sources: per layer, the kernel / core array or the variables to collapse.
    kinds: per layer ``(source, modes, compute dtype name)``.
    groups: tuple of ``((L, M, dtype), ((layer index, mode index), ...))``,
      sorted by L within each dtype (:func:`_program_inputs`).
    method: 'auto', 'gram' or 'svd'.
    lapack: whether :func:`use_lapack_eigenvalues` was on (read at trace
      time; a static argument so that each setting has its own program).

  Returns:
    ``{dtype: (lam (N, P), L (N,), M (N,), e (N,), finite (N,))}`` for the
    N matrices of that dtype in group order: gamma^2 of the matrix times
    ``2**-e``, largest first, zero-padded to P. ``finite`` is False for a
    matrix with NaN / Inf entries (its lam is zero, its e 0).
  """
  del lapack  # read by _eigvalsh through _LAPACK while tracing
  kernels = []
  for (source, _, dtype), src in zip(kinds, sources):
    if source == 'to_kernel':
      kernel = forms.to_kernel(src)
    elif source == 'svd_core':
      kernel = _svd_core(src)
    else:
      kernel = src
    kernels.append(kernel.astype(dtype))
  by_dtype = {}  # dtype -> [(L, M, stack (n, L, M))] in group order
  for (big_l, big_m, dtype), members in groups:
    by_dtype.setdefault(dtype, []).append((big_l, big_m, jnp.stack(
        [_matrix(kernels[i], kinds[i][1][m]) for i, m in members])))
  out = {}
  for dtype, items in by_dtype.items():
    ys, e = _scale_stacks([y for _, _, y in items])
    sides = [big_l for big_l, _, _ in items]
    if method == 'svd':
      lams, finite = _svd_spectra(ys)
    else:
      lams, finite = _gram_spectra(ys, sides, method)
    width = max(lam.shape[1] for lam in lams)
    lam = jnp.concatenate([jnp.pad(lam, ((0, 0), (0, width - lam.shape[1])))
                           for lam in lams])
    counts = [y.shape[0] for y in ys]
    big_l, big_m = (jnp.asarray(np.repeat([it[k] for it in items], counts),
                                dtype) for k in (0, 1))
    out[dtype] = (lam, big_l, big_m, jnp.where(finite, e, 0), finite)
  return out


def _gram_spectra(ys, sides, method):
  """gamma^2 per size bucket (a list of (n, P)) and ``finite`` (N,).

  ``ys``: scaled stacks (n, L, M) in group order, ``sides`` their L. Groups
  are sorted by L, so each bucket's matrices are contiguous and the
  buckets' rows, concatenated, are in group order.
  """
  buckets = {}  # P -> [(padded grams (n, P, P), L)]
  for y, big_l in zip(ys, sides):
    gram = jnp.matmul(y, jnp.swapaxes(y, 1, 2),
                      precision=jax.lax.Precision.HIGHEST)
    size = _bucket(big_l)
    if buckets and size not in buckets and size < max(buckets):
      raise AssertionError('shape groups must be sorted by L')
    pad = size - big_l
    buckets.setdefault(size, []).append(
        (jnp.pad(gram, ((0, 0), (0, pad), (0, pad))), big_l))
  lams, finite = [], []
  for items in buckets.values():
    grams = jnp.concatenate([g for g, _ in items])
    # |y| <= 1, so a finite matrix has a finite Gram sum (at most L^2 M);
    # a NaN / Inf entry makes its diagonal entry NaN / Inf. (XLA:CPU's max
    # reduction skips NaN, so the peak of _scale_stacks does not tell.)
    ok = jnp.isfinite(jnp.sum(grams, axis=(1, 2)))
    grams = jnp.where(ok[:, None, None], grams, 0.0)  # LAPACK never sees NaN
    big_l = jnp.asarray(np.repeat([l for _, l in items],
                                  [g.shape[0] for g, _ in items]),
                        grams.dtype)
    lams.append(_bucket_spectra(grams, big_l[:, None], method))
    finite.append(ok)
  return lams, jnp.concatenate(finite)


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


@functools.partial(jax.jit, static_argnames=('method',))
def _network_solve(spectra, method):
  """ONE vmapped EVBMF solve of all matrices of :func:`_network_spectra_impl`.

  Spectra zero-padded to the longest, true L and M passed as data (zero
  padding adds nothing to any sum of the free energy).

  Returns:
    ``{dtype: (rank (N,), sigma2 (N,), threshold (N,), gamma (N, P),
    e (N,), unsure (N,))}``: sigma2 and the threshold are those of the
    matrix times ``2**-e`` (multiply by ``2**(2e)`` and ``2**e``); gamma is
    rescaled. A matrix with NaN / Inf entries has rank -1 and NaN gamma.
    ``unsure`` (``'auto'`` only; else all False) marks the matrices whose
    spectrum spans more than the Gram route resolves: the caller redoes
    them with ``'svd'`` (:func:`evbmf_per_mode`), so the SVD is compiled
    only for networks that need it.
  """
  def solve(lam, big_l, big_m, e, finite):
    res, gamma = _evbmf_sq(lam, big_l, big_m)
    unsure = (_gram_unsure(lam, big_l, big_m) if method == 'auto'
              else jnp.zeros((), bool))
    # sigma2 and the threshold stay normalized (the host rescales them in
    # float64, see _per_mode); rank -1 marks a non-finite matrix.
    return (jnp.where(finite, res.rank, -1), res.sigma2, res.threshold,
            jnp.where(finite, _ldexp(gamma, e), jnp.nan), e,
            finite & unsure)

  return {dtype: jax.vmap(solve)(*args) for dtype, args in spectra.items()}


def _run(plan, all_layers, method):
  """``(per_mode, unsure)`` of the planned layers from two compiled calls.

  The spectra program runs asynchronously, so the solve's program is traced
  and compiled while it runs.
  """
  sources, kinds, groups = _program_inputs(plan, all_layers)
  devices = {d for x in jax.tree.leaves(sources)
             for d in getattr(x, 'devices', lambda: ())()}
  platforms = {d.platform for d in devices} or {jax.default_backend()}
  spectra_program = _network_spectra[
      'cpu' if platforms == {'cpu'} else None]
  # _eigvalsh reads the switch while tracing; passing it as a static
  # argument gives each setting its own compiled program.
  spectra = spectra_program(sources, kinds, groups, method,
                            lapack=linalg._LAPACK['on'])
  out = jax.device_get(_network_solve(spectra, method))
  return _per_mode(out, groups, plan)


@contextlib.contextmanager
def _persistent_cache(directory):
  """JAX's persistent compilation cache in ``directory`` for this block.

  Sets ``jax_compilation_cache_dir`` (and a minimum compile time of 0 s, so
  that every program of the block is stored) and restores both after.
  JAX opens one cache directory per process: the first directory used, by
  this or by JAX's own setting, serves the rest of the process.
  """
  if directory is None:
    yield
    return
  directory = os.fspath(directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f'compilation_cache={directory!r} cannot be used as a '
                     f'directory: {e}') from e
  if not os.access(directory, os.W_OK):
    raise ValueError(f'compilation_cache={directory!r} is not writable')
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], directory)
  jax.config.update(names[1], 0.0)
  try:
    yield
  finally:
    for n, v in before.items():
      jax.config.update(n, v)


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


def _per_mode(out, groups, plan) -> tuple[dict[tuple[int, int], tuple],
                                         set[tuple[int, int]]]:
  """``{(layer, mode): (rank, sigma2, threshold, gamma)}`` on the host, and
  the ``(layer, mode)`` keys that ``'auto'`` must redo with the SVD.

  Raises:
    ValueError: a matrix came out non-finite (rank -1) although its layer's
      variables are finite.
  """
  per_mode, row, unsure = {}, {}, set()
  for (big_l, _, dtype), members in groups:
    rank, sigma2, thr, gamma, e, redo = out[dtype]
    for i, m in members:
      j = row.setdefault(dtype, 0)
      row[dtype] += 1
      if rank[j] < 0:
        layer = plan[i]
        rows, cols = layer.matrices[m]
        raise ValueError(
            f'layer {layer.path!r}: its {rows} x {cols} matrix of mode '
            f'{layer.modes[m]!r} has non-finite (NaN or Inf) entries although '
            f'the layer\'s variables are finite: building it from the '
            f'{layer.form!r} form ({layer.source}) overflowed {dtype}')
      # Rescaled in float64: exact for every float32 layer, where the
      # device's float32 sigma2 may over- or underflow (see evbmf).
      per_mode[(i, m)] = (int(rank[j]), _host_ldexp(float(sigma2[j]),
                                                    2 * int(e[j])),
                          _host_ldexp(float(thr[j]), int(e[j])),
                          np.asarray(gamma[j, :big_l]))
      if redo[j]:
        unsure.add((i, m))
  return per_mode, unsure
