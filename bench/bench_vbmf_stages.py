"""Where the first ``vbmf_ranks`` call of a process spends its time when its
spectra are the compiled program's (other backends, or
``lj.vbmf.use_host_spectra(False)`` on CPU; the CPU default computes them
on the host and compiles only the solve: docs/benchmarks_vbmf.md).

Runs, in fresh processes (one per repeat), the steps of the first call on
the ResNet-50 planted kernels of bench/bench_vbmf.py one after another,
without the second thread the library compiles the solve in, so each step
is timed alone: JAX's one-time LAPACK set-up (jaxlib imports SciPy's LAPACK
bindings on the first linear-algebra lowering of a process), then the
spectra program's trace, lowering, compilation and run, then the solve's.
Each process then times the reference loop of bench/bench_vbmf.py (float64
SVD + bounded search per matrix), so the shares can be read against it.

Run:  python bench/bench_vbmf_stages.py   (writes docs/benchmarks_vbmf_stages.md)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = ('LAPACK set-up (SciPy import)', 'spectra: trace', 'spectra: lower',
         'spectra: compile', 'spectra: run', 'solve: trace + lower',
         'solve: compile', 'solve: run')
WARM = ('spectra program', 'solve program',
        'spectra part: Gram products (XLA, the spectra\'s options)',
        'spectra part: eigenvalues (LAPACK ?syevd mode N, 1 BLAS thread)',
        'NumPy floor: Gram products (`m @ m.T`, BLAS ?syrk)',
        'NumPy floor: `eigvalsh`')


def child(net):
  """One fresh process: the steps' seconds and the loop's, as JSON."""
  import jax  # pylint: disable=g-import-not-at-top
  import bench_vbmf  # pylint: disable=g-import-not-at-top
  from jaxlib import lapack  # pylint: disable=g-import-not-at-top
  from lowrank_jax.vbmf import batched, linalg, network, spectra  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(jax.numpy.asarray, bench_vbmf.build_params(net, 0))
  jax.block_until_ready(params)
  def lap():
    marks.append(time.perf_counter())

  marks = [time.perf_counter()]   # one more after each step of STEPS
  lapack.prepare_lapack_call('gesdd_ffi', jax.numpy.float32)
  lap()
  all_layers, plan = network._plan(params, None)  # pylint: disable=protected-access
  sources, kinds, groups = spectra._program_inputs(plan, all_layers)  # pylint: disable=protected-access
  traced = spectra._network_spectra['cpu'].trace(  # pylint: disable=protected-access
      sources, kinds=kinds, groups=groups, method='auto', prescale=False,
      lapack=linalg._LAPACK['on'])  # pylint: disable=protected-access
  lap()
  lowered = traced.lower()
  lap()
  compiled = lowered.compile()
  lap()
  out = jax.block_until_ready(compiled(sources))
  lap()
  solve = batched._network_solve.trace(out, 'auto').lower()  # pylint: disable=protected-access
  lap()
  solve = solve.compile()
  lap()
  jax.block_until_ready(solve(out))
  lap()
  reference = bench_vbmf._reference_module().reference_evbmf  # pylint: disable=protected-access
  t = time.perf_counter()
  bench_vbmf.reference_ranks(reference, params)
  steps = [b - a for a, b in zip(marks, marks[1:])]
  loop = time.perf_counter() - t
  warm = warm_parts(params, lambda: compiled(sources), lambda: solve(out))
  print(json.dumps({'steps': steps, 'reference': loop, 'warm': warm}))


def warm_parts(params, spectra_run, solve_run, repeats=5):
  """Warm seconds (medians of ``repeats``) of the two programs, of the
  spectra's two library parts compiled alone (every Gram product at the
  spectra's options; the LAPACK eigenvalue call on the unpadded Gram
  matrices), and of the NumPy floor's two parts
  (:func:`bench_vbmf.floor_loop`), in WARM's order."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import bench_vbmf  # pylint: disable=g-import-not-at-top
  from lowrank_jax import lapack_threads, tree  # pylint: disable=g-import-not-at-top
  from lowrank_jax.vbmf import linalg, spectra  # pylint: disable=g-import-not-at-top
  kernels, modes = [], []  # one entry per unfolding of bench_vbmf.unfoldings
  for layer in tree.layers(params).values():
    k = layer['kernel']
    n = len(bench_vbmf.unfoldings(np.asarray(k)))
    kernels += [k] * n
    modes += ['in', 'out'][-n:]
  def all_grams(ks):
    return [spectra._mode_gram(k, m) for k, m in zip(ks, modes)]  # pylint: disable=protected-access
  options = spectra._SPECTRA_CPU_OPTIONS  # pylint: disable=protected-access
  grams = jax.jit(all_grams).lower(kernels).compile(options)
  eig = jax.jit(lambda gs: [linalg._gram_eigenvalues(g) for g in gs])  # pylint: disable=protected-access
  gs = grams(kernels)
  mats = bench_vbmf.floor_matrices(params)
  np_grams = [m @ m.T for m in mats]

  def median(fn):
    run = lambda: jax.block_until_ready(fn())  # noqa: E731
    run()  # warm-up
    return bench_vbmf.timed(run, repeats)[0]
  with lapack_threads.limited():
    out = [median(spectra_run), median(solve_run),
           median(lambda: grams(kernels)), median(lambda: eig(gs))]
  return out + [median(lambda: [m @ m.T for m in mats]),
                median(lambda: [np.linalg.eigvalsh(g) for g in np_grams])]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--net', default='resnet50',
                      choices=('resnet50', 'resnet18'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--no-write', action='store_true')
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f'--repeats {args.repeats}: must be >= 1')
  if args.child:
    child(args.net)
    return
  runs = []
  for _ in range(args.repeats):
    out = subprocess.run([sys.executable, os.path.abspath(__file__),
                          '--child', '--net', args.net], capture_output=True,
                         text=True, check=True)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  lines = report(runs, args, sys.argv[1:] if argv is None else argv)
  print('\n'.join(lines))
  if not args.no_write:
    path = os.path.join(ROOT, 'docs', 'benchmarks_vbmf_stages.md')
    with open(path + '.tmp', 'w') as f:
      f.write('\n'.join(lines) + '\n')
    os.replace(path + '.tmp', path)
    print(f'wrote {path}')


