"""EVBMF against an independent NumPy/SciPy port of Nakajima's EVBMF.m.

The reference below follows the MATLAB routine of the VBMF package: transpose
tall inputs, full SVD, sigma^2 bounds, rescaling by 1 / sigma2_lb, and a
bounded scalar search (``fminbnd`` there, SciPy's bounded Brent here, with
fminbnd's default TolX = 1e-4) of the original free energy. It shares no code
with :mod:`lowrank_jax.vbmf` (which works in log sigma^2, drops constants and
searches globally).
"""

import copy
import functools
import importlib
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lowrank_jax import tree
from lowrank_jax import vbmf
from lowrank_jax.forms import svd as svd_form
from lowrank_jax.forms import tucker2
from lowrank_jax.vbmf import batched
from lowrank_jax.vbmf import host_spectra
from lowrank_jax.vbmf import network
from lowrank_jax.vbmf import solver
from lowrank_jax.vbmf import spectra as spectra_program
from lowrank_jax.models import get_model


# ---------------------------------------------------------------------------
# The reference (EVBMF.m, Nakajima et al. JMLR 2013).


def _tau(x, alpha):
  return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2, big_l, big_m, s, residual, xubar):
  """EVBsigma2 of EVBMF.m: the free energy as a function of sigma^2."""
  h = len(s)
  alpha = big_l / big_m
  x = s ** 2 / (big_m * sigma2)
  z1 = x[x > xubar]
  z2 = x[x <= xubar]
  tau_z1 = _tau(z1, alpha)
  return (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1)
          + np.sum(np.log((tau_z1 + 1) / z1))
          + alpha * np.sum(np.log(tau_z1 / alpha + 1))
          + residual / (big_m * sigma2) + (big_l - h) * np.log(sigma2))


def reference_evbmf(y, sigma2=None, xatol=1e-4):
  """EVBMF of one matrix in float64 NumPy/SciPy.

  Returns:
    ``(rank, sigma2, threshold, shrunk (L,), singular values (L,))``.
  """
  y = np.asarray(y, np.float64)
  if y.shape[0] > y.shape[1]:
    y = y.T
  big_l, big_m = y.shape
  h = big_l
  alpha = big_l / big_m
  tauubar = 2.5129 * math.sqrt(alpha)
  xubar = (1 + tauubar) * (1 + alpha / tauubar)
  s = np.linalg.svd(y, compute_uv=False)
  residual = 0.0  # H == L
  if sigma2 is None:
    e = int(min(math.ceil(big_l / (1 + alpha)) - 1, h))  # eH_ub, 1-based
    upper = (np.sum(s ** 2) + residual) / (big_l * big_m)
    lower = max(s[e] ** 2 / (big_m * xubar), np.mean(s[e:] ** 2) / big_m)
    scale = 1.0 / lower
    opt = minimize_scalar(
        _free_energy, bounds=(lower * scale, upper * scale), method='bounded',
        args=(big_l, big_m, s * math.sqrt(scale), residual * scale, xubar),
        options={'xatol': xatol})
    sigma2 = opt.x / scale
  threshold = math.sqrt(big_m * sigma2 * xubar)
  rank = int(np.sum(s > threshold))
  shrunk = np.zeros(big_l)
  sr = s[:rank]
  q = 1 - (big_l + big_m) * sigma2 / sr ** 2
  shrunk[:rank] = sr / 2 * (q + np.sqrt(
      q ** 2 - 4 * big_l * big_m * sigma2 ** 2 / sr ** 4))
  return rank, sigma2, threshold, shrunk, s


def assert_same_minimum(y, sigma2_a, sigma2_b, rtol=1e-5):
  """Both sigma2 minimize the free energy of ``y`` equally well: Omega
  (float64, exact spectrum) at the two agrees to ``rtol``.

  The free energy can be flat at its minimum, so two float32 solves whose
  spectra differ by rounding (another LAPACK path, padding, alignment) can
  stop 1e-3 apart in sigma2 at the same Omega to float32 resolution: for a
  40 x 120 matrix with signal 1e3 x the noise edge, sigma2 1.01373 and
  1.01404 differ in Omega by 5.8e-5 (of 72.7).
  """
  y = np.asarray(y, np.float64)
  if y.shape[0] > y.shape[1]:
    y = y.T
  big_l, big_m = y.shape
  alpha = big_l / big_m
  tauubar = 2.5129 * math.sqrt(alpha)
  xubar = (1 + tauubar) * (1 + alpha / tauubar)
  s = np.linalg.svd(y, compute_uv=False)
  omega_a, omega_b = (_free_energy(float(v), big_l, big_m, s, 0.0, xubar)
                      for v in (sigma2_a, sigma2_b))
  assert abs(omega_a - omega_b) <= rtol * abs(omega_b), (sigma2_a, sigma2_b,
                                                         omega_a, omega_b)


# ---------------------------------------------------------------------------
# Planted matrices.


def planted(shape, rank, *, seed=0, noise=1.0, strength=(3.0, 8.0)):
  """``U diag(s) V^T + noise`` with s evenly in ``strength`` x the noise edge.

  The noise edge ``noise * (sqrt(L) + sqrt(M))`` is the largest singular
  value of the noise alone, so a planted rank well below
  ``L / (1 + L/M)`` is what EVBMF should find.
  """
  rng = np.random.default_rng(seed)
  rows, cols = shape
  edge = noise * (math.sqrt(rows) + math.sqrt(cols))
  u, _ = np.linalg.qr(rng.standard_normal((rows, max(rank, 1))))
  v, _ = np.linalg.qr(rng.standard_normal((cols, max(rank, 1))))
  s = edge * np.linspace(strength[1], strength[0], max(rank, 1))
  signal = (u[:, :rank] * s[:rank]) @ v[:, :rank].T
  return signal + noise * rng.standard_normal(shape)


_jit_evbmf = jax.jit(vbmf.evbmf, static_argnames='method')
_jit_vmap_evbmf = jax.jit(jax.vmap(vbmf.evbmf))
_jit_evbmf_sigma2 = jax.jit(lambda y, s: vbmf.evbmf(y, sigma2=s))
# evbmf and the singular values, one compiled program per shape (called
# eagerly, its hundreds of small ops each compile: 30 s of a test).
_jit_evbmf_matrix = jax.jit(lambda y, method: vbmf._evbmf_matrix(
    y, None, method), static_argnames='method')

REF_CASES = [  # (shape, planted rank)
    ((5, 7), 1), ((7, 5), 1), ((20, 20), 4), ((40, 100), 8), ((100, 40), 8),
    ((64, 256), 10), ((150, 60), 12)]
