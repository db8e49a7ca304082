"""The networks: fc2, lenet5, resnet20, resnet18, vgg16 (CIFAR-style), vgg7,
vgg7b, vgg7w, vgg8.

Plain linen: every conv and dense layer is an ``nn.Conv`` / ``nn.Dense``, so
these are models like any user's, and a params tree rewritten by any
transform runs through :func:`lowrank_jax.apply` with the same model object.
All models take NHWC float inputs of 28x28x1 (MNIST-like) or 32x32x3
(CIFAR-like) and are applied as ``lj.apply(model, variables, x,
train=False)``; with
``train=True`` BatchNorm uses batch statistics and needs
``mutable=['batch_stats']``.

Layer paths (used by selection rules) are readable: ``conv1``,
``stage2_block0/conv1``, ``stage2_block0/shortcut``, ``features/conv3_2``,
``classifier/fc1``, ``head``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import nnx

from lowrank_jax import nnx_surgery
import jax.numpy as jnp

ModuleDef = Any


class FC2(nn.Module):
  """Two-layer perceptron (ADTN paper's FC-2): 784 -> hidden -> classes."""
  num_classes: int = 10
  hidden: int = 256
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class LeNet5(nn.Module):
  """LeNet-5: conv5x5(6) pool conv5x5(16) pool fc120 fc84 fc.

  28x28 inputs are padded to 32x32 by the first conv's padding (2), as in the
  original; 32x32 inputs run it with padding 2 too (then 8x8x16 before fc).
  """
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(6, (5, 5), padding=((2, 2), (2, 2)), dtype=self.dtype,
                     name='conv1')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (5, 5), padding='VALID', dtype=self.dtype,
                     name='conv2')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, dtype=self.dtype, name='fc1')(x))
    x = nn.relu(nn.Dense(84, dtype=self.dtype, name='fc2')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class BasicBlock(nn.Module):
  """ResNet basic block: 3x3 conv-bn-relu, 3x3 conv-bn, shortcut, relu."""
  features: int
  strides: int = 1
  norm: ModuleDef = nn.BatchNorm
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.features, (3, 3), (self.strides, self.strides),
             name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2', scale_init=nn.initializers.zeros_init())(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv(self.features, (1, 1), (self.strides, self.strides),
               name='shortcut')(x)
      x = self.norm(name='shortcut_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet: 3x3 stem (no max-pool), stages of basic blocks."""
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype,
             name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, norm=norm, dtype=self.dtype,
                       name=f'stage{i + 1}_block{j}')(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


_VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
          512, 512, 512, 'M')


