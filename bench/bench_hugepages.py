"""The README's main job in miniature, with and without huge pages for malloc.

train.py restarts itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
where glibc and the kernel's transparent-huge-page mode (``madvise``) let
that help (``train.hugepages_environ``); ``LOWRANK_JAX_HUGEPAGES=0`` runs it
without. This bench runs ``configs/main.py`` on a subset of the training
images (one orthogonal epoch, the split, one fine-tuning epoch) both ways
in fresh processes, alternating (off, on, on, off, ...), and reports per
run the wall time, the user and system CPU seconds and the minor page
faults of the process (``os.wait4``), and the median images/s of each
stage's training rows after its first (metrics.jsonl).

  python bench/bench_hugepages.py      # writes docs/benchmarks_hugepages.md
  python bench/bench_hugepages.py --rounds 1 --subset 6400 --out /tmp/h.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hostinfo  # noqa: E402
import train  # noqa: E402  (the top-level train.py: its restart rule)
from write_benchmark_model_md import read_metrics  # noqa: E402
from lowrank_jax.train import atomic  # noqa: E402

# The stages whose training rows give the images/s columns.
STAGES = {'orthogonal_train': 'orthogonal', 'finetune': 'fine-tuning'}


def command(workdir: str, subset: int) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
          os.path.join(ROOT, 'configs', 'main.py'), '--workdir', workdir,
          '--config.progress=False', '--config.num_epochs=1',
          '--config.finetune.num_epochs=1', f'--config.train_subset={subset}']


def run(mode: str, subset: int) -> dict:
  """One fresh run; ``mode`` 'off' sets LOWRANK_JAX_HUGEPAGES=0."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env[train.HUGEPAGES_OFF] = '0' if mode == 'off' else '1'
  workdir = tempfile.mkdtemp(prefix=f'hugepages_{mode}_')
  try:
    start = time.perf_counter()
    proc = subprocess.Popen(command(workdir, subset), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
      raise RuntimeError(f'{mode} run failed:\n{err[-3000:]}')
    rates = {stage: statistics.median(
        [r['images_per_s'] for r in read_metrics(workdir, stage)
         if r.get('images_per_s')][1:] or [0.0]) for stage in STAGES}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {'mode': mode, 'restarted': 'restarting with' in err,
          'wall_s': wall, 'user_s': usage.ru_utime, 'sys_s': usage.ru_stime,
          'faults': usage.ru_minflt, **rates}


def environment_line() -> str:
  wanted = train.restart_environ({}) is not None
  return (f'C library: {train.libc_version() or "not glibc"}; transparent '
          f'huge pages: {train.thp_mode() or "not available"}; train.py '
          f'restarts with the tunable: {"yes" if wanted else "no"}.')


def _median(results, mode, key):
  return statistics.median(r[key] for r in results if r['mode'] == mode)


def report(results, args, seconds) -> str:
  lines = ['# Huge pages for XLA:CPU\'s buffers (train.py)', '',
           'Written by `bench/bench_hugepages.py` (its docstring says what is '
           'timed); nothing typed in by hand.', '',
           f'## `python bench/bench_hugepages.py --rounds {args.rounds} '
           f'--subset {args.subset}`', '',
           f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
           f'{seconds:.0f} s. {hostinfo.machine_line()} '
           f'{environment_line()}', '',
           '| run | huge pages | wall s | user CPU s | system CPU s | minor '
           'page faults | images/s orthogonal | images/s fine-tuning |',
           '|---|---|---:|---:|---:|---:|---:|---:|']
  for i, r in enumerate(results):
    lines.append(
        f'| {i + 1} | {"on" if r["restarted"] else "off"} | '
        f'{r["wall_s"]:.1f} | {r["user_s"]:.1f} | {r["sys_s"]:.1f} | '
        f'{r["faults"]:,} | {r["orthogonal_train"]:.0f} | '
        f'{r["finetune"]:.0f} |')
  cells = []
  for key, name in (('wall_s', 'wall time'), ('sys_s', 'system CPU time'),
                    *((s, f'{n} images/s') for s, n in STAGES.items())):
    off, on = _median(results, 'off', key), _median(results, 'on', key)
    ratio = f'{on / off:.2f}x' if off else 'no rows'
    cells.append(f'{name} {off:.1f} -> {on:.1f} ({ratio})')
  lines += ['', 'Medians, off -> on: ' + '; '.join(cells) + '.', '']
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=2,
                      help='pairs of runs, alternating off/on order')
  parser.add_argument('--subset', type=int, default=25600,
                      help='training images (the epoch length)')
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'docs', 'benchmarks_hugepages.md'))
  args = parser.parse_args(argv)
  start, results = time.perf_counter(), []
  for i in range(args.rounds):
    for mode in (('off', 'on') if i % 2 == 0 else ('on', 'off')):
      results.append(run(mode, args.subset))
      print(json.dumps(results[-1]), flush=True)
  text = report(results, args, time.perf_counter() - start)
  atomic.write_text(args.out, text)
  print(text)


if __name__ == '__main__':
  main()
