"""Models shaped like the ones users bring, written here from their structure.

None of them uses anything from lowrank_jax: plain ``nn.Conv`` / ``nn.Dense``
(linen) and ``nnx.Conv`` / ``nnx.Linear`` (NNX), as in the Flax examples.

* :class:`ExampleResNet`: the layout of the Flax examples' ImageNet ResNet
  (conv and norm passed as ``functools.partial``, a ``conv_proj`` shortcut,
  auto-named layers, the head hard-coded as ``nn.Dense``), sized for 28x28.
* :class:`PlainVGG`: a VGG-style stack (biased convs, no norm, max-pool,
  dense classifier with dropout).
* :class:`NNXCNN`: an NNX CNN with BatchNorm and Dropout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import nnx
import jax.numpy as jnp

ModuleDef = Any


class ExampleResNetBlock(nn.Module):
  """conv-norm-act, conv-norm (zero-init scale), projection when shapes differ."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides,
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class ExampleResNet(nn.Module):
  """A ResNet in the layout of the Flax examples' ImageNet model."""
  stage_sizes: Sequence[int] = (1, 1)
  num_filters: int = 8
  num_classes: int = 10
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
             name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ExampleResNetBlock(self.num_filters * 2 ** i, strides=strides,
                               conv=conv, norm=norm, act=self.act)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, self.dtype)


class PlainVGG(nn.Module):
  """VGG-style: biased 3x3 convs, max-pools, two dense layers with dropout."""
  widths: Sequence[Any] = (16, 16, 'M', 32, 32, 'M')
  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    for w in self.widths:
      if w == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2))
      else:
        x = nn.relu(nn.Conv(w, kernel_size=(3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class NNXCNN(nnx.Module):
  """An NNX CNN: conv-bn-relu, strided conv-bn-relu, 1x1 conv, dropout, head."""

  def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, rngs=rngs)
    self.mix = nnx.Conv(32, 32, (1, 1), rngs=rngs)
    self.dropout = nnx.Dropout(0.25, rngs=rngs)
    self.head = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.mix(x))
    x = self.dropout(jnp.mean(x, axis=(1, 2)))
    return self.head(x)


def nnx_cnn(seed: int = 0) -> NNXCNN:
  """A factory as ``config.model='module:factory'`` takes it."""
  return NNXCNN(rngs=nnx.Rngs(seed))


def example_resnet() -> ExampleResNet:
  """A factory as ``config.model='module:factory'`` takes it."""
  return ExampleResNet()
