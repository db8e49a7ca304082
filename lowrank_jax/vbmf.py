"""Empirical VBMF ranks of matrices and of every layer of a network.

:func:`evbmf` is the global analytic solution of empirical variational
Bayesian matrix factorization (EVBMF) of one L x M matrix: it estimates the
noise variance sigma^2 and keeps the singular values above the EVB threshold.
It is pure ``jnp``, jittable and vmappable.

:func:`vbmf_ranks` applies it to every selected layer of a parameter tree in
*one* compiled call: the two Tucker-2 unfoldings of each k x k conv, the
(everything but C_out) x C_out matrix of each dense layer and 1x1 conv, and the
core of each layer already in Tucker-2 form (MUSCO re-compression). The ranks
are then weakened (:func:`weakened_rank`) and clamped on the host.

Implementation notes (what differs from the widely copied Python port):

* sigma^2 is found in log space on a rescaled problem (singular values divided
  by their root mean square), so ``rank(c * Y) == rank(Y)`` for every c > 0;
  the port's absolute tolerance on the raw scale stops after one step for
  trained weights (sigma^2 ~ 1e-5).
* Tall matrices are transposed first (L <= M) and multiplied by the power
  of two that brings the largest absolute entry into [0.5, 1); the results
  are scaled back exactly (sigma^2 by the square of that power).
* The objective drops the constant ``-sum(log gamma_h^2)``, which is the same
  on both branches of the free energy, so exact zero singular values (zero or
  low-rank matrices, rank-deficient unfoldings) give no ``-log 0``.
* The search is global on a bounded interval: a 128-point grid in
  ``log sigma^2`` over [sigma^2_lb, sigma^2_ub], then 40 bisection steps on
  the sign of the free energy's derivative in the two grid cells beside the
  best grid point (the derivative has a closed form without cancellation, so
  sigma^2 is found to float precision, not to a tolerance). MATLAB's
  ``fminbnd`` finds a local minimum; on the planted test spectra both agree
  (tests/test_vbmf.py).

References:
  Nakajima, Sugiyama, Babacan, Tomioka, Global Analytic Solution of
  Fully-observed Variational Bayesian Matrix Factorization, JMLR 14, 2013.
  Gusak et al., Automated Multi-Stage Compression of Neural Networks (MUSCO),
  ICCV Workshops 2019 (weakened ranks, minimum ranks).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import forms
from lowrank_jax import tree

MinRank = Union[None, int, Mapping[str, int]]

# Constants of the EVB threshold (Nakajima et al. 2013, Theorem 3 and Eq. 34).
_TAU_COEF = 2.5129
# Minimizer of the free energy over t = log(sigma^2 / sigma^2_ub): a grid,
# then bisection on the sign of dOmega/dt in the bracket of the best point.
_GRID = 128
_BISECT_STEPS = 40
# Default minimum ranks (MUSCO): k x k convs and dense layers 8, 1x1 convs 2.
DEFAULT_MIN_RANK_KXK = 8
DEFAULT_MIN_RANK_1X1 = 2
METHODS = ('auto', 'gram', 'svd')
# 'auto' redoes a matrix with the SVD when its largest singular value is so
# far above the noise (x_1 = gamma_1^2 / (M sigma2) > _GRAM_RANGE / eps) that
# the Gram route's absolute error eps * gamma_1^2 would exceed ~1e-3 of the
# noise level M sigma2 the decision rests on.
_GRAM_RANGE = 1e-3


class EVBMFResult(NamedTuple):
  """EVBMF of one L x M matrix (L = min of its two sides).

  Attributes:
    rank: () int32, number of singular values above ``threshold``; -1 (and
      NaN in the other fields) for a traced input with NaN / Inf, see
      :func:`evbmf`.
    sigma2: () noise variance (estimated, or the one given); inf / 0 where
      it over- / underflows the dtype (see :func:`evbmf`).
    threshold: () the EVB threshold on singular values,
      ``sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))``.
    shrunk: (L,) the EVB-shrunk singular values, largest first, zeros beyond
      ``rank``.
  """
  rank: jax.Array
  sigma2: jax.Array
  threshold: jax.Array
  shrunk: jax.Array


def _compute_dtype(dtype) -> jnp.dtype:
  """float64 stays float64 (x64 mode), everything else runs in float32."""
  return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(
      jnp.float32)


def _syevd_values_call(target: str, g: jax.Array) -> jax.Array:
  """Eigenvalues (ascending) of symmetric ``g`` (n, n) by LAPACK mode 'N'."""
  n = g.shape[-1]
  call = jax.ffi.ffi_call(
      target,
      (jax.ShapeDtypeStruct(g.shape, g.dtype),
       jax.ShapeDtypeStruct((n,), g.dtype),
       jax.ShapeDtypeStruct((), jnp.int32)),
      input_layouts=[(0, 1)], output_layouts=[(0, 1), None, None],
      input_output_aliases={0: 0}, vmap_method='sequential')
  _, w, info = call(g, mode=np.uint8(ord('N')), uplo=np.uint8(ord('L')))
  return jnp.where(info == 0, w, jnp.nan)


# Opt-in fast path (off by default): see use_lapack_eigenvalues.
_LAPACK = {'on': False}


def use_lapack_eigenvalues(enabled: bool = True) -> bool:
  """Opts in to (or out of) jaxlib's CPU LAPACK eigenvalue-only call.

  ``jnp.linalg.eigvalsh`` computes eigenvectors too; LAPACK ``?syevd`` in
  mode 'N' skips them, which made a whole ResNet-50 ``vbmf_ranks`` about
  17% faster on CPU (0.92 s -> 0.76 s, docs/benchmarks_vbmf.md). The call
  goes through a target that is private to jaxlib (``jax._src.lib.lapack``),
  so it is off by default and, when asked for, used only after a self-check
  on a matrix with known eigenvalues; a jaxlib that changed it keeps the
  default path. Functions already compiled are not affected.

  Args:
    enabled: turn the fast path on (True) or off (False).

  Returns:
    Whether the fast path is now active.
  """
  _LAPACK['on'] = bool(enabled) and (
      _lapack_syevd_target('float32') is not None)
  return _LAPACK['on']


@functools.lru_cache(maxsize=None)
def _lapack_syevd_target(dtype_name: str) -> Optional[str]:
  """jaxlib's CPU LAPACK ``?syevd`` FFI target, or None if unusable.

  The target is private to jaxlib, so it is used only after a check on a
  3 x 3 matrix with known eigenvalues (1, 2, 4) passes on the CPU; any
  failure (missing module, changed signature, wrong result) means None.
  """
  try:
    from jax._src.lib import lapack  # pylint: disable=g-import-not-at-top
    target = lapack.prepare_lapack_call('syevd_ffi', np.dtype(dtype_name))
    probe = np.array([[3., 1., 0.], [1., 3., 0.], [0., 0., 1.]], dtype_name)
    with jax.ensure_compile_time_eval():
      probe = jax.device_put(probe, jax.devices('cpu')[0])
      got = jax.jit(functools.partial(_syevd_values_call, target))(probe)
      got = np.asarray(jax.device_get(got))
    if np.allclose(got, [1., 2., 4.], rtol=1e-5):
      return target
  except Exception:  # pylint: disable=broad-except
    pass
  return None


def _eigvalsh(gram: jax.Array) -> jax.Array:
  """Eigenvalues (ascending) of a symmetric matrix, without eigenvectors.

  ``jnp.linalg.eigvalsh`` runs LAPACK ``?syevd`` with eigenvectors on CPU
  (its eigenvalue-only mode is not exposed), which costs about twice the
  eigenvalues alone (512 x 512 float32: 24 ms vs 13 ms; whole ResNet-50
  ``vbmf_ranks`` 0.92 s vs 0.76 s). With :func:`use_lapack_eigenvalues`
  on, this calls jaxlib's own ``?syevd`` FFI target in mode 'N' on CPU
  (after a self-check, see :func:`_lapack_syevd_target`); by default, on
  other platforms, or if that private target is unusable, ``eigvalsh``. A
  LAPACK failure (info != 0) gives NaN, as ``eigvalsh`` does.
  """
  def fallback(g):
    return jnp.linalg.eigvalsh(g, symmetrize_input=False)

  target = _lapack_syevd_target(gram.dtype.name) if _LAPACK['on'] else None
  if target is None or gram.ndim != 2:
    return fallback(gram)
  return jax.lax.platform_dependent(
      gram, cpu=functools.partial(_syevd_values_call, target),
      default=fallback)


def _squared_singular_values(y: jax.Array, method: str) -> jax.Array:
  """gamma_h^2 of an L x M matrix (L <= M), largest first, shape (L,).

  ``'gram'``: eigenvalues of the L x L Gram matrix ``Y Y^T`` (one BLAS-3
  product, then a small symmetric eigenproblem); ``'svd'``: the singular values
  of Y. The Gram route squares the condition number: a singular value gamma
  carries an absolute error of about ``eps * gamma_1^2 / (2 gamma)``, so
  values below ``sqrt(L * eps) * gamma_1`` (float32, L = 512: 0.8% of
  gamma_1) are set to zero. EVB thresholds of real weights lie well above
  that; use ``'svd'`` (or float64) for spectra spanning more decades.
  """
  if method == 'gram':
    gram = jnp.matmul(y, y.T, precision=jax.lax.Precision.HIGHEST)
    lam = _eigvalsh(gram)[::-1]
    # Eigenvalues below L * eps * lambda_max are rounding noise of the Gram
    # route (numerically zero singular values come out ~sqrt(eps) gamma_1).
    tol = y.shape[0] * jnp.finfo(lam.dtype).eps * lam[0]
    return jnp.where(lam > tol, lam, 0.0)
  if method == 'svd':
    s = jnp.linalg.svd(y, compute_uv=False)
    return s * s
  raise ValueError(f'method must be one of {METHODS}, got {method!r}')


def _branches(t, g, alpha, xubar):
  """x_h, the mask x_h > xubar and tau_h (clipped to xubar off the mask)."""
  x = g * jnp.exp(-t)
  above = x > xubar
  b = jnp.where(above, x, xubar) - 1.0 - alpha
  tau = 0.5 * (b + jnp.sqrt(jnp.maximum(b * b - 4.0 * alpha, 0.0)))
  return x, above, tau


def _free_energy(t, g, big_l, alpha, xubar):
  """Omega(sigma^2) up to a constant, at sigma^2 = sigma^2_ub * exp(t).

  With x_h = gamma_h^2 / (M sigma^2) = g_h exp(-t), ``g_h = L gamma_h^2 /
  ||Y||_F^2`` and tau_h the root of ``x = (1 + tau)(1 + alpha / tau)``:
  ``L t + sum_{x_h <= xubar} x_h + sum_{x_h > xubar} [1 + alpha + alpha / tau_h
  + log(1 + tau_h) + alpha log(1 + tau_h / alpha)]``. The paper's
  ``x_h - tau_h`` is written as ``1 + alpha + alpha / tau_h``, which avoids the
  cancellation of two large numbers (it cost ~1% of sigma^2 in float32), and
  the constant ``-sum_h log(gamma_h^2)`` is dropped.
  """
  x, above, tau = _branches(t, g, alpha, xubar)
  psi = (1.0 + alpha + alpha / tau + jnp.log1p(tau) +
         alpha * jnp.log1p(tau / alpha))
  return big_l * t + jnp.sum(jnp.where(above, psi, x))


def _free_energy_slope(t, g, big_l, alpha, xubar):
  """d Omega / dt: ``L - sum_{x_h <= xubar} x_h - sum_{x_h > xubar} (1 + alpha
  + alpha / tau_h)`` (exact; no large terms cancel)."""
  x, above, tau = _branches(t, g, alpha, xubar)
  return big_l - jnp.sum(jnp.where(above, 1.0 + alpha + alpha / tau, x))


def _minimize(f, slope, lo, hi):
  """Global minimizer of a piecewise-smooth scalar function on [lo, hi].

  ``f`` on a grid picks the basin; in each of the two grid cells beside the
  best grid point, bisection on the sign of ``slope`` finds the local
  minimum (the slope has no cancellation, so the result is accurate to a few
  ulps of t even in float32); the best of the two and the grid point wins.
  Jittable and vmappable (fixed iteration counts).
  """
  dtype = lo.dtype
  ts = lo + (hi - lo) * jnp.linspace(0.0, 1.0, _GRID, dtype=dtype)
  vals = jax.vmap(f)(ts)
  best = jnp.argmin(vals)
  mid = ts[best]
  a = jnp.stack([ts[jnp.maximum(best - 1, 0)], mid])
  b = jnp.stack([mid, ts[jnp.minimum(best + 1, _GRID - 1)]])

  def step(_, ab):
    a, b = ab
    m = 0.5 * (a + b)
    up = jax.vmap(slope)(m) > 0
    return jnp.where(up, a, m), jnp.where(up, m, b)

  a, b = jax.lax.fori_loop(0, _BISECT_STEPS, step, (a, b))
  cands = jnp.concatenate([0.5 * (a + b), mid[None]])
  return cands[jnp.argmin(jax.vmap(f)(cands))]


def _constants(big_l, big_m, dtype):
  """alpha, xubar and the 0-based index e of gamma_{e+1} (Eq. of sigma2_lb).

  ``big_l``, ``big_m`` may be Python ints or traced per-matrix scalars.
  """
  big_l = jnp.asarray(big_l, dtype)
  big_m = jnp.asarray(big_m, dtype)
  alpha = big_l / big_m
  tau_bar = _TAU_COEF * jnp.sqrt(alpha)
  xubar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
  # e = min(ceil(L / (1 + alpha)) - 1, H) with H = L (1-based gamma_{e+1}).
  e = jnp.minimum(jnp.ceil(big_l / (1.0 + alpha)) - 1.0, big_l - 1.0)
  return big_l, big_m, alpha, xubar, e.astype(jnp.int32)


def _evbmf_sq(lam, big_l, big_m, sigma2=None):
  """EVBMF from squared singular values of an L x M matrix (L <= M).

  Args:
    lam: (P,) gamma_h^2, largest first, P >= L; entries from L on are zero
      padding (several matrices share one compiled solve that way).
    big_l, big_m: L and M, Python ints or traced scalars.
    sigma2: the noise variance on the scale of ``lam``, or None.

  Returns:
    ``(EVBMFResult, gamma)``, both with arrays of length P (zeros from L on).
  """
  dtype = lam.dtype
  big_l, big_m, alpha, xubar, e = _constants(big_l, big_m, dtype)
  index = jnp.arange(lam.shape[-1])
  total = jnp.sum(lam)
  nonzero = total > 0
  safe_total = jnp.where(nonzero, total, 1.0)
  g = big_l * lam / safe_total  # gamma_h^2 / (M sigma2_ub); mean == 1.
  ub = total / (big_l * big_m)  # sigma2_ub = ||Y||_F^2 / (L M)

  if sigma2 is None:
    tail = (index >= e) & (index < big_l)
    tail_mean = jnp.sum(jnp.where(tail, g, 0.0)) / (big_l - e)
    lb = jnp.maximum(g[e] / xubar, tail_mean)
    # Numerically low-rank matrices (tail ~ rounding noise) have lb ~ 0:
    # floor it at eps * sigma2_ub (any singular value that small is noise).
    lb = jnp.clip(lb, jnp.finfo(dtype).eps, 1.0)
    kw = dict(g=g, big_l=big_l, alpha=alpha, xubar=xubar)
    t = _minimize(functools.partial(_free_energy, **kw),
                  functools.partial(_free_energy_slope, **kw),
                  jnp.log(lb), jnp.zeros((), dtype))
    v = jnp.where(nonzero, jnp.exp(t), 0.0)  # sigma2 / sigma2_ub
    sigma2_out = ub * v
  else:
    sigma2_out = jnp.asarray(sigma2, dtype)
    v = jnp.where(nonzero, sigma2_out / jnp.where(nonzero, ub, 1.0), 0.0)

  # gamma_h > threshold  <=>  g_h > xubar * v.
  rank_mask = nonzero & (g > xubar * v) & (index < big_l)
  rank = jnp.sum(rank_mask, dtype=jnp.int32)
  threshold = jnp.sqrt(big_m * sigma2_out * xubar)
  gamma = jnp.sqrt(lam)
  # Shrinkage (Nakajima et al. 2013, Eq. 15) on the normalized scale: with
  # gamma^2 = M sigma2_ub g and sigma2 = sigma2_ub v, sigma2 / gamma^2 =
  # v / (M g).
  r = v / (big_m * jnp.where(rank_mask, g, 1.0))
  q = 1.0 - (big_l + big_m) * r
  disc = q * q - 4.0 * big_l * big_m * r * r
  factor = 0.5 * (q + jnp.sqrt(jnp.maximum(disc, 0.0)))
  shrunk = jnp.where(rank_mask, gamma * factor, 0.0)
  return EVBMFResult(rank, sigma2_out, threshold, shrunk), gamma


def _pow2(k, dtype):
  """``2.0 ** k`` in ``dtype`` (float32 / float64), exactly, from its bits.

  ``k`` is an integer array within the normal exponent range of ``dtype``
  (float32: [-126, 127]); no ``exp2`` rounding.
  """
  if jnp.dtype(dtype) == jnp.float64:
    bits = (k.astype(jnp.int64) + 1023) << 52
    return jax.lax.bitcast_convert_type(bits, jnp.float64)
  bits = (k.astype(jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _ldexp(x, k, *, flush=True):
  """``x * 2**k`` for an integer array ``k``, exact when representable.

  ``|k| / 4`` must lie in the normal exponent range of x's dtype (float32:
  |k| <= 500, ample for the ``2e`` of any float32 matrix).

  The power is applied as four factors of at most 2^|k/4|, each a normal
  number and all of one direction, so intermediates neither overflow nor
  underflow before the result does (a single factor 2^k can itself be
  unrepresentable; dividing by a scalar lets XLA multiply by its
  reciprocal, which for 1 / 3e38 is subnormal and flushed to 0 on CPU).
  A result above the dtype's largest finite value is ``inf``; with
  ``flush``, one below its smallest normal value is 0 on every backend
  (XLA's CPU backend flushes subnormals anyway).
  """
  k = jnp.asarray(k, jnp.int32)
  q = jax.lax.div(k, jnp.int32(4))  # truncates towards 0: same sign as k.
  p = _pow2(q, x.dtype)
  out = x * p * p * p * _pow2(k - 3 * q, x.dtype)
  if flush:
    out = jnp.where(jnp.abs(out) < jnp.finfo(x.dtype).tiny,
                    jnp.zeros_like(out), out)
  return out


def _check_matrix(y):
  """Static checks of evbmf's input (shape and dtype; traced input too)."""
  shape = jnp.shape(y)
  if len(shape) != 2:
    raise ValueError(f'evbmf expects a matrix, got shape {shape}')
  if 0 in shape:
    raise ValueError(f'evbmf expects a non-empty matrix, got shape {shape}')
  dtype = jnp.result_type(y)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(f'evbmf expects a real matrix, got dtype {dtype} '
                    f'(shape {shape}); pass e.g. the real part or abs '
                    'explicitly')
  return dtype


def _check_concrete_input(y, sigma2, dtype):
  """Host-side value checks of concrete (not traced) ``y`` and ``sigma2``."""
  if not isinstance(y, jax.core.Tracer):
    arr = np.asarray(jax.device_get(y))
    if arr.dtype.kind not in 'biu':
      arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32,
                       copy=False)
      bad = ~np.isfinite(arr)
      if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f'evbmf: y (shape {arr.shape}) has {int(bad.sum())} non-finite '
            f'(NaN or Inf) entries, the first at index {first} '
            f'(value {arr[first]}); EVBMF of such a matrix is meaningless')
  if sigma2 is not None and not isinstance(sigma2, jax.core.Tracer):
    compute = _compute_dtype(dtype)
    try:
      value = np.asarray(jax.device_get(sigma2), np.float64)
    except (TypeError, ValueError):  # strings, complex, ragged ...
      value = None
    ok = value is not None and value.ndim == 0
    if ok:
      with np.errstate(over='ignore', under='ignore'):
        cast = value.astype(compute)  # 1e300 / 1e-50 do not fit float32.
      ok = bool(np.isfinite(cast)) and bool(cast > 0)
    if not ok:
      raise ValueError(f'sigma2 must be a positive finite scalar (in '
                       f'{compute.name}), got {sigma2!r}')


