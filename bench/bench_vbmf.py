"""vbmf_ranks on ResNet-50-shaped and resnet18 kernels against NumPy/SciPy.

Networks (HWIO float32, planted spectra: a Tucker-2 signal of random ranks
plus Gaussian noise, seeded):
  * ``resnet50``: all 53 convs of torchvision's ResNet-50 (stem 7x7x3x64,
    the bottleneck 1x1 / 3x3 / 1x1 convs and the four projection
    shortcuts): 70 matrices, two unfoldings per k x k conv, one per 1x1;
  * ``resnet18``: every layer of ``lj.get_model('resnet18')`` (CIFAR
    ResNet-18, the convs and the dense head) with the same planted kernels.

Timed per network:
  * the first ``vbmf_ranks`` call in a *fresh process* (trace + compile +
    run), without a compilation cache, and with ``compilation_cache=DIR``
    after another process filled DIR, and with the spectra by the compiled
    program (``use_host_spectra(False)``); each child process also times
    the reference loop once, right after, so each ratio comes from one
    process, and a row is the median over ``--fresh`` processes (default 3);
  * in this process, interleaved: warm ``vbmf_ranks`` calls (median; also
    with the host BLAS at its own threads, and with the compiled spectra
    program, its eigenvalues by LAPACK and by the SVD), the reference loop
    and the floor;
  * the reference: ``reference_evbmf`` of tests/test_vbmf.py (a float64 port
    of Nakajima's EVBMF.m: SVD + bounded scalar search) in a Python loop;
  * the floor: NumPy float32 Gram + ``eigvalsh`` of every matrix, no search.

Run:  python bench/bench_vbmf.py            (writes docs/benchmarks_vbmf.md)
      python bench/bench_vbmf.py --nets resnet18 --no-write
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hostinfo  # pylint: disable=g-import-not-at-top
import lowrank_jax as lj  # pylint: disable=g-import-not-at-top
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
  if kernel.ndim == 2:  # a dense layer
    return [kernel]
  kh, kw, c_in, c_out = kernel.shape
  if kh * kw > 1:
    return [np.moveaxis(kernel, 2, 0).reshape(c_in, -1),
            np.moveaxis(kernel, 3, 0).reshape(c_out, -1)]
  return [kernel.reshape(-1, c_out)]


def network_shapes(net: str) -> list[tuple[str, tuple[int, ...]]]:
  """(path, kernel shape) of every layer of ``net`` (resnet50 / resnet18)."""
  if net == 'resnet50':
    return resnet50_convs()
  from lowrank_jax.models import get_model  # pylint: disable=g-import-not-at-top
  model = get_model(net)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  layers = tree.layers(tree.split_variables(shapes)[0])
  return [(p, tuple(v['kernel'].shape)) for p, v in layers.items()]


def build_params(net='resnet50', seed=0):
  """{path: {'kernel': planted}} for every layer of ``net`` (nested dicts)."""
  rng = np.random.default_rng(seed)
  params = {}
  for path, shape in network_shapes(net):
    *blocks, name = path.split('/')
    node = params
    for b in blocks:
      node = node.setdefault(b, {})
    four = shape if len(shape) == 4 else (1, 1) + shape
    node[name] = {'kernel': jnp.asarray(
        planted_kernel(rng, four).reshape(shape))}
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


def floor_matrices(params) -> list[np.ndarray]:
  """Every layer's unfoldings (:func:`unfoldings`), each L x M with L <= M:
  the matrices whose ``Y Y^T`` the floor forms."""
  return [m if m.shape[0] <= m.shape[1] else m.T
          for layer in tree.layers(params).values()
          for m in unfoldings(np.asarray(layer['kernel']))]


def floor_loop(params):
  """The Gram route's own cost outside XLA: NumPy float32 ``Y Y^T`` (BLAS,
  all cores) + ``np.linalg.eigvalsh`` (LAPACK ``?syevd``, eigenvalues only)
  of every matrix, looped; no EVBMF search. A floor for any method that
  needs the whole spectrum of every matrix in float32."""
  mats = floor_matrices(params)

  def run():
    for m in mats:
      np.linalg.eigvalsh(m @ m.T)
  return run


def padded_estimate(n_matrices=70):
  """Time of one 1024 x 4608 Gram + eigh (the padded shape), times 70."""
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.standard_normal((1024, 4608)), jnp.float32)
  f = jax.jit(lambda m: vbmf._squared_singular_values(m, 'gram'))
  jax.block_until_ready(f(y))
  med, _ = timed(lambda: jax.block_until_ready(f(y)), 1)
  return med * n_matrices


def interleaved(fns, repeats):
  """Median seconds of each function, calls interleaved round by round."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(v) for name, v in times.items()}


