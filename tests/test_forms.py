"""Every form's forward equals a dense conv with its merged kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import forms
from lowrank_jax import tree
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


@pytest.mark.parametrize('form,shape,ranks', [
    ('dense', (3, 3, 6, 8), None), ('dense', (12, 5), None),
    ('tucker2', (3, 3, 6, 8), (3, 4)), ('cp', (3, 3, 6, 8), (4,)),
    ('svd', (3, 3, 6, 8), (3,)), ('svd', (12, 5), (3,)),
    ('overparam', (3, 3, 6, 8), (9, 11)), ('adtn', (3, 3, 6, 8), (2,)),
    ('adtn', (12, 5), (2,))])
def test_kernel_shape_is_the_merged_kernels(form, shape, ranks):
  """tree.kernel_shape reads a form's own kernel_shape where it has one
  (dense, adtn), else the shape of to_kernel: the same answer."""
  options = {'overparam': {'key': jax.random.PRNGKey(2)},
             'adtn': {'key': jax.random.PRNGKey(2), 'steps': 0}}
  module = forms.get(form)
  v = module.from_kernel(_kernel(shape), ranks, **options.get(form, {}))
  assert tree.kernel_shape(v) == shape == module.to_kernel(v).shape


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


def _tucker2_error(kernel, ranks, **options):
  v = forms.tucker2.from_kernel(kernel, ranks, **options)
  return float(jnp.linalg.norm(forms.tucker2.to_kernel(v) - kernel) /
               jnp.linalg.norm(kernel))


def _decaying_kernel(shape, seed=0, alpha=0.5):
  """A kernel whose unfoldings' spectra decay like i**-alpha (trained-like)."""
  rng = np.random.default_rng(seed)
  _, _, c_in, c_out = shape
  q_in = np.linalg.qr(rng.standard_normal((c_in, c_in)))[0]
  q_out = np.linalg.qr(rng.standard_normal((c_out, c_out)))[0]
  core = rng.standard_normal(shape)
  core *= (1.0 + np.arange(c_in))[:, None] ** -alpha
  core *= (1.0 + np.arange(c_out)) ** -alpha
  return jnp.asarray(np.einsum('hwrs,ir,os->hwio', core, q_in, q_out),
                     jnp.float32)


@pytest.mark.parametrize('shape,ranks', [((3, 3, 24, 24), (6, 6)),
                                         ((3, 3, 32, 16), (5, 9))])
def test_hooi_sweeps_never_raise_the_error_and_beat_hosvd(shape, ranks):
  kernel = _decaying_kernel(shape, seed=5)
  errors = [_tucker2_error(kernel, ranks, hooi_iters=n, hooi_tol=0.0)
            for n in (0, 1, 2, 4, 8, 16)]
  assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0] - 1e-3, errors
  default = _tucker2_error(kernel, ranks)
  assert default <= errors[0] + 1e-6
  # The tolerance stops within it of the converged error.
  assert default <= _tucker2_error(kernel, ranks, hooi_iters=200,
                                   hooi_tol=0.0) + 1e-3


@pytest.mark.parametrize('hooi_iters', [0, 100])
def test_tucker2_recovers_planted_ranks_and_is_exact_at_full_rank(hooi_iters):
  rng = np.random.default_rng(3)
  core = rng.standard_normal((3, 3, 4, 7))
  planted = np.einsum('hwrs,ir,os->hwio', core,
                      np.linalg.qr(rng.standard_normal((20, 4)))[0],
                      np.linalg.qr(rng.standard_normal((12, 7)))[0])
  planted = jnp.asarray(planted, jnp.float32)
  assert _tucker2_error(planted, (4, 7), hooi_iters=hooi_iters) < 1e-5
  assert _tucker2_error(planted, (3, 7), hooi_iters=hooi_iters) > 1e-2
  kernel = _kernel((3, 3, 20, 12), seed=4)
  assert _tucker2_error(kernel, (20, 12), hooi_iters=hooi_iters) < 1e-5


def test_tucker2_defaults_agree_across_entry_points():
  import inspect  # pylint: disable=g-import-not-at-top
  from lowrank_jax import transforms  # pylint: disable=g-import-not-at-top
  def default(fn, name):
    return inspect.signature(fn).parameters[name].default
  iters = {default(fn, 'hooi_iters') for fn in (
      forms.tucker2.from_kernel, forms.tucker2.refine,
      transforms.tucker2_split, transforms.decompose)}
  assert iters == {100}
  assert (default(forms.tucker2.from_kernel, 'hooi_tol') ==
          default(forms.tucker2.refine, 'hooi_tol') == 1e-5)


def test_tucker2_default_at_most_tensorly_partial_tucker():
  tensorly = pytest.importorskip('tensorly')
  from tensorly.decomposition import partial_tucker  # pylint: disable=g-import-not-at-top
  tensorly.set_backend('numpy')
  kernel = _decaying_kernel((3, 3, 48, 40), seed=9)
  for ranks in ((8, 8), (12, 6)):
    if tensorly.__version__.startswith('0.4.'):   # (core, factors)
      core, (a, b) = partial_tucker(np.asarray(kernel), modes=[2, 3],
                                    rank=list(ranks))
    else:                                         # ((core, factors), errors)
      (core, (a, b)), _ = partial_tucker(np.asarray(kernel), rank=list(ranks),
                                         modes=[2, 3])
    ref = np.linalg.norm(np.einsum('hwrs,ir,os->hwio', core, a, b) -
                         kernel) / np.linalg.norm(kernel)
    assert _tucker2_error(kernel, ranks) <= ref + 1e-6


def test_library_never_imports_tensorly():
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(forms.__file__).parents[1]
  offenders = [str(p) for p in root.rglob('*.py')
               if 'import tensorly' in p.read_text()
               or 'from tensorly' in p.read_text()]
  assert not offenders


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