def _prepare(y):
  """Casts, orients (L <= M) and scales by a power of two.

  Returns:
    ``(y * 2**-e, e, finite)``: ``e`` is the binary exponent of the largest
    absolute entry (``frexp``: the scaled peak lies in [0.5, 1); 0 for a zero
    matrix), so the scaling and the rescaling of the results are exact and no
    intermediate of the solve under- or overflows. A matrix with NaN / Inf
    entries is replaced by zeros (LAPACK never sees them) and ``finite`` is
    False.
  """
  _check_matrix(y)
  y = jnp.asarray(y)
  y = y.astype(_compute_dtype(y.dtype))
  if y.shape[0] > y.shape[1]:
    y = y.T
  finite = jnp.all(jnp.isfinite(y))
  y = jnp.where(finite, y, jnp.zeros_like(y))
  _, e = jnp.frexp(jnp.max(jnp.abs(y)))
  return _ldexp(y, -e, flush=False), e, finite


def _spectrum(y, method):
  """gamma^2 (L,) of the oriented matrix times ``2**-e``, ``e``, ``finite``.

  See :func:`_prepare` for ``e`` and ``finite``. ``'auto'`` takes the Gram
  route and, when the spectrum spans more than the
  Gram route resolves, recomputes it with the SVD: when
  ``gamma_1^2 / (M sigma2_lb) > _GRAM_RANGE / eps`` (sigma2_lb <= sigma2, so
  this errs towards the SVD). Inside ``lax.map`` (as in :func:`vbmf_ranks`)
  the SVD runs only for such matrices; under ``vmap`` both branches run.
  """
  y, e, finite = _prepare(y)
  if method != 'auto':
    return _squared_singular_values(y, method), e, finite
  lam = _squared_singular_values(y, 'gram')
  big_l, big_m = y.shape
  _, _, _, xubar, e_lb = _constants(big_l, big_m, lam.dtype)
  tail = jnp.where(jnp.arange(big_l) >= e_lb, lam, 0.0)
  lb_times_m = jnp.maximum(lam[e_lb] / xubar, jnp.sum(tail) / (big_l - e_lb))
  limit = _GRAM_RANGE / jnp.finfo(lam.dtype).eps
  unsure = ~(lam[0] <= limit * lb_times_m)  # NaN (LAPACK failure) too.
  lam = jax.lax.cond(unsure, lambda: _squared_singular_values(y, 'svd'),
                     lambda: lam)
  return lam, e, finite


