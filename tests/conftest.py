"""Shared fixtures: a few real Fashion-MNIST images from the Debian package."""

import os

import numpy as np
import pytest

FMNIST_DIR = os.environ.get('LOWRANK_JAX_FASHION_MNIST_DIR',
                            '/usr/share/datasets/fashion-mnist')


@pytest.fixture(scope='session')
def fmnist():
  """The offline Fashion-MNIST dataset (small subsets), or skip if absent."""
  from lowrank_jax.train import data
  if not os.path.exists(os.path.join(FMNIST_DIR,
                                     't10k-images-idx3-ubyte.gz')):
    pytest.skip('dataset-fashion-mnist is not installed')
  return data.load_dataset('fashion_mnist_local', validation_size=1000,
                           train_subset=4096, test_subset=1024, seed=0)


@pytest.fixture(scope='session')
def real_images(fmnist):
  """Eight normalized real test images, (8, 28, 28, 1) float32."""
  x = fmnist.test.images[:8].astype(np.float32) / 255.0
  return (x - fmnist.mean) / fmnist.std


@pytest.fixture(scope='session')
def real_images_rgb(real_images):
  """The same images padded to 32x32 and tiled to 3 channels (CIFAR shape)."""
  x = np.pad(real_images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return np.repeat(x, 3, axis=-1)
