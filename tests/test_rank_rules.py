"""Rank rules: network-wide targets, costs from shapes, guards."""

import jax
import jax.numpy as jnp
import pytest

import lowrank_jax as lj
from lowrank_jax import rank_rules


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
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
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
  with pytest.raises(ValueError, match=r'compress.target_ratio=1000.0 '
                     r'\(flops\) cannot be reached.*compress.min_rank'):
    rank_rules.ranks_for_ratio(geometry, metric='flops', target=1000.0)
  with pytest.raises(ValueError, match='must be > 1'):
    rank_rules.ranks_for_ratio(geometry, metric='flops', target=0.5)
