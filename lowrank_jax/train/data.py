"""Image-classification datasets as in-memory numpy arrays, plus a batch iterator.

Everything here is numpy-only (no TensorFlow, no JAX); batches are handed to
JAX by the caller. Array layouts:

* stored images: ``(N, H, W, C)`` uint8 in ``[0, 255]``; labels: ``(N,)`` int32.
* batches from :func:`iterate_batches`: ``(B, H, W, C)`` float32, normalized per
  channel as ``(x / 255 - mean) / std``; labels ``(B,)`` int32.

Sources:

* ``fashion_mnist_local`` (default, offline): the IDX files shipped by the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
  overridable with ``data_dir`` or ``$LOWRANK_JAX_FASHION_MNIST_DIR``). We parse
  IDX ourselves because TFDS's ``fashion_mnist`` builder rejects these files with
  a checksum error: Debian recompressed the ``.gz`` files, so the bytes differ
  from upstream even though the contents are identical.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: TensorFlow Datasets via
  ``tfds.data_source`` (array_record backend). Reading prepared data works
  without TensorFlow (given ``importlib_resources`` and ``pillow``/``opencv``);
  preparing it (first download) needs network and, in tfds 4.9, TensorFlow.
  Failures are re-raised as :class:`DatasetUnavailableError`; a TFDS name is
  never silently replaced by local data.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import socket
import threading
import zlib
from typing import Iterator, NamedTuple

import numpy as np

FASHION_MNIST_DIR_ENV = 'LOWRANK_JAX_FASHION_MNIST_DIR'
DEFAULT_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_APT_HINT = 'sudo apt-get install dataset-fashion-mnist'
_LOCAL_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}
# Host probed before letting TFDS download (TFDS first tries its GCS mirror);
# without the probe an offline machine spends minutes in retries.
_TFDS_PROBE_HOST = ('storage.googleapis.com', 443)


class DatasetUnavailableError(RuntimeError):
  """The requested dataset cannot be loaded on this machine."""


class DatasetInfo(NamedTuple):
  """Static description of a known dataset."""

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)
  source: str


DATASETS: dict[str, DatasetInfo] = {
    'fashion_mnist_local': DatasetInfo(
        10, (28, 28, 1), 'Debian package dataset-fashion-mnist (IDX .gz, offline)'),
    'mnist': DatasetInfo(10, (28, 28, 1), "TFDS 'mnist' (download)"),
    'fashion_mnist': DatasetInfo(10, (28, 28, 1), "TFDS 'fashion_mnist' (download)"),
    'cifar10': DatasetInfo(10, (32, 32, 3), "TFDS 'cifar10' (download)"),
    'cifar100': DatasetInfo(100, (32, 32, 3), "TFDS 'cifar100' fine labels (download)"),
}


class Split(NamedTuple):
  """One split: ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int32."""

  images: np.ndarray
  labels: np.ndarray


class Dataset(NamedTuple):
  """Train/validation/test splits plus per-channel train statistics.

  ``mean`` and ``std`` are (C,) float32, computed on the train split scaled to
  [0, 1].
  """

  train: Split
  validation: Split
  test: Split
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  name: str


# ----------------------------------------------------------------------------
# IDX parsing (Fashion-MNIST, Debian files).

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4',
               0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str) -> np.ndarray:
  """Reads a gzip-compressed IDX file into an array of its declared shape.

  Args:
    path: Path to an ``*-ubyte.gz`` file.

  Returns:
    Array with the header's dims and dtype (native byte order).

  Raises:
    ValueError: The file is not valid gzip, has a bad magic number, or its
      payload size disagrees with the header. The message names ``path``.
  """
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f'{path}: cannot decompress IDX file ({e})') from e
  if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: bad IDX magic number {data[:4].hex() or '<empty>'}")
  ndim = data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise ValueError(f'{path}: truncated or invalid IDX header (ndim={ndim})')
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f'{path}: IDX payload has {len(data) - header} bytes, '
                     f'header dims {dims} need {expected}')
  arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder('='))  # Native order, writable copy.


def _load_local(data_dir: str | None) -> tuple[np.ndarray, ...]:
  """Returns (train_x, train_y, test_x, test_y) from Debian's IDX files."""
  root = data_dir or os.environ.get(FASHION_MNIST_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR
  paths = {k: os.path.join(root, v) for k, v in _LOCAL_FILES.items()}
  for path in paths.values():
    if not os.path.isfile(path):
      raise DatasetUnavailableError(
          f'Fashion-MNIST file not found: {path}. Install it with '
          f'`{_APT_HINT}`, or point data_dir / ${FASHION_MNIST_DIR_ENV} at a '
          'directory holding the four *-ubyte.gz IDX files.')
  out = []
  for split in ('train', 'test'):
    x, y = read_idx(paths[f'{split}_images']), read_idx(paths[f'{split}_labels'])
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise ValueError(f"{paths[f'{split}_images']}: images {x.shape} do not "
                       f"match labels {y.shape} in {paths[f'{split}_labels']}")
    out += [x[..., None].astype(np.uint8, copy=False), y.astype(np.int32)]
  return tuple(out)


# ----------------------------------------------------------------------------
# TFDS (without TensorFlow).


def _network_available(host: tuple[str, int] = _TFDS_PROBE_HOST,
                       timeout: float = 5.0) -> bool:
  """True if a TCP connection to ``host`` succeeds within ``timeout`` seconds.

  Runs in a daemon thread so that a slow DNS lookup cannot block us either.
  With a proxy configured we cannot tell, so we optimistically return True.
  """
  proxies = ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')
  if any(os.environ.get(v) for v in proxies):
    return True
  ok = []

  def probe():
    try:
      socket.create_connection(host, timeout=timeout).close()
      ok.append(True)
    except OSError:
      pass

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout)
  return bool(ok)


