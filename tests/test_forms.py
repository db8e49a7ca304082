"""Every form's forward equals a dense conv with its merged kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import forms
from lowrank_jax.forms import base

SPECS = [
    base.LayerSpec('conv', (1, 1), 'SAME', (1, 1)),
    base.LayerSpec('conv', (2, 2), 'SAME', (1, 1)),
    base.LayerSpec('conv', (1, 2), 'VALID', (2, 1)),
    base.LayerSpec('conv', (2, 1), ((1, 0), (2, 1)), (1, 2)),
]


def _kernel(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) / np.sqrt(
      np.prod(shape[:-1]))


@pytest.mark.parametrize('spec', SPECS)
@pytest.mark.parametrize('form,ranks', [('tucker2', (3, 5)), ('cp', (6,)),
                                        ('svd', (4,)), ('overparam', (9, 11))])
def test_forward_matches_merged_kernel(form, ranks, spec):
  kernel = _kernel((3, 3, 6, 8))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 10, 6))
  module = forms.get(form)
  options = {'key': jax.random.PRNGKey(2)} if form == 'overparam' else {}
  v = module.from_kernel(kernel, ranks, **options)
  assert forms.identify(v) == form
  y = module.forward(v, x, spec)
  ref = base.conv(x, module.to_kernel(v), spec)
  np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('spec', SPECS[:2])
def test_svd_of_1x1_conv_and_dense(spec):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 6))
  kernel = _kernel((1, 1, 6, 8))
  v = forms.svd.from_kernel(kernel, 6)
  np.testing.assert_allclose(forms.svd.forward(v, x, spec),
                             base.conv(x, kernel, spec), atol=2e-5)
  dense = _kernel((6, 8))
  v = forms.svd.from_kernel(dense, 6)
  np.testing.assert_allclose(forms.svd.forward(v, x, base.DENSE), x @ dense,
                             atol=2e-5)


def test_registry_rejects_clashing_keys_and_unknown_variables():
  class Fake:
    NAME, KEYS = 'fake', frozenset({'kernel'})
  with pytest.raises(ValueError, match="same variables as 'dense'"):
    forms.register(Fake)
  with pytest.raises(ValueError, match='match no registered form'):
    forms.identify(['kernel', 'u'])
  assert forms.identify(['u_in', 'core', 'u_out', 'bias']) == 'tucker2'


@pytest.mark.parametrize('shape', [(3, 3, 16, 24), (5, 5, 8, 8),
                                   (3, 3, 32, 4)])
def test_tucker2_error_falls_with_rank_and_meets_hosvd_bounds(shape):
  kernel = _kernel(shape, seed=3)
  _, _, c_in, c_out = shape
  s_in = np.linalg.svd(np.moveaxis(kernel, 2, 0).reshape(c_in, -1),
                       compute_uv=False)
  s_out = np.linalg.svd(np.moveaxis(kernel, 3, 0).reshape(c_out, -1),
                        compute_uv=False)
  norm2 = float(jnp.sum(kernel ** 2))
  errors = []
  for frac in (0.25, 0.5, 0.75, 1.0):
    r_in, r_out = max(1, int(c_in * frac)), max(1, int(c_out * frac))
    v = forms.tucker2.from_kernel(kernel, (r_in, r_out))
    err2 = float(jnp.sum((forms.tucker2.to_kernel(v) - kernel) ** 2))
    tail_in, tail_out = np.sum(s_in[r_in:] ** 2), np.sum(s_out[r_out:] ** 2)
    # HOSVD: max(tails) <= error^2 <= sum(tails) (truncated-SVD bounds).
    assert err2 <= (tail_in + tail_out) * (1 + 1e-4) + 1e-6 * norm2
    assert err2 >= max(tail_in, tail_out) * (1 - 1e-4) - 1e-6 * norm2
    errors.append(err2)
    np.testing.assert_allclose(v['u_in'].T @ v['u_in'], np.eye(r_in),
                               atol=1e-5)
    np.testing.assert_allclose(v['u_out'] @ v['u_out'].T, np.eye(r_out),
                               atol=1e-5)
  assert all(a >= b for a, b in zip(errors, errors[1:]))
  assert errors[-1] < 1e-9 * norm2 + 1e-10


def test_hooi_does_not_increase_error():
  kernel = _kernel((3, 3, 24, 24), seed=5)
  def err(it):
    v = forms.tucker2.from_kernel(kernel, (6, 6), hooi_iters=it)
    return float(jnp.linalg.norm(forms.tucker2.to_kernel(v) - kernel))
  assert err(5) <= err(0) * (1 + 1e-5)


def test_cp_error_falls_with_rank():
  kernel = _kernel((3, 3, 8, 8), seed=7)
  errs = []
  for rank in (2, 8, 32, 96):
    v = forms.cp.from_kernel(kernel, rank, als_iters=50)
    errs.append(float(jnp.linalg.norm(forms.cp.to_kernel(v) - kernel) /
                      jnp.linalg.norm(kernel)))
  assert errs[0] > errs[1] > errs[2] and errs[3] < 0.05
  # A planted CP tensor of rank 3 is recovered.
  f = [jax.random.normal(jax.random.PRNGKey(i), (n, 3))
       for i, n in enumerate((3, 3, 8, 8))]
  planted = jnp.einsum('hr,wr,ir,or->hwio', *f)
  v = forms.cp.from_kernel(planted, 3, als_iters=200)
  rel = jnp.linalg.norm(forms.cp.to_kernel(v) - planted) / jnp.linalg.norm(
      planted)
  assert rel < 1e-3


def test_overparam_is_exact_with_orthonormal_sides():
  kernel = _kernel((3, 3, 5, 7))
  v = forms.overparam.from_kernel(kernel, (8, 10),
                                  key=jax.random.PRNGKey(3))
  np.testing.assert_allclose(forms.overparam.to_kernel(v), kernel, atol=1e-5)
  np.testing.assert_allclose(v['op_in'] @ v['op_in'].T, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(v['op_out'].T @ v['op_out'], np.eye(7),
                             atol=1e-5)
  assert v['op_core'].shape == (3, 3, 8, 10)


def test_flops_formulas():
  x_shape, out_shape = (2, 8, 8, 16), (2, 4, 4, 32)
  spec = base.LayerSpec('conv', (2, 2))
  kernel = _kernel((3, 3, 16, 32))
  assert forms.dense.flops({'kernel': kernel}, spec, x_shape,
                           out_shape) == 2 * 16 * 9 * 16 * 32
  v = forms.tucker2.from_kernel(kernel, (4, 6))
  assert forms.tucker2.flops(v, spec, x_shape, out_shape) == (
      2 * 64 * 16 * 4 + 2 * 16 * (9 * 4 * 6 + 6 * 32))
