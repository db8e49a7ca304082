"""EVBMF ranks of every layer of a network: :func:`vbmf_ranks`.

:func:`vbmf_ranks` applies EVBMF to every selected layer of a parameter tree
in *one* compiled call (:func:`_network_evbmf`; a second one only for the
matrices whose spectra ``'auto'`` redoes with the SVD): the two Tucker-2
unfoldings of each k x k conv, the (everything but C_out) x C_out matrix of
each dense layer and 1x1 conv, and the core of each layer already in
Tucker-2 form (MUSCO re-compression). The ranks are then weakened
(:func:`lowrank_jax.vbmf.weakened_rank`) and clamped on the host.

References:
  Nakajima et al., JMLR 14, 2013 (EVBMF); Gusak et al., ICCV Workshops 2019
  (MUSCO weakened ranks and minimum ranks).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import forms
from lowrank_jax import tree
from lowrank_jax.vbmf import linalg
from lowrank_jax.vbmf.linalg import (_compute_dtype, _host_ldexp, _ldexp,
                                     METHODS)
from lowrank_jax.vbmf.solver import (_evbmf_sq, _gram_unsure,
                                     _prepare)
from lowrank_jax.vbmf.weaken import (_check_min_rank, _check_weaken,
                                     _min_ranks, MinRank, weakened_rank)


class _Layer(NamedTuple):
  """Host-side plan of one layer (all static)."""
  path: str
  form: str
  source: str           # 'core' (tucker2), 'kernel' (dense), 'svd_core'
                        # (svd) or 'to_kernel'.
  shape: tuple          # shape of the kernel / core the matrices come from.
  kind: str             # tree.kernel_kind of the layer ('kxk', '1x1',
                        # 'dense'); 'dense' for svd (its R x R core).
  modes: tuple          # ('in', 'out') or ('mat',).
  current: tuple        # R of each mode.
  matrices: tuple       # (rows, cols) of each mode's matrix, paper layout.
  dtype: Any


def _source(form: str, variables: Mapping) -> tuple[str, tuple, Any]:
  """``(source, shape, dtype)`` of the array a layer's matrices come from."""
  if form == 'tucker2':
    return 'core', tuple(variables['core'].shape), variables['core'].dtype
  if form == 'dense':
    return ('kernel', tuple(variables['kernel'].shape),
            variables['kernel'].dtype)
  if form == 'svd':
    # The R x R core of u @ v (see _svd_core): its singular values are the
    # product's nonzero ones, without the round-off of its null space, which
    # EVBMF would otherwise read as signal against a tiny noise floor.
    rank = variables['v'].shape[0]
    return 'svd_core', (rank, rank), variables['v'].dtype
  kernel = jax.eval_shape(
      forms.to_kernel, {k: v for k, v in variables.items() if k != 'bias'})
  return 'to_kernel', tuple(kernel.shape), kernel.dtype


def _plan_layer(path: str, variables: Mapping) -> _Layer:
  """The static plan of one layer: its matrices, modes and current sizes."""
  form = forms.identify(variables.keys())
  source, shape, dtype = _source(form, variables)
  # An SVD layer's source is its R x R core: a matrix, whatever its kernel.
  kind = 'dense' if source == 'svd_core' else tree.kernel_kind(variables)
  if kind == 'kxk' or form == 'tucker2':  # a 1x1 Tucker-2 core: two modes too
    kh, kw, c_in, c_out = shape
    modes = ('in', 'out')
    current = (c_in, c_out)
    matrices = ((c_in, kh * kw * c_out), (c_out, kh * kw * c_in))
  elif kind in ('1x1', 'dense'):
    rows, cols = math.prod(shape[:-1]), shape[-1]
    modes, current, matrices = ('mat',), (min(rows, cols),), ((rows, cols),)
  else:
    raise ValueError(f'layer {path!r}: kernel of shape {shape} is neither '
                     'dense (C_in, C_out) nor a conv (kh, kw, C_in, C_out)')
  if form not in ('dense', 'tucker2'):
    # A factorized layer whose ranks map one to one onto our modes (svd of a
    # dense layer / 1x1 conv): its current size is its rank (MUSCO weakens
    # from the current size), never more than the kernel's.
    held = tuple(forms.get(form).ranks(variables))
    if len(held) == len(modes):
      current = tuple(min(c, int(r)) for c, r in zip(current, held))
  return _Layer(path, form, source, shape, kind, modes, current, matrices,
                jnp.dtype(dtype))


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
    them with ``'svd'`` (:func:`vbmf_ranks`), so the SVD is compiled only
    for networks that need it.
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
      # float64, see vbmf_ranks); rank -1 marks a non-finite matrix.
      return (jnp.where(finite, res.rank, -1), res.sigma2, res.threshold,
              jnp.where(finite, _ldexp(gamma, e), jnp.nan), e,
              finite & unsure)

    out[dtype] = jax.vmap(solve)(lam, big_l, big_m, e, finite)
  return out