def report(runs, args, argv):
  import hostinfo  # pylint: disable=g-import-not-at-top
  med = [statistics.median(r['steps'][i] for r in runs)
         for i in range(len(STEPS))]
  loop = statistics.median(r['reference'] for r in runs)
  total = sum(med)
  lines = ['## The first `vbmf_ranks` call with the compiled spectra '
           'program, step by step', '',
           f'Command: `{" ".join(["python", "bench/bench_vbmf_stages.py"] + argv)}`.',
           '', hostinfo.machine_line(), '',
           'The route of other backends and of '
           '`lj.vbmf.use_host_spectra(False)`; on CPU the default computes '
           'the spectra on the host with NumPy and compiles only the solve '
           '(docs/benchmarks_vbmf.md times both routes).', '',
           f'{args.net} planted kernels (bench/bench_vbmf.py), one fresh '
           f'process per repeat ({len(runs)}), medians. The steps run one '
           'after another here; the library compiles the solve in a second '
           'thread while the spectra compile and run, so its first call is '
           'shorter than the sum (docs/benchmarks_vbmf.md).', '',
           '| step | s | share of the sum | vs reference loop |',
           '|---|---:|---:|---:|']
  lines += [f'| {name} | {t:.3f} | {t / total:.0%} | {t / loop:.2f}x |'
            for name, t in zip(STEPS, med)]
  lines += [f'| sum | {total:.3f} | 100% | {total / loop:.2f}x |',
            f'| reference loop (same processes) | {loop:.3f} | | 1.00x |']
  return lines + warm_report(runs)


def warm_report(runs):
  """The warm call's table: its programs, their parts, the NumPy floor."""
  med = [statistics.median(r['warm'][i] for r in runs)
         for i in range(len(WARM))]
  call, floor = med[0] + med[1], med[4] + med[5]
  rest = med[0] - med[2] - med[3]
  return ['', '## The warm call with the compiled spectra program, by part',
          '',
          'The same processes, after the first call: medians of 5 runs '
          'each, then over the processes. The parts are compiled alone on '
          'the same matrices (every mode\'s Gram matrix, unpadded for the '
          'eigenvalues); the floor is bench/bench_vbmf.py\'s (NumPy float32, '
          'BLAS at its default threads). Host BLAS at 1 thread for the '
          'library\'s rows, as `vbmf_ranks` holds it.', '',
          '| what | s | vs the NumPy floor |', '|---|---:|---:|']  + [
              f'| {name} | {t:.3f} | {t / floor:.2f}x |'
              for name, t in zip(WARM, med)] + [
                  f'| the two programs | {call:.3f} | {call / floor:.2f}x |',
                  f'| NumPy floor, both parts | {floor:.3f} | 1.00x |',
                  '', f'The spectra program spends {rest:.3f} s outside its '
                  'two parts compiled alone (stacking, scaling, zero-padding '
                  'to the size buckets, the per-bucket loop).']


if __name__ == '__main__':
  main()
