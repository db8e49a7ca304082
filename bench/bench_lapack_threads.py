"""The library's LAPACK calls with the host BLAS at one thread or as it is.

On CPU, jaxlib runs LAPACK as custom calls on XLA's worker threads through
SciPy's OpenBLAS, whose own threads then compete with XLA's; the library
holds the host BLAS at ``lj.set_lapack_threads`` threads (default 1) while
it runs them (lowrank_jax/lapack_threads.py). Timed here, each side in
fresh processes (so the first call, with its compilation, counts as users
meet it), alternating the two sides:

  * ``vbmf``: ``lj.vbmf_ranks`` of the ResNet-50 planted kernels of
    bench/bench_vbmf.py (70 matrices): the first call, then the median of
    3 warm calls;
  * ``tucker2``: ``lj.tucker2_split`` (HOOI, the default) of every k x k
    conv of resnet18's planted kernels at a quarter of their channels: the
    first call, then one warm call;
  * ``evbmf``: ``lj.evbmf`` called eagerly (as in a notebook) on the
    C_out x (kh kw C_in) matrix of each k x k conv of the ResNet-50 planted
    kernels, one call per matrix: the first pass, then one warm pass;
  * ``overparam``: ``lj.overparameterize`` (expansion 1, the he2024 start:
    a QR per factor) of resnet18's planted kernels: the first call, then
    one warm call;

once on the machine as it is ("idle": nothing else started) and then next
to ``--load`` training runs in other processes for as long as the
measurement lasts, timed from ``--load-warmup`` seconds after their start
(the scene names the training step they had logged by then): ``train.py``
with ``--load-config`` (default configs/vgg7w.py, and ``--load-pipeline``,
default direct, on Fashion-MNIST) in a temporary workdir, once per
``--load-nice`` niceness of those processes (0, and 5 as for a run started
with ``nice -n 5``). ``limit 1`` is the library's default, ``as is``
``lj.set_lapack_threads(None)``. A process that has not finished
within ``--timeout`` seconds is stopped and shown as such. Each process
also checks that both sides give the same ranks / factors (to rounding).

Run:  python bench/bench_lapack_threads.py   (writes
      docs/benchmarks_lapack_threads.md; ``--append`` adds a section)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hostinfo  # pylint: disable=g-import-not-at-top
from write_benchmark_model_md import read_metrics  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'benchmarks_lapack_threads.md')
WARM = {'vbmf': 3, 'tucker2': 1, 'evbmf': 1, 'overparam': 1}
# The planted kernels each workload runs on (bench/bench_vbmf.py).
NETS = {'vbmf': 'resnet50', 'tucker2': 'resnet18', 'evbmf': 'resnet50',
        'overparam': 'resnet18'}
SIDES = ('limit 1', 'as is')
# What each workload's processes are checked to agree on.
SAME = {'vbmf': 'ranks.', 'evbmf': 'ranks.',
        'tucker2': 'relative error per layer (to 1e-4).',
        'overparam': 'core norm per layer (to 1e-4).'}


def _workload(name, npz):
  """``(call, summary)`` of one workload on the kernels saved in ``npz``."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import lowrank_jax as lj
  from lowrank_jax import tree
  from bench_vbmf import _load_params
  params = _load_params(npz)
  if name == 'vbmf':
    return (lambda: lj.vbmf_ranks(params),
            lambda r: {p: list(v) for p, v in r.items()})
  if name == 'evbmf':
    mats = {p: v['kernel'].reshape(-1, v['kernel'].shape[-1]).T
            for p, v in tree.layers(params).items()
            if v['kernel'].ndim == 4 and v['kernel'].shape[0] > 1}
    return (lambda: {p: int(lj.evbmf(m).rank) for p, m in mats.items()},
            lambda r: r)
  if name == 'overparam':
    key = jax.random.PRNGKey(0)
    return (lambda: jax.block_until_ready(lj.overparameterize(params,
                                                              key=key)),
            lambda out: {p: float(jnp.linalg.norm(v['op_core']))
                         for p, v in tree.layers(out).items()
                         if 'op_core' in v})

  def quarter(_, layer):
    c_in, c_out = layer['kernel'].shape[2:]
    return max(1, c_in // 4), max(1, c_out // 4)

  def call():
    return jax.block_until_ready(lj.tucker2_split(params, quarter))

  def summary(split):
    # Relative error of each split layer: factors are defined up to
    # rotations within (near-)equal singular values, their errors are not.
    errors, dense = {}, tree.layers(params)
    for path, layer in tree.layers(split).items():
      kernel = dense[path]['kernel']
      merged = lj.forms.to_kernel(layer)
      errors[path] = float(jnp.linalg.norm(merged - kernel)
                           / jnp.linalg.norm(kernel))
    return errors
  return call, summary


def child(name, npz, side):
  """One fresh process: the first call, then WARM[name] warm calls."""
  import lowrank_jax as lj  # pylint: disable=g-import-not-at-top
  lj.set_lapack_threads(1 if side == 'limit 1' else None)
  call, summary = _workload(name, npz)
  t = time.perf_counter()
  out = call()
  first = time.perf_counter() - t
  warm = []
  for _ in range(WARM[name]):
    t = time.perf_counter()
    call()
    warm.append(time.perf_counter() - t)
  print(json.dumps({'first': first, 'warm': statistics.median(warm),
                    'summary': summary(out)}))


def _run_child(name, npz, side, timeout):
  cmd = [sys.executable, os.path.abspath(__file__), '--child', name, npz,
         side]
  t = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'stopped': time.perf_counter() - t}
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(names, npz, repeats, timeout):
  """``{name: {side: [child results]}}``, the sides alternating."""
  results = {n: {s: [] for s in SIDES} for n in names}
  for name in names:
    for i in range(repeats):
      order = SIDES if i % 2 == 0 else SIDES[::-1]
      for side in order:
        got = _run_child(name, npz[name], side, timeout)
        results[name][side].append(got)
        print(name, side, {k: v for k, v in got.items() if k != 'summary'},
              flush=True)
  return results


