"""EVBMF of all matrices of a network in one compiled program.

:func:`evbmf_per_mode` takes the layer plans of
:mod:`~lowrank_jax.vbmf.network` and returns every (layer, mode)'s EVBMF
rank, sigma^2, threshold and spectrum from one jitted call
(:func:`_network_evbmf`): the matrices are built from their sources inside
the program, their L x L Gram matrices zero-padded to a few size buckets
(:func:`_bucket`) so that a network compiles a few eigensolver loops, and
one vmapped EVBMF solve takes them all. Under ``'auto'``, the matrices whose
spectrum the Gram route cannot resolve are redone with the SVD in a second
program. ``compilation_cache=DIR`` turns JAX's persistent compilation cache
on for that call only (:func:`_persistent_cache`).

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
from lowrank_jax.vbmf.solver import _evbmf_sq, _gram_unsure, _prepare

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
      # resolves, redone with the SVD in a second program (compiled only
      # for networks that have such a matrix).
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


@functools.partial(jax.jit, static_argnames=('kinds', 'groups', 'method',
                                             'lapack'))
def _network_evbmf(sources, kinds, groups, method, lapack=False):
  """EVBMF of all matrices of a network, in one program.

  The static arguments hold no layer paths, so networks with the same shapes
  and forms share one compiled program.

  Per (L, M) shape group, the matrices are stacked, scaled (see
  :func:`~lowrank_jax.vbmf.solver._prepare`) and, on the Gram route, their
  L x L Gram matrices formed in one batched product. The eigenproblems then
  run per size bucket (:func:`_bucket`), the Gram matrices zero-padded to it,
  so a network compiles a few eigensolver loops, not one per shape (the
  compilation, not the run, dominated the first call). ``'svd'`` runs per
  shape group. Then ONE vmapped EVBMF solve for all matrices: spectra
  zero-padded to the longest, true L and M passed as data (zero padding adds
  nothing to any sum of the free energy).

  Args:
    sources: per layer, the kernel / core array or the variables to collapse.
    kinds: per layer ``(source, modes, compute dtype name)``.
    groups: tuple of ``((L, M, dtype), ((layer index, mode index), ...))``.
    method: 'auto', 'gram' or 'svd'.
    lapack: whether :func:`use_lapack_eigenvalues` was on (read at trace
      time; a static argument so that each setting has its own program).

  Returns:
    ``{dtype: (rank (N,), sigma2 (N,), threshold (N,), gamma (N, P),
    e (N,), unsure (N,))}`` for the N matrices of that dtype in group order,
    gamma zero-padded to P. sigma2 and the threshold are those of the matrix
    times ``2**-e`` (multiply by ``2**(2e)`` and ``2**e``); gamma is
    rescaled. A matrix with NaN / Inf entries has rank -1 and NaN gamma.
    ``unsure`` (``'auto'`` only; else all False) marks the matrices whose
    spectrum spans more than the Gram route resolves: the caller redoes
    them with ``'svd'`` (:func:`evbmf_per_mode`), so the SVD is compiled
    only for networks that need it.
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
  rows = {}  # dtype -> [(lam (n, P), e, finite, L, M)] in group order
  buckets = {}  # (P, dtype) -> [(slot in rows, padded grams, L)]
  for (big_l, big_m, dtype), members in groups:
    stack = jnp.stack([
        _matrix(kernels[i], kinds[i][1][m]) for i, m in members])
    y, e, finite = jax.vmap(_prepare)(stack)
    part = rows.setdefault(dtype, [])
    if method == 'svd':
      # lax.map for the reason given in _bucket_spectra.
      lam = jax.lax.map(
          functools.partial(linalg._squared_singular_values, method='svd'),
          y)
      part.append([lam, e, finite, big_l, big_m])
      continue
    gram = jnp.matmul(y, jnp.swapaxes(y, 1, 2),
                      precision=jax.lax.Precision.HIGHEST)
    size = _bucket(big_l)
    pad = size - big_l
    buckets.setdefault((size, dtype), []).append(
        (len(part), jnp.pad(gram, ((0, 0), (0, pad), (0, pad))), big_l))
    part.append([None, e, finite, big_l, big_m])
  for (size, dtype), items in buckets.items():
    counts = [g.shape[0] for _, g, _ in items]
    big_l = jnp.asarray(np.repeat([l for _, _, l in items], counts), dtype)
    lam = _bucket_spectra(jnp.concatenate([g for _, g, _ in items]),
                          big_l[:, None], method)
    for (slot, _, _), piece in zip(items, jnp.split(
        lam, np.cumsum(counts)[:-1])):
      rows[dtype][slot][0] = piece
  out = {}
  for dtype, parts in rows.items():
    width = max(p[0].shape[1] for p in parts)
    lam = jnp.concatenate([jnp.pad(p[0], ((0, 0), (0, width - p[0].shape[1])))
                           for p in parts])
    e = jnp.concatenate([p[1] for p in parts])
    finite = jnp.concatenate([p[2] for p in parts])
    counts = [p[0].shape[0] for p in parts]
    big_l, big_m = (jnp.asarray(np.repeat([p[k] for p in parts], counts),
                                dtype) for k in (3, 4))

    def solve(lam, big_l, big_m, e, finite):
      res, gamma = _evbmf_sq(lam, big_l, big_m)
      unsure = (_gram_unsure(lam, big_l, big_m) if method == 'auto'
                else jnp.zeros((), bool))
      # sigma2 and the threshold stay normalized (the host rescales them in
      # float64, see _per_mode); rank -1 marks a non-finite matrix.
      return (jnp.where(finite, res.rank, -1), res.sigma2, res.threshold,
              jnp.where(finite, _ldexp(gamma, e), jnp.nan), e,
              finite & unsure)

    out[dtype] = jax.vmap(solve)(lam, big_l, big_m, e, finite)
  return out


def _run(plan, all_layers, method):
  """``(per_mode, unsure)`` of the planned layers from one compiled call."""
  sources, kinds, groups = _program_inputs(plan, all_layers)
  # _network_evbmf's _eigvalsh reads the switch while tracing; passing it as
  # a static argument gives each setting its own compiled program.
  out = jax.device_get(_network_evbmf(sources, kinds, groups, method,
                                      lapack=linalg._LAPACK['on']))
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
  """``(sources, kinds, groups)``: the arguments of :func:`_network_evbmf`."""
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
