"""vbmf_ranks on ResNet-50-shaped kernels against a NumPy/SciPy loop.

All 53 convs of torchvision's ResNet-50 (stem 7x7x3x64, the bottleneck
1x1 / 3x3 / 1x1 convs and the four projection shortcuts, HWIO, float32) with
planted spectra: a Tucker-2 signal of random ranks plus Gaussian noise, seeded.
That is 70 matrices: two unfoldings per k x k conv, one per 1x1 conv.

Timed in the same process:
  * ``lowrank_jax.vbmf_ranks`` (one compiled call for the whole network):
    compile time of the first call, then the median of warm calls, for
    ``method='auto'`` (the default) and ``method='svd'``;
  * the reference: ``reference_evbmf`` of tests/test_vbmf.py (a float64 port
    of Nakajima's EVBMF.m: full SVD + bounded scalar search) in a Python loop
    over the same 70 matrices;
  * an estimate for the padded alternative (all matrices zero-padded to one
    common shape): one Gram + eigh of a 1024 x 4608 matrix, times 70.

Run:  python bench/bench_vbmf.py            (writes docs/benchmarks_vbmf.md)
      python bench/bench_vbmf.py --svd --no-write
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hostinfo  # pylint: disable=g-import-not-at-top
from lowrank_jax import tree  # pylint: disable=g-import-not-at-top
from lowrank_jax import vbmf  # pylint: disable=g-import-not-at-top


def _reference_module():
  """tests/test_vbmf.py, imported by path (tests/ is not a package)."""
  path = os.path.join(ROOT, 'tests', 'test_vbmf.py')
  spec = importlib.util.spec_from_file_location('_test_vbmf_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def resnet50_convs() -> list[tuple[str, tuple[int, int, int, int]]]:
  """(path, HWIO shape) of the 53 convs of torchvision's ResNet-50."""
  convs = [('conv1', (7, 7, 3, 64))]
  c_in = 64
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3),
                                              (64, 128, 256, 512))):
    for b in range(blocks):
      p = f'layer{stage + 1}_{b}'
      convs.append((f'{p}/conv1', (1, 1, c_in, width)))
      convs.append((f'{p}/conv2', (3, 3, width, width)))
      convs.append((f'{p}/conv3', (1, 1, width, 4 * width)))
      if b == 0:
        convs.append((f'{p}/downsample', (1, 1, c_in, 4 * width)))
      c_in = 4 * width
  return convs


def planted_kernel(rng, shape, noise=1e-2):
  """Tucker-2 signal (ranks 10-40% of each side) plus Gaussian noise.

  The signal's singular values in both unfoldings lie between ~2 and ~20
  times the noise edge noise * (sqrt(L) + sqrt(M)), like a trained layer's
  leading directions over its bulk.
  """
  kh, kw, c_in, c_out = shape
  r_in = max(1, int(round(c_in * rng.uniform(0.1, 0.4))))
  r_out = max(1, int(round(c_out * rng.uniform(0.1, 0.4))))
  if kh * kw == 1:  # A matrix: a well-conditioned square core.
    r_in = r_out = min(r_in, r_out)
    q1, _ = np.linalg.qr(rng.standard_normal((r_in, r_in)))
    q2, _ = np.linalg.qr(rng.standard_normal((r_in, r_in)))
    core = (q1 * np.linspace(1.0, 0.5, r_in)) @ q2
    core = core[None, None]
  else:
    core = rng.standard_normal((kh, kw, r_in, r_out))
  core *= np.linspace(1.0, 0.3, r_in)[None, None, :, None]
  core *= np.linspace(1.0, 0.3, r_out)[None, None, None, :]
  u_in, _ = np.linalg.qr(rng.standard_normal((c_in, r_in)))
  u_out, _ = np.linalg.qr(rng.standard_normal((c_out, r_out)))
  # Scale so the weakest signal direction of either unfolding sits at
  # ~2x the noise edge of that unfolding.
  weakest = []
  for unfold, (rows, cols) in (
      (np.moveaxis(core, 2, 0).reshape(r_in, -1), (c_in, kh * kw * c_out)),
      (np.moveaxis(core, 3, 0).reshape(r_out, -1), (c_out, kh * kw * c_in))):
    s = np.linalg.svd(unfold, compute_uv=False)
    edge = noise * (math.sqrt(rows) + math.sqrt(cols))
    weakest.append(2.0 * edge / s[-1])
  core *= max(weakest)
  signal = np.einsum('hwrs,ir,os->hwio', core, u_in, u_out,
                     optimize=True)
  kernel = signal + noise * rng.standard_normal(shape)
  return kernel.astype(np.float32)


