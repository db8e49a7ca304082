"""Speed tooling: evaluation orders, small-map convs, never_slower, ranks.

Correctness properties only; no wall-clock assertions (timings go to bench/).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import counting
from lowrank_jax import forms
from lowrank_jax import models
from lowrank_jax import speed
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax.forms import base

SPECS = [
    base.LayerSpec('conv', (1, 1), 'SAME', (1, 1)),
    base.LayerSpec('conv', (2, 2), 'SAME', (1, 1)),
    base.LayerSpec('conv', (1, 2), 'VALID', (2, 1)),
    base.LayerSpec('conv', (2, 1), ((1, 0), (2, 1)), (1, 2)),
    base.LayerSpec('conv', (2, 2), ((2, 2), (0, 1)), (2, 2)),
]


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) / np.sqrt(
      max(np.prod(shape[:-1]), 1))


def _np_normal(seed, shape):
  """:func:`_normal`'s scaling, from NumPy (nothing to compile)."""
  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x / np.sqrt(max(np.prod(shape[:-1]), 1)))


def _lax_conv(x, kernel, spec):
  return jax.lax.conv_general_dilated(
      x, kernel, tuple(spec.strides), base._lax_padding(spec.padding),
      rhs_dilation=tuple(spec.dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


FACTORS = {
    'tucker2': lambda: {'u_in': _normal(1, (6, 3)),
                        'core': _normal(2, (3, 3, 3, 5)),
                        'u_out': _normal(3, (5, 8))},
    'cp': lambda: {'cp_in': _normal(1, (6, 4)), 'cp_h': _normal(2, (3, 4)),
                   'cp_w': _normal(3, (3, 4)), 'cp_out': _normal(4, (4, 8))},
    'svd': lambda: {'u': _normal(1, (3, 3, 6, 4)), 'v': _normal(2, (4, 8))},
}


def _no_output(x, kernel, spec) -> bool:
  """Whether lax itself rejects this conv (a window larger than the padded
  input leaves no output position)."""
  try:
    jax.eval_shape(lambda x, k: _lax_conv(x, k, spec), x, kernel)
  except (TypeError, ValueError):
    return True
  return False


@pytest.mark.parametrize('spec', SPECS)
@pytest.mark.parametrize('hw', [(9, 10), (2, 3)])
@pytest.mark.parametrize('form', sorted(FACTORS))
def test_every_order_equals_the_merged_conv(form, hw, spec):
  module = forms.get(form)
  v = FACTORS[form]()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *hw, 6))

  @jax.jit
  def run(v, x):
    ref = _lax_conv(x, module.to_kernel(v), spec)
    outs = {o: module.forward_order(v, x, spec, o) for o in module.ORDERS}
    return ref, outs, module.forward(v, x, spec)

  if _no_output(x, module.to_kernel(v), spec):
    with pytest.raises((TypeError, ValueError)):
      run(v, x)
    return
  ref, outs, y = run(v, x)
  for order, out in outs.items():
    np.testing.assert_allclose(out, ref, atol=3e-5, rtol=1e-4,
                               err_msg=f'{form} {order}')
  np.testing.assert_allclose(y, ref, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize('spec', [base.DENSE, base.LayerSpec('conv', (2, 2))])
def test_svd_orders_for_matrices_and_1x1(spec):
  u = _normal(1, (6, 4)) if spec.kind == 'dense' else _normal(1, (1, 1, 6, 4))
  v = {'u': u, 'v': _normal(2, (4, 8))}
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 6))
  kernel = forms.svd.to_kernel(v)
  ref = x @ kernel if spec.kind == 'dense' else _lax_conv(x, kernel, spec)
  for order in forms.svd.ORDERS:
    np.testing.assert_allclose(forms.svd.forward_order(v, x, spec, order),
                               ref, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize('hw', [(1, 1), (2, 2), (2, 5)])
@pytest.mark.parametrize('spec', SPECS)
@pytest.mark.parametrize('window', [(3, 3), (5, 2)])
def test_conv_as_matmul_equals_lax_conv(window, spec, hw):
  kernel = _normal(1, (*window, 3, 4))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *hw, 3))

  @jax.jit
  def run(x, kernel):
    return (_lax_conv(x, kernel, spec), base.conv_as_matmul(x, kernel, spec),
            base.conv(x, kernel, spec))

  if _no_output(x, kernel, spec):
    with pytest.raises((TypeError, ValueError)):
      run(x, kernel)
    return
  ref, by_matmul, by_conv = run(x, kernel)
  np.testing.assert_allclose(by_matmul, ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(by_conv, ref, atol=2e-5, rtol=1e-5)


def test_conv_on_a_map_smaller_than_the_window_compiles_to_a_dot():
  x = jnp.ones((2, 2, 2, 8))
  kernel = jnp.ones((3, 3, 8, 8))
  spec = base.LayerSpec('conv')
  hlo = jax.jit(lambda k, x: base.conv(x, k, spec)).lower(
      kernel, x).as_text()
  assert 'convolution' not in hlo and 'dot_general' in hlo
  hlo = jax.jit(jax.grad(lambda k, x: base.conv(x, k, spec).sum())).lower(
      kernel, x).as_text()
  assert 'convolution' not in hlo


def test_order_choice_is_static_and_follows_costs():
  v = jax.eval_shape(FACTORS['tucker2'])
  spec = base.LayerSpec('conv')
  costs = forms.tucker2.order_costs(v, (2, 9, 10, 6), spec)
  assert set(costs) == set(forms.tucker2.ORDERS)
  chosen = forms.tucker2.choose_order(v, (2, 9, 10, 6), spec)
  assert costs[chosen] == min(costs.values())
  # Full input rank: folding u_in into the core saves a whole 1x1 conv.
  full = {'u_in': jax.ShapeDtypeStruct((3, 3), jnp.float32),
          'core': jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32),
          'u_out': jax.ShapeDtypeStruct((8, 64), jnp.float32)}
  assert forms.tucker2.choose_order(full, (8, 32, 32, 3), spec) != 'factored'
  # Few channels out of many: the chain of small ops wins.
  low = {'u_in': jax.ShapeDtypeStruct((128, 32), jnp.float32),
         'core': jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32),
         'u_out': jax.ShapeDtypeStruct((32, 128), jnp.float32)}
  assert forms.tucker2.choose_order(low, (64, 32, 32, 128),
                                    spec) == 'factored'