def vbmf_ranks(params: Mapping, *, select=None, weaken: float = 1.0,
               min_rank: MinRank = None, report: bool = False,
               method: str = 'auto', compilation_cache=None):
  """EVBMF (weakened, clamped) ranks of every selected layer, in one call.

  Per layer (paths from :func:`lowrank_jax.tree.layers`):

  * k x k conv (HWIO kernel with kh * kw > 1): ``(R_in, R_out)``, R_in from the
    C_in x (kh kw C_out) unfolding, R_out from the C_out x (kh kw C_in)
    unfolding; the current sizes are C_in and C_out.
  * dense layer and 1 x 1 conv: ``(R,)`` from the (everything but C_out) x
    C_out matrix; the current size is min(rows, C_out).
  * a layer already in Tucker-2 form: ``(R_in, R_out)`` from the two
    unfoldings of its ``core`` (MUSCO re-compression), so the ranks are at
    most its current ranks, which are the current sizes.
  * a layer already in SVD form: ``(R,)`` from the R x R core
    ``R_u R_v^T`` of its factors' QRs (same nonzero singular values as
    ``u @ v``, without its null space's round-off); the current size is R.
  * any other form (cp, overparam, ...) is collapsed to its dense kernel
    (:func:`lowrank_jax.forms.to_kernel`) first.

  Each mode's rank is ``weakened_rank(R, R_vbmf, weaken=weaken,
  min_rank=min(min_rank, R))``: EVBMF rank 0 keeps R.

  All matrices of the network go through one jitted function (jax.jit caches
  it per set of shapes and forms): each (L, M) shape group forms its Gram
  matrices in one batched product, the eigenproblems run per size bucket
  (Gram matrices zero-padded to 16, 24, 32, 48, 64, ...: the same
  eigenvalues plus zeros, see :func:`_bucket_spectra`), and one vmapped
  EVBMF solve takes every matrix. Padding only the L x L Gram matrices to a
  few sizes, not the matrices to one common size, keeps the work: padding
  all 70 ResNet-50 matrices to 1024 x 4608 would multiply the Gram / SVD
  work by about 20 (docs/benchmarks_vbmf.md), while 6 buckets instead of 15
  shape groups cut the compiled eigensolver loops, which dominated the first
  call. Under ``'auto'``, the rare matrices whose spectrum spans more than
  the Gram route resolves are redone with the SVD in a second program.

  The first call traces and compiles (seconds); later calls with the same
  shapes reuse the program. To skip the compilation in later *processes*
  too, pass ``compilation_cache=DIR``: JAX's persistent compilation cache
  (https://docs.jax.dev/en/latest/persistent_compilation_cache.html) is then
  on in DIR for this call only (nothing is set at import or left set after
  the call). The cache is trusted code: use a directory only you can write.

  Args:
    params: Flax variables dict or bare params tree (not modified).
    select: layer selection rules (see :func:`lowrank_jax.tree.select_paths`);
      None selects every layer.
    weaken: MUSCO's w in [0, 1]: 1 (default) is plain EVBMF, 0 keeps ranks.
    min_rank: None (MUSCO defaults: 8 for k x k convs and dense layers, 2 for
      1 x 1 convs), an int for all layers, or ``{path regex: int}`` (first
      full match wins, unmatched layers get the default; a rule that matches
      no layer raises). Always clamped to at most R.
    report: also return per-layer details.
    method: ``'auto'`` (default), ``'gram'`` or ``'svd'``, see
      :func:`evbmf`.
    compilation_cache: None (default), or a directory for JAX's persistent
      compilation cache during this call (created if missing; a fresh
      process with the same shapes then loads the program instead of
      compiling it; ``python bench/bench_vbmf.py`` measures both).

  Returns:
    ``{path: ranks tuple}``; with ``report``, ``(ranks, details)``
    where ``details[path]`` has ``form``, ``shape`` (of the kernel or core the
    matrices come from), ``matrices`` ((rows, cols) per mode: C_in x kh kw
    C_out, C_out x kh kw C_in, or rows x C_out), ``current`` (R per mode),
    ``min_rank`` (per mode, clamped), ``vbmf``, ``weakened``, ``sigma2``,
    ``threshold`` (tuples per mode; Python floats rescaled in float64, so
    they neither over- nor underflow for float32 layers) and
    ``singular_values`` (list of numpy arrays per mode, largest first).

  Raises:
    ValueError: weaken outside [0, 1]; a min_rank <= 0 or a min_rank rule
      matching no layer; a selected layer with NaN / Inf (naming its path
      and the variable); a layer whose matrix is not finite although its
      variables are (a factorized form whose product overflows; naming the
      layer and mode); a selection rule matching no layer.

  References:
    Nakajima et al., JMLR 14, 2013 (EVBMF); Gusak et al., ICCV Workshops 2019
    (MUSCO weakened ranks and minimum ranks).
  """
  weaken = _check_weaken(weaken)
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  if min_rank is not None and not isinstance(min_rank, Mapping):
    _check_min_rank(min_rank)
  all_layers, plan = _plan(params, select)
  minimum = _min_ranks(plan, list(all_layers), min_rank)
  if not plan:
    return ({}, {}) if report else {}
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
  ranks, details = _assemble(plan, per_mode, minimum, weaken, report)
  return (ranks, details) if report else ranks


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
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], os.fspath(directory))
  jax.config.update(names[1], 0.0)
  try:
    yield
  finally:
    for n, v in before.items():
      jax.config.update(n, v)