SCALES = (1e-4, 1.0, 1e3)


@pytest.mark.parametrize('shape,rank', REF_CASES)
def test_matches_reference(shape, rank):
  y = planted(shape, rank, seed=sum(shape))
  refs = [reference_evbmf(c * y) for c in SCALES]
  assert all(r[0] == rank for r in refs)
  with jax.enable_x64(True):
    stack = jnp.asarray(np.stack([c * y for c in SCALES]), jnp.float64)
    res64 = jax.device_get(_jit_vmap_evbmf(stack))
  res32 = jax.device_get(
      _jit_vmap_evbmf(jnp.asarray(np.stack([c * y for c in SCALES]),
                                  jnp.float32)))
  for i, (r_rank, r_sigma2, r_thr, r_shrunk, _) in enumerate(refs):
    for res, tol in ((res64, 2e-4), (res32, 1e-3)):
      assert int(res.rank[i]) == r_rank
      np.testing.assert_allclose(res.sigma2[i], r_sigma2, rtol=1e-2)
      np.testing.assert_allclose(res.sigma2[i], r_sigma2, rtol=tol)
      np.testing.assert_allclose(res.threshold[i], r_thr, rtol=tol)
      # Shrinkage amplifies the sigma^2 difference on tiny matrices.
      np.testing.assert_allclose(res.shrunk[i], r_shrunk, rtol=1e-2,
                                 atol=1e-2 * r_shrunk.max())


@pytest.mark.parametrize('shape', [(30, 80), (80, 30)])
def test_svd_method_matches_gram_and_reference(shape):
  y = planted(shape, 6, seed=3)
  r_rank, r_sigma2, _, _, r_s = reference_evbmf(y)
  with jax.enable_x64(True):
    for method in vbmf.METHODS:
      res = _jit_evbmf(jnp.asarray(y), method=method)
      assert int(res.rank) == r_rank == 6
      np.testing.assert_allclose(res.sigma2, r_sigma2, rtol=2e-4)
      _, gamma = _jit_evbmf_matrix(jnp.asarray(y), method=method)
      np.testing.assert_allclose(gamma, r_s, rtol=1e-6, atol=1e-9 * r_s[0])


def test_given_sigma2_matches_reference():
  y = planted((30, 50), 5, seed=4)
  for sigma2 in (0.5, 1.0, 4.0):
    r_rank, _, r_thr, r_shrunk, _ = reference_evbmf(y, sigma2=sigma2)
    res = vbmf.evbmf(jnp.asarray(y, jnp.float32), sigma2=sigma2)
    assert int(res.rank) == r_rank
    np.testing.assert_allclose(res.sigma2, sigma2, rtol=1e-6)
    np.testing.assert_allclose(res.threshold, r_thr, rtol=1e-5)
    np.testing.assert_allclose(res.shrunk, r_shrunk, rtol=1e-3,
                               atol=1e-3 * r_shrunk.max())


@pytest.mark.parametrize('shape', [(64, 256), (256, 64)])
def test_recovers_planted_rank(shape):
  y = planted(shape, 10, seed=5, noise=0.01)
  res = _jit_evbmf(jnp.asarray(y, jnp.float32))
  assert int(res.rank) == 10
  np.testing.assert_allclose(res.sigma2, 1e-4, rtol=0.1)  # noise variance
  shrunk = np.asarray(res.shrunk)
  assert shrunk.shape == (64,)
  assert np.all(shrunk[:10] > 0) and np.all(shrunk[10:] == 0)


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_scale_invariance(dtype):
  y = planted((48, 120), 7, seed=6)
  scales = np.array([1e-6, 1e-3, 1.0, 1e3, 1e6])
  with jax.enable_x64(dtype == 'float64'):
    stack = jnp.asarray(scales[:, None, None] * y, dtype)
    res = jax.device_get(_jit_vmap_evbmf(stack))
  assert res.sigma2.dtype == np.dtype(dtype)
  assert np.all(res.rank == 7)
  tol = 1e-4 if dtype == 'float32' else 1e-9
  np.testing.assert_allclose(res.sigma2 / scales ** 2, res.sigma2[2],
                             rtol=tol)
  np.testing.assert_allclose(res.threshold / scales, res.threshold[2],
                             rtol=tol)
  assert np.all(np.isfinite(res.shrunk))


def test_transpose_jit_vmap_and_eager_agree():
  y = jnp.asarray(planted((24, 60), 4, seed=7), jnp.float32)
  eager = vbmf.evbmf(y)
  jitted = _jit_evbmf(y)
  transposed = _jit_evbmf(y.T)
  batched = _jit_vmap_evbmf(jnp.stack([y, y]))
  assert int(eager.rank) == 4
  for res in (jitted, transposed):
    assert int(res.rank) == int(eager.rank)
    for a, b in zip(res[1:], eager[1:]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for i in range(2):
    assert int(batched.rank[i]) == int(eager.rank)
    for a, b in zip(batched[1:], eager[1:]):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name,y,rank', [
    ('zero', np.zeros((5, 7)), 0),
    ('constant', np.full((5, 7), 3.0), 1),
    ('rank1', np.outer(np.arange(1.0, 9.0), np.arange(1.0, 21.0)), 1),
    ('row', np.arange(1.0, 8.0)[None], 0),
    ('column', np.arange(1.0, 8.0)[:, None], 0),
    ('two_by_two', np.array([[1.0, 2.0], [3.0, 5.0]]), 0),
])
def test_degenerate_inputs_have_no_nan(name, y, rank):
  res = vbmf.evbmf(jnp.asarray(y, jnp.float32))
  for field in res:
    assert np.all(np.isfinite(np.asarray(field))), (name, res)
  assert int(res.rank) == rank, name
  assert res.shrunk.shape == (min(y.shape),)
  if name == 'zero':
    assert float(res.sigma2) == 0.0 and float(res.threshold) == 0.0
  if rank:
    np.testing.assert_allclose(res.shrunk[0], np.linalg.norm(y), rtol=1e-3)
  given = vbmf.evbmf(jnp.asarray(y, jnp.float32), sigma2=1.0)
  assert all(np.all(np.isfinite(np.asarray(f))) for f in given)


def test_evbmf_rejects_bad_input():
  with pytest.raises(ValueError, match='matrix'):
    vbmf.evbmf(jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match='method'):
    vbmf.evbmf(jnp.zeros((2, 3)), method='qr')


