"""Linear-algebra backend of EVBMF: spectra, the LAPACK path, exact scaling.

* :func:`_squared_singular_values`: gamma_h^2 of a matrix by the Gram route
  (eigenvalues of ``Y Y^T``) or the SVD (the ``method`` of :func:`evbmf`).
* :func:`_gram_eigenvalues`: eigenvalues of a Gram matrix without
  eigenvectors: on CPU jaxlib's LAPACK ``?syevd`` in mode 'N' where its
  self-check passes, else (other backends, or after
  ``use_lapack_eigenvalues(False)``) its singular values (``?gesdd``,
  jobz='N' on CPU); the one switch is ``_LAPACK``, read while tracing.
* :func:`_pow2`, :func:`_ldexp`, :func:`_host_ldexp`: exact scaling by powers
  of two (device and host), so that the solve neither under- nor overflows.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('auto', 'gram', 'svd')


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



# Whether the CPU eigenvalue-only LAPACK call is wanted (the default; it is
# used only where its self-check passes): see use_lapack_eigenvalues.
_LAPACK = {'on': True}


def use_lapack_eigenvalues(enabled: bool = True) -> bool:
  """Turns jaxlib's CPU LAPACK eigenvalue-only call on (default) or off.

  LAPACK ``?syevd`` in mode 'N' computes eigenvalues only, faster than the
  singular values of the Gram matrix (``?gesdd``, jobz='N', the only
  eigenvalue-only route jax's public API offers on CPU); the warm rows of
  docs/benchmarks_vbmf.md time both on the ResNet-50 matrices of
  bench/bench_vbmf.py. The call goes through a target that is
  private to jaxlib (``jax._src.lib.lapack``), so it is used only after a
  self-check on a matrix with known eigenvalues (run once, at the first
  trace that needs it); a jaxlib that changed it gets the SVD instead.
  Other backends always use the SVD. Functions already compiled are not
  affected.

  Args:
    enabled: use the LAPACK call where it passes its self-check (True) or
      never (False).

  Returns:
    Whether the LAPACK call is now in use.
  """
  _LAPACK['on'] = bool(enabled)
  return _LAPACK['on'] and _lapack_syevd_target('float32') is not None


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
      # Optimization level 0: the check compiles in ~0.03 s.
      got = jax.jit(functools.partial(_syevd_values_call, target),
                    compiler_options={'xla_backend_optimization_level': 0}
                    )(probe)
      got = np.asarray(jax.device_get(got))
    if np.allclose(got, [1., 2., 4.], rtol=1e-5):
      return target
  except Exception:  # pylint: disable=broad-except
    pass
  return None


def _gram_eigenvalues(gram: jax.Array) -> jax.Array:
  """Eigenvalues of a symmetric PSD (Gram) matrix, largest first, no vectors.

  On CPU, jaxlib's own ``?syevd`` FFI target in mode 'N' (eigenvalues
  only), after a self-check (:func:`_lapack_syevd_target`) and unless
  ``use_lapack_eigenvalues(False)``. Otherwise its singular values,
  ``jax.lax.linalg.svd(compute_uv=False)`` (LAPACK ``?gesdd`` with jobz='N'
  on CPU): for a positive semidefinite matrix they are the eigenvalues (a
  rounding-level negative eigenvalue comes out as its absolute value, below
  the Gram route's cut either way). ``jnp.linalg.eigvalsh`` runs ``?syevd``
  *with* eigenvectors on CPU (its eigenvalue-only mode is not exposed): on
  the ResNet-50 matrices of bench/bench_vbmf.py the spectra program ran 10%
  faster with the SVD (jax 0.10.2, 2 shared cores). A LAPACK failure gives
  NaN.
  """
  def fallback(g):
    return jax.lax.linalg.svd(g, full_matrices=False, compute_uv=False)

  target = _lapack_syevd_target(gram.dtype.name) if _LAPACK['on'] else None
  if target is None or gram.ndim != 2:
    return fallback(gram)
  return jax.lax.platform_dependent(
      gram, cpu=lambda g: _syevd_values_call(target, g)[::-1],
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
    lam = _gram_eigenvalues(gram)
    # Eigenvalues below L * eps * lambda_max are rounding noise of the Gram
    # route (numerically zero singular values come out ~sqrt(eps) gamma_1).
    tol = y.shape[0] * jnp.finfo(lam.dtype).eps * lam[0]
    return jnp.where(lam > tol, lam, 0.0)
  if method == 'svd':
    s = jnp.linalg.svd(y, compute_uv=False)
    return s * s
  raise ValueError(f'method must be one of {METHODS}, got {method!r}')


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



def _host_ldexp(x: float, k: int) -> float:
  """``x * 2**k`` as a Python float (float64); inf where that overflows."""
  try:
    return math.ldexp(x, k)
  except OverflowError:
    return math.copysign(math.inf, x)