def _evbmf_matrix(y, sigma2, method):
  """evbmf plus the singular values (for reports); see :func:`evbmf`."""
  lam, e, finite = _spectrum(y, method)
  dtype = lam.dtype
  big_l, big_m = min(jnp.shape(y)), max(jnp.shape(y))
  if sigma2 is None:
    res, gamma = _evbmf_sq(lam, big_l, big_m)
    valid = finite
    sigma2_out = _ldexp(res.sigma2, 2 * e)
    threshold = _ldexp(res.threshold, e)
  else:
    given = jnp.asarray(sigma2, dtype)
    valid = finite & (given > 0) & jnp.isfinite(given)
    # On the scale of the normalized matrix (0 or inf where that saturates:
    # the limits "all nonzero singular values are signal" / "none is").
    res, gamma = _evbmf_sq(lam, big_l, big_m, _ldexp(given, -2 * e))
    sigma2_out = given
    xubar = _constants(big_l, big_m, dtype)[3]
    threshold = jnp.sqrt(given) * jnp.sqrt(big_m * xubar)
  nan = jnp.asarray(jnp.nan, dtype)
  res = EVBMFResult(jnp.where(valid, res.rank, -1),
                    jnp.where(valid, sigma2_out, nan),
                    jnp.where(valid, threshold, nan),
                    jnp.where(valid, _ldexp(res.shrunk, e), nan))
  return res, jnp.where(valid, _ldexp(gamma, e), nan)