# ---------------------------------------------------------------------------
# Numerical hygiene: non-finite, extreme scales, invalid arguments.


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('index', [(0, 0), (17, 3), (47, 119)])
@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_evbmf_rejects_non_finite(value, index, dtype):
  y = planted((48, 120), 7, seed=6).astype(dtype)
  y[index] = value
  with pytest.raises(ValueError, match='non-finite') as e:
    vbmf.evbmf(jnp.asarray(y))
  assert f'first at index {index}' in str(e.value)
  assert '(48, 120)' in str(e.value)
  with pytest.raises(ValueError, match='non-finite'):
    vbmf.evbmf(y)  # NumPy input too


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_traced_non_finite_is_flagged_not_rank_zero(value):
  """Under jit / vmap no host check is possible: rank -1 and NaN instead."""
  good = planted((24, 60), 4, seed=7).astype(np.float32)
  bad = good.copy()
  bad[3, 5] = value
  res = _jit_evbmf(jnp.asarray(bad))
  assert int(res.rank) == -1
  assert np.isnan(float(res.sigma2)) and np.isnan(float(res.threshold))
  assert np.all(np.isnan(np.asarray(res.shrunk)))
  given = _jit_evbmf_sigma2(jnp.asarray(bad), 1.0)
  assert int(given.rank) == -1 and np.isnan(float(given.sigma2))
  # vmap: only the bad matrix is flagged, its neighbour is unaffected.
  batched = _jit_vmap_evbmf(jnp.asarray(np.stack([good, bad])))
  assert list(np.asarray(batched.rank)) == [4, -1]
  assert np.isfinite(batched.sigma2[0]) and np.isnan(batched.sigma2[1])
  np.testing.assert_allclose(batched.sigma2[0], vbmf.evbmf(good).sigma2,
                             rtol=1e-5)


def _expected_saturated(exact, dtype):
  """What evbmf returns for a true value ``exact`` (documented in evbmf)."""
  info = np.finfo(dtype)
  if exact > float(info.max):
    return np.inf
  return 0.0 if exact < float(info.tiny) else exact


@pytest.mark.parametrize('dtype,scales', [
    ('float32', [1e-20, 1e-12, 1.0, 1e12, 1e20, 1e30, 'top']),
    ('float64', [1e-150, 1e-100, 1.0, 1e100, 1e150, 1e250, 'top']),
])
def test_scale_invariance_over_the_whole_range(dtype, scales):
  """rank(c y) == rank(y) from tiny c up to max|c y| ~ float max (1e38 for
  float32); sigma2 / c^2 and threshold / c are invariant wherever the true
  value is a normal number, and inf / 0 (not garbage) where it is not."""
  y = planted((48, 120), 7, seed=6)
  top = 0.95 * np.finfo(dtype).max / np.abs(y).max()  # max|c y| ~ 3.2e38
  scales = np.array([top if c == 'top' else c for c in scales])
  with jax.enable_x64(dtype == 'float64'):
    stack = np.stack([(c * y).astype(dtype) for c in scales])
    assert np.all(np.isfinite(stack))
    res = jax.device_get(_jit_vmap_evbmf(jnp.asarray(stack)))
    eager = [vbmf.evbmf(jnp.asarray(m)) for m in stack[[0, -1]]]
  assert res.sigma2.dtype == np.dtype(dtype)
  assert list(res.rank) == [7] * len(scales)
  base = scales == 1.0
  sigma2, thr = float(res.sigma2[base][0]), float(res.threshold[base][0])
  tol = 1e-4 if dtype == 'float32' else 1e-9
  for i, c in enumerate(scales):
    c = float(c)
    for got, exact in ((res.sigma2[i], sigma2 * c * c),
                       (res.threshold[i], thr * c)):
      want = _expected_saturated(exact, dtype)
      if np.isfinite(want) and want > 0:
        np.testing.assert_allclose(got, want, rtol=tol, err_msg=f'c={c}')
      else:
        assert got == want, (c, got, exact)
    if scales[i] != top:
      shrunk = res.shrunk[i].astype(np.float64) / c
      np.testing.assert_allclose(shrunk, res.shrunk[base][0], rtol=10 * tol,
                                 atol=10 * tol * res.shrunk[base][0][0])
  if dtype == 'float32':  # the two ends saturate (documented)
    assert res.sigma2[0] == 0.0 and res.sigma2[-1] == np.inf
    assert np.isfinite(res.threshold[0]) and res.threshold[0] > 0
  for r, i in zip(eager, (0, -1)):
    assert int(r.rank) == 7
    assert float(r.sigma2) == res.sigma2[i]