# ----------------------------------------------------------------- ranks ---


@pytest.mark.parametrize('multiple', [1, 8, 16, 32])
@pytest.mark.parametrize('mode', ['up', 'down', 'nearest'])
def test_round_rank_properties(multiple, mode):
  for bound in (1, 5, 16, 37, 64, 512):
    for rank in range(1, bound + 1):
      r = speed.round_rank(rank, multiple, bound=bound, mode=mode)
      assert 1 <= r <= bound
      assert r % multiple == 0 or r == bound or (mode == 'down' and r == rank)
      if mode == 'up':
        assert r >= rank
      if mode == 'down':
        assert r <= rank
      if mode == 'nearest' and r != bound:
        assert abs(r - rank) <= multiple // 2 or rank < multiple // 2
      if rank % multiple == 0:
        assert r == rank
  with pytest.raises(ValueError):
    speed.round_rank(0, 8, bound=4)
  with pytest.raises(ValueError):
    speed.round_rank(3, 8, bound=4, mode='sideways')


def test_round_ranks_reads_bounds_from_the_layers():
  params = {'a': {'kernel': jnp.zeros((3, 3, 12, 40))},
            'b': {'kernel': jnp.zeros((20, 6))}}
  out = speed.round_ranks(params, {'a': (5, 33), 'b': 5}, 8)
  assert out == {'a': (8, 40), 'b': (6,)}
  assert speed.round_ranks(params, {'a': (9, 17)}, 8,
                           mode='down') == {'a': (8, 16)}