def _records_to_arrays(source) -> tuple[np.ndarray, np.ndarray]:
  """Stacks a TFDS data source of {'image', 'label'} dicts into numpy arrays."""
  keys = list(range(len(source)))
  getitems = getattr(source, '__getitems__', None)
  records = getitems(keys) if getitems else [source[i] for i in keys]
  images = np.stack([np.asarray(r['image'], np.uint8) for r in records])
  if images.ndim == 3:
    images = images[..., None]
  # Kept in their own integer dtype: load_dataset checks their range before
  # the int32 cast (which would wrap out-of-range values silently).
  labels = np.asarray([r['label'] for r in records])
  return images, labels


def _load_tfds(name: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
  """Returns (train_x, train_y, test_x, test_y) via ``tfds.data_source``.

  Reading prepared array_record data needs no TensorFlow, but preparing it
  does (tfds 4.9 encodes images with ``tf.image.encode_png`` and its MNIST/CIFAR
  builders read with ``tf.io.gfile``), and downloading needs network. Both are
  checked up front: offline, TFDS would otherwise retry for minutes.
  """

  def unavailable(reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f'Dataset {name!r} could not be loaded through tensorflow-datasets: '
        f'{reason}. Without TensorFlow, tfds.data_source can only read data '
        'already prepared in array_record format (it also needs the packages '
        'importlib_resources and pillow); preparing it needs network access '
        "and TensorFlow (pip install -e '.[tfds]' installs all three). For "
        f'offline use: `{_APT_HINT}` and '
        "name='fashion_mnist_local'.")

  # tfds.data_source only defaults to array_record when data_dir is None, so
  # ask for it explicitly (TFRECORD needs TensorFlow and has no random access).
  kwargs = {'file_format': 'array_record'}
  try:
    import tensorflow_datasets as tfds  # Lazy: slow import, optional.

    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    prepared = builder.is_prepared()
  except Exception as e:  # Any TFDS failure.
    raise unavailable(f'{type(e).__name__}: {e}') from e
  if not prepared:
    if importlib.util.find_spec('tensorflow') is None:
      raise unavailable(f'not prepared in {builder.data_dir} and TensorFlow, '
                        'needed to prepare it, is not installed')
    if not _network_available():
      raise unavailable(f'not prepared in {builder.data_dir} and no network access')
  try:
    (tx, ty), (sx, sy) = [
        _records_to_arrays(tfds.data_source(
            name, split=s, data_dir=data_dir, download=True, builder_kwargs=kwargs))
        for s in ('train', 'test')]
  except Exception as e:  # Any TFDS failure.
    raise unavailable(f'{type(e).__name__}: {e}') from e
  return tx, ty, sx, sy


# ----------------------------------------------------------------------------
# Public API.


def _check_labels(labels: np.ndarray, num_classes: int, *, dataset: str,
                 split: str, num_images: int | None = None) -> np.ndarray:
  """Validates class labels and returns them as (N,) int32.

  Every loader goes through this (:func:`load_dataset` calls it on the train
  and test arrays of both the IDX and the TFDS path), so a label outside
  ``[0, num_classes)`` fails at load instead of turning the cross-entropy
  into NaN (or silently into garbage) during training.

  Args:
    labels: (N,) labels, any integer dtype.
    num_classes: Number of classes of the dataset.
    dataset: Dataset name, for the message.
    split: Split name, for the message.
    num_images: If given, the number of images the labels belong to.

  Returns:
    ``labels`` as int32 (a copy only if the dtype differs).

  Raises:
    ValueError: Labels not a 1-D integer array, not one per image, or a label
      < 0 or >= ``num_classes``; the message names the dataset, the split,
      the first offending label value and its index.
  """
  where = f'dataset {dataset!r}, split {split!r}'
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'{where}: labels must be 1-D, got shape {labels.shape}')
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{where}: labels must be integers, got dtype '
                     f'{labels.dtype}')
  if num_images is not None and len(labels) != num_images:
    raise ValueError(f'{where}: {num_images} images but {len(labels)} labels')
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
        f'{where}: label {labels[i].item()} at index {i} is outside [0, '
        f'{num_classes}) ({int(bad.sum())} of {len(labels)} labels out of '
        f'range; labels seen: {labels.min().item()}..{labels.max().item()})')
  return labels.astype(np.int32, copy=False)


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean/std of uint8 (N, H, W, C) images scaled to [0, 1].

  Accumulates in float64 over chunks to bound memory (CIFAR would need 600 MB
  as one float32 array). Returns (C,) float32 each; a zero std becomes 1.
  """
  flat = images.reshape(-1, images.shape[-1])
  s1, s2 = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
  for start in range(0, len(flat), 1 << 22):
    f = flat[start:start + (1 << 22)].astype(np.float32) / 255.0
    s1 += f.sum(0, dtype=np.float64)
    s2 += np.einsum('nc,nc->c', f, f, dtype=np.float64)
  mean = s1 / len(flat)
  std = np.sqrt(np.maximum(s2 / len(flat) - mean**2, 0.0))
  return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def load_dataset(name: str = 'fashion_mnist_local', *, validation_size: int = 5000,
                 train_subset: int | None = None, test_subset: int | None = None,
                 seed: int = 0, data_dir: str | None = None) -> Dataset:
  """Loads a dataset fully into memory and splits off a validation set.

  The original train split is permuted with ``np.random.default_rng(seed)``;
  the first ``validation_size`` permuted examples form the validation split and
  the rest (in permuted order) the train split. ``train_subset`` /
  ``test_subset`` then keep the first k examples of train / test.

  Args:
    name: One of ``DATASETS``.
    validation_size: Number of train examples held out (0 allowed).
    train_subset: If set, keep only this many train examples.
    test_subset: If set, keep only this many test examples.
    seed: Seed of the train/validation permutation.
    data_dir: Directory of the IDX files (``fashion_mnist_local``) or the TFDS
      data dir (other names).

  Returns:
    A :class:`Dataset`; images (N, H, W, C) uint8, labels (N,) int32, mean/std
    (C,) float32 over the post-split, post-subset train images in [0, 1].

  Raises:
    ValueError: Unknown name, bad sizes, a corrupt IDX file, or a label
      outside ``[0, num_classes)`` (naming the dataset, split and label; see
      :func:`_check_labels`).
    DatasetUnavailableError: The data cannot be found or downloaded.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}')
  if name == 'fashion_mnist_local':
    tx, ty, sx, sy = _load_local(data_dir)
  else:
    tx, ty, sx, sy = _load_tfds(name, data_dir)
  num_classes = DATASETS[name].num_classes
  ty = _check_labels(ty, num_classes, dataset=name, split='train',
                    num_images=len(tx))
  sy = _check_labels(sy, num_classes, dataset=name, split='test',
                    num_images=len(sx))
  if not 0 <= validation_size < len(ty):
    raise ValueError(f'validation_size={validation_size} must be in [0, {len(ty)})')
  perm = np.random.default_rng(seed).permutation(len(ty))
  val_idx, train_idx = perm[:validation_size], perm[validation_size:]
  if train_subset is not None:
    train_idx = train_idx[:train_subset]
  if not len(train_idx):
    raise ValueError('train split is empty')
  train = Split(tx[train_idx], ty[train_idx])
  test = Split(sx[:test_subset], sy[:test_subset])
  mean, std = _channel_stats(train.images)
  return Dataset(train, Split(tx[val_idx], ty[val_idx]), test,
                 num_classes, mean, std, name)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches :func:`iterate_batches` yields for ``n`` examples."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  return n // batch_size if drop_remainder else -(-n // batch_size)