def _load_params(path):
  """Nested {'kernel': ...} dicts from an .npz of '/'-joined paths."""
  params = {}
  with np.load(path) as data:
    for key in data.files:
      *blocks, name = key.split('/')
      node = params
      for b in blocks:
        node = node.setdefault(b, {})
      node[name] = {'kernel': jnp.asarray(data[key])}
  return params


def child(npz, cache, program=False):
  """One fresh process: the first vbmf_ranks call (spectra by the compiled
  program with ``program``, else the CPU default, on the host), then the
  reference loop once; prints JSON."""
  params = _load_params(npz)
  if program:
    vbmf.use_host_spectra(False)
  t = time.perf_counter()
  ranks = vbmf.vbmf_ranks(params, compilation_cache=cache or None)
  first = time.perf_counter() - t
  reference = _reference_module().reference_evbmf
  t = time.perf_counter()
  reference_ranks(reference, params)
  ref = time.perf_counter() - t
  print(json.dumps({'first': first, 'reference': ref,
                    'ranks': {p: list(r) for p, r in ranks.items()}}))


def fresh_process(npz, cache='', program=False):
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--child', npz,
       '--cache', cache] + (['--program'] if program else []),
      capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_processes(npz, n, cache=''):
  """``n`` fresh processes (:func:`fresh_process`): :func:`summary`."""
  return summary([fresh_process(npz, cache) for _ in range(n)])


def summary(runs):
  """The median first call, reference loop and per-process ratio of fresh
  processes, each process's ratio and ranks. The reference loop's own time
  varies by up to 2x between processes, so one process's ratio is not
  enough to read a goal from."""
  ratios = [r['first'] / r['reference'] for r in runs]
  return dict(first=statistics.median(r['first'] for r in runs),
              reference=statistics.median(r['reference'] for r in runs),
              references=[r['reference'] for r in runs],
              ratio=statistics.median(ratios), ratios=ratios,
              ranks=runs[0]['ranks'],
              same_ranks=all(r['ranks'] == runs[0]['ranks'] for r in runs))