def unfoldings(kernel: np.ndarray) -> list[np.ndarray]:
  """C_in x (kh kw C_out) and C_out x (kh kw C_in) for k x k, else C_in x C_out."""
  kh, kw, c_in, c_out = kernel.shape
  if kh * kw > 1:
    return [np.moveaxis(kernel, 2, 0).reshape(c_in, -1),
            np.moveaxis(kernel, 3, 0).reshape(c_out, -1)]
  return [kernel.reshape(-1, c_out)]


def build_params(seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for path, shape in resnet50_convs():
    block, _, name = path.rpartition('/')
    node = params.setdefault(block, {}) if block else params
    node[name] = {'kernel': jnp.asarray(planted_kernel(rng, shape))}
  return params


def reference_ranks(reference, params):
  return {path: tuple(reference(m)[0]
                      for m in unfoldings(np.asarray(layer['kernel'])))
          for path, layer in tree.layers(params).items()}


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def floor_time(params, repeats):
  """The Gram route's own cost outside XLA: NumPy float32 ``Y Y^T`` (BLAS,
  all cores) + ``np.linalg.eigvalsh`` (LAPACK ``?syevd``, eigenvalues only)
  of every matrix, looped; no EVBMF search. A floor for any method that
  needs the whole spectrum of every matrix in float32."""
  mats = [m if m.shape[0] <= m.shape[1] else m.T
          for layer in tree.layers(params).values()
          for m in unfoldings(np.asarray(layer['kernel']))]

  def run():
    for m in mats:
      np.linalg.eigvalsh(m @ m.T)

  run()
  return timed(run, repeats)[0]


def padded_estimate(n_matrices=70):
  """Time of one 1024 x 4608 Gram + eigh (the padded shape), times 70."""
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.standard_normal((1024, 4608)), jnp.float32)
  f = jax.jit(lambda m: vbmf._squared_singular_values(m, 'gram'))
  jax.block_until_ready(f(y))
  med, _ = timed(lambda: jax.block_until_ready(f(y)), 1)
  return med * n_matrices