def _augment(x: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
  """Random crop after zero padding plus random horizontal flip, vectorized.

  Args:
    x: (B, H, W, C) uint8. Padding uses raw pixel value 0 (black).
    rng: Source of the per-image offsets and flips.
    pad: Pixels of padding on every side.

  Returns:
    (B, H, W, C) uint8.
  """
  b, h, w, c = x.shape
  hp, wp = h + 2 * pad, w + 2 * pad
  dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
  flip = rng.random(b) < 0.5
  padded = np.zeros((b, hp, wp, c), x.dtype)
  padded[:, pad:pad + h, pad:pad + w] = x
  # One flat gather does crop and flip: pixel (i, r, q) <- padded[i, dy+r, dx+q'].
  rows = (np.arange(b) * hp + dy)[:, None] + np.arange(h)
  cols = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
  return padded.reshape(-1, c)[rows[:, :, None] * wp + cols[:, None, :]]


def iterate_batches(split: Split, batch_size: int, *, mean, std,
                    seed: int | None = None, epoch: int = 0, augment: bool = False,
                    drop_remainder: bool = True, pad_crop: int = 4
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields normalized (and optionally augmented) batches of one epoch.

  Args:
    split: Images (N, H, W, C) uint8 and labels (N,) int32.
    batch_size: Examples per batch.
    mean: (C,) per-channel mean of images in [0, 1].
    std: (C,) per-channel std of images in [0, 1].
    seed: If not None, the order is a permutation drawn from
      ``np.random.default_rng([seed, epoch])``; None keeps the stored order.
    epoch: Epoch index mixed into the seed.
    augment: Zero-pad by ``pad_crop``, random-crop back to (H, W), random
      horizontal flip; drawn from the same ``(seed, epoch)`` generator (seed 0
      if ``seed`` is None), hence deterministic.
    drop_remainder: If False, also yield the final partial batch.
    pad_crop: Padding for the random crop.

  Yields:
    ``(images, labels)``: (B, H, W, C) float32 ``((x / 255) - mean) / std`` and
    (B,) int32.
  """
  n = len(split.labels)
  count = num_batches(n, batch_size, drop_remainder)
  rng = np.random.default_rng([0 if seed is None else seed, epoch])
  order = np.arange(n) if seed is None else rng.permutation(n)
  std = np.asarray(std, np.float32)
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  shift = (-np.asarray(mean, np.float32) / std).astype(np.float32)
  for i in range(count):
    idx = order[i * batch_size:(i + 1) * batch_size]
    x = split.images[idx]
    if augment:
      x = _augment(x, rng, pad_crop)
    x = x.astype(np.float32)
    x *= scale
    x += shift
    yield x, split.labels[idx]


def describe(ds: Dataset) -> str:
  """One-line summary of a :class:`Dataset`."""
  h, w, c = ds.train.images.shape[1:]
  mean, std = ([round(float(v), 4) for v in a] for a in (ds.mean, ds.std))
  return (f'{ds.name}: train={len(ds.train.labels)} val={len(ds.validation.labels)} '
          f'test={len(ds.test.labels)} image={h}x{w}x{c} classes={ds.num_classes} '
          f'mean={mean} std={std}')