def evbmf(y: jax.Array, *, sigma2: Optional[Any] = None,
          method: str = 'auto') -> EVBMFResult:
  """Empirical VBMF of one matrix: rank, noise variance, shrunk spectrum.

  Tall inputs are transposed (L <= M after). When ``sigma2`` is None it is
  estimated by minimizing the free energy over [sigma2_lb, sigma2_ub] in log
  space on a rescaled problem. The input is first multiplied by the power of
  two ``2**-e`` that brings its largest absolute entry into [0.5, 1), and
  sigma2, the threshold and the shrunk values are multiplied back by
  ``2**(2e)``, ``2**e`` and ``2**e`` (exactly, in steps that cannot
  overflow early). So the rank does not depend on the scale of ``y``
  (``rank(c * y) == rank(y)`` for every c > 0 that leaves ``c * y`` finite
  and normal, float32 and float64, up to rounding) and nothing under- or
  overflows inside the solve.

  What cannot be represented: sigma2 scales with ``c**2``, so for extreme
  scales it may lie outside the dtype's normal range even though ``y`` is
  fine (float32: ``y ~ 1e-20`` gives sigma2 ~ 1e-40, ``max|y| ~ 1e38`` gives
  sigma2 ~ 1e74). A result field (``sigma2``, ``threshold``, ``shrunk``)
  above the dtype's largest finite value is returned as ``inf``, one below
  its smallest normal value (float32: 1.2e-38) as 0, on every backend; the
  rank is unaffected. :func:`vbmf_ranks` reports sigma2 and the threshold as
  Python floats rescaled in float64 on the host, which covers every float32
  input.

  Invalid input raises:

  * ``ValueError``: not a matrix; an empty matrix (0 x N or N x 0, the
    message names the shape); NaN / Inf entries (message with count and
    first index); ``sigma2`` not a positive finite scalar; unknown method.
  * ``TypeError``: a complex matrix.

  The value checks (NaN / Inf in ``y``, the sign of ``sigma2``) need
  concrete arrays: they run on the host when ``y`` / ``sigma2`` are not
  traced. Under ``jax.jit`` / ``vmap`` they are impossible; there a
  non-finite ``y``, or a traced ``sigma2`` that is not positive and finite,
  gives ``rank == -1`` and NaN ``sigma2``, ``threshold`` and ``shrunk``
  (never a plausible-looking rank 0), and LAPACK never sees the NaNs.

  Degenerate (finite) inputs give no NaN: an all-zero matrix gives rank 0,
  sigma2 0, threshold 0; a 1 x n (or n x 1) matrix gives rank 0 (sigma2_lb ==
  sigma2_ub == ||y||^2 / n and the threshold is above the only singular
  value); an exactly low-rank matrix (e.g. constant, rank 1) gives its rank
  as long as that rank is at most ``ceil(L / (1 + L/M)) - 1`` (the estimate
  sits at the lower bound ``max(sigma2_lb, eps * sigma2_ub)``); a 2 x 2
  matrix always gives rank 0. Subnormal input entries count as 0 (XLA's CPU
  backend flushes them).

  Jittable and vmappable (``jax.vmap(evbmf)(stack)``); ``sigma2`` may be a
  traced scalar.

  Args:
    y: (L, M) real matrix, any float dtype (half precision runs in float32).
    sigma2: the noise variance if known (then it is not estimated); a
      positive finite scalar.
    method: ``'auto'`` (the default: the Gram route, redone with the SVD
      for a matrix whose spectrum spans more than float32 Gram products
      resolve), ``'gram'`` (eigenvalues of the L x L Gram matrix ``Y Y^T``)
      or ``'svd'`` (singular values of ``y``); ``python bench/bench_vbmf.py
      --svd`` times them on ResNet-50 unfoldings.

  Returns:
    :class:`EVBMFResult` with ``shrunk`` of shape (min(L, M),).

  Raises:
    ValueError, TypeError: see above.

  References:
    Nakajima, Sugiyama, Babacan, Tomioka, Global Analytic Solution of
    Fully-observed Variational Bayesian Matrix Factorization, JMLR 14, 2013.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  dtype = _check_matrix(y)
  _check_concrete_input(y, sigma2, dtype)
  return _evbmf_matrix(y, sigma2, method)[0]


def _check_weaken(weaken) -> float:
  try:
    w = float(weaken)
  except (TypeError, ValueError):
    raise ValueError(f'weaken must be a number in [0, 1], got {weaken!r}'
                     ) from None
  if not 0.0 <= w <= 1.0:
    raise ValueError(f'weaken must be in [0, 1] (1 = plain EVBMF, 0 = keep '
                     f'the current rank), got {weaken!r}')
  return w


def _check_min_rank(value, where='min_rank') -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{where} must be a positive int, got {value!r}')
  if value <= 0:
    raise ValueError(f'{where} must be a positive int, got {value!r}')
  return int(value)


def weakened_rank(rank: int, vbmf_rank: int, *, weaken: float,
                  min_rank: int) -> int:
  """MUSCO's weakened VBMF rank of one mode.

  ``max(floor(R - w * (R - R_vbmf)), min_rank)``, clamped to at most R. An
  EVBMF rank of 0 (EVBMF found no signal) keeps R. The floor is taken with a
  1e-9 slack so that products like ``0.8 * 5`` that should be integers do not
  drop by one through rounding.

  Args:
    rank: R, the current size of the mode (>= 1).
    vbmf_rank: R_vbmf, the EVBMF rank of the mode (>= 0).
    weaken: w in [0, 1]: 1 gives the EVBMF rank, 0 keeps R.
    min_rank: the smallest rank allowed (>= 1; clamped to R).

  Returns:
    The new rank, an int in [min(min_rank, R), R].

  Raises:
    ValueError: weaken outside [0, 1], min_rank <= 0, rank < 1 or
      vbmf_rank < 0.

  References:
    Gusak et al., Automated Multi-Stage Compression of Neural Networks,
    ICCV Workshops 2019.
  """
  w = _check_weaken(weaken)
  min_rank = _check_min_rank(min_rank)
  rank, vbmf_rank = int(rank), int(vbmf_rank)
  if rank < 1:
    raise ValueError(f'rank must be >= 1, got {rank}')
  if vbmf_rank < 0:
    raise ValueError(f'vbmf_rank must be >= 0, got {vbmf_rank}')
  if vbmf_rank == 0:
    return rank
  new = math.floor(rank - w * (rank - vbmf_rank) + 1e-9)
  return min(max(new, min_rank), rank)


# --------------------------------------------------------------------------
# Whole networks.


class _Layer(NamedTuple):
  """Host-side plan of one layer (all static)."""
  path: str
  form: str
  source: str           # 'core' (tucker2), 'kernel' (dense), 'svd_core'
                        # (svd) or 'to_kernel'.
  shape: tuple          # shape of the kernel / core the matrices come from.
  modes: tuple          # ('in', 'out') or ('mat',).
  current: tuple        # R of each mode.
  matrices: tuple       # (rows, cols) of each mode's matrix, paper layout.
  dtype: Any


def _plan_layer(path: str, variables: Mapping) -> _Layer:
  form = forms.identify(variables.keys())
  if form == 'tucker2':
    source, shape = 'core', tuple(variables['core'].shape)
    dtype = variables['core'].dtype
  elif form == 'dense':
    source, shape = 'kernel', tuple(variables['kernel'].shape)
    dtype = variables['kernel'].dtype
  elif form == 'svd':
    # The R x R core of u @ v (see _svd_core): its singular values are the
    # product's nonzero ones, without the round-off of its null space, which
    # EVBMF would otherwise read as signal against a tiny noise floor.
    rank = variables['v'].shape[0]
    source, shape, dtype = 'svd_core', (rank, rank), variables['v'].dtype
  else:
    kernel = jax.eval_shape(
        forms.to_kernel, {k: v for k, v in variables.items() if k != 'bias'})
    source, shape, dtype = 'to_kernel', tuple(kernel.shape), kernel.dtype
  if len(shape) == 4 and (shape[0] * shape[1] > 1 or form == 'tucker2'):
    kh, kw, c_in, c_out = shape
    modes = ('in', 'out')
    current = (c_in, c_out)
    matrices = ((c_in, kh * kw * c_out), (c_out, kh * kw * c_in))
  elif len(shape) in (2, 4):
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
  return _Layer(path, form, source, shape, modes, current, matrices,
                jnp.dtype(dtype))


def _default_min_rank(layer: _Layer) -> int:
  shape = layer.shape
  if len(shape) == 4 and shape[0] * shape[1] == 1:
    return DEFAULT_MIN_RANK_1X1
  return DEFAULT_MIN_RANK_KXK


def _min_ranks(chosen: Sequence[_Layer], all_paths: Sequence[str],
               min_rank: MinRank) -> dict[str, int]:
  """The minimum rank of each chosen layer (before clamping to R)."""
  if min_rank is None:
    return {l.path: _default_min_rank(l) for l in chosen}
  if isinstance(min_rank, Mapping):
    rules = [(str(k), _check_min_rank(v, f'min_rank[{k!r}]'))
             for k, v in min_rank.items()]
    for pattern, _ in rules:
      if not any(re.fullmatch(pattern, p) for p in all_paths):
        raise ValueError(f'min_rank rule {pattern!r} matches no layer path; '
                         f'paths: {list(all_paths)[:8]}')
    out = {}
    for l in chosen:
      out[l.path] = next((v for pattern, v in rules
                          if re.fullmatch(pattern, l.path)),
                         _default_min_rank(l))
    return out
  value = _check_min_rank(min_rank)
  return {l.path: value for l in chosen}


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


@functools.partial(jax.jit, static_argnames=('kinds', 'groups', 'method',
                                             'lapack'))
def _network_evbmf(sources, kinds, groups, method, lapack=False):
  """EVBMF of all matrices of a network, grouped by shape, in one program.

  The static arguments hold no layer paths, so networks with the same shapes
  and forms share one compiled program.

  Args:
    sources: per layer, the kernel / core array or the variables to collapse.
    kinds: per layer ``(source, modes, compute dtype name)``.
    groups: tuple of ``((L, M, dtype), ((layer index, mode index), ...))``.
    method: 'auto', 'gram' or 'svd'.
    lapack: whether :func:`use_lapack_eigenvalues` was on (read at trace
      time; a static argument so that each setting has its own program).

  Returns:
    ``{dtype: (rank (N,), sigma2 (N,), threshold (N,), gamma (N, P),
    e (N,))}`` for the N matrices of that dtype in group order, gamma
    zero-padded to P. sigma2 and the threshold are those of the matrix
    times ``2**-e`` (multiply by ``2**(2e)`` and ``2**e``); gamma is
    rescaled. A matrix with NaN / Inf entries has rank -1 and NaN gamma.
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
  # Spectra per shape group (static shapes), then ONE vmapped EVBMF solve
  # for all matrices: spectra zero-padded to the longest, true L and M
  # passed as data (zero padding adds nothing to any sum of the free energy).
  lams, exps, finites, sizes = {}, {}, {}, {}
  for (big_l, big_m, dtype), members in groups:
    stack = jnp.stack([
        _matrix(kernels[i], kinds[i][1][m]) for i, m in members])
    # lax.map, not vmap: jaxlib 0.10.2's batched CPU eigh fans its batch out
    # into XLA's intra-op thread pool and blocks the worker until it is
    # done; two such calls at once (independent groups) wedged a 2-thread
    # pool for good. One matrix per call runs inline.
    lam, e, finite = jax.lax.map(
        functools.partial(_spectrum, method=method), stack)
    lams.setdefault(dtype, []).append(lam)
    exps.setdefault(dtype, []).append(e)
    finites.setdefault(dtype, []).append(finite)
    sizes.setdefault(dtype, []).extend([(big_l, big_m)] * len(members))
  out = {}
  for dtype, parts in lams.items():
    width = max(p.shape[1] for p in parts)
    lam = jnp.concatenate([jnp.pad(p, ((0, 0), (0, width - p.shape[1])))
                           for p in parts])
    e = jnp.concatenate(exps[dtype])
    finite = jnp.concatenate(finites[dtype])
    big_l, big_m = (jnp.asarray(a, dtype) for a in zip(*sizes[dtype]))

    def solve(lam, big_l, big_m, e, finite):
      res, gamma = _evbmf_sq(lam, big_l, big_m)
      # sigma2 and the threshold stay normalized (the host rescales them in
      # float64, see vbmf_ranks); rank -1 marks a non-finite matrix.
      return (jnp.where(finite, res.rank, -1), res.sigma2, res.threshold,
              jnp.where(finite, _ldexp(gamma, e), jnp.nan), e)

    out[dtype] = jax.vmap(solve)(lam, big_l, big_m, e, finite)
  return out