@pytest.mark.parametrize('form', ['tucker2', 'cp', 'svd'])
@pytest.mark.parametrize('ratio', [2.0, 4.0, 8.0])
def test_rank_for_flop_ratio_is_the_largest_that_reaches_the_ratio(form,
                                                                   ratio):
  shape, spec = (3, 3, 64, 128), base.LayerSpec('conv', (2, 2))
  in_shape, out_shape = (1, 16, 16, 64), (1, 8, 8, 128)
  ranks = speed.rank_for_flop_ratio(form, shape, ratio, in_shape, out_shape,
                                    spec)
  dense = speed.split_macs('dense', shape, (), in_shape, out_shape, spec)
  macs = speed.split_macs(form, shape, ranks, in_shape, out_shape, spec)
  assert dense / macs >= ratio
  if form != 'tucker2':
    bigger = speed.split_macs(form, shape, (ranks[0] + 1,), in_shape,
                              out_shape, spec)
    assert dense / bigger < ratio
  assert speed.rank_for_flop_ratio('tucker2', (3, 3, 3, 4), 100.0,
                                   (1, 8, 8, 3), (1, 8, 8, 4)) is None


# -------------------------------------------------------- never slower ---


@pytest.fixture(scope='module')
def split_net():
  """LeNet-5 on 32x32x3: 5x5 convs Tucker-2, dense layers SVD.

  Factors from NumPy: eager jax.random compiles once per shape, 30 s here.
  """
  model = models.get_model('lenet5')
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  # Shapes only (eval_shape: no init compiled); the biases are the init's
  # zeros, every kernel is replaced below.
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(1), x,
                                               train=False), x)['params']
  new = {}
  for i, (path, layer) in enumerate(tree.layers(params).items()):
    shape = layer['kernel'].shape
    if len(shape) == 4:   # conv: Tucker-2 at ranks (2, 4)
      new[path] = {'u_in': _np_normal(i, (shape[2], 2)),
                   'core': _np_normal(i + 10, shape[:2] + (2, 4)),
                   'u_out': _np_normal(i + 20, (4, shape[3]))}
    else:                 # dense: SVD at rank 5
      new[path] = {'u': _np_normal(i, (shape[0], 5)),
                   'v': _np_normal(i + 10, (5, shape[1]))}
    new[path]['bias'] = jnp.zeros(layer['bias'].shape)
  return model, {'params': tree.replace_layers(params, new)}, x


def _fake_timer(slow):
  """A timer that says the layers in ``slow`` are slower than dense."""
  def timer(model, variables, input_shape, *, dtype, repeats, select=None):
    del dtype, repeats, select
    calls = counting.called_layers(model, variables, input_shape)
    out = {}
    for path, call in calls.items():
      if forms.identify(call.variables) == 'dense':
        continue
      speedup = 0.8 if path in slow else 1.5
      out[path] = speed.LayerTiming(1e-3, 1e-3 / speedup, speedup, 3.0)
    return out
  return timer


def test_never_slower_merges_exactly_the_slower_layers(split_net):
  model, variables, x = split_net
  split_paths = [p for p, f in transforms.layer_forms(variables).items()
                 if f != 'dense']
  assert len(split_paths) == 5
  slow = set(split_paths[::2])
  before = jax.tree.map(lambda a: a, variables)
  new, report = speed.never_slower(model, variables, x.shape,
                                   timer=_fake_timer(slow))
  assert set(report.merged) == slow
  assert set(report.kept) == set(split_paths) - slow
  assert all('margin' in why for why in report.merged.values())
  after = transforms.layer_forms(new)
  for path, form in transforms.layer_forms(variables).items():
    assert after[path] == ('dense' if path in slow else form)
  np.testing.assert_allclose(lj.apply(model, new, x, train=False),
                             lj.apply(model, variables, x, train=False),
                             atol=1e-4, rtol=1e-4)
  # The input tree is left as it was.
  jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_never_slower_margin_and_nothing_to_merge(split_net):
  model, variables, x = split_net
  new, report = speed.never_slower(model, variables, x.shape,
                                   timer=_fake_timer(set()))
  assert not report.merged and new is variables
  new, report = speed.never_slower(model, variables, x.shape, margin=2.0,
                                   timer=_fake_timer(set()))
  assert set(transforms.layer_forms(new).values()) == {'dense'}
  np.testing.assert_allclose(lj.apply(model, new, x, train=False),
                             lj.apply(model, variables, x, train=False),
                             atol=1e-4, rtol=1e-4)