class VGG16(nn.Module):
  """CIFAR-style VGG-16 with BatchNorm and a 512-512-classes classifier.

  Pooling uses SAME padding so 28x28 inputs reach 1x1 after five pools
  (28-14-7-4-2-1) just as 32x32 inputs do. The classifier is two 512-wide
  dense layers with dropout (the common CIFAR VGG variant), then the head.
  """
  num_classes: int = 10
  dropout: float = 0.5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    block, index = 1, 1
    for v in _VGG16:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2), padding='SAME')
        block, index = block + 1, 1
        continue
      x = nn.Conv(v, (3, 3), use_bias=False, dtype=self.dtype,
               name=f'conv{block}_{index}')(x)
      x = nn.relu(norm(name=f'bn{block}_{index}')(x))
      index += 1
    x = x.reshape(x.shape[0], -1)
    for k in (1, 2):
      x = nn.relu(nn.Dense(512, dtype=self.dtype, name=f'fc{k}')(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


class SmallVGG(nn.Module):
  """A small VGG-style net with BatchNorm and a global-average-pool head.

  ``layers`` lists the features: an int is a 3x3 conv (no bias) -> BatchNorm
  -> relu of that width, ``'M'`` a 2x2 max-pool (SAME padding, so 28x28
  goes 14-7-4). After the last conv: global average pool, then one dense
  head. Layer paths are ``conv{block}_{index}`` (block counts pools, as in
  :class:`VGG16`) and ``head``.
  """
  layers: Sequence[Any]
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    block, index = 1, 1
    for v in self.layers:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2), padding='SAME')
        block, index = block + 1, 1
        continue
      x = nn.Conv(v, (3, 3), use_bias=False, dtype=self.dtype,
                  name=f'conv{block}_{index}')(x)
      x = nn.relu(norm(name=f'bn{block}_{index}')(x))
      index += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    'fc2': FC2,
    'lenet5': LeNet5,
    'resnet20': functools.partial(ResNet, stage_sizes=(3, 3, 3),
                                  widths=(16, 32, 64)),
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                  widths=(64, 128, 256, 512)),
    'vgg16': VGG16,
    # Benchmark-model candidates sized for 2 CPU cores, measured in
    # docs/benchmark_model.md. vgg7: 107k params, 7.3M MACs on 28x28x1; one
    # conv at 28x28, the rest at 14x14 and 7x7, where 32- and 64-channel
    # 3x3 convs are worth splitting (92.86% after 15 epochs).
    'vgg7': functools.partial(SmallVGG, layers=(16, 'M', 32, 32, 'M',
                                                64, 64, 64)),
    # The benchmark model (docs/benchmark_model.md): two convs at each of
    # 28, 14 and 7 pixels, 72.7k params; 93.29% test after 20 epochs.
    'vgg7b': functools.partial(SmallVGG, layers=(16, 16, 'M', 32, 32, 'M',
                                                 64, 64)),
    # vgg7b at twice the width (32, 64, 128 channels; a32 of
    # docs/benchmark_model.md): 288k params, 29M MACs. Room to compress 4x
    # and stay near vgg7b's size: the frontier's wide model.
    'vgg7w': functools.partial(SmallVGG, layers=(32, 32, 'M', 64, 64, 'M',
                                                 128, 128)),
    # vgg7 with a second conv at 28x28: 109k params, 9.2M MACs.
    'vgg8': functools.partial(SmallVGG, layers=(16, 16, 'M', 32, 32, 'M',
                                                64, 64, 64)),
}


def get_model(name: str, *, num_classes: int = 10, **kwargs) -> nn.Module:
  """Creates a model by name, or by a user's factory.

  Args:
    name: one of ``MODELS`` (fc2, lenet5, resnet20, resnet18, vgg16, vgg7,
      vgg7b, vgg7w, vgg8), or
      ``'package.module:factory'``: a callable returning a ``flax.linen``
      module whose ``__call__(x, train=...)`` returns logits, or an NNX
      module whose ``__call__(x)`` does (``train()`` / ``eval()`` switch
      its modes); it is given ``num_classes=`` when its signature takes it.
    num_classes: size of the output layer.
    **kwargs: further model attributes (e.g. ``dtype=jnp.bfloat16``).

  Returns:
    An unbound Flax module (an NNX one wrapped in
    :class:`lowrank_jax.nnx_surgery.NNXModel`); ``model.init(key, x,
    train=False)`` makes its variables.
  """
  if ':' in name:
    return _from_factory(name, num_classes=num_classes, **kwargs)
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known: {sorted(MODELS)}, or '
                     "'package.module:factory'")
  return MODELS[name](num_classes=num_classes, **kwargs)


def _from_factory(spec: str, **kwargs) -> nn.Module:
  module_name, _, attr = spec.partition(':')
  try:
    factory = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'model {spec!r}: cannot import {attr!r} from '
                     f'{module_name!r} ({type(e).__name__}: {e}); is the '
                     'module on PYTHONPATH?') from e
  if not callable(factory):
    raise ValueError(f'model {spec!r}: {attr!r} is not callable')
  try:
    params = inspect.signature(factory).parameters
  except (TypeError, ValueError):   # a builtin: pass nothing
    params = {}
  takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
  kwargs = {k: v for k, v in kwargs.items() if takes_any or k in params}
  model = factory(**kwargs)
  if isinstance(model, nnx.Module):
    return nnx_surgery.NNXModel(model)
  if not isinstance(model, nn.Module):
    raise ValueError(f'model {spec!r} returned {type(model).__name__}, not '
                     'a flax.linen Module')
  return model


def uses_dropout(model: nn.Module) -> bool:
  """Whether the model needs a 'dropout' PRNG when applied with train=True."""
  return isinstance(model, VGG16) and model.dropout > 0