def bench_network(net, args, workdir):
  """Timings and agreement of one network (a dict for the report)."""
  params = build_params(net)
  layers = tree.layers(params)
  n_mats = sum(len(unfoldings(np.asarray(v['kernel'])))
               for v in layers.values())
  npz = os.path.join(workdir, f'{net}.npz')
  np.savez(npz, **{p: np.asarray(v['kernel']) for p, v in layers.items()})
  cache = os.path.join(workdir, f'{net}_cache')
  # The default and the compiled spectra alternate, process by process.
  pairs = [(fresh_process(npz), fresh_process(npz, program=True))
           for _ in range(args.fresh)]
  cold = summary([a for a, _ in pairs])
  cold_program = summary([b for _, b in pairs])
  print(f'{net}: fresh processes, no cache: first call {cold["first"]:.2f} '
        f's, reference loop {cold["reference"]:.2f} s, ratios '
        f'{[round(x, 2) for x in cold["ratios"]]}', flush=True)
  fill = fresh_processes(npz, 1, cache)
  warm_cache = fresh_processes(npz, args.fresh, cache)
  print(f'{net}: fresh processes, cache filled by another: first call '
        f'{warm_cache["first"]:.2f} s (the filling one: {fill["first"]:.2f} '
        f's), reference loop {warm_cache["reference"]:.2f} s, ratios '
        f'{[round(x, 2) for x in warm_cache["ratios"]]}', flush=True)

  reference = _reference_module().reference_evbmf
  details = vbmf.vbmf_ranks(params, report=True)[1]
  ref_ranks = reference_ranks(reference, params)
  agree = sum(int(a == b) for p in ref_ranks
              for a, b in zip(details[p]['vbmf'], ref_ranks[p]))
  same_children = all(c['same_ranks'] and c['ranks'] == cold['ranks']
                      for c in (cold, cold_program, fill, warm_cache))
  lapack = vbmf.use_lapack_eigenvalues(True)  # the default

  def warm_program(lapack_eigenvalues=True):
    vbmf.use_host_spectra(False)
    vbmf.use_lapack_eigenvalues(lapack_eigenvalues)
    try:
      return vbmf.vbmf_ranks(params)
    finally:
      vbmf.use_lapack_eigenvalues(True)
      vbmf.use_host_spectra(True)

  def warm_own_threads():
    lj.set_lapack_threads(None)
    try:
      return vbmf.vbmf_ranks(params)
    finally:
      lj.set_lapack_threads(1)  # the default, which the other rows time

  same_program = (warm_program() == warm_program(False) ==
                  vbmf.vbmf_ranks(params))
  med = interleaved({
      'warm': lambda: vbmf.vbmf_ranks(params),
      'warm_own_threads': warm_own_threads,
      'warm_program': warm_program,
      'warm_svd': lambda: warm_program(False),
      'reference': lambda: reference_ranks(reference, params),
      'floor': floor_loop(params),
  }, args.repeats)
  print(f'{net}: interleaved medians {med}', flush=True)
  return dict(net=net, layers=len(layers), matrices=n_mats, cold=cold,
              cold_program=cold_program,
              fill=fill, warm_cache=warm_cache, agree=agree,
              same_children=same_children, lapack=lapack,
              same_program=same_program, **med)


def _pooled(r):
  """The median reference loop over every fresh process of a network."""
  return statistics.median(
      t for k in ('cold', 'cold_program', 'fill', 'warm_cache')
      for t in r[k]['references'])


def _ratio_text(runs, pooled):
  """``0.66x (per process 0.64x [0.52-0.71], loop 3.12 s there)``: the
  median first call over the pooled loop median, then the per-process
  ratios of :func:`summary`."""
  return (f'{runs["first"] / pooled:.2f}x (per process {runs["ratio"]:.2f}x '
          f'[{min(runs["ratios"]):.2f}-{max(runs["ratios"]):.2f}], loop '
          f'{runs["reference"]:.2f} s there)')