def _host_ldexp(x: float, k: int) -> float:
  """``x * 2**k`` as a Python float (float64); inf where that overflows."""
  try:
    return math.ldexp(x, k)
  except OverflowError:
    return math.copysign(math.inf, x)


def vbmf_ranks(params: Mapping, *, select=None, weaken: float = 1.0,
               min_rank: MinRank = None, report: bool = False,
               method: str = 'auto'):
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
  it per set of shapes and forms): matrices are grouped by their (L, M) shape
  and each group is one ``vmap``-ed EVBMF. Grouping was chosen over padding to
  a common size because a network's shapes differ by up to 16x per side
  (ResNet-50: 3 x 3136 to 1024 x 2048); padding all 70 ResNet-50 matrices to
  1024 x 4608 would multiply the Gram / SVD work by about 20 (measured in
  docs/benchmarks_vbmf.md), while grouping compiles 15 small vmapped bodies
  into the same single program.

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
  bare, _ = tree.split_variables(params)
  all_layers = tree.layers(bare)
  paths = tree.select_paths(all_layers.keys(), select)
  if select is None:   # 1-D / 3-D convs have no ranks to estimate
    paths = [p for p in paths if tree.kernel_kind(all_layers[p]) != 'other']
  for path in paths:
    tree.check_finite(path, all_layers[path])
  plan = tuple(_plan_layer(p, all_layers[p]) for p in paths)
  minimum = _min_ranks(plan, list(all_layers), min_rank)
  if not plan:
    return ({}, {}) if report else {}

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
  out = jax.device_get(_network_evbmf(tuple(sources), kinds, groups, method,
                                      lapack=_LAPACK['on']))

  per_mode, row = {}, {}
  for (big_l, _, dtype), members in groups:
    rank, sigma2, thr, gamma, e = out[dtype]
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
  return (ranks, details) if report else ranks


__all__ = ['EVBMFResult', 'evbmf', 'vbmf_ranks', 'weakened_rank']
