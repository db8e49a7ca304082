"""Rank rules: network-wide targets, costs from shapes, guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import rank_rules
from lowrank_jax import vbmf


@pytest.fixture(scope='module')
def vgg():
  model = lj.get_model('vgg16')
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 28, 28, 1))))
  return model, shapes, rank_rules.layer_geometry(model, shapes,
                                                  (1, 28, 28, 1))


@pytest.mark.parametrize('metric,target', [('params', 4.0), ('flops', 4.0),
                                           ('flops', 8.0)])
def test_target_ratio_is_met_network_wide(vgg, metric, target):
  _, _, geometry = vgg
  ranks = rank_rules.ranks_for_ratio(geometry, metric=metric, target=target)
  base = rank_rules.network_cost(geometry, {})
  after = rank_rules.network_cost(geometry, ranks)
  index = 0 if metric == 'params' else 1
  ratio = base[index] / after[index]
  assert target <= ratio < target * 1.05
  for path, r in ranks.items():
    g = geometry[path]
    assert all(8 <= x <= size for x, size in zip(r, rank_rules.mode_sizes(g)))


def test_split_cost_matches_a_real_split(vgg):
  model, shapes, geometry = vgg
  # Random arrays of the init's shapes (NumPy: an eager VGG-16 init, or
  # jax.random per leaf, compiles for tens of seconds; costs need shapes).
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32),
                           shapes)
  ranks = {'conv3_2': (40, 72), 'fc1': (30,), 'conv1_2': (8, 16)}
  split = lj.svd_split(lj.tucker2_split(variables, {
      k: v for k, v in ranks.items() if len(v) == 2}), {'fc1': 30})
  after = rank_rules.layer_geometry(model, split, (1, 28, 28, 1))
  for path, r in ranks.items():
    assert rank_rules.split_cost(geometry[path], r) == (
        after[path].params, after[path].macs)


def test_rounding_and_unreachable_target(vgg):
  _, _, geometry = vgg
  ranks = rank_rules.ranks_for_ratio(geometry, metric='flops', target=3.0,
                                     round_to=16)
  assert all(x % 16 == 0 or x == size for r, g in
             ((r, geometry[p]) for p, r in ranks.items())
             for x, size in zip(r, rank_rules.mode_sizes(g)))
  with pytest.raises(ValueError, match=r'target ratio 1000.0 '
                     r"\(flops\) cannot be reached: at the minimum ranks "
                     r"\(by layer kind: \{'kxk': 8, 'dense': 8\}\)"):
    rank_rules.ranks_for_ratio(geometry, metric='flops', target=1000.0)
  with pytest.raises(ValueError, match='must be > 1'):
    rank_rules.ranks_for_ratio(geometry, metric='flops', target=0.5)


def test_min_rank_follows_the_vbmf_convention(vgg):
  _, _, geometry = vgg
  defaults = rank_rules.min_rank_floors(geometry)
  assert defaults == {p: vbmf.weaken.DEFAULT_MIN_RANK[g.kind]
                      for p, g in geometry.items()}
  ranks = rank_rules.ranks_for_ratio(geometry, metric='flops', target=4.0,
                                     min_rank={'fc.*': 40})
  assert all(r[0] >= 40 for p, r in ranks.items() if p.startswith('fc'))
  ranks = rank_rules.ranks_for_ratio(geometry, metric='flops', target=4.0,
                                     min_rank=24)
  assert all(x >= min(24, size) for p, r in ranks.items()
             for x, size in zip(r, rank_rules.mode_sizes(geometry[p])))
  with pytest.raises(ValueError, match='matches no layer'):
    rank_rules.ranks_for_ratio(geometry, metric='flops', target=4.0,
                               min_rank={'no_such_layer': 4})


@pytest.mark.parametrize('form', ['tucker2', 'cp', 'svd'])
def test_one_layer_solver_is_the_network_solver(vgg, form):
  """rank_for_flop_ratio is ranks_for_ratio on a network of one layer."""
  _, _, geometry = vgg
  g = geometry['conv2_1']
  ranks = rank_rules.rank_for_flop_ratio(form, g.kernel_shape, 4.0,
                                         g.in_shape, g.out_shape)
  alone = {'conv2_1': g._replace(bias=0, params=g.params - g.bias)}
  assert rank_rules.ranks_for_ratio(
      alone, metric='flops', target=4.0, min_rank=1,
      conv_form=form)['conv2_1'] == ranks
  with pytest.raises(ValueError, match="splits into 'svd'"):
    rank_rules.rank_for_flop_ratio('tucker2', (64, 10), 2.0, (1, 64),
                                   (1, 10))
