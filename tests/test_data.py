"""Tests for lowrank_jax.train.data on the real Debian Fashion-MNIST files."""

import gzip
import os
import sys
import time
import types

import numpy as np
import pytest

from lowrank_jax.train import data

DEBIAN_DIR = os.environ.get(data.FASHION_MNIST_DIR_ENV,
                            data.DEFAULT_FASHION_MNIST_DIR)
NAMES = list(data._LOCAL_FILES.values())


def _have_debian_files():
  return all(os.path.isfile(os.path.join(DEBIAN_DIR, f)) for f in NAMES)


needs_files = pytest.mark.skipif(
    not _have_debian_files(),
    reason=f'Debian Fashion-MNIST files absent from {DEBIAN_DIR} '
    '(apt-get install dataset-fashion-mnist)')


@pytest.fixture(scope='module')
def ds():
  if not _have_debian_files():
    pytest.skip('Debian Fashion-MNIST files absent')
  return data.load_dataset(data_dir=DEBIAN_DIR)


def _write_idx(path, array, type_code=0x08):
  header = bytes([0, 0, type_code, array.ndim])
  header += np.asarray(array.shape, '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def _debian_copy(tmp_path):
  """tmp_path with symlinks to the four real files; returns tmp_path."""
  for name in NAMES:
    os.symlink(os.path.join(DEBIAN_DIR, name), tmp_path / name)
  return tmp_path


# ---------------------------------------------------------------- Loading.


@needs_files
def test_shapes_and_dtypes(ds):
  assert len(ds.train.labels) + len(ds.validation.labels) == 60000
  assert len(ds.validation.labels) == 5000
  assert len(ds.test.labels) == 10000
  for split in (ds.train, ds.validation, ds.test):
    assert split.images.shape[1:] == (28, 28, 1)
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32
    assert len(split.images) == len(split.labels)
  assert ds.num_classes == data.DATASETS[ds.name].num_classes == 10
  assert ds.mean.shape == ds.std.shape == (1,)
  assert ds.mean.dtype == ds.std.dtype == np.float32
  assert ds.name == 'fashion_mnist_local'
  summary = data.describe(ds)
  assert "\n" not in summary and 'train=55000' in summary and 'test=10000' in summary


@needs_files
def test_labels(ds):
  # Fashion-MNIST t10k starts with label 9 ("Ankle boot"); test is unshuffled.
  assert ds.test.labels[0] == 9
  for split in (ds.train, ds.validation, ds.test):
    assert split.labels.min() == 0 and split.labels.max() == 9
    assert len(np.unique(split.labels)) == 10
  # Train + validation is a partition of the balanced original train set.
  all_train = np.concatenate([ds.train.labels, ds.validation.labels])
  np.testing.assert_array_equal(np.bincount(all_train), np.full(10, 6000))


@needs_files
def test_split_determinism_and_subsets(ds):
  again = data.load_dataset(seed=0, train_subset=1000, test_subset=500,
                            data_dir=DEBIAN_DIR)
  np.testing.assert_array_equal(again.validation.images, ds.validation.images)
  np.testing.assert_array_equal(again.train.labels, ds.train.labels[:1000])
  np.testing.assert_array_equal(again.train.images, ds.train.images[:1000])
  np.testing.assert_array_equal(again.test.labels, ds.test.labels[:500])
  assert len(again.train.labels) == 1000 and len(again.test.labels) == 500
  other = data.load_dataset(seed=1, validation_size=0, test_subset=10,
                            data_dir=DEBIAN_DIR)
  assert other.validation.images.shape == (0, 28, 28, 1)
  assert other.validation.images.dtype == np.uint8
  assert other.validation.labels.shape == (0,)
  assert len(other.train.labels) == 60000
  # Another seed gives another order.
  assert not np.array_equal(other.train.labels[:5000], ds.validation.labels)


@needs_files
def test_normalization_statistics(ds):
  x = ds.train.images.astype(np.float64) / 255.0
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
  s1 = s2 = n = 0.0
  for images, labels in data.iterate_batches(
          ds.train, 5000, mean=ds.mean, std=ds.std, drop_remainder=False):
    assert images.dtype == np.float32 and labels.dtype == np.int32
    s1 += images.sum(dtype=np.float64)
    s2 += np.square(images, dtype=np.float64).sum()
    n += images.size
  assert n == ds.train.images.size
  assert abs(s1 / n) < 1e-4
  assert abs(np.sqrt(s2 / n - (s1 / n) ** 2) - 1.0) < 1e-4


# ---------------------------------------------------------------- Batching.


def _labels(split, bs, **kw):
  return np.concatenate([y for _, y in data.iterate_batches(split, bs, **kw)])


@needs_files
def test_batch_order_determinism(ds):
  kw = dict(mean=ds.mean, std=ds.std)
  a = _labels(ds.test, 100, seed=0, epoch=0, **kw)
  np.testing.assert_array_equal(a, _labels(ds.test, 100, seed=0, epoch=0, **kw))
  assert not np.array_equal(a, _labels(ds.test, 100, seed=0, epoch=1, **kw))
  assert not np.array_equal(a, _labels(ds.test, 100, seed=1, epoch=0, **kw))
  # A permutation: every example exactly once.
  np.testing.assert_array_equal(np.sort(a), np.sort(ds.test.labels))
  # seed=None keeps the stored order.
  np.testing.assert_array_equal(_labels(ds.test, 100, **kw), ds.test.labels)
  x0, _ = next(data.iterate_batches(ds.test, 4, **kw))
  np.testing.assert_allclose(
      x0, (ds.test.images[:4] / 255.0 - ds.mean) / ds.std, rtol=1e-5, atol=1e-5)


@needs_files
def test_drop_remainder(ds):
  kw = dict(mean=ds.mean, std=ds.std, seed=3)
  dropped = [y for _, y in data.iterate_batches(ds.test, 3000, **kw)]
  assert [len(y) for y in dropped] == [3000] * 3 == [3000] * data.num_batches(10000, 3000)
  kept = [(x, y) for x, y in data.iterate_batches(ds.test, 3000, drop_remainder=False, **kw)]
  assert [len(y) for _, y in kept] == [3000, 3000, 3000, 1000]
  assert kept[-1][0].shape == (1000, 28, 28, 1)
  assert data.num_batches(10000, 3000, drop_remainder=False) == 4
  assert data.num_batches(9000, 3000, drop_remainder=False) == 3
  assert data.num_batches(5, 10) == 0 and data.num_batches(5, 10, False) == 1
  with pytest.raises(ValueError):
    data.num_batches(10, 0)


@needs_files
def test_augmentation(ds):
  split = data.Split(ds.test.images[:512], ds.test.labels[:512])
  kw = dict(mean=ds.mean, std=ds.std, augment=True)
  a = list(data.iterate_batches(split, 128, seed=0, epoch=0, **kw))
  b = list(data.iterate_batches(split, 128, seed=0, epoch=0, **kw))
  c = list(data.iterate_batches(split, 128, seed=0, epoch=1, **kw))
  plain = list(data.iterate_batches(split, 128, seed=0, epoch=0, mean=ds.mean, std=ds.std))
  assert len(a) == 4
  for (xa, ya), (xb, yb), (xp, yp) in zip(a, b, plain):
    assert xa.shape == (128, 28, 28, 1) and xa.dtype == np.float32
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(ya, yp)  # Augmentation keeps the order.
  assert not np.array_equal(a[0][0], plain[0][0])
  assert not np.array_equal(a[0][0], c[0][0])


@needs_files
def test_augmentation_is_crop_and_flip(ds):
  images = ds.test.images[:32]
  rng = np.random.default_rng(0)
  only_flip = data._augment(images, rng, pad=0)
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(only_flip, images)]
  assert all(f or np.array_equal(o, x) for f, o, x in zip(flipped, only_flip, images))
  assert 0 < sum(flipped) < 32
  out = data._augment(images, rng, pad=4)
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for o, p in zip(out, padded):
    crops = [p[dy:dy + 28, dx:dx + 28] for dy in range(9) for dx in range(9)]
    assert any(np.array_equal(o, cr) or np.array_equal(o, cr[:, ::-1]) for cr in crops)


