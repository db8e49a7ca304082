"""lowrank_jax's Tucker-2 and CP splits against TensorLy's, on the same kernels.

In one process, interleaved, on the same float32 HWIO kernels:
  * ``lj.tucker2_split`` with its default (HOOI from HOSVD to a 1e-5
    tolerance) and with ``hooi_iters=0`` (plain HOSVD), against TensorLy's
    ``partial_tucker`` on modes (C_in, C_out) with its defaults (HOOI from
    HOSVD, tol 1e-4, at most 100 sweeps);
  * ``lj.cp_split`` with its default (50 ALS sweeps from an SVD start)
    against TensorLy's ``parafac`` with its defaults (ALS from an SVD start,
    tol 1e-8, at most 100 sweeps).
For each: the relative error ``|W - W_r| / |W|`` (float64 NumPy), the first
call in the process (for lowrank_jax: trace + compile + run, one program per
kernel shape and ranks) and the median of repeated calls.

Kernels: a planted Tucker-rank (64, 64) 3x3x256x256 kernel plus Gaussian
noise; a 3x3x256x256 random kernel whose unfoldings' spectra decay like
i**-0.5 (stated as a trained-like stand-in, not a trained kernel); and the
trained 3x3 kernels of the newest checkpoint under runs/ (if any: ``--ckpt``
names one; none is used when runs/ holds none).

TensorLy runs on its NumPy backend (its JAX backend turns on x64 globally);
the library never imports it. Install: ``pip install -e '.[bench]'``.

Run:  python bench/bench_peers.py   (writes docs/benchmarks_peers.md)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import os
import statistics
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hostinfo  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import lowrank_jax as lj  # pylint: disable=g-import-not-at-top
from lowrank_jax import forms  # pylint: disable=g-import-not-at-top


def _orth(rng, n, r):
  return np.linalg.qr(rng.standard_normal((n, r)))[0]


def planted_kernel(shape=(3, 3, 256, 256), ranks=(64, 64), noise=0.5,
                   seed=0):
  """Tucker-rank ``ranks`` kernel plus noise of ``noise`` x its RMS."""
  rng = np.random.default_rng(seed)
  core = rng.standard_normal(shape[:2] + tuple(ranks))
  k = np.einsum('hwrs,ir,os->hwio', core, _orth(rng, shape[2], ranks[0]),
                _orth(rng, shape[3], ranks[1]))
  k += noise * np.sqrt(np.mean(k ** 2)) * rng.standard_normal(shape)
  return k.astype(np.float32)


def decaying_kernel(shape=(3, 3, 256, 256), alpha=0.5, seed=1):
  """Random kernel whose C_in and C_out spectra decay like i**-alpha."""
  rng = np.random.default_rng(seed)
  core = rng.standard_normal(shape)
  core *= (1.0 + np.arange(shape[2]))[:, None] ** -alpha
  core *= (1.0 + np.arange(shape[3])) ** -alpha
  k = np.einsum('hwrs,ir,os->hwio', core, _orth(rng, shape[2], shape[2]),
                _orth(rng, shape[3], shape[3]))
  return k.astype(np.float32)


def checkpoint_kernels(path=None, limit=2):
  """The largest 3x3 kernels of a train checkpoint under runs/ (or none)."""
  if path is None:
    found = sorted(glob.glob(os.path.join(ROOT, 'runs', '**', 'checkpoints',
                                          'train'), recursive=True),
                   key=os.path.getmtime)
    if not found:
      return None, {}
    path = found[-1]
  from lowrank_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  tree = checkpoint.restore_checkpoint(path)['params']
  kernels = {}
  for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if leaf.ndim == 4 and leaf.shape[:2] == (3, 3) and min(leaf.shape[2:]) > 8:
      name = '/'.join(str(getattr(k, 'key', k)) for k in p)
      kernels[name] = np.asarray(leaf, np.float32)
  biggest = sorted(kernels, key=lambda n: -kernels[n].size)[:limit]
  return os.path.relpath(path, ROOT), {n: kernels[n] for n in biggest}


def rel_error(kernel, approx):
  k = np.asarray(kernel, np.float64)
  return float(np.linalg.norm(np.asarray(approx, np.float64) - k) /
               np.linalg.norm(k))


def _block(x):
  return jax.block_until_ready(x)


def lj_tucker2(kernel, ranks, **options):
  out = lj.tucker2_split({'conv': {'kernel': kernel}}, tuple(ranks),
                         **options)
  return _block(forms.to_kernel(out['conv']))


def lj_cp(kernel, rank):
  out = lj.cp_split({'conv': {'kernel': kernel}}, rank)
  return _block(forms.to_kernel(out['conv']))


def tl_tucker2(kernel, ranks):
  import tensorly as tl  # pylint: disable=g-import-not-at-top
  from tensorly.decomposition import partial_tucker  # pylint: disable=g-import-not-at-top
  if tl.__version__.startswith('0.4.'):   # returns (core, factors)
    core, (a, b) = partial_tucker(kernel, modes=[2, 3], rank=list(ranks))
  else:                                    # ((core, factors), errors)
    (core, (a, b)), _ = partial_tucker(kernel, rank=list(ranks), modes=[2, 3])
  return np.einsum('hwrs,ir,os->hwio', core, a, b)


def tl_cp(kernel, rank):
  import tensorly as tl  # pylint: disable=g-import-not-at-top
  from tensorly.decomposition import parafac  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():   # its SVD start caps kh, kw's columns
    warnings.simplefilter('ignore', UserWarning)
    cp = parafac(kernel, rank)
  return tl.cp_to_tensor(cp) if hasattr(tl, 'cp_to_tensor') else (
      tl.kruskal_to_tensor(cp))


def compare(fns, repeats):
  """First call of each (in order), then ``repeats`` interleaved rounds."""
  rows = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    approx = fn()
    rows[name] = {'first': time.perf_counter() - t0, 'approx': approx,
                  'times': []}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      rows[name]['times'].append(time.perf_counter() - t0)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cp-repeats', type=int, default=1,
                      help='repeated calls of the CP rows (parafac takes '
                      'a minute per 3x3x256x256 call here)')
  parser.add_argument('--ckpt', default=None,
                      help='a checkpoints/train directory (default: newest '
                      'under runs/)')
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  import tensorly as tl  # pylint: disable=g-import-not-at-top
  tl.set_backend('numpy')

  ckpt, trained = checkpoint_kernels(args.ckpt)
  cases = [('planted (64, 64) + noise 0.5, 3x3x256x256', planted_kernel(),
            [(32, 32), (64, 64)], [64]),
           ('decaying spectra i^-0.5 (trained-like stand-in), 3x3x256x256',
            decaying_kernel(), [(32, 32), (64, 64)], [64])]
  for name, k in trained.items():
    c_in, c_out = k.shape[2:]
    cases.append((f'trained `{name}` of {ckpt}, {"x".join(map(str, k.shape))}',
                  k, [(c_in // 4, c_out // 4), (c_in // 2, c_out // 2)],
                  [min(c_in, c_out) // 2]))

  tucker_rows, cp_rows, verdicts = [], [], []
  for label, kernel, tucker_ranks, cp_ranks in cases:
    for ranks in tucker_ranks:
      res = compare({
          'default': functools.partial(lj_tucker2, kernel, ranks),
          'hosvd': functools.partial(lj_tucker2, kernel, ranks, hooi_iters=0),
          'tensorly': functools.partial(tl_tucker2, kernel, ranks),
      }, args.repeats)
      err = {n: rel_error(kernel, r['approx']) for n, r in res.items()}
      med = {n: statistics.median(r['times']) for n, r in res.items()}
      verdicts.append((err['default'] <= err['tensorly'] + 1e-6,
                       med['default'] <= med['tensorly'],
                       res['default']['first'] <= res['tensorly']['first']))
      for n, what in (('default', '`lj.tucker2_split` default (HOOI, tol '
                       '1e-5)'), ('hosvd', '`lj.tucker2_split` '
                                  '`hooi_iters=0` (HOSVD)'),
                      ('tensorly', '`partial_tucker` (HOOI, tol 1e-4)')):
        tucker_rows.append(
            f'| {label} | {ranks} | {what} | {err[n]:.5f} | '
            f'{res[n]["first"]:.3f} | {med[n]:.4f} | '
            f'{med[n] / med["tensorly"]:.3f}x |')
      print(tucker_rows[-3:], flush=True)
    for rank in cp_ranks:
      res = compare({'lowrank_jax': functools.partial(lj_cp, kernel, rank),
                     'tensorly': functools.partial(tl_cp, kernel, rank)},
                    args.cp_repeats)
      err = {n: rel_error(kernel, r['approx']) for n, r in res.items()}
      med = {n: statistics.median(r['times']) for n, r in res.items()}
      for n, what in (('lowrank_jax', '`lj.cp_split` (50 ALS sweeps)'),
                      ('tensorly', '`parafac` (ALS, tol 1e-8, <= 100)')):
        cp_rows.append(
            f'| {label} | {rank} | {what} | {err[n]:.5f} | '
            f'{res[n]["first"]:.3f} | {med[n]:.4f} | '
            f'{med[n] / med["tensorly"]:.3f}x |')
      print(cp_rows[-2:], flush=True)

  date = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  env = ' '.join(f'{v}={os.environ[v]}' for v in
                 ('OPENBLAS_NUM_THREADS', 'XLA_FLAGS') if v in os.environ)
  command = f'{env + " " if env else ""}python bench/bench_peers.py'
  header = ('| kernel | ranks | method | relative error | first call s | '
            f'median of {args.repeats} s | time vs TensorLy |')
  lines = [
      '# Tucker-2 and CP against TensorLy',
      '',
      f'Generated by `{command}` ({date}); nothing typed in by hand.',
      '',
      hostinfo.machine_line() + ' The machine is shared with other jobs: '
      'compare the ratios (all timed in one process, calls interleaved), '
      'not the absolute times.',
      '',
      f'TensorLy {tl.__version__}, NumPy backend, its default options. '
      'lowrank_jax through the public transforms on `{"conv": {"kernel": '
      'W}}`. First call: the first in this process for that kernel and '
      'ranks (lowrank_jax compiles one program per kernel shape and ranks, '
      'so a row whose shape and ranks an earlier row had reuses its '
      'program; TensorLy has nothing to compile). Relative error: '
      '`|W - W_r| / |W|` in float64.',
      '',
      '## Tucker-2 (modes C_in, C_out)',
      '',
      header, '|---|---|---|---:|---:|---:|---:|',
  ] + tucker_rows + [
      '',
      f'Default error <= TensorLy\'s in {sum(v[0] for v in verdicts)} of '
      f'{len(verdicts)} cases; default repeated-call time <= TensorLy\'s in '
      f'{sum(v[1] for v in verdicts)} of {len(verdicts)}; first call '
      f'(lowrank_jax\'s includes its compile where no earlier row had the '
      f'same shape and ranks) <= TensorLy\'s in '
      f'{sum(v[2] for v in verdicts)} of {len(verdicts)}.',
      '',
      '## CP',
      '',
      header.replace('ranks', 'rank').replace(
          f'median of {args.repeats}', f'median of {args.cp_repeats}'),
      '|---|---|---|---:|---:|---:|---:|',
  ] + cp_rows + ['']
  if not trained:
    lines += ['No checkpoint under runs/: the trained-kernel rows are '
              'absent.', '']
  text = '\n'.join(lines)
  print(text)
  if not args.no_write:
    with open(os.path.join(ROOT, 'docs', 'benchmarks_peers.md'), 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
