"""BatchNorm statistics re-estimated after a split (recalibrate_batch_stats)."""

import copy

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj


class _Block(nn.Module):
  momentum: float

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(5)(x)
    return nn.BatchNorm(use_running_average=not train,
                        momentum=self.momentum)(x)


class _Net(nn.Module):
  """Dense -> BN (0.9) -> relu -> block(Dense -> BN (0.99)), a BN at two
  depths with two momenta."""
  momenta: tuple = (0.9, 0.99)

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=self.momenta[0])(x)
    return _Block(self.momenta[1], name='block')(nn.relu(x), train)


def _batches(n, shape=(32, 7), seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(2.0, 3.0, shape).astype(np.float32),
           np.zeros(shape[0], np.int32)) for _ in range(n)]


def test_linen_statistics_are_the_average_of_the_batch_statistics():
  """Each BN's mean and variance: the average over the batches of its batch
  statistics, read from a twin model with momentum 0 (whose update *is*
  the batch's); independent of the old statistics; parameters untouched."""
  model, twin = _Net(), _Net(momenta=(0.0, 0.0))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 7)))
  before = copy.deepcopy(jax.device_get(variables))
  batches = _batches(3)
  got = lj.recalibrate_batch_stats(model, variables, batches)
  per_batch = [twin.apply(variables, x, train=True,
                          mutable=['batch_stats'])[1]['batch_stats']
               for x, _ in batches]
  want = jax.tree.map(lambda *s: np.mean(s, axis=0), *per_batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=1e-5),
               got['batch_stats'], want)
  assert got['params'] is variables['params']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables),
               before)
  stale = {**variables, 'batch_stats': jax.tree.map(
      lambda s: s * 0 + 100.0, variables['batch_stats'])}
  again = lj.recalibrate_batch_stats(model, stale, iter(batches))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               again['batch_stats'], got['batch_stats'])


def test_a_split_network_recalibrated_on_a_batch_evaluates_it_as_in_training():
  """vgg7b, every conv but the first Tucker-2 split: after recalibrating on
  one batch, the network in evaluation mode gives that batch the outputs
  of training mode (BatchNorm's running statistics are then the batch's)."""
  model = lj.get_model('vgg7b')
  x = np.random.default_rng(1).normal(size=(16, 28, 28, 1)).astype(
      np.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  ranks = {p: (4, 4) for p in lj.find_layers(variables)
           if p.startswith('conv') and p != 'conv1_1'}
  split = lj.decompose(variables, ranks)
  assert 'tucker2' in lj.layer_forms(split).values()
  out = lj.recalibrate_batch_stats(model, split, [x])
  train, _ = lj.apply(model, split, x, train=True, mutable=['batch_stats'])
  stale = lj.apply(model, split, x, train=False)
  np.testing.assert_allclose(lj.apply(model, out, x, train=False), train,
                             rtol=1e-3, atol=1e-3)
  assert np.abs(np.asarray(stale) - np.asarray(train)).max() > 1e-2


class _NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.bn_in = nnx.BatchNorm(7, momentum=0.9, rngs=rngs)
    self.dense = nnx.Linear(7, 5, rngs=rngs)
    self.bn_out = nnx.BatchNorm(5, momentum=0.99, rngs=rngs)

  def __call__(self, x):
    return self.bn_out(self.dense(nnx.relu(self.bn_in(x))))


def test_nnx_module_is_cloned_and_recalibrated():
  """A new module whose first BN holds the average of the batches' means and
  variances; the given module keeps its statistics and settings."""
  net = _NnxNet(nnx.Rngs(0))
  net.eval()
  batches = _batches(2)
  out = lj.recalibrate_batch_stats(net, batches)
  assert out is not net
  np.testing.assert_allclose(net.bn_in.mean[...], 0.0)
  assert (net.bn_in.momentum, net.bn_in.use_running_average) == (0.9, True)
  assert (out.bn_out.momentum, out.bn_out.use_running_average) == (0.99,
                                                                    True)
  xs = np.stack([x for x, _ in batches])
  np.testing.assert_allclose(out.bn_in.mean[...], xs.mean(axis=1).mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(out.bn_in.var[...], xs.var(axis=1).mean(0),
                             rtol=1e-4)
  one = lj.recalibrate_batch_stats(net, batches[:1])
  net.train()
  np.testing.assert_allclose(one(batches[0][0]), net(batches[0][0]),
                             rtol=1e-4, atol=1e-4)


def test_errors_name_what_is_missing():
  model = _Net()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 7)))
  with pytest.raises(ValueError, match='no batches'):
    lj.recalibrate_batch_stats(model, variables, [])
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    lj.recalibrate_batch_stats(model, {'params': variables['params']},
                               _batches(1))
  with pytest.raises(ValueError, match='no nnx.BatchNorm'):
    lj.recalibrate_batch_stats(nnx.Linear(3, 2, rngs=nnx.Rngs(0)),
                               _batches(1, (4, 3)))
  with pytest.raises(ValueError, match='no batches'):
    lj.recalibrate_batch_stats(_NnxNet(nnx.Rngs(0)), [])


def test_a_network_with_dropout_is_recalibrated_without_rngs_given():
  """vgg16 (dropout in its classifier): masks are drawn per batch unless
  the caller passes rngs; with its own rngs the same batches give the same
  statistics twice."""
  model = lj.get_model('vgg16')
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  batches = [np.random.default_rng(i).normal(size=(4, 32, 32, 3)).astype(
      np.float32) for i in range(2)]
  out = lj.recalibrate_batch_stats(model, variables, batches)
  assert not np.allclose(out['batch_stats']['bn1_1']['mean'],
                         variables['batch_stats']['bn1_1']['mean'])
  mine = {'dropout': jax.random.PRNGKey(5)}
  a, b = (lj.recalibrate_batch_stats(model, variables, batches, rngs=mine)
          for _ in range(2))
  jax.tree.map(np.testing.assert_array_equal, a['batch_stats'],
               b['batch_stats'])
