"""EVBMF ranks of every layer of a network: :func:`vbmf_ranks`.

:func:`vbmf_ranks` plans, per selected layer of a parameter tree, the
matrices EVBMF is applied to (:func:`_plan_layer`): the two Tucker-2
unfoldings of each k x k conv, the (everything but C_out) x C_out matrix of
each dense layer and 1x1 conv, and the core of each layer already in
Tucker-2 form (MUSCO re-compression). All of them go through *one* call of
two compiled programs, spectra and solve
(:func:`lowrank_jax.vbmf.batched.evbmf_per_mode`; a second call only for
the matrices whose spectra ``'auto'`` redoes with the SVD). The ranks are
then weakened (:func:`lowrank_jax.vbmf.weakened_rank`) and clamped on the
host.

References:
  Nakajima et al., JMLR 14, 2013 (EVBMF); Gusak et al., ICCV Workshops 2019
  (MUSCO weakened ranks and minimum ranks).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax import forms
from lowrank_jax import tree
from lowrank_jax.vbmf.batched import evbmf_per_mode
from lowrank_jax.vbmf.linalg import METHODS
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
    # The R x R core of u @ v (spectra._svd_core): its singular values are
    # the product's nonzero ones, without the round-off of its null space,
    # which EVBMF would otherwise read as signal against a tiny noise floor.
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

  All matrices of the network go through one spectra pass and one vmapped
  EVBMF solve, a jitted program (jax.jit caches it per set of shapes). On
  CPU the spectra are computed on the host by default (BLAS ?syrk Gram
  matrices and LAPACK eigenvalues through NumPy, the same arrays as the
  compiled program's, with no tracing or compiling:
  :mod:`lowrank_jax.vbmf.host_spectra`; ``lj.vbmf.use_host_spectra(False)``
  turns it off). Elsewhere, and for layers in a form that must be collapsed
  first, they are a second jitted program (compiled at XLA optimization
  level 0 on CPU, see :mod:`lowrank_jax.vbmf.batched`): each matrix's Gram
  matrix is formed
  from its kernel (no copies of the unfoldings) and scaled by a power of
  two, the eigenproblems (eigenvalues only) run per size bucket
  (Gram matrices zero-padded to 16, 24, 32, 48, 64, ...: the same
  eigenvalues plus zeros, see
  :func:`lowrank_jax.vbmf.spectra._bucket_spectra`), and one vmapped
  EVBMF solve takes every matrix. Padding only the L x L Gram matrices to a
  few sizes, not the matrices to one common size, keeps the work: padding
  all 70 ResNet-50 matrices to 1024 x 4608 would multiply the Gram / SVD
  work by about 20 (docs/benchmarks_vbmf.md), while 6 buckets instead of 15
  shape groups cut the compiled eigensolver loops, which dominated the first
  call. Matrices at extreme scales (or non-finite) are redone with
  prescaled matrices, and under ``'auto'`` the rare matrices whose
  spectrum spans more than the Gram route resolves with the SVD, each in a
  second call.

  The first call traces and compiles (about a second; the solve compiles
  in a second thread while the spectra are computed); later calls with
  the same shapes reuse the programs. To skip the compilation in later
  *processes* too, pass ``compilation_cache=DIR``: JAX's persistent
  compilation cache
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
  per_mode = evbmf_per_mode(plan, all_layers, method,
                            compilation_cache=compilation_cache)
  ranks, details = _assemble(plan, per_mode, minimum, weaken, report)
  return (ranks, details) if report else ranks


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