# ---------------------------------------------------------------- Errors.


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError) as e:
    data.load_dataset('imagenet')
  for name in data.DATASETS:
    assert name in str(e.value)


def test_missing_files_name_path_and_package(tmp_path, monkeypatch):
  with pytest.raises(data.DatasetUnavailableError) as e:
    data.load_dataset(data_dir=str(tmp_path))
  assert str(tmp_path / 'train-images-idx3-ubyte.gz') in str(e.value)
  assert 'apt-get install dataset-fashion-mnist' in str(e.value)
  assert isinstance(e.value, RuntimeError)
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path / 'env'))
  with pytest.raises(data.DatasetUnavailableError, match=str(tmp_path / 'env')):
    data.load_dataset()


def test_read_idx_roundtrip(tmp_path):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / 'x.gz', x)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'x.gz')), x)
  y = np.array([1, -2, 70000], '>i4')
  _write_idx(tmp_path / 'y.gz', y, type_code=0x0C)
  out = data.read_idx(str(tmp_path / 'y.gz'))
  np.testing.assert_array_equal(out, [1, -2, 70000])
  assert out.dtype.isnative


@pytest.mark.parametrize('kind', ['truncated_gzip', 'bad_magic', 'short_payload', 'not_gzip'])
def test_corrupt_idx_names_file(tmp_path, kind):
  path = tmp_path / 'bad-idx1-ubyte.gz'
  good = np.zeros(100, np.uint8)
  if kind == 'truncated_gzip':
    _write_idx(path, np.arange(5000, dtype=np.uint32).astype(np.uint8))
    path.write_bytes(path.read_bytes()[:40])
  elif kind == 'bad_magic':
    with gzip.open(path, 'wb') as f:
      f.write(b"\x12\x34\x08\x01" + np.asarray([100], '>u4').tobytes() + good.tobytes())
  elif kind == 'short_payload':
    _write_idx(path, good)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
  else:
    path.write_bytes(b'definitely not gzip')
  with pytest.raises(ValueError, match=str(path)):
    data.read_idx(str(path))