def test_largest_singular_value_near_float32_max():
  """gamma_1 = 1e38 (the largest float32 spectrum there is): rank, threshold
  and shrunk values are finite and scale exactly; only sigma2 (~c^2)
  saturates to inf."""
  y = planted((48, 120), 7, seed=6)
  c = 1e38 / np.linalg.svd(y, compute_uv=False)[0]
  base = vbmf.evbmf(jnp.asarray(y, jnp.float32))
  big = vbmf.evbmf(jnp.asarray(y * c, jnp.float32))
  assert int(base.rank) == int(big.rank) == 7
  assert float(big.sigma2) == np.inf
  assert np.isfinite(float(big.threshold))
  assert np.all(np.isfinite(np.asarray(big.shrunk)))
  np.testing.assert_allclose(float(big.threshold) / c, base.threshold,
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(big.shrunk, np.float64) / c,
                             base.shrunk, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('sigma2', [0.0, -1.0, -0.0, np.nan, np.inf, 1e-50,
                                    1e300, 1j, 'x', np.ones(2)])
def test_evbmf_rejects_bad_sigma2(sigma2):
  y = jnp.asarray(planted((20, 30), 3, seed=1), jnp.float32)
  with pytest.raises(ValueError, match='sigma2'):
    vbmf.evbmf(y, sigma2=sigma2)


@pytest.mark.parametrize('sigma2', [0.0, -2.0, np.nan, np.inf])
def test_traced_bad_sigma2_is_flagged(sigma2):
  y = jnp.asarray(planted((20, 30), 3, seed=1), jnp.float32)
  res = _jit_evbmf_sigma2(y, sigma2)
  assert int(res.rank) == -1
  assert np.isnan(float(res.sigma2)) and np.isnan(float(res.threshold))
  ok = _jit_evbmf_sigma2(y, 1.0)
  assert int(ok.rank) == int(vbmf.evbmf(y, sigma2=1.0).rank) >= 0


@pytest.mark.parametrize('dtype', [np.complex64, np.complex128])
def test_evbmf_rejects_complex(dtype):
  y = (planted((10, 20), 2, seed=2) * (1 + 1j)).astype(dtype)
  with pytest.raises(TypeError, match='real'):
    vbmf.evbmf(y)
  with pytest.raises(TypeError, match='complex'):
    _jit_evbmf(jnp.asarray(y))  # static dtype: rejected under jit too


@pytest.mark.parametrize('shape', [(0, 5), (5, 0), (0, 0)])
def test_evbmf_rejects_empty(shape):
  pattern = re.escape(str(shape))
  with pytest.raises(ValueError, match=pattern) as e:
    vbmf.evbmf(jnp.zeros(shape))
  assert 'empty' in str(e.value)
  with pytest.raises(ValueError, match=pattern):
    _jit_evbmf(jnp.zeros(shape))


# ---------------------------------------------------------------------------
# weakened_rank.


@pytest.mark.parametrize('rank,vbmf_rank,weaken,min_rank,expected', [
    (64, 16, 1.0, 8, 16),     # plain EVBMF
    (64, 16, 0.5, 8, 40),     # floor(64 - 0.5 * 48)
    (64, 16, 0.0, 8, 64),     # w = 0 keeps R
    (64, 0, 1.0, 8, 64),      # EVBMF found nothing: keep R
    (64, 3, 1.0, 8, 8),       # min_rank
    (5, 2, 1.0, 8, 5),        # min_rank clamped to R
    (100, 30, 0.6, 1, 58),    # 0.6 * 70 = 42.000000000000007 in floats
    (10, 5, 0.8, 1, 6),
    (7, 9, 1.0, 1, 7),        # never above R
])
def test_weakened_rank(rank, vbmf_rank, weaken, min_rank, expected):
  assert vbmf.weakened_rank(rank, vbmf_rank, weaken=weaken,
                            min_rank=min_rank) == expected


@pytest.mark.parametrize('kwargs,match', [
    (dict(weaken=-0.1, min_rank=1), 'weaken'),
    (dict(weaken=1.5, min_rank=1), 'weaken'),
    (dict(weaken=float('nan'), min_rank=1), 'weaken'),
    (dict(weaken=0.5, min_rank=0), 'min_rank'),
])
def test_weakened_rank_validates(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vbmf.weakened_rank(10, 3, **kwargs)


# ---------------------------------------------------------------------------
# vbmf_ranks on a real model tree.

PLANTED = {  # path: planted (R_in, R_out) or (R,)
    'stage3_block1/conv1': (12, 20),
    'stage2_block0/conv2': (6, 9),
    'stage3_block0/shortcut': (5,),
    'head': (3,),
}


def _planted_kernel(shape, ranks, seed):
  """A kernel whose unfoldings have the planted ranks, plus small noise."""
  rng = np.random.default_rng(seed)
  if len(ranks) == 1:
    rows = math.prod(shape[:-1])
    mat = planted((rows, shape[-1]), ranks[0], seed=seed, noise=1e-3)
    return mat.reshape(shape).astype(np.float32)
  kh, kw, c_in, c_out = shape
  r_in, r_out = ranks
  core = rng.standard_normal((kh, kw, r_in, r_out))
  u_in, _ = np.linalg.qr(rng.standard_normal((c_in, r_in)))
  u_out, _ = np.linalg.qr(rng.standard_normal((c_out, r_out)))
  signal = np.einsum('hwrs,ir,os->hwio', core, u_in, u_out)
  return (signal + 1e-3 * rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture(scope='module')
def resnet20():
  model = get_model('resnet20')
  init = jax.jit(functools.partial(model.init, train=False))
  variables = jax.device_get(init(jax.random.PRNGKey(0),
                                  jnp.zeros((1, 32, 32, 3))))
  params, rebuild = tree.split_variables(variables)
  layers = tree.layers(params)
  new = {}
  for i, (path, ranks) in enumerate(PLANTED.items()):
    shape = layers[path]['kernel'].shape
    new[path] = dict(layers[path], kernel=_planted_kernel(shape, ranks, i))
  return rebuild(tree.replace_layers(params, new))


@pytest.fixture(scope='module')
def resnet20_ranks(resnet20):
  before = copy.deepcopy(jax.device_get(resnet20))
  out = vbmf.vbmf_ranks(resnet20, report=True)
  after = jax.device_get(resnet20)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
  return out


def test_vbmf_ranks_keys_bounds_and_planted_ranks(resnet20, resnet20_ranks):
  ranks, details = resnet20_ranks
  layers = tree.layers(tree.split_variables(resnet20)[0])
  assert list(ranks) == list(layers) == list(details)
  for path, r in ranks.items():
    shape = layers[path]['kernel'].shape
    d = details[path]
    assert all(isinstance(x, int) for x in r)
    if len(shape) == 4 and shape[0] * shape[1] > 1:
      assert len(r) == 2 and d['current'] == shape[2:]
      assert d['min_rank'] == tuple(min(8, c) for c in shape[2:])
    else:  # 1x1 shortcuts and the head
      assert len(r) == 1
      assert d['current'] == (min(math.prod(shape[:-1]), shape[-1]),)
      assert d['min_rank'] == (min(2 if len(shape) == 4 else 8,
                                   d['current'][0]),)
    assert all(lo <= x <= c for x, lo, c in zip(r, d['min_rank'],
                                                d['current']))
    assert d['weakened'] == r
    assert len(d['singular_values']) == len(r) == len(d['sigma2'])
    for sv, (rows, cols) in zip(d['singular_values'], d['matrices']):
      assert sv.shape == (min(rows, cols),) and np.all(np.diff(sv) <= 0)
  for path, planted_ranks in PLANTED.items():
    assert details[path]['vbmf'] == planted_ranks, path
    expected = tuple(max(p, lo) for p, lo in zip(planted_ranks,
                                                 details[path]['min_rank']))
    assert ranks[path] == expected
  # Random (unplanted) He-initialised convs have no signal: EVBMF returns 0
  # and the current size is kept.
  assert details['stage1_block0/conv1']['vbmf'] == (0, 0)
  assert ranks['stage1_block0/conv1'] == (16, 16)


def test_vbmf_ranks_equal_per_layer_evbmf(resnet20, resnet20_ranks):
  _, details = resnet20_ranks
  layers = tree.layers(tree.split_variables(resnet20)[0])
  for path in ('stage3_block1/conv1', 'stage2_block0/conv1', 'head',
               'stage3_block0/shortcut', 'conv1'):
    k = np.asarray(layers[path]['kernel'])
    if k.ndim == 4 and k.shape[0] * k.shape[1] > 1:
      mats = [np.moveaxis(k, 2, 0).reshape(k.shape[2], -1),   # C_in x ...
              np.moveaxis(k, 3, 0).reshape(k.shape[3], -1)]   # C_out x ...
    else:
      mats = [k.reshape(-1, k.shape[-1])]
    for i, mat in enumerate(mats):
      res = _jit_evbmf(jnp.asarray(mat))
      assert details[path]['vbmf'][i] == int(res.rank), path
      np.testing.assert_allclose(details[path]['sigma2'][i], res.sigma2,
                                 rtol=1e-4)
      np.testing.assert_allclose(details[path]['threshold'][i],
                                 res.threshold, rtol=1e-4)
      if details[path]['vbmf'][i]:
        r_rank = reference_evbmf(mat)[0]
        assert r_rank == details[path]['vbmf'][i], path


def test_vbmf_ranks_weaken_and_min_rank(resnet20):
  # Same shapes and selection as the fixture: no new compilation.
  ranks = vbmf.vbmf_ranks(resnet20, weaken=0.5,
                          min_rank={r'stage3_block1/conv1': 1, 'head': 1})
  assert ranks['stage3_block1/conv1'] == (38, 42)   # floor(64 - 0.5 (64-12))
  assert ranks['head'] == (6,)                      # floor(10 - 0.5 (10-3))
  assert ranks['stage3_block0/shortcut'] == (18,)   # floor(32 - 0.5 (32-5))
  assert vbmf.vbmf_ranks(resnet20, weaken=0.0)['stage3_block1/conv1'] == (
      64, 64)
  assert vbmf.vbmf_ranks(resnet20, min_rank=40)['stage3_block1/conv1'] == (
      40, 40)
  with pytest.raises(ValueError, match='weaken'):
    vbmf.vbmf_ranks(resnet20, weaken=1.2)
  with pytest.raises(ValueError, match='min_rank'):
    vbmf.vbmf_ranks(resnet20, min_rank=0)
  with pytest.raises(ValueError, match='min_rank'):
    vbmf.vbmf_ranks(resnet20, min_rank={'head': -1})
  with pytest.raises(ValueError, match='matches no layer'):
    vbmf.vbmf_ranks(resnet20, min_rank={'no_such_layer': 4})


def test_vbmf_ranks_selection_and_factorized_forms(resnet20):
  params, rebuild = tree.split_variables(resnet20)
  ranks = vbmf.vbmf_ranks(resnet20, select=r'stage1.*')
  assert ranks and all(p.startswith('stage1') for p in ranks)
  assert len(ranks) == 6
  with pytest.raises(ValueError, match='matches no layer'):
    vbmf.vbmf_ranks(resnet20, select=r'stage9.*')

  layers = tree.layers(params)
  conv = layers['stage3_block1/conv1']
  # HOSVD, as the tool's pipelines split (config.compress.hooi_iters = 0).
  split = dict(tucker2.from_kernel(conv['kernel'], (16, 24), hooi_iters=0))
  head = dict(svd_form.from_kernel(layers['head']['kernel'], 5))
  new = rebuild(tree.replace_layers(
      params, {'stage3_block1/conv1': split, 'head': head}))
  ranks, details = vbmf.vbmf_ranks(
      new, select=['stage3_block1/conv1', 'head'], report=True,
      min_rank=1)
  d = details['stage3_block1/conv1']
  assert d['form'] == 'tucker2' and d['shape'] == (3, 3, 16, 24)
  assert d['current'] == (16, 24)
  assert d['vbmf'] == (12, 20) and ranks['stage3_block1/conv1'] == (12, 20)
  assert details['head']['form'] == 'svd'
  # An svd-form layer's kernel has exact rank 5 (truncation removed the noise
  # outside the kept subspace): weakening starts from 5, never above it.
  assert details['head']['current'] == (5,)
  assert 3 <= ranks['head'][0] <= 5


@pytest.mark.parametrize('path,name,value', [
    ('stage2_block1/conv2', 'kernel', np.nan),
    ('stage3_block0/shortcut', 'kernel', np.inf),
    ('head', 'kernel', -np.inf),
    ('head', 'bias', np.nan),
])
def test_vbmf_ranks_names_a_non_finite_layer(resnet20, path, name, value):
  params, rebuild = tree.split_variables(resnet20)
  layer = dict(tree.get_layer(params, path))
  arr = np.array(layer[name])
  arr.flat[1] = value
  layer[name] = arr
  bad = rebuild(tree.replace_layers(params, {path: layer}))
  with pytest.raises(ValueError, match='non-finite') as e:
    vbmf.vbmf_ranks(bad)
  assert repr(path) in str(e.value) and repr(name) in str(e.value)
  # Also when only that layer is selected.
  with pytest.raises(ValueError, match=re.escape(repr(path))):
    vbmf.vbmf_ranks(bad, select=path)


def test_vbmf_ranks_names_a_layer_whose_product_overflows(resnet20):
  """Finite svd factors whose product overflows float32: named, not rank 0."""
  params, rebuild = tree.split_variables(resnet20)
  head = dict(svd_form.from_kernel(tree.get_layer(params, 'head')['kernel'],
                                   5))
  head['u'] = np.asarray(head['u']) * np.float32(1e25)
  head['v'] = np.asarray(head['v']) * np.float32(1e25)
  bad = rebuild(tree.replace_layers(params, {'head': head}))
  with pytest.raises(ValueError, match='overflowed') as e:
    vbmf.vbmf_ranks(bad, select='head')
  assert "'head'" in str(e.value) and "'svd'" in str(e.value)


@pytest.mark.parametrize('scale', [1e-25, 1e25])
def test_vbmf_ranks_reports_sigma2_beyond_float32(resnet20, scale):
  """Details rescale sigma2 on the host in float64: a layer scaled so that
  its float32 sigma2 would under- / overflow keeps rank and sigma2 / c^2."""
  params, rebuild = tree.split_variables(resnet20)
  base = vbmf.vbmf_ranks(resnet20, select='head', report=True)[1]
  head = dict(tree.get_layer(params, 'head'))
  head['kernel'] = (np.asarray(head['kernel'], np.float64) * scale
                    ).astype(np.float32)
  scaled = rebuild(tree.replace_layers(params, {'head': head}))
  got = vbmf.vbmf_ranks(scaled, select='head', report=True)[1]
  assert got['head']['vbmf'] == base['head']['vbmf'] == PLANTED['head']
  s2, b2 = got['head']['sigma2'][0], base['head']['sigma2'][0]
  assert 0 < s2 < np.inf
  assert not float(np.finfo(np.float32).tiny) < s2 < float(
      np.finfo(np.float32).max)
  np.testing.assert_allclose(s2 / scale ** 2, b2, rtol=1e-4)
  np.testing.assert_allclose(got['head']['threshold'][0] / scale,
                             base['head']['threshold'][0], rtol=1e-4)


@pytest.mark.parametrize('host', [True, False])
def test_vbmf_ranks_compiles_two_programs_once(resnet20, host,
                                              no_compilation_cache):
  """First call: one trace and one XLA compilation each of the spectra
  program (none with the host spectra, the default on CPU) and the solve;
  repeat calls: none. A network with a matrix that 'auto' must redo with
  the SVD compiles the pair once more, once."""
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)

  def traces():   # (spectra, solve) programs traced so far
    # pylint: disable=protected-access
    return (sum(f._cache_size() for f in vbmf._network_spectra.values()),
            vbmf._network_solve._cache_size())

  params, _ = tree.split_variables(resnet20)
  stage2 = {p: v for p, v in tree.layers(params).items()
            if p.startswith('stage2')}
  renamed = {'net': {p.replace('/', '_'): v for p, v in stage2.items()}}
  # The LAPACK path's self-check compiles a probe once per process: not here.
  vbmf.use_lapack_eigenvalues(True)
  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listener)
  vbmf.use_host_spectra(host)
  first_pass = 0 if host else 1  # spectra programs of the first pass
  try:
    plain = vbmf.vbmf_ranks(resnet20, select=r'stage1.*')  # random init
    assert (traces(), len(compiles)) == ((first_pass, 1), 1 + first_pass)
    assert vbmf.vbmf_ranks(resnet20, select=r'stage1.*') == plain
    assert (traces(), len(compiles)) == ((first_pass, 1), 1 + first_pass)
    # stage2_block0/conv2's planted spectrum (noise 1e-3) spans more than
    # float32 Gram products resolve: the network's pair of programs plus the
    # pair of the SVD redo of that layer.
    first = vbmf.vbmf_ranks(resnet20, select=r'stage2.*')
    want = ((1 + 2 * first_pass, 3), 4 + 2 * first_pass)
    assert (traces(), len(compiles)) == want
    second = vbmf.vbmf_ranks(resnet20, select=r'stage2.*')
    # Same shapes under other paths (and a bare params tree): cached too.
    third = vbmf.vbmf_ranks(renamed)
    assert (traces(), len(compiles)) == want
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    vbmf.use_host_spectra(True)
  assert first == second
  assert list(third.values()) == list(first.values())


def test_lapack_eigenvalue_path_is_default_correct_and_can_be_turned_off(
    resnet20):
  """On by default (where its self-check passes, as it must on the jaxlib we
  test): the compiled program calls LAPACK directly; turned off, the SVD
  gives the same eigenvalues and ranks."""
  assert vbmf._LAPACK['on']
  gram = jnp.asarray(planted((20, 40), 3, seed=1) @ planted((20, 40), 3,
                                                          seed=1).T,
                     jnp.float32)
  jaxpr = lambda: str(jax.make_jaxpr(lambda g: vbmf._gram_eigenvalues(g))(gram))
  if not vbmf.use_lapack_eigenvalues(True):
    pytest.fail('the LAPACK eigenvalue target failed its self-check on '
                'this jaxlib: update _syevd_values_call or drop it')
  # A new function each time: make_jaxpr caches traces per function.
  assert 'ffi_call' in jaxpr()
  expected = np.linalg.eigvalsh(np.asarray(gram))[::-1]
  np.testing.assert_allclose(vbmf._gram_eigenvalues(gram), expected,
                             rtol=1e-4, atol=1e-3)
  vbmf.use_host_spectra(False)  # vbmf_ranks through the compiled program
  try:
    default = vbmf.vbmf_ranks(resnet20, select=r'stage3.*')
    assert not vbmf.use_lapack_eigenvalues(False)
    assert 'ffi_call' not in jaxpr()
    np.testing.assert_allclose(vbmf._gram_eigenvalues(gram), expected,
                               rtol=1e-4, atol=1e-3)
    assert vbmf.vbmf_ranks(resnet20, select=r'stage3.*') == default
  finally:
    vbmf.use_lapack_eigenvalues(True)
    vbmf.use_host_spectra(True)


# ---------------------------------------------------------------------------
# Speed-ups that must not change answers: eigenproblems in size buckets, the
# 'auto' SVD redo in a second program, the persistent compilation cache, the
# eager dispatch.


@pytest.mark.parametrize('big_l,size', [(1, 16), (3, 16), (16, 16), (17, 24),
                                        (24, 24), (25, 32), (100, 128),
                                        (147, 192), (512, 512), (513, 768)])
def test_bucket_sizes(big_l, size):
  assert spectra_program._bucket(big_l) == size
  assert big_l <= size <= max(16, 1.5 * big_l)


def _dense_tree(shapes, seed=0, **planted_kw):
  """{'d{i}': {'kernel': (rows, cols)}}: planted rank 5 (1 if a side < 10)."""
  return {f'd{i}': {'kernel': jnp.asarray(
      planted(shape, 5 if min(shape) >= 10 else 1, seed=seed + i,
              **planted_kw), jnp.float32)}
          for i, shape in enumerate(shapes)}


# L values off the buckets (20 -> 24, 40 -> 48, 100 -> 128, 3 -> 16), two
# shapes sharing a bucket (20 x 90 and 21 x 50), tall and wide.
BUCKET_SHAPES = [(20, 90), (50, 21), (40, 300), (300, 40), (100, 130),
                 (3, 70)]


@pytest.mark.parametrize('method', ['auto', 'gram'])
def test_bucketed_network_equals_unbucketed_evbmf(method):
  """vbmf_ranks pads Gram matrices to bucket sizes: the same ranks, sigma2
  and spectra as evbmf of each matrix alone (no padding)."""
  params = _dense_tree(BUCKET_SHAPES)
  _, details = vbmf.vbmf_ranks(params, report=True, method=method,
                               min_rank=1)
  for i, shape in enumerate(BUCKET_SHAPES):
    y = params[f'd{i}']['kernel']
    alone, gamma = _jit_evbmf_matrix(y, method=method)
    d = details[f'd{i}']
    assert d['vbmf'] == (int(alone.rank),), shape
    assert (min(shape) < 4) or d['vbmf'] == (5,), shape
    np.testing.assert_allclose(d['singular_values'][0], gamma, rtol=1e-5,
                               atol=1e-6 * float(gamma[0]))
    # The free energy can be flat at its minimum (assert_same_minimum): for
    # 40 x 300, sigma2 0.99512 and 0.99611 differ in Omega by 1.7e-5 (of
    # 23.17), a change the padding's rounding-level change of the spectrum
    # (2e-7 of gamma_1, LAPACK ?syevd) can cause; so sigma2 and the
    # threshold agree to that flatness, not to float precision.
    assert_same_minimum(y, d['sigma2'][0], alone.sigma2)
    np.testing.assert_allclose(d['sigma2'][0], alone.sigma2, rtol=2e-3)
    np.testing.assert_allclose(d['threshold'][0], alone.threshold, rtol=1e-3)


@pytest.mark.parametrize('backend', [None, 'cpu'])  # both compiled variants
@pytest.mark.parametrize('method', ['auto', 'svd'])
@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_network_programs_flag_a_non_finite_matrix(backend, method, value):
  """Behind vbmf_ranks' host check, the programs themselves give a matrix
  with one NaN / Inf entry rank -1 (XLA:CPU's max reduction skips NaN, so
  the flag rests on the Gram matrix / sum of squares), and its neighbours
  in the batch their planted rank."""
  all_layers, plan = network._plan(
      _dense_tree([(20, 90), (40, 300), (45, 300)]), None)
  kernel = np.array(all_layers['d1']['kernel'])
  kernel[3, 7] = value
  all_layers['d1'] = {'kernel': jnp.asarray(kernel)}
  sources, kinds, groups = spectra_program._program_inputs(plan, all_layers)
  spectra = spectra_program._network_spectra[backend](
      sources, kinds, groups, method, prescale=True)
  rank, _, _, gamma, e, _ = batched._network_solve(spectra, method)['float32']
  order = [i for _, members in groups for i, _ in members]
  assert [int(r) for r in rank] == [-1 if plan[i].path == 'd1' else 5
                                    for i in order]
  assert np.isnan(np.asarray(gamma)[order.index(1)]).all()
  assert int(e[order.index(1)]) == 0


def test_direct_grams_equal_the_prescaled_program_and_flag_extreme_scales():
  """The first pass forms each Gram matrix from its kernel (tall 'in' and
  'out' unfoldings too) and scales it by its diagonal: the same spectra as
  the prescaled program (the redo), and a layer at 1e-30 is flagged for
  that redo, as is an all-zero one; vbmf_ranks still ranks both."""
  rng = np.random.default_rng(0)
  shapes = {'tall_in': (3, 3, 40, 2), 'tall_out': (3, 3, 2, 40),
            'conv': (3, 3, 16, 24), 'dense': (20, 90)}
  params = {p: {'kernel': jnp.asarray(rng.standard_normal(s), jnp.float32)}
            for p, s in shapes.items()}
  params['tiny'] = {'kernel': jnp.asarray(1e-30 * planted((20, 90), 5),
                                          jnp.float32)}
  params['zero'] = {'kernel': jnp.zeros((20, 90), jnp.float32)}
  all_layers, plan = network._plan(params, None)
  sources, kinds, groups = spectra_program._program_inputs(plan, all_layers)

  def spectra(prescale):
    out = spectra_program._network_spectra['cpu'](
        sources, kinds, groups, 'gram', prescale=prescale)['float32']
    lam = np.asarray(out[0]) * np.exp2(2.0 * np.asarray(out[3]))[:, None]
    return lam, np.asarray(out[5])

  (direct, rescale), (prescaled, none) = spectra(False), spectra(True)
  order = [plan[i].path for _, members in groups for i, _ in members]
  assert list(rescale) == [p in ('tiny', 'zero') for p in order]
  assert not none.any()
  for row, want, path in zip(direct, prescaled, order):
    if path not in ('tiny', 'zero'):
      np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6 * want[0])
  ranks = vbmf.vbmf_ranks(params, min_rank=1)
  assert ranks['tiny'] == (5,) and ranks['zero'] == (20,)