def _plan(params: Mapping, select) -> tuple[dict, tuple[_Layer, ...]]:
  """All layers by path, and the plans of the selected (finite) ones."""
  bare, _ = tree.split_variables(params)
  all_layers = tree.layers(bare)
  paths = tree.select_paths(all_layers.keys(), select)
  if select is None:   # 1-D / 3-D convs have no ranks to estimate
    paths = [p for p in paths if tree.kernel_kind(all_layers[p]) != 'other']
  for path in paths:
    tree.check_finite(path, all_layers[path])
  return all_layers, tuple(_plan_layer(p, all_layers[p]) for p in paths)


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


def _assemble(plan, per_mode, minimum, weaken, report):
  """``(ranks, details)``: weakened, clamped ranks; details if ``report``."""
  ranks, details = {}, {}
  for i, layer in enumerate(plan):
    found = [per_mode[(i, m)] for m in range(len(layer.modes))]
    mins = tuple(min(minimum[layer.path], r) for r in layer.current)
    new = tuple(weakened_rank(r, f[0], weaken=weaken, min_rank=lo)
                for r, f, lo in zip(layer.current, found, mins))
    ranks[layer.path] = new
    if report:
      details[layer.path] = {
          'form': layer.form,
          'shape': layer.shape,
          'matrices': layer.matrices,
          'current': layer.current,
          'min_rank': mins,
          'vbmf': tuple(f[0] for f in found),
          'weakened': new,
          'sigma2': tuple(f[1] for f in found),
          'threshold': tuple(f[2] for f in found),
          'singular_values': [f[3] for f in found],
      }
  return ranks, details