@needs_files
def test_corrupt_debian_copy_raises_through_load(tmp_path):
  _debian_copy(tmp_path)
  target = tmp_path / 't10k-labels-idx1-ubyte.gz'
  raw = target.read_bytes()
  target.unlink()
  target.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match=str(target)):
    data.load_dataset(data_dir=str(tmp_path))


# ---------------------------------------------------------------- TFDS.


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_tfds_name_offline_fails_fast(tmp_path, monkeypatch, name):
  # Never download during tests, even on a machine with network access.
  monkeypatch.setattr(data, '_network_available', lambda *a, **k: False)
  start = time.time()
  with pytest.raises(data.DatasetUnavailableError) as e:
    data.load_dataset(name, data_dir=str(tmp_path))
  assert time.time() - start < 20
  msg = str(e.value)
  assert repr(name) in msg
  assert 'fashion_mnist_local' in msg and 'dataset-fashion-mnist' in msg


def test_network_probe_fails_fast(monkeypatch):
  for var in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  start = time.time()
  assert not data._network_available(('does-not-exist.invalid', 443), timeout=3)
  assert time.time() - start < 5


def test_tfds_records_are_stacked(monkeypatch):
  """Prepared-data path with a fake tensorflow_datasets module (no I/O)."""
  calls = []

  def data_source(name, *, split, data_dir, download, builder_kwargs):
    calls.append((name, split, builder_kwargs['file_format']))
    n = {'train': 12, 'test': 4}[split]
    return [{'image': np.full((28, 28), i, np.uint8), 'label': np.int64(i % 10)}
            for i in range(n)]

  fake = types.SimpleNamespace(
      builder=lambda name, data_dir, **kw: types.SimpleNamespace(
          is_prepared=lambda: True, data_dir=data_dir),
      data_source=data_source)
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  ds = data.load_dataset('mnist', validation_size=2, data_dir='/nonexistent')
  assert calls == [('mnist', 'train', 'array_record'), ('mnist', 'test', 'array_record')]
  assert ds.train.images.shape == (10, 28, 28, 1) and ds.train.images.dtype == np.uint8
  assert ds.test.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.test.labels, [0, 1, 2, 3])
  np.testing.assert_array_equal(ds.test.images[:, 0, 0, 0], [0, 1, 2, 3])


