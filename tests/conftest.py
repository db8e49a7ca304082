"""Shared fixtures: a few real Fashion-MNIST images from the Debian package.

The session compiles through JAX's persistent compilation cache in a fresh
temporary directory (the tests' own ``train.py`` processes too, through the
environment): the many pipeline runs compile the same programs, and each is
compiled once per session. Under pytest-xdist (the README's test command)
each worker imports this file and compiles into a directory of its own (JAX
writes cache entries without a lock). Tests about compilation itself take
:func:`no_compilation_cache`.
"""

import os
import shutil
import tempfile

_XLA_CACHE = tempfile.mkdtemp(prefix='lowrank_jax_tests_xla_cache_')
os.environ.update(JAX_COMPILATION_CACHE_DIR=_XLA_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax.experimental.compilation_cache import compilation_cache
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


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture
def no_compilation_cache():
  """No persistent compilation cache for this test (JAX's default), and the
  session's back after it."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', None)
  compilation_cache.reset_cache()
  yield
  jax.config.update('jax_compilation_cache_dir', before)
  compilation_cache.reset_cache()