def machine() -> dict:
  cpu = hostinfo.cpu_name() or 'unknown'
  try:
    nproc = subprocess.run(['nproc'], capture_output=True, text=True,
                           check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    nproc = str(os.cpu_count())
  return {'platform': platform.platform(), 'nproc': nproc, 'cpu': cpu,
          'python': platform.python_version(), 'jax': jax.__version__,
          'numpy': np.__version__, 'backend': jax.default_backend(),
          'load': ' '.join(f'{x:.1f}' for x in os.getloadavg())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5,
                      help='warm runs of each timed function (median)')
  parser.add_argument('--ref-repeats', type=int, default=3,
                      help='timed runs of the reference loop (median), after '
                      'one untimed run that also checks the ranks')
  parser.add_argument('--svd', action='store_true',
                      help="also time method='svd'")
  parser.add_argument('--no-write', action='store_true',
                      help='print only; do not write docs/benchmarks_vbmf.md')
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs',
                                                    'benchmarks_vbmf.md'))
  args = parser.parse_args(argv)

  reference = _reference_module().reference_evbmf
  params = build_params()
  n_layers = sum(1 for _ in resnet50_convs())
  n_mats = sum(2 if s[0] * s[1] > 1 else 1 for _, s in resnet50_convs())
  info = machine()
  print(f'{n_layers} convs, {n_mats} matrices; {info}', flush=True)

  rows = {}
  details = None
  for method in ('auto',) + (('svd',) if args.svd else ()):
    t = time.perf_counter()
    ranks, details_m = vbmf.vbmf_ranks(params, report=True,
                                       method=method)
    first = time.perf_counter() - t
    warm, _ = timed(lambda m=method: vbmf.vbmf_ranks(params, method=m),
                    args.repeats)
    rows[method] = (first, warm, details_m)
    details = details if details is not None else details_m
    print(f'vbmf_ranks method={method}: first call {first:.2f} s, warm '
          f'median {warm:.3f} s', flush=True)

  ref_ranks = reference_ranks(reference, params)  # warm-up / agreement
  ref_time, _ = timed(lambda: reference_ranks(reference, params),
                      args.ref_repeats)
  print(f'numpy/scipy reference loop: median {ref_time:.3f} s', flush=True)
  floor = floor_time(params, args.ref_repeats)
  print(f'floor (numpy Gram + eigvalsh loop): median {floor:.3f} s',
        flush=True)
  pad = padded_estimate()
  print(f'padded alternative (estimate): {pad:.2f} s', flush=True)

  agree = {}
  for method, (_, _, d) in rows.items():
    same = sum(int(a == b) for p in ref_ranks
               for a, b in zip(d[p]['vbmf'], ref_ranks[p]))
    agree[method] = same
    print(f'rank agreement ({method}): {same}/{n_mats} matrices', flush=True)
  mismatches = [(p, rows['auto'][2][p]['vbmf'], ref_ranks[p])
                for p in ref_ranks if rows['auto'][2][p]['vbmf'] != ref_ranks[p]]
  for m in mismatches:
    print('  mismatch', m)

  first, warm, _ = rows['auto']
  lines = [
      '## EVBMF ranks of a whole network (`vbmf_ranks`)',
      '',
      f'Command: `{" ".join(["python", "bench/bench_vbmf.py"] + (argv if argv is not None else sys.argv[1:]))}`'
      + (f' with OPENBLAS_NUM_THREADS={os.environ["OPENBLAS_NUM_THREADS"]}'
         if 'OPENBLAS_NUM_THREADS' in os.environ else '') + '.',
      '',
      f'Machine: {info["platform"]}, `nproc` = {info["nproc"]}, '
      f'{info["cpu"]}; Python {info["python"]}, JAX {info["jax"]} '
      f'({info["backend"]} backend), NumPy {info["numpy"]}. Load average at '
      f'the end of the run: {info["load"]} (the machine is shared; both sides '
      'ran interleaved in one process, so the ratio is fairer than the '
      'absolute times).',
      '',
      f'Workload: the {n_layers} convs of torchvision ResNet-50 in HWIO '
      f'float32 with planted Tucker-2 spectra plus noise (seed 0): {n_mats} '
      'matrices (two unfoldings per k x k conv, one per 1x1 conv), from '
      '3 x 3136 to 1024 x 2048 and 512 x 4608.',
      '',
      '| what | time (s) | vs reference | ranks identical to reference |',
      '|---|---|---|---|',
      f'| NumPy/SciPy reference (float64 SVD + bounded search, loop over '
      f'matrices), median of {args.ref_repeats} | {ref_time:.3f} | 1.0x | - |',
  ]
  for method, (f, w, _) in rows.items():
    lines.append(
        f"| `vbmf_ranks(method='{method}')`, warm, median of "
        f'{args.repeats} | {w:.3f} | {ref_time / w:.1f}x faster | '
        f'{agree[method]}/{n_mats} |')
    lines.append(f"| `vbmf_ranks(method='{method}')`, first call (trace + "
                 f'compile + run) | {f:.2f} | - | - |')
  lines.append(f'| floor: NumPy float32 Gram + `eigvalsh` (eigenvalues '
               f'only) per matrix, no search, median of {args.ref_repeats} '
               f'| {floor:.3f} | {ref_time / floor:.1f}x | - |')
  lines.append(f'| padded alternative: 70 x (Gram + eigh of 1024 x 4608), '
               f'estimate | {pad:.2f} | {ref_time / pad:.1f}x | - |')
  lines += [
      '',
      f"Result: `vbmf_ranks` (default `method='auto'`) takes {warm:.3f} s "
      f'warm against {ref_time:.3f} s for the reference loop, '
      f'**{ref_time / warm:.1f}x faster**, with '
      f"{agree['auto']}/{n_mats} matrices at identical EVBMF ranks; the "
      f'first call adds {first - warm:.1f} s of tracing and compilation '
      '(cached per set of shapes afterwards).',
      '',
      f'Goal: at least 10x faster with identical ranks: '
      + ('**met**.' if ref_time / warm >= 10 and agree['auto'] == n_mats
         else f'**not met** ({ref_time / warm:.1f}x). ') +
      ('' if ref_time / warm >= 10 else
       f'The floor row bounds what the Gram route can reach here: the '
       f'Gram products and eigenvalues alone, in NumPy with no EVBMF at '
       f'all, take {floor:.3f} s ({ref_time / floor:.1f}x). LAPACK\'s '
       'symmetric eigensolver runs on one core (its tridiagonal reduction '
       'is BLAS-2, memory-bound), and XLA:CPU ran two independent '
       'eigenproblems one after the other when tried (2.2x the time of '
       'one), so the second core only helps the Gram products. '
       'The reference\'s float64 SVD uses both cores through OpenBLAS.'),
      '',
  ]
  text = '\n'.join(lines)
  print()
  print(text)
  if not args.no_write:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as fh:
      fh.write(text)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