def test_time_layers_times_every_split_layer(split_net):
  model, variables, x = split_net
  timings = speed.time_layers(model, variables, x.shape, repeats=1,
                              min_time_s=0.0, select=[r'conv2', r'fc.*'])
  split = [p for p, f in transforms.layer_forms(variables).items()
           if f != 'dense' and re.match(r'conv2|fc', p)]
  assert list(timings) == split
  for t in timings.values():
    assert t.dense_s > 0 and t.split_s > 0
    assert t.speedup == pytest.approx(t.dense_s / t.split_s)
  from lowrank_jax import count_flops
  dense_flops = count_flops(model, transforms.collapse(variables), x.shape)
  split_flops = count_flops(model, variables, x.shape)
  for path, t in timings.items():
    assert t.flop_ratio == pytest.approx(
        dense_flops.per_layer[path].macs / split_flops.per_layer[path].macs)


# ------------------------------------------------------ whole networks ---


def _fake_network_timer(cpu):
  """A time_networks that reports the given CPU seconds, wall twice that."""
  def timer(candidates, input_shape, *, model, rounds, dtype, seed,
            **apply_kwargs):
    del input_shape, model, rounds, dtype, seed, apply_kwargs
    return {k: speed.NetworkTiming(2 * cpu[k], cpu[k]) for k in candidates}
  return timer


def test_fastest_network_keeps_the_first_unless_another_beats_the_margin():
  candidates = {'split': object(), 'folded': object(), 'dense': object()}
  timer = _fake_network_timer({'split': 1.0, 'folded': 0.8, 'dense': 2.0})
  best, choice = speed.fastest_network(candidates, (1, 4), timer=timer,
                                       clock='cpu')
  assert best is candidates['folded'] and choice.chosen == 'folded'
  assert choice.clock == 'cpu' and set(choice.timings) == set(candidates)
  best, choice = speed.fastest_network(candidates, (1, 4), timer=timer,
                                       margin=1.3)
  assert best is candidates['split'] and choice.chosen == 'split'
  with pytest.raises(ValueError, match='clock'):
    speed.fastest_network(candidates, (1, 4), timer=timer, clock='gpu')


def _check_choice(candidates, best, choice):
  assert best is candidates[choice.chosen]
  assert list(choice.timings) == list(candidates)
  for t in choice.timings.values():
    assert isinstance(t, speed.NetworkTiming) and t.wall_s > 0 and t.cpu_s > 0


def test_fastest_network_times_linen_trees(split_net):
  model, variables, x = split_net
  candidates = {'split': variables, 'folded': lj.fold_cores(variables)}
  assert lj.layer_forms(candidates['folded'])['conv1'] == 'svd'
  best, choice = speed.fastest_network(candidates, x.shape, model=model,
                                       rounds=2, clock='cpu', train=False)
  _check_choice(candidates, best, choice)
  with pytest.raises(TypeError, match='model='):
    speed.fastest_network(candidates, x.shape, rounds=1)


def test_fastest_network_times_nnx_modules():
  import own_models  # pylint: disable=g-import-not-at-top
  module = own_models.nnx_cnn()
  module.eval()
  split = lj.tucker2_split(module, (4, 8), select='conv2')
  candidates = {'split': split, 'folded': lj.fold_cores(split)}
  best, choice = lj.fastest_network(candidates, (2, 28, 28, 1), rounds=1)
  _check_choice(candidates, best, choice)
  assert choice.clock == 'wall'


@pytest.mark.parametrize('shuffle', [None, 3])
def test_time_calls_order_fixed_or_shuffled_per_round(shuffle):
  calls = []
  fns = [lambda k=k: calls.append(k) for k in range(4)]
  measured = speed.time_calls(fns, [()] * 4, repeats=6, shuffle=shuffle)
  rounds = [calls[4 + 4 * r:8 + 4 * r] for r in range(6)]   # after warm-up
  assert calls[:4] == [0, 1, 2, 3]   # warm-up (compile) in the given order
  assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)
  if shuffle is None:
    assert all(r == [0, 1, 2, 3] for r in rounds)
  else:
    assert len({tuple(r) for r in rounds}) > 1
  for m in measured:
    assert len(m.times_s) == 6 and np.isfinite(m.cpu_s) and m.cpu_s >= 0
  timings = speed.time_interleaved(dict(zip('abcd', fns)), dict.fromkeys(
      'abcd', ()), rounds=2, seed=1)
  assert sorted(timings) == list('abcd')
  assert all(t.wall_s >= 0 and t.cpu_s >= 0 for t in timings.values())