def _program_and_host_spectra(params):
  """The compiled CPU spectra program's first pass and the host route's,
  as {dtype: arrays} on the host, with the plan's group order (paths)."""
  all_layers, plan = network._plan(params, None)
  sources, kinds, groups = spectra_program._program_inputs(plan, all_layers)
  assert host_spectra.serves(kinds, 'auto', False, {'cpu'})
  program = jax.device_get(spectra_program._network_spectra['cpu'](
      sources, kinds, groups, 'auto', prescale=False))
  host = host_spectra.host_spectra(sources, kinds, groups)
  order = [plan[i].path for _, members in groups for i, _ in members]
  return program, host, order


def test_host_spectra_equal_the_compiled_program():
  """The host route (CPU default) gives the program's arrays: the same
  shapes and dtypes, padding, exponents and flags (tall 'in' and 'out'
  unfoldings, a dense layer, a Tucker-2 core, a bfloat16 layer, a layer
  at 1e-30 and an all-zero one, both flagged for the prescaled pass),
  and the same spectra to float32 rounding."""
  rng = np.random.default_rng(0)
  shapes = {'tall_in': (3, 3, 40, 2), 'tall_out': (3, 3, 2, 40),
            'conv': (3, 3, 16, 24), 'dense': (20, 90), 'wide': (90, 20)}
  params = {p: {'kernel': jnp.asarray(rng.standard_normal(s), jnp.float32)}
            for p, s in shapes.items()}
  params['half'] = {'kernel': jnp.asarray(rng.standard_normal((3, 3, 8, 12)),
                                          jnp.bfloat16)}
  params['split'] = tucker2.from_kernel(
      jnp.asarray(rng.standard_normal((3, 3, 24, 32)), jnp.float32), (12, 16))
  params['tiny'] = {'kernel': jnp.asarray(1e-30 * planted((20, 90), 5),
                                          jnp.float32)}
  params['zero'] = {'kernel': jnp.zeros((20, 90), jnp.float32)}
  program, host, order = _program_and_host_spectra(params)
  assert program.keys() == host.keys() == {'float32'}
  want, got = program['float32'], host['float32']
  for a, b in zip(want, got):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
  for k in (1, 2, 3, 4, 5):  # L, M, e, finite, rescale
    np.testing.assert_array_equal(got[k], want[k])
  assert list(got[5]) == [p in ('tiny', 'zero') for p in order]
  for row, ref, path in zip(got[0], want[0], order):
    if path not in ('tiny', 'zero'):
      np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-6 * ref[0])
      assert row[0] > 0
    else:
      assert not row.any()