def report(rows, args, argv, pad):
  info = hostinfo.machine_line()
  lines = [
      '## EVBMF ranks of a whole network (`vbmf_ranks`)',
      '',
      f'Command: `{" ".join(["python", "bench/bench_vbmf.py"] + argv)}`'
      + (f' with OPENBLAS_NUM_THREADS={os.environ["OPENBLAS_NUM_THREADS"]}'
         if 'OPENBLAS_NUM_THREADS' in os.environ else '') + '.',
      '',
      f'{info} Python {platform.python_version()}, NumPy {np.__version__}. '
      'Read the ratios, not the absolute times: each child process times '
      'its first call and then the reference loop; a first-call ratio is '
      f'the median first call over {args.fresh} such processes divided by '
      'the median reference loop of all the fresh processes of that '
      'network (the loop\'s own time varies by up to 2x between processes, '
      'so per-process ratios, in brackets, swing with it); the warm rows are '
      'interleaved round by round.',
      '',
      'Workloads (float32, planted Tucker-2 spectra plus noise, seed 0): '
      + '; '.join(f'{r["net"]}: {r["layers"]} layers, {r["matrices"]} '
                  'matrices' for r in rows) + '. resnet50 is the 53 convs '
      'of torchvision ResNet-50 (3 x 3136 to 1024 x 2048 and 512 x 4608); '
      "resnet18 every layer of `lj.get_model('resnet18')`.",
      '',
      '| network | what | time (s) | vs reference loop |',
      '|---|---|---:|---:|',
  ]
  for r in rows:
    n = r['net']
    cold, cached, fill = r['cold'], r['warm_cache'], r['fill']
    pooled = _pooled(r)
    lines += [
        f'| {n} | first call, fresh process, no cache | {cold["first"]:.2f} '
        f'| {_ratio_text(cold, pooled)} |',
        f'| {n} | first call, fresh process, no cache, spectra by the '
        'compiled program (`use_host_spectra(False)`) | '
        f'{r["cold_program"]["first"]:.2f} | '
        f'{_ratio_text(r["cold_program"], pooled)} |',
        f'| {n} | first call, fresh process, `compilation_cache=DIR` filled '
        f'by an earlier process | {cached["first"]:.2f} | '
        f'{_ratio_text(cached, pooled)} |',
        f'| {n} | the process that filled the cache (first call) | '
        f'{fill["first"]:.2f} | {fill["first"] / pooled:.2f}x |',
        f'| {n} | reference loop, median over the '
        f'{3 * args.fresh + 1} fresh processes | {pooled:.3f} | '
        '1.00x (first calls) |',
        f'| {n} | warm call, median of {args.repeats} | {r["warm"]:.3f} | '
        f'{r["warm"] / r["reference"]:.2f}x |',
        f'| {n} | warm call, host BLAS at its own threads '
        f'(`set_lapack_threads(None)`), median of {args.repeats} | '
        f'{r["warm_own_threads"]:.3f} | '
        f'{r["warm_own_threads"] / r["reference"]:.2f}x |',
        f'| {n} | warm call, spectra by the compiled program, median of '
        f'{args.repeats} | {r["warm_program"]:.3f} | '
        f'{r["warm_program"] / r["reference"]:.2f}x |',
        f'| {n} | warm call, compiled program, eigenvalues by the SVD '
        f'(`use_lapack_eigenvalues(False)`), median of {args.repeats} | '
        f'{r["warm_svd"]:.3f} | {r["warm_svd"] / r["reference"]:.2f}x |',
        f'| {n} | floor: NumPy float32 Gram + `eigvalsh`, no search, median '
        f'of {args.repeats} | {r["floor"]:.3f} | '
        f'{r["floor"] / r["reference"]:.2f}x |',
        f'| {n} | reference loop (float64 SVD + bounded search per matrix), '
        f'median of {args.repeats}, interleaved with the warm calls | '
        f'{r["reference"]:.3f} | 1.00x (warm calls) |',
    ]
  if pad is not None:
    lines.append(f'| resnet50 | padded alternative: 70 x (Gram + eigh of '
                 f'1024 x 4608), estimate | {pad:.2f} | - |')
  lines += ['']
  for r in rows:
    pooled = _pooled(r)
    first_ok = r['warm_cache']['first'] / pooled <= 0.5
    cold_ok = r['cold']['first'] / pooled <= 0.5
    warm_ok = r['warm'] <= r['floor']
    lines.append(
        f'{r["net"]}: EVBMF ranks identical to the reference on '
        f'{r["agree"]}/{r["matrices"]} matrices; the '
        f'{3 * args.fresh + 1} fresh processes gave '
        f'{"identical" if r["same_children"] else "DIFFERENT"} ranks. '
        'Goal first call <= 0.5x the loop: '
        f'**{"met" if cold_ok else "not met"}** '
        f'without a cache, **{"met" if first_ok else "not met"}** with '
        f'`compilation_cache`; goal warm <= floor: '
        f'**{"met" if warm_ok else "not met"}** '
        f'({r["warm"] / r["floor"]:.2f}x the floor; '
        f'{r["warm_own_threads"] / r["floor"]:.2f}x with the host BLAS at '
        'its own threads). The compiled program\'s LAPACK eigenvalue '
        f'path {"in use" if r["lapack"] else "NOT in use (self-check)"}; '
        'the compiled program with it and with the SVD: '
        f'{r["warm_program"] / r["warm"]:.2f}x and '
        f'{r["warm_svd"] / r["warm"]:.2f}x the warm time, '
        f'{"the same" if r["same_program"] else "DIFFERENT"} ranks.')
    lines.append('')
  lines += [
      'How: on CPU the spectra (each matrix\'s squared singular values) '
      'are computed on the host by default with NumPy, one matrix per core '
      'at one BLAS thread each: each Gram matrix by BLAS ?syrk from its '
      'kernel, scaled by the power of two of its largest diagonal entry, '
      "its eigenvalues by LAPACK ?syevd mode 'N' (`eigvalsh`), so only the "
      'EVBMF solve is compiled (one vmapped jnp program of every matrix, in '
      'a second thread while the spectra run). The compiled spectra '
      'program (other backends, `use_host_spectra(False)`, layers that '
      'must be collapsed to a kernel first, and the redos: matrices at '
      "extreme scales prescaled, and those 'auto' gives to the SVD) forms "
      'the same Gram matrices in XLA, runs the eigenproblems per size '
      'bucket (Gram matrices zero-padded to 16, 24, 32, 48, 64, ...; '
      'ResNet-50: 6 buckets instead of 15 shape groups) with eigenvalues '
      "only (LAPACK ?syevd mode 'N' through jaxlib's own target after a "
      "self-check; `lj.vbmf.use_lapack_eigenvalues(False)` falls back to "
      "the singular values, ?gesdd jobz='N') and is compiled at XLA "
      'optimization level 0 on CPU. `compilation_cache=DIR` (opt-in, '
      'JAX\'s persistent compilation cache for that call only) skips the '
      'compilation in later processes, leaving tracing and lowering. The '
      'floor row is NumPy\'s own: `m @ m.T` (BLAS ?syrk, at NumPy\'s '
      'default threads) and `eigvalsh` of every matrix, without the '
      'unfoldings\' copies, the scaling or the search.',
      '',
  ]
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--nets', default='resnet50,resnet18',
                      help='comma-separated: resnet50, resnet18')
  parser.add_argument('--repeats', type=int, default=3,
                      help='interleaved rounds of the warm call, the '
                      'reference loop and the floor (median)')
  parser.add_argument('--fresh', type=int, default=3,
                      help='fresh processes per first-call row (median)')
  parser.add_argument('--no-write', action='store_true',
                      help='print only; do not write docs/benchmarks_vbmf.md')
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs',
                                                    'benchmarks_vbmf.md'))
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--cache', default='', help=argparse.SUPPRESS)
  parser.add_argument('--program', action='store_true',
                      help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  if args.fresh < 1:
    parser.error(f'--fresh {args.fresh}: must be >= 1 (the first-call rows '
                 'are medians over that many processes)')
  if args.repeats < 1:
    parser.error(f'--repeats {args.repeats}: must be >= 1 (the warm rows '
                 'are medians over that many rounds)')
  if args.child:
    child(args.child, args.cache, args.program)
    return
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for net in args.nets.split(','):
      rows.append(bench_network(net, args, workdir))
  pad = padded_estimate() if 'resnet50' in args.nets else None
  text = report(rows, args, argv, pad)
  print()
  print(text)
  if not args.no_write:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as fh:
      fh.write(text)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
