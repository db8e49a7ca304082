"""Empirical VBMF of one matrix: :func:`evbmf` and its solver.

:func:`evbmf` is the global analytic solution of empirical variational
Bayesian matrix factorization (EVBMF) of one L x M matrix: it estimates the
noise variance sigma^2 and keeps the singular values above the EVB threshold.
It is pure ``jnp``, jittable and vmappable. :func:`_evbmf_sq` (from squared
singular values) and :func:`_spectrum` are shared with
:func:`lowrank_jax.vbmf.vbmf_ranks`.

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
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.lapack_threads import limits_threads
from lowrank_jax.vbmf.linalg import (_compute_dtype, _ldexp,
                                     _squared_singular_values, METHODS)

# Constants of the EVB threshold (Nakajima et al. 2013, Theorem 3 and Eq. 34).
_TAU_COEF = 2.5129
# Minimizer of the free energy over t = log(sigma^2 / sigma^2_ub): a grid,
# then bisection on the sign of dOmega/dt in the bracket of the best point.
_GRID = 128
_BISECT_STEPS = 40
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
    arr = np.asarray(y)
    if arr.dtype.kind not in 'biu':
      arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32,
                       copy=False)
      if not np.isfinite(arr).all():  # details only for a bad matrix
        bad = ~np.isfinite(arr)
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
  this errs towards the SVD). Under ``jit`` the SVD runs only for such
  matrices; under ``vmap`` both branches run. (:func:`vbmf_ranks` applies
  the same test, :func:`_gram_unsure`, and redoes such matrices in a second
  program.)
  """
  y, e, finite = _prepare(y)
  if method != 'auto':
    return _squared_singular_values(y, method), e, finite
  lam = _squared_singular_values(y, 'gram')
  unsure = _gram_unsure(lam, *y.shape)
  lam = jax.lax.cond(unsure, lambda: _squared_singular_values(y, 'svd'),
                     lambda: lam)
  return lam, e, finite


def _gram_unsure(lam, big_l, big_m):
  """Whether a Gram-route spectrum spans more than float Gram products
  resolve: ``gamma_1^2 / (M sigma2_lb) > _GRAM_RANGE / eps``.

  ``lam`` (P,) is gamma^2, largest first, zero from L on (P >= L); L and M
  may be traced. sigma2_lb <= sigma2, so this errs towards the SVD. True
  for NaN (a LAPACK failure) too.
  """
  _, _, _, xubar, e_lb = _constants(big_l, big_m, lam.dtype)
  index = jnp.arange(lam.shape[-1])
  tail = jnp.where((index >= e_lb) & (index < big_l), lam, 0.0)
  lb_times_m = jnp.maximum(lam[e_lb] / xubar,
                           jnp.sum(tail) / (big_l - e_lb.astype(lam.dtype)))
  limit = _GRAM_RANGE / jnp.finfo(lam.dtype).eps
  return ~(lam[0] <= limit * lb_times_m)


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
  if isinstance(y, jax.core.Tracer) or isinstance(sigma2, jax.core.Tracer):
    return _evbmf_matrix(y, sigma2, method)[0]
  # Called eagerly (a notebook): run one compiled program, cached per shape,
  # dtype and method, instead of re-tracing its cond / scan on every call.
  # NumPy / Python input goes straight to jit's C++ dispatch (one transfer
  # there; a jnp.asarray first cost a second dispatch, ~30 us of 0.5 ms).
  return _run_compiled(y, sigma2, method)


# The host BLAS is held at lapack_threads' limit until the result is ready:
# next to a training run the BLAS as it is made these calls many times
# slower (docs/benchmarks_lapack_threads.md, workload evbmf).
@limits_threads
def _run_compiled(y, sigma2, method):
  if sigma2 is None:
    return _EVBMF_COMPILED[method](y)
  return _EVBMF_COMPILED_SIGMA2[method](y, sigma2)


# One jitted function per method (no static argument to hash per call) and
# per sigma2 given / estimated (no None leaf to flatten).
_EVBMF_COMPILED = {
    m: jax.jit(lambda y, m=m: _evbmf_matrix(y, None, m)[0]) for m in METHODS}
_EVBMF_COMPILED_SIGMA2 = {
    m: jax.jit(lambda y, s, m=m: _evbmf_matrix(y, s, m)[0]) for m in METHODS}