@pytest.mark.parametrize('method', ['auto', 'gram'])
def test_vbmf_ranks_agree_with_and_without_the_host_spectra(resnet20,
                                                           method):
  """The same ranks, sigma2 and spectra from either route, on resnet20's
  planted kernels and a non-finite layer's error."""
  try:
    vbmf.use_host_spectra(False)
    want = vbmf.vbmf_ranks(resnet20, report=True, method=method)
  finally:
    vbmf.use_host_spectra(True)
  got = vbmf.vbmf_ranks(resnet20, report=True, method=method)
  assert got[0] == want[0]
  for path, d in got[1].items():
    np.testing.assert_allclose(d['sigma2'], want[1][path]['sigma2'],
                               rtol=1e-4)
    for a, b in zip(d['singular_values'], want[1][path]['singular_values']):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * b[0])


def test_host_spectra_agree_with_the_program_in_float64_and_mixed_dtypes():
  """Under x64, float64 layers next to a float32 one: each dtype's spectra
  on the host (a float64 Gram route) give the program's ranks and sigma2."""
  with jax.enable_x64(True):
    params = {
        'wide': {'kernel': jnp.asarray(planted((20, 90), 5, seed=2),
                                       jnp.float64)},
        'conv': {'kernel': jnp.asarray(planted((27, 40), 4, seed=3).reshape(
            3, 3, 3, 40), jnp.float64)},
        'f32': {'kernel': jnp.asarray(planted((30, 60), 6, seed=4),
                                      jnp.float32)}}
    host = vbmf.vbmf_ranks(params, report=True, min_rank=1)
    try:
      vbmf.use_host_spectra(False)
      program = vbmf.vbmf_ranks(params, report=True, min_rank=1)
    finally:
      vbmf.use_host_spectra(True)
  assert host[0] == program[0]
  assert host[0]['wide'] == (5,) and host[0]['f32'] == (6,)
  for path, d in host[1].items():
    np.testing.assert_allclose(d['sigma2'], program[1][path]['sigma2'],
                               rtol=1e-5 if path == 'f32' else 1e-10)