def _start_load(n, nice, config, pipeline, workdir, warmup):
  """``n`` training runs of ``config`` at ``nice``, ``warmup`` seconds
  after their start (data read, compiled and stepping, see _load_steps)."""
  procs = [subprocess.Popen(
      ['nice', '-n', str(nice), sys.executable,
       os.path.join(ROOT, 'train.py'), f'--config={config}',
       f'--workdir={os.path.join(workdir, f"load{nice}_{i}")}',
       f'--config.pipeline={pipeline}', '--config.num_epochs=1000',
       '--config.progress=False', '--config.checkpoint_every_steps=0'],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
           for i in range(n)]
  time.sleep(warmup)
  for p in procs:
    if p.poll() is not None:
      raise SystemExit(f'the load ({config}) exited with {p.returncode}')
  return procs


def _load_steps(workdir, nice, n):
  """The training step each load run had logged, as text."""
  steps = []
  for i in range(n):
    rows = read_metrics(os.path.join(workdir, f'load{nice}_{i}'), None)
    last = [r['step'] for r in rows if r.get('split') == 'train']
    steps.append(str(last[-1]) if last else 'none yet')
  return ', '.join(steps)


def _same(runs):
  """Whether every finished run of a workload gave the same summary."""
  sums = [r['summary'] for side in runs.values() for r in side
          if 'summary' in r]
  if len(sums) < 2:
    return None
  keys = sums[0].keys()
  return all(s.keys() == keys and all(
      np.isclose(s[k], sums[0][k], rtol=1e-4) if isinstance(s[k], float)
      else s[k] == sums[0][k] for k in keys) for s in sums)


def _cell(runs, field):
  done = [r[field] for r in runs if field in r]
  stopped = [r['stopped'] for r in runs if 'stopped' in r]
  text = f'{statistics.median(done):.2f}' if done else '-'
  if stopped:
    text += f' ({len(stopped)} of {len(runs)} stopped after ' \
            f'{min(stopped):.0f} s)'
  return text, (statistics.median(done) if done else None)


def _ratio(limited, free):
  if limited is None:
    return '-'
  if free is None:
    return 'as is did not finish'
  return f'{free / limited:.1f}x'


def write(results, args, seconds):
  lines = [] if args.append else [
      '# Host BLAS threads during the library\'s LAPACK calls', '',
      'Written by `bench/bench_lapack_threads.py` (its docstring says what '
      'is timed); nothing typed in by hand.', '']
  lines += [
      '## `' + ' '.join(['python bench/bench_lapack_threads.py']
                        + sys.argv[1:]) + '`',
      '',
      f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
      f'{seconds:.0f} s. {hostinfo.machine_line()}', '',
      'Seconds, medians over fresh processes; "as is / limit 1": how many '
      'times longer the call takes with the host BLAS left as it is.', '',
      '| machine | workload | BLAS threads | first call s | warm call s '
      '| first: as is / limit 1 | warm: as is / limit 1 |',
      '|---|---|---|---:|---:|---:|---:|']
  for scene, by_name in results.items():
    for name, runs in by_name.items():
      cells = {s: (_cell(runs[s], 'first'), _cell(runs[s], 'warm'))
               for s in SIDES}
      for side in SIDES:
        (first, f_val), (warm, w_val) = cells[side]
        ratios = ('', '')
        if side == 'as is':
          (_, f_lim), (_, w_lim) = cells['limit 1']
          ratios = (_ratio(f_lim, f_val), _ratio(w_lim, w_val))
        lines.append(f'| {scene} | {name} | {side} | {first} | {warm} | '
                     f'{ratios[0]} | {ratios[1]} |')
  lines.append('')
  for scene, by_name in results.items():
    for name, runs in by_name.items():
      same = _same(runs)
      lines.append(f'* {scene}, {name}: ' + (
          'fewer than two finished processes to compare.' if same is None
          else 'every finished process gave the same ' + SAME[name]
          if same else
          '**the processes disagree**.'))
  with open(DOC, 'a' if args.append else 'w') as f:
    f.write(('\n' if args.append else '') + '\n'.join(lines) + '\n')
  print('\n'.join(lines))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workloads', nargs='+', default=['vbmf', 'tucker2'],
                      choices=sorted(WARM))
  parser.add_argument('--repeats', type=int, default=2,
                      help='fresh processes per side (alternating)')
  parser.add_argument('--load', type=int, default=1,
                      help='training processes for the loaded rows')
  parser.add_argument('--load-config', default='configs/vgg7w.py')
  parser.add_argument('--load-pipeline', default='direct',
                      help='its pipeline (he2024: orthogonal training)')
  parser.add_argument('--load-nice', type=int, nargs='+', default=[0, 5],
                      help='one loaded scene per niceness of the load '
                      '(5: a training run started with nice -n 5)')
  parser.add_argument('--load-warmup', type=float, default=60.0,
                      help='seconds the load runs before timing starts '
                      '(the scene names the step it had logged by then)')
  parser.add_argument('--timeout', type=float, default=150.0,
                      help='seconds before a process is stopped')
  parser.add_argument('--no-write', action='store_true')
  parser.add_argument('--append', action='store_true',
                      help='add this run to the page instead of replacing it')
  args = parser.parse_args(argv)
  if args.load_warmup < 0:
    parser.error(f'--load-warmup {args.load_warmup}: must be >= 0 seconds')
  from bench_vbmf import build_params  # pylint: disable=g-import-not-at-top
  from lowrank_jax import tree  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    for net in sorted({NETS[name] for name in args.workloads}):
      layers = tree.layers(build_params(net))
      np.savez(os.path.join(workdir, f'{net}.npz'),
               **{p: np.asarray(v['kernel']) for p, v in layers.items()})
    npz = {name: os.path.join(workdir, f'{NETS[name]}.npz')
           for name in args.workloads}
    results = {'idle': measure(args.workloads, npz, args.repeats,
                               args.timeout)}
    for nice in args.load_nice if args.load else ():
      procs = _start_load(args.load, nice, args.load_config,
                          args.load_pipeline, workdir, args.load_warmup)
      try:
        steps = _load_steps(workdir, nice, args.load)
        results[f'next to {args.load} train.py run(s) of '
                f'{args.load_config} ({args.load_pipeline}) at nice '
                f'{nice}, timed from step {steps}'] = measure(
                    args.workloads, npz, args.repeats, args.timeout)
      finally:
        for p in procs:
          p.kill()
          p.wait()
  if not args.no_write:
    write(results, args, time.perf_counter() - start)


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--child':
    child(*sys.argv[2:5])
  else:
    main()
