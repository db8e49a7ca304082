"""Model shapes and exact parameter counts."""

import jax
import jax.numpy as jnp
import pytest

import lowrank_jax as lj
from lowrank_jax import count_params, find_layers, get_model

# Exact counts; resnet20 / resnet18 on 32x32x3 match the published CIFAR
# figures (0.27M, 11.17M), LeNet-5 on 28x28x1 the classic 61,706.
COUNTS = {
    ('fc2', 1): 203_530, ('fc2', 3): 789_258,
    ('lenet5', 1): 61_706, ('lenet5', 3): 83_126,
    ('resnet20', 1): 272_186, ('resnet20', 3): 272_474,
    ('resnet18', 1): 11_172_810, ('resnet18', 3): 11_173_962,
    ('vgg16', 1): 15_248_202, ('vgg16', 3): 15_249_354,
    ('vgg7', 1): 107_322, ('vgg7', 3): 107_610,
    ('vgg7b', 1): 72_666, ('vgg7b', 3): 72_954,
    ('vgg7w', 1): 288_170, ('vgg7w', 3): 288_746,
    ('vgg8', 1): 109_658, ('vgg8', 3): 109_946,
}


@pytest.mark.parametrize('name,channels', sorted(COUNTS))
def test_shapes_and_param_counts(name, channels):
  size = 28 if channels == 1 else 32
  model = get_model(name, num_classes=10)
  x = jnp.zeros((2, size, size, channels))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  assert count_params(variables) == COUNTS[(name, channels)]
  out = jax.eval_shape(lambda v: lj.apply(model, v, x, train=False), variables)
  assert out.shape == (2, 10)


def test_layer_paths_are_readable():
  model = get_model('resnet20')
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                        jnp.zeros((1, 32, 32, 3))))
  paths = list(find_layers(v))
  assert {'conv1', 'head', 'stage1_block0/conv1'} <= set(paths)
  assert 'stage2_block0/shortcut' in paths
  assert len(paths) == 22  # 19 3x3 convs, 2 shortcuts, head


def test_num_classes_and_unknown_name():
  model = get_model('lenet5', num_classes=100)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  assert lj.apply(model, v, jnp.zeros((3, 28, 28, 1))).shape == (3, 100)
  with pytest.raises(ValueError, match='known: .*resnet20'):
    get_model('resnet21')



_SMALL_VGG_KERNELS = {
    'vgg7': {'conv1_1': (3, 3, 1, 16), 'conv2_1': (3, 3, 16, 32),
             'conv2_2': (3, 3, 32, 32), 'conv3_1': (3, 3, 32, 64),
             'conv3_2': (3, 3, 64, 64), 'conv3_3': (3, 3, 64, 64),
             'head': (64, 10)},
    'vgg7b': {'conv1_1': (3, 3, 1, 16), 'conv1_2': (3, 3, 16, 16),
              'conv2_1': (3, 3, 16, 32), 'conv2_2': (3, 3, 32, 32),
              'conv3_1': (3, 3, 32, 64), 'conv3_2': (3, 3, 64, 64),
              'head': (64, 10)},
    'vgg8': {'conv1_1': (3, 3, 1, 16), 'conv1_2': (3, 3, 16, 16),
             'conv2_1': (3, 3, 16, 32), 'conv2_2': (3, 3, 32, 32),
             'conv3_1': (3, 3, 32, 64), 'conv3_2': (3, 3, 64, 64),
             'conv3_3': (3, 3, 64, 64), 'head': (64, 10)},
}


@pytest.mark.parametrize('name', sorted(_SMALL_VGG_KERNELS))
def test_small_vgg_layers_and_init(name):
  """The benchmark models: their 3x3 convs and head by path; BatchNorm
  starts as the identity; initial outputs are finite and differ per input;
  train mode updates every BatchNorm's statistics."""
  model = get_model(name)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
  v = model.init(jax.random.PRNGKey(0), x)
  kernels = {p: l['kernel'].shape for p, l in find_layers(v).items()}
  assert kernels == _SMALL_VGG_KERNELS[name]
  assert all(jnp.all(v['params'][f'bn{p[4:]}']['scale'] == 1)
             for p in kernels if p.startswith('conv'))
  out = lj.apply(model, v, x, train=False)
  assert out.shape == (4, 10) and jnp.all(jnp.isfinite(out))
  assert float(jnp.std(out[:, 0])) > 0
  _, updates = lj.apply(model, v, x, train=True, mutable=['batch_stats'])
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
      v['batch_stats'])