def test_bucketed_spectra_equal_unpadded_eigenvalues():
  rng = np.random.default_rng(0)
  ys = [rng.standard_normal((big_l, 60)).astype(np.float32)
        for big_l in (20, 21, 24)]
  grams = [y @ y.T for y in ys]
  padded = jnp.stack([np.pad(g, ((0, 24 - len(g)), (0, 24 - len(g))))
                      for g in grams])
  lam = spectra_program._bucket_spectra(
      padded, jnp.asarray([[20.], [21.], [24.]]))
  for row, g in zip(np.asarray(lam), grams):
    big_l = len(g)
    want = np.linalg.eigvalsh(g.astype(np.float64))[::-1]
    np.testing.assert_allclose(row[:big_l], want, rtol=1e-4)
    assert np.all(row[big_l:] == 0)


def test_auto_redoes_wide_spectra_with_the_svd():
  """A spectrum spanning more than float32 Gram products resolve (signal
  1e3 x the noise edge): 'auto' gives the SVD's spectrum, whose small
  singular values the Gram route would have cut to zero."""
  params = _dense_tree([(40, 120), (30, 80)], seed=3,
                       strength=(300.0, 1000.0))
  params['plain'] = {'kernel': jnp.asarray(planted((30, 80), 4, seed=9),
                                           jnp.float32)}
  _, auto = vbmf.vbmf_ranks(params, report=True, min_rank=1)
  _, gram = vbmf.vbmf_ranks(params, report=True, method='gram', min_rank=1)
  for path in ('d0', 'd1'):
    y = np.asarray(params[path]['kernel'], np.float64)
    s = np.linalg.svd(y, compute_uv=False)
    got = auto[path]['singular_values'][0]
    np.testing.assert_allclose(got, s, rtol=1e-4)
    assert got[-1] > 0 and gram[path]['singular_values'][0][-1] == 0
    assert auto[path]['vbmf'] == (5,)
    alone = _jit_evbmf(params[path]['kernel'])
    assert_same_minimum(y, auto[path]['sigma2'][0], alone.sigma2)
    np.testing.assert_allclose(auto[path]['sigma2'][0], alone.sigma2,
                               rtol=2e-3)
  np.testing.assert_allclose(auto['plain']['singular_values'][0],
                             gram['plain']['singular_values'][0], rtol=1e-6)


