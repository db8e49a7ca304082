"""Pure transforms on whole models: function preservation, counts, errors."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import forms, tree


def _perturbed_variables(name, x, seed=0):
  """Init, then give BatchNorm non-trivial scales and statistics.

  ResNet's zero-initialised last BN scale would otherwise hide every
  residual-branch conv from an output comparison.
  """
  model = lj.get_model(name)
  # Jitted init and NumPy draws: eager init and one jax.random call per leaf
  # compiled op by op (VGG-16: 8 s of this test's 19 s).
  init = jax.jit(model.init, static_argnames='train')
  v = init(jax.random.PRNGKey(seed), x[:1], train=False)
  rng = np.random.default_rng(seed + 1)

  def perturb(path, leaf):
    last = path[-1].key
    if last in ('scale', 'var'):
      return jnp.asarray(0.5 + rng.uniform(size=leaf.shape), leaf.dtype)
    if last in ('bias', 'mean'):
      return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    return leaf
  return model, jax.tree_util.tree_map_with_path(perturb, v)


def _full_ranks(path, variables):
  shape = variables['kernel'].shape
  return (shape[-2], shape[-1])


@pytest.mark.parametrize('name', ['resnet20', 'vgg16'])
def test_full_rank_splits_preserve_outputs_on_real_images(name, real_images):
  x = jnp.asarray(real_images[:4])
  model, v = _perturbed_variables(name, x)
  y = lj.apply(model, v, x, train=False)
  scale = float(jnp.max(jnp.abs(y)))
  split = lj.tucker2_split(v, _full_ranks)
  split = lj.svd_split(split, lambda p, l: min(l['kernel'].shape[-2:]))
  assert set(lj.layer_forms(split).values()) == {'tucker2', 'svd'}
  np.testing.assert_allclose(lj.apply(model, split, x, train=False), y,
                             atol=2e-4 * scale)
  over = lj.overparameterize(v, expansion=1.25, key=jax.random.PRNGKey(2))
  np.testing.assert_allclose(lj.apply(model, over, x, train=False), y,
                             atol=2e-4 * scale)
  back = lj.collapse(over)
  assert set(lj.layer_forms(back).values()) == {'dense'}
  np.testing.assert_allclose(lj.apply(model, back, x, train=False), y,
                             atol=2e-4 * scale)


def test_exact_param_counts_after_splits():
  model = lj.get_model('resnet20')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  before = lj.count_params(v)
  _, per_layer = lj.count_params(v, report=True)
  ranks = {'stage2_block1/conv1': (5, 7), 'conv1': (2, 4)}
  out = lj.tucker2_split(v, ranks)
  expected = before
  for path, (r_in, r_out) in ranks.items():
    kh, kw, c_in, c_out = tree.get_layer(v['params'], path)['kernel'].shape
    expected += c_in * r_in + kh * kw * r_in * r_out + r_out * c_out
    expected -= per_layer[path]
  assert lj.count_params(out) == expected
  out = lj.svd_split(out, {'head': 3, 'stage3_block0/shortcut': 2})
  expected += (64 * 3 + 3 * 10) - 64 * 10          # head keeps its bias
  expected += (32 * 2 + 2 * 64) - 32 * 64
  assert lj.count_params(out) == expected


def test_recompressing_a_split_layer_decomposes_its_core():
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  once = lj.tucker2_split(v, (6, 12), select='conv2')
  twice, actions = lj.tucker2_split(once, (3, 5), select='conv2', report=True)
  layer = tree.get_layer(twice['params'], 'conv2')
  assert forms.identify(layer) == 'tucker2'
  assert layer['u_in'].shape == (6, 3) and layer['u_out'].shape == (5, 16)
  assert actions[0].form_before == 'tucker2' and actions[0].ranks == (3, 5)
  inner = forms.tucker2.from_kernel(
      tree.get_layer(once['params'], 'conv2')['core'], (3, 5))
  old = tree.get_layer(once['params'], 'conv2')
  composed = forms.tucker2.to_kernel(
      {'u_in': old['u_in'] @ inner['u_in'], 'core': inner['core'],
       'u_out': inner['u_out'] @ old['u_out']})
  np.testing.assert_allclose(forms.tucker2.to_kernel(layer), composed,
                             atol=1e-5)
  with pytest.raises(ValueError, match="'conv2': rank R_in=5 exceeds"):
    lj.tucker2_split(twice, (5, 5), select='conv2')


def test_transforms_do_not_modify_input():
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  frozen = copy.deepcopy(jax.tree_util.tree_map(np.asarray, v))
  lj.tucker2_split(v, 2, select='conv2')
  lj.svd_split(v, 2)
  lj.overparameterize(v, select=['conv.*', 'fc1'], key=jax.random.PRNGKey(0))
  lj.cp_split(v, 3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen,
                         jax.tree_util.tree_map(np.asarray, v))
  assert list(frozen['params']) == list(v['params'])


def test_bad_input_errors_name_the_problem():
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="'conv1': rank R_in=2 exceeds its "
                     'dimension 1'):
    lj.tucker2_split(v, 2, select='conv1')
  with pytest.raises(ValueError, match="'conv2': rank R_out=0 must be >= 1"):
    lj.tucker2_split(v, (2, 0), select='conv2')
  with pytest.raises(ValueError, match=r"rule 'conv3' matches no layer; close "
                     r"paths: \['conv2', 'conv1'\]"):
    lj.tucker2_split(v, 2, select='conv3')
  with pytest.raises(KeyError, match="name no layer at \\['fc9'\\]"):
    lj.svd_split(v, {'fc9': 2})
  bad = jax.tree_util.tree_map(lambda a: a, v)
  bad['params']['fc1']['kernel'] = bad['params']['fc1']['kernel'].at[0, 0].set(
      jnp.nan)
  with pytest.raises(ValueError, match="layer 'fc1': variable 'kernel' has 1 "
                     'non-finite'):
    lj.svd_split(bad, 4)
  with pytest.raises(ValueError, match='expansion must be >= 1'):
    lj.overparameterize(v, expansion=0.5, key=jax.random.PRNGKey(0))
  # Ineligible layers matched by a rule are skipped with a reason.
  _, actions = lj.tucker2_split(v, 4, select=['conv2', 'fc.*'], report=True)
  reasons = {a.path: (a.action, a.reason) for a in actions}
  assert reasons['conv2'][0] == 'split'
  assert reasons['fc1'] == ('skipped',
                            'tucker2 takes kxk layers; this is a dense layer')


class _Grouped(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Conv(8, (3, 3), feature_group_count=2, name='grouped')(x)


def test_grouped_conv_split_fails_at_apply_naming_the_layer():
  model = _Grouped()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  split = lj.tucker2_split(v, (2, 4))
  with pytest.raises(ValueError, match="layer 'grouped' is a grouped conv"):
    lj.apply(model, split, jnp.zeros((1, 8, 8, 4)))


def test_orthogonal_penalty_zero_positive_and_gradient():
  model = lj.get_model('lenet5')
  # Jitted init and NumPy noise: eagerly, each op compiles per leaf shape
  # (11 of this test's 17 s).
  v = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  assert float(lj.orthogonal_penalty(v)) == 0.0  # dense only
  over = lj.overparameterize(v, expansion=2.0, key=jax.random.PRNGKey(0))
  assert float(lj.orthogonal_penalty(over)) < 1e-10
  rng = np.random.default_rng(1)
  noisy = jax.tree_util.tree_map(
      lambda a: a + np.float32(0.05) * rng.standard_normal(a.shape, np.float32),
      over)
  assert float(lj.orthogonal_penalty(noisy)) > 1e-3
  assert float(lj.orthogonal_penalty(noisy, select='conv1')) < float(
      lj.orthogonal_penalty(noisy))
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                 noisy['params'])
    f = lambda p: lj.penalties.factor_orthogonality(
        p['conv2']['op_in']).astype(jnp.float64)
    g = jax.grad(lambda p: jnp.sum(_penalty64(p)))(p64)['conv2']['op_in']
    direction = np.random.default_rng(0).normal(size=g.shape)
    eps = 1e-6
    plus = jax.tree_util.tree_map(lambda a: a, p64)
    minus = jax.tree_util.tree_map(lambda a: a, p64)
    plus['conv2'] = dict(plus['conv2'], op_in=p64['conv2']['op_in'] +
                         eps * direction)
    minus['conv2'] = dict(minus['conv2'], op_in=p64['conv2']['op_in'] -
                          eps * direction)
    fd = (_penalty64(plus) - _penalty64(minus)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g * direction)), float(fd),
                               rtol=1e-6)
    del f


def _penalty64(p):
  mat = p['conv2']['op_in']
  gram = mat @ mat.T
  ref = jnp.sum((gram - jnp.eye(mat.shape[0])) ** 2) / mat.shape[0]
  ours = lj.penalties.factor_orthogonality(mat)
  # factor_orthogonality works in float32; check it against the float64 form
  # here and differentiate the float64 form of the same expression.
  np.testing.assert_allclose(float(jax.lax.stop_gradient(ours)),
                             float(jax.lax.stop_gradient(ref)), rtol=1e-4)
  return ref


def test_penalty_is_jittable_and_matches_eager():
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  over = lj.overparameterize(v, key=jax.random.PRNGKey(0))
  noisy = jax.tree_util.tree_map(lambda a: a * 1.1, over)
  np.testing.assert_allclose(jax.jit(lj.orthogonal_penalty)(noisy),
                             lj.orthogonal_penalty(noisy), rtol=1e-6)


def test_count_flops_matches_xla_cost_analysis():
  model = lj.get_model('lenet5')
  shape = (1, 28, 28, 1)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
  for variables in (v, lj.tucker2_split(v, (1, 8), select='conv2'),
                    lj.svd_split(v, 8)):
    report = lj.count_flops(model, variables, shape)
    cost = jax.jit(lambda x: lj.apply(model, variables, x)).lower(
        jnp.zeros(shape)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA counts 2 flops per multiply-add plus the bias adds, relus and pools.
    assert 0.97 < cost['flops'] / (2 * report.total) < 1.05
  report = lj.count_flops(model, v, shape)
  assert report.per_layer['conv2'].macs == 10 * 10 * 16 * 25 * 6
  assert report.per_layer['conv2'].out_shape == (1, 10, 10, 16)
  assert report.total == sum(r.macs for r in report.per_layer.values())


def test_cp_flops_match_xla_and_decompose_dispatches_cp():
  model = lj.get_model('lenet5')
  shape = (1, 28, 28, 1)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
  split = lj.decompose(v, {'conv2': (6,), 'fc1': (12,)}, conv_form='cp')
  assert lj.layer_forms(split)['conv2'] == 'cp'
  assert lj.layer_forms(split)['fc1'] == 'svd'
  report = lj.count_flops(model, split, shape)
  k = report.per_layer['conv2']
  # 1x1 6->6 on 14x14, depthwise 5x1 and 1x5, 1x1 6->16 on 10x10.
  assert k.macs == 14 * 14 * 6 * 6 + 10 * 14 * 6 * 5 + 10 * 10 * 6 * 5 + \
      10 * 10 * 6 * 16
  cost = jax.jit(lambda x: lj.apply(model, split, x)).lower(
      jnp.zeros(shape)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 0.95 < cost['flops'] / (2 * report.total) < 1.1


def _fold_ranks(path, variables):
  """Cores of 16 channels on the wider side where C_in is 16, else 17."""
  c_in = variables['kernel'].shape[2]
  return (4, 16) if c_in == 16 else (8, 17)


@pytest.mark.parametrize('max_channels', [16, 17])
def test_fold_cores_keeps_outputs_and_counts_the_folded_layers(
    max_channels, real_images):
  x = jnp.asarray(real_images[:4])
  model, v = _perturbed_variables('resnet20', x)
  split = lj.tucker2_split(v, _fold_ranks, select=[('conv1', False), '.*'])
  before = jax.tree_util.tree_map(np.asarray, split)
  folded, actions = lj.fold_cores(split, max_channels=max_channels,
                                  report=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, split)
  y = lj.apply(model, split, x, train=False)
  np.testing.assert_allclose(lj.apply(model, folded, x, train=False), y,
                             atol=1e-4 * float(jnp.max(jnp.abs(y))))
  shape = (4,) + x.shape[1:]
  flops = lj.count_flops(model, split, shape, train=False).per_layer
  flops_after = lj.count_flops(model, folded, shape, train=False).per_layer
  params, params_after = split['params'], folded['params']
  expected = lj.count_params(split)
  done = {a.path: a for a in actions if a.action == 'folded'}
  for path, form in lj.layer_forms(split).items():
    layer = tree.get_layer(params, path)
    if form != 'tucker2' or max(forms.tucker2.ranks(layer)) > max_channels:
      assert path not in done
      assert lj.layer_forms(folded)[path] == form
      continue
    (r_in, r_out), after = forms.tucker2.ranks(layer), done[path]
    assert (after.form_before, after.form_after, after.ranks) == (
        'tucker2', 'svd', (r_out,))
    kh, kw, c_in, c_out = tree.kernel_shape(layer)
    assert tree.get_layer(params_after, path)['u'].shape == (kh, kw, c_in,
                                                              r_out)
    grown = kh * kw * c_in * r_out - c_in * r_in - kh * kw * r_in * r_out
    expected += grown
    out = flops[path].out_shape
    assert flops_after[path].macs == math.prod(out[:-1]) * (
        kh * kw * c_in * r_out + r_out * c_out)
  assert len(done) == (7 if max_channels == 16 else 18)
  assert lj.count_params(folded) == expected
  skipped = [a.reason for a in actions if a.action == 'skipped']
  assert any('not Tucker-2' in r for r in skipped)
  assert any('wider than max_channels' in r for r in skipped) == (
      max_channels == 16)


def test_fold_cores_on_nnx_returns_a_new_module_with_equal_outputs(
    real_images):
  import own_models  # pylint: disable=g-import-not-at-top
  module = own_models.nnx_cnn()
  module.eval()
  split = lj.tucker2_split(module, (4, 8), select='conv2')
  folded = lj.fold_cores(split)
  assert folded is not split
  assert lj.layer_forms(split)['conv2'] == 'tucker2'
  assert lj.layer_forms(folded) == {'conv1': 'dense', 'conv2': 'svd',
                                    'mix': 'dense', 'head': 'dense'}
  folded.eval()
  y = split(real_images)
  np.testing.assert_allclose(folded(real_images), y,
                             atol=1e-5 * float(jnp.max(jnp.abs(y))))
  # conv2: 3x3, 16 -> 32, stride 2; the core (4, 8) becomes (3, 3, 16, 8).
  assert lj.count_params(folded) - lj.count_params(split) == (
      9 * 16 * 8 - 16 * 4 - 9 * 4 * 8)
  assert lj.count_flops(folded, (1, 28, 28, 1)).per_layer['conv2'].macs == (
      7 * 7 * (9 * 16 * 8 + 8 * 32))


@pytest.mark.parametrize('max_channels', [0, -3])
def test_fold_cores_refuses_a_width_that_folds_nothing(max_channels):
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match=f'max_channels={max_channels} must'):
    lj.fold_cores(v, max_channels=max_channels)