# ---------------------------------------------------------------- Labels.


@pytest.mark.parametrize('dtype', [np.uint8, np.int8, np.int32, np.int64,
                                   np.uint64])
def test_check_labels_accepts_valid_labels(dtype):
  labels = np.array([0, 3, 9, 9, 1], dtype)
  out = data._check_labels(labels, 10, dataset='d', split='train',
                           num_images=5)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, [0, 3, 9, 9, 1])
  empty = data._check_labels(np.zeros(0), 10, dataset='d', split='test')
  assert empty.dtype == np.int32 and empty.shape == (0,)


@pytest.mark.parametrize('labels,num_classes,bad,index', [
    ([0, 1, 10, 2], 10, 10, 2),             # == num_classes
    ([0, -1, 3], 10, -1, 1),                # negative
    ([5, 99, 100, 255], 100, 100, 2),       # cifar100's boundary
    (np.array([255, 0], np.uint8), 10, 255, 0),
    # Would wrap to 1 in an int32 cast: caught before casting.
    (np.array([3, 2**32 + 1], np.int64), 10, 2**32 + 1, 1),
])
def test_check_labels_names_dataset_split_and_label(labels, num_classes, bad,
                                                    index):
  with pytest.raises(ValueError) as e:
    data._check_labels(np.asarray(labels), num_classes, dataset='cifar100',
                       split='test')
  msg = str(e.value)
  assert "dataset 'cifar100', split 'test'" in msg
  assert f'label {bad} at index {index}' in msg
  assert f'[0, {num_classes})' in msg


@pytest.mark.parametrize('labels,num_images,match', [
    (np.array([0.0, 1.0]), 2, 'integers'),
    (np.zeros((2, 1), np.int32), 2, '1-D'),
    (np.zeros(3, np.int32), 4, '4 images but 3 labels'),
])
def test_check_labels_rejects_malformed_labels(labels, num_images, match):
  with pytest.raises(ValueError, match=match) as e:
    data._check_labels(labels, 10, dataset='mnist', split='train',
                       num_images=num_images)
  assert "'mnist'" in str(e.value) and "'train'" in str(e.value)


@pytest.mark.parametrize('name,loader', [('fashion_mnist_local', '_load_local'),
                                         ('cifar100', '_load_tfds')])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_load_dataset_checks_labels_of_every_source(monkeypatch, name, loader,
                                                    split):
  """Both loaders' arrays pass through the label check (small synthetic
  arrays from a stubbed loader; no dataset files involved)."""
  num_classes = data.DATASETS[name].num_classes
  h, w, c = data.DATASETS[name].image_shape
  images = np.zeros((8, h, w, c), np.uint8)
  good = np.arange(8, dtype=np.int64) % num_classes
  bad = good.copy()
  bad[5] = num_classes
  arrays = {'train': (images, good), 'test': (images, good)}
  arrays[split] = (images, bad)

  def fake(*args):
    del args
    return (*arrays['train'], *arrays['test'])

  monkeypatch.setattr(data, loader, fake)
  with pytest.raises(ValueError) as e:
    data.load_dataset(name, validation_size=2)
  msg = str(e.value)
  assert repr(name) in msg and repr(split) in msg
  assert f'label {num_classes} at index 5' in msg
  arrays[split] = (images, good)
  ds = data.load_dataset(name, validation_size=2)
  assert ds.train.labels.dtype == ds.test.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.test.labels, good)


def test_tfds_records_keep_label_values_for_the_check():
  records = [{'image': np.zeros((2, 2), np.uint8), 'label': np.int64(v)}
             for v in (1, 2**32 + 1)]
  _, labels = data._records_to_arrays(records)
  assert labels.tolist() == [1, 2**32 + 1]   # not wrapped to 1 by a cast
  with pytest.raises(ValueError, match=f'label {2**32 + 1}'):
    data._check_labels(labels, 10, dataset='mnist', split='train')