def test_compilation_cache_is_opt_in_and_scoped(tmp_path,
                                                no_compilation_cache):
  """compilation_cache=DIR stores the compiled program there, gives the same
  ranks, and leaves JAX's configuration as it was."""
  assert jax.config.jax_compilation_cache_dir is None
  params = _dense_tree([(37, 23), (19, 41)], seed=11)
  jax.clear_caches()  # compile here, not from the in-memory cache
  cached = vbmf.vbmf_ranks(params, compilation_cache=tmp_path / 'cache')
  assert jax.config.jax_compilation_cache_dir is None
  assert any((tmp_path / 'cache').iterdir())
  assert cached == vbmf.vbmf_ranks(params)


def test_compilation_cache_rejects_a_path_that_is_no_directory(
    tmp_path, no_compilation_cache):
  """A cache path that cannot be a directory is named in the error, and
  JAX's configuration is left as it was."""
  params = _dense_tree([(37, 23)], seed=11)
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match="compilation_cache='.*file/cache'"):
    vbmf.vbmf_ranks(params, compilation_cache=blocker / 'cache')
  assert jax.config.jax_compilation_cache_dir is None
  assert blocker.read_text() == 'not a directory'


def test_eager_evbmf_compiles_once_per_shape():
  """Repeated eager calls (NumPy and jax input) reuse one program."""
  y = planted((24, 60), 4, seed=7).astype(np.float32)
  first = vbmf.evbmf(y)
  vbmf.evbmf(jnp.asarray(y))
  compiled = solver._EVBMF_COMPILED['auto']
  size = compiled._cache_size()  # pylint: disable=protected-access
  again = [vbmf.evbmf(y), vbmf.evbmf(jnp.asarray(y)), vbmf.evbmf(y)]
  assert compiled._cache_size() == size  # pylint: disable=protected-access
  for res in again:
    assert int(res.rank) == int(first.rank) == 4
    np.testing.assert_array_equal(res.sigma2, first.sigma2)


@pytest.mark.parametrize('module,argv,message', [
    ('bench_vbmf', ['--fresh', '0'], '--fresh 0: must be >= 1'),
    ('bench_vbmf', ['--repeats', '0'], '--repeats 0: must be >= 1'),
    ('bench_vbmf_stages', ['--repeats', '0'], '--repeats 0: must be >= 1')])
def test_vbmf_benches_refuse_empty_medians(monkeypatch, capsys, module, argv,
                                           message):
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), '..',
                                           'bench'))
  bench = importlib.import_module(module)
  with pytest.raises(SystemExit):
    bench.main(argv + ['--no-write'])
  assert message in capsys.readouterr().err
