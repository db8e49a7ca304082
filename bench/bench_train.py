"""Training throughput: lowrank_jax.train.loop.train vs a plain Flax/Optax loop.

Both loops train the same model with the same optimizer (built by
``optim.make_optimizer`` from the model's config) on the same real
Fashion-MNIST batches (``data.iterate_batches``, seed 0, epoch 0, batch 128),
in the same process. Throughput is measured over intervals of
``--log-every`` steps, each ended by a host sync (our loop: its metrics log
row; the plain loop: fetching its losses), and reported as the median over
intervals after the first (warm-up); compile time (first step, including
compilation) is reported separately. The plain loop runs before and after
ours, alternating (plain, ours, plain, ours, plain by default), and the
medians pool all intervals of a kind, which spreads drifts in machine load
over both.

  python bench/bench_train.py                      # writes docs/benchmarks_train.md
  python bench/bench_train.py --models lenet5 --steps 100 --out /tmp/b.md
  python bench/bench_train.py --models fc2 --out /tmp/fc2.md  # host overhead
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fc2 as fc2_config  # noqa: E402
from configs import lenet5 as lenet5_config  # noqa: E402
from configs import resnet20 as resnet20_config  # noqa: E402
import hostinfo  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax.train import data  # noqa: E402
from lowrank_jax.train import loop  # noqa: E402
from lowrank_jax.train import metrics as metrics_lib  # noqa: E402
from lowrank_jax.train import optim  # noqa: E402
from lowrank_jax.train import sharding  # noqa: E402
from lowrank_jax.train import state as state_lib  # noqa: E402
from lowrank_jax.train import steps as steps_lib  # noqa: E402

CONFIGS = {'fc2': fc2_config, 'lenet5': lenet5_config,
           'resnet20': resnet20_config}
# Steps per timed run and per interval: resnet20 is ~30x slower per step.
# (steps per loop run, steps per timing interval, alternated step pairs).
DEFAULT_STEPS = {'fc2': (400, 40, 200), 'lenet5': (200, 20, 100),
                 'resnet20': (16, 4, 10)}
BATCH = 128


def make_plain_step(model, tx):
  """The hand-written reference step: jit(value_and_grad + optax update)."""

  def step_fn(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      if batch_stats:
        logits, upd = model.apply({'params': p, 'batch_stats': batch_stats},
                                  x, train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean(), upd['batch_stats']
      logits = model.apply({'params': p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean(), batch_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return jax.jit(step_fn, donate_argnums=(0, 1, 2))


def _plain_state(model, config, tx):
  variables = state_lib.init_variables(model, (1, 28, 28, 1),
                                       jax.random.PRNGKey(config.seed))
  params = variables['params']
  return params, variables.get('batch_stats', {}), tx.init(params)


def plain_loop(model, config, dataset, steps, log_every, step_fn=None):
  """The reference loop: device_put, step, fetch losses every log_every."""
  steps_per_epoch = data.num_batches(len(dataset.train.labels), BATCH)
  tx, _ = optim.make_optimizer(config, steps_per_epoch)
  params, batch_stats, opt_state = _plain_state(model, config, tx)
  step_fn = step_fn or make_plain_step(model, tx)
  batches = data.iterate_batches(dataset.train, BATCH, mean=dataset.mean,
                                 std=dataset.std, seed=config.seed, epoch=0,
                                 augment=config.augment,
                                 pad_crop=config.pad_crop)
  marks, losses, first_step_s = [], [], None
  t0 = time.perf_counter()
  for i, (x, y) in enumerate(batches):
    if i == steps:
      break
    x, y = jax.device_put((x, y))
    params, batch_stats, opt_state, loss = step_fn(params, batch_stats,
                                                   opt_state, x, y)
    losses.append(loss)
    if i == 0:
      jax.block_until_ready(loss)
      first_step_s = time.perf_counter() - t0
    if (i + 1) % log_every == 0:
      jax.device_get(losses)  # The sync our loop does per log row.
      losses = []
      marks.append((i + 1, time.perf_counter(), time.process_time()))
  return _intervals(marks), first_step_s, step_fn


def _intervals(marks):
  """``[(wall_s, cpu_s, steps)]`` between consecutive sync marks."""
  return [(t1 - t0, c1 - c0, s1 - s0)
          for (s0, t0, c0), (s1, t1, c1) in zip(marks, marks[1:])]


def our_loop(model, config, dataset, steps, log_every):
  """``loop.train`` with a log row (one host sync) every ``log_every``.

  Timed by the same clock as the plain loop: a wrapper around the metrics
  log's ``write`` marks wall and CPU time at each train row (the row is
  written right after the sync that fetches the interval's metrics).
  """
  config = config.copy_and_resolve_references()
  config.max_steps = steps
  config.log_every_steps = log_every
  config.checkpoint_every_steps = 0
  marks = []
  write = metrics_lib._MetricsLog.write

  def timed_write(self, row):
    if row.get('split') == 'train' and row['step'] % log_every == 0:
      marks.append((row['step'], time.perf_counter(), time.process_time()))
    return write(self, row)

  metrics_lib._MetricsLog.write = timed_write
  try:
    with tempfile.TemporaryDirectory() as workdir:
      _, history = loop.train(config, workdir, dataset=dataset,
                              model=model)
  finally:
    metrics_lib._MetricsLog.write = write
  first = [r for r in history if r['split'] == 'train'][0]['first_step_s']
  return _intervals(marks), first


def step_pairs(model, config, dataset, pairs):
  """Our jitted step vs the plain one, alternated step by step.

  Each step is timed alone (dispatch to ready), the two alternate (order
  swapped every pair) on the same batches, so drifts in machine load hit
  both alike. Returns ``(ours_s, plain_s)`` lists.
  """
  steps_per_epoch = data.num_batches(len(dataset.train.labels), BATCH)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  mesh = sharding.make_mesh()
  state = state_lib.create_train_state(config, model, None, (1, 28, 28, 1),
                                       jax.random.PRNGKey(config.seed), tx=tx,
                                       mesh=mesh)
  ours = steps_lib.make_train_step(model, learning_rate_fn=schedule,
                                   mesh=mesh)
  plain = make_plain_step(model, tx)
  params, batch_stats, opt_state = _plain_state(model, config, tx)
  times = {'ours': [], 'plain': []}
  batches = data.iterate_batches(dataset.train, BATCH, mean=dataset.mean,
                                 std=dataset.std, seed=config.seed, epoch=1)
  for i, (x, y) in enumerate(batches):
    if i == pairs + 2:
      break
    for kind in ('ours', 'plain') if i % 2 else ('plain', 'ours'):
      t0 = time.perf_counter()
      if kind == 'ours':
        state, metrics = ours(state, sharding.shard_batch((x, y), mesh))
        jax.block_until_ready(metrics)
      else:
        xb, yb = jax.device_put((x, y))
        params, batch_stats, opt_state, loss = plain(
            params, batch_stats, opt_state, xb, yb)
        jax.block_until_ready(loss)
      if i >= 2:  # Two warm-up pairs (compilation, first runs).
        times[kind].append(time.perf_counter() - t0)
  return times['ours'], times['plain']


def machine() -> dict:
  cpu = hostinfo.cpu_name() or platform.processor() or '?'
  return {
      'cpu': cpu, 'nproc': os.cpu_count(),
      'affinity': len(os.sched_getaffinity(0)),
      'jax': jax.__version__, 'backend': jax.default_backend(),
      'devices': jax.device_count(), 'python': platform.python_version(),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='lenet5,resnet20')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per run (default per model)')
  parser.add_argument('--log-every', type=int, default=None,
                      help='steps per timing interval (default per model)')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
      'benchmarks_train.md'))
  parser.add_argument('--pairs', type=int, default=None,
                      help='alternated step pairs (default per model)')
  parser.add_argument('--rounds', type=int, default=3,
                      help='plain runs; ours runs between them (rounds - 1)')
  args = parser.parse_args(argv)
  # Ours re-creates its step each run: after the first run, load the compiled
  # executables from a (bench-local) persistent cache instead of recompiling.
  cache = tempfile.mkdtemp(prefix='bench_train_cache_')
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

  t_bench = time.perf_counter()
  load_before = os.getloadavg()
  full = data.load_dataset('fashion_mnist_local', validation_size=5000)
  empty = data.Split(full.train.images[:0], full.train.labels[:0])
  # Evaluation is not timed: empty validation/test splits skip it.
  dataset = full._replace(validation=empty, test=empty)
  results = []
  for name in args.models.split(','):
    steps, log_every, pairs = DEFAULT_STEPS[name]
    steps = args.steps or steps
    pairs = args.pairs or pairs
    log_every = args.log_every or log_every
    config = CONFIGS[name].get_config()
    model = models.get_model(name, num_classes=10)
    intervals = {'plain': [], 'ours': []}
    compile_s = {}
    step_fn = None
    for i in range(args.rounds):
      for kind in ('plain', 'ours') if i < args.rounds - 1 else ('plain',):
        if kind == 'plain':
          got, first, step_fn = plain_loop(model, config, dataset, steps,
                                           log_every, step_fn=step_fn)
        else:
          got, first = our_loop(model, config, dataset, steps, log_every)
        compile_s.setdefault(kind, first)
        intervals[kind] += got
        print(f'  {name} {kind}: ' + ' '.join(
            f'{n * BATCH / w:.0f}' for w, _, n in got) + ' img/s', flush=True)
    row = {'model': name, 'steps': steps, 'interval': log_every,
           'rounds': args.rounds, 'plain_compile_s': compile_s['plain'],
           'ours_compile_s': compile_s['ours']}
    for kind, got in intervals.items():
      rates = [n * BATCH / w for w, _, n in got]
      row[kind] = statistics.median(rates)
      row[kind + '_best'] = max(rates)
      row[kind + '_cpu_ms'] = statistics.median(1e3 * c / n for _, c, n in got)
      row[kind + '_n'] = len(got)
    ours_s, plain_s = step_pairs(model, config, dataset, pairs)
    ratios = [o / p for o, p in zip(ours_s, plain_s)]
    row['pairs'] = len(ratios)
    row['step_ours_ms'] = 1e3 * statistics.median(ours_s)
    row['step_plain_ms'] = 1e3 * statistics.median(plain_s)
    row['overhead_step'] = statistics.median(ratios) - 1
    row['overhead'] = 1 - row['ours'] / row['plain']
    row['overhead_best'] = 1 - row['ours_best'] / row['plain_best']
    row['overhead_cpu'] = row['ours_cpu_ms'] / row['plain_cpu_ms'] - 1
    results.append(row)
    print(f"{name}: plain {row['plain']:.0f} img/s, ours {row['ours']:.0f} "
          f"img/s, overhead {100 * row['overhead']:+.1f}% (best intervals "
          f"{100 * row['overhead_best']:+.1f}%, CPU time/step "
          f"{100 * row['overhead_cpu']:+.1f}%), alternated steps "
          f"{100 * row['overhead_step']:+.1f}%, compile plain "
          f"{row['plain_compile_s']:.1f}s ours {row['ours_compile_s']:.1f}s",
          flush=True)
  info = machine()
  info['load'] = f'{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after'
  info['bench_s'] = time.perf_counter() - t_bench
  shutil.rmtree(cache, ignore_errors=True)
  command = 'python bench/bench_train.py ' + ' '.join(sys.argv[1:])
  write_report(args.out, results, info, command.strip())


def write_report(path, results, info, command):
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')
  lines = [
      '# Training-loop throughput',
      '',
      '`lowrank_jax.train.loop.train` (sharded jitted step, metrics kept on '
      'device between log rows, tqdm, JSON-lines/TensorBoard logging, '
      'orbax checkpointing) against a minimal hand-written loop '
      '(`jax.jit` of `value_and_grad` + `optax`, `model.apply`, '
      '`jax.device_put` of each batch) on the same model, optimizer '
      '(`optim.make_optimizer` of the model\'s config) and real '
      'Fashion-MNIST batches (batch 128), in one process.',
      '',
      f'Command: `{command}` (from the repository root, {now} UTC, '
      f'{info["bench_s"]:.0f} s in all).',
      '',
      f'Machine: {info["cpu"]}, nproc {info["nproc"]} (affinity '
      f'{info["affinity"]}), jax {info["jax"]}, backend {info["backend"]} '
      f'({info["devices"]} device), Python {info["python"]}; 1-minute load '
      f'average {info["load"]}: the 2 cores are shared with other jobs, so '
      'wall-clock rates swing by 2x between runs.',
      '',
      '## Whole loops',
      '',
      'Each run trains from a fresh init for the given steps; a host sync '
      'ends every interval (ours: the log row; plain: fetching the losses). '
      'Runs alternate plain, ours, plain, ... and all intervals of a kind '
      'after each run\'s first are pooled. img/s are medians; overhead = '
      '1 - ours / plain (negative: ours faster). CPU time/step (process '
      'CPU seconds per step, median) is the least load-sensitive measure.',
      '',
      '| model | steps/run (interval) | runs plain / ours | intervals '
      'plain / ours | plain img/s | ours img/s | overhead: median img/s '
      '| overhead: best interval | overhead: CPU time/step | compile plain / '
      'ours (s) |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    lines.append(
        f"| {r['model']} | {r['steps']} ({r['interval']}) | {r['rounds']} / "
        f"{r['rounds'] - 1} | {r['plain_n']} / {r['ours_n']} | "
        f"{r['plain']:.0f} | {r['ours']:.0f} | {100 * r['overhead']:+.1f}% | "
        f"{100 * r['overhead_best']:+.1f}% | {100 * r['overhead_cpu']:+.1f}% "
        f"({r['plain_cpu_ms']:.1f} / {r['ours_cpu_ms']:.1f} ms) | "
        f"{r['plain_compile_s']:.1f} / {r['ours_compile_s']:.1f} |")
  lines += [
      '',
      'Compile = wall time of the first step of the first run (trace + XLA '
      'compile + one step); later runs of ours load the executable from a '
      'bench-local persistent compilation cache.',
      '',
      '## Jitted steps alternated step by step',
      '',
      'Our `make_train_step` step (with accuracy, learning-rate and '
      'dropout-key outputs, shardings, `shard_batch`) and the plain step, '
      'each timed alone from dispatch to ready, alternating on the same '
      'batches (order swapped every pair; 2 warm-up pairs dropped), so load '
      'drifts hit both alike. Overhead = median over pairs of ours / plain '
      '- 1.',
      '',
      '| model | pairs | plain ms/step | ours ms/step | overhead |',
      '|---|---|---|---|---|',
  ]
  for r in results:
    lines.append(
        f"| {r['model']} | {r['pairs']} | {r['step_plain_ms']:.1f} | "
        f"{r['step_ours_ms']:.1f} | {100 * r['overhead_step']:+.1f}% |")
  lines += ['', NOTES, RUN_LOG_HEADER]
  lines += _previous_run_log(path) + [
      f'* {now} UTC, load {info["load"]}: ' + '; '.join(
          f"{r['model']} whole-loop {100 * r['overhead']:+.1f}% (CPU/step "
          f"{100 * r['overhead_cpu']:+.1f}%), alternated steps "
          f"{100 * r['overhead_step']:+.1f}%" for r in results)]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'wrote {path}')


RUN_LOG_HEADER = '''## Run log

Overheads (ours vs plain) of every run of this bench that wrote this file,
oldest first; the spread shows the machine's noise.
'''


def _previous_run_log(path) -> list[str]:
  """The run-log lines of an earlier report at ``path``, if any."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  if '## Run log' not in text:
    return []
  return [line for line in text.split('## Run log', 1)[1].splitlines()
          if line.startswith('* ')]


NOTES = '''## What our loop adds per step

* The batch goes to the devices with one `jax.device_put(batch,
  NamedSharding(mesh, P('data')))`. Multi-process runs use
  `jax.make_array_from_process_local_data`, which costs about twice the host
  time (0.5 vs 0.26 ms per batch of 128 measured here), hence the
  single-process fast path in `sharding.shard_batch`.
* The step returns its metrics as device scalars; they are appended to a
  list and fetched once per `log_every_steps` (one host sync per row), so
  dispatch stays asynchronous and the host prepares the next batch while
  the device computes.
* The progress bar gets `tqdm.update(1)` per step (a counter; it redraws
  at most every 0.1 s) and a new postfix only at log rows; it is disabled
  when stderr is not a terminal (as in this bench).
* Evaluation and checkpoint saves happen outside the timed intervals (our
  rows' own `images_per_s` subtract them; here the splits are empty and
  the only checkpoint is written after the last interval).
* Inside the step: accuracy, the learning rate and a dropout key
  (`fold_in`) on top of the loss — negligible next to the convolutions.
* Host overhead probe (`--models fc2`, 2 ms steps, where per-step Python
  work shows most; 2026-11-22): with pre-placed batches and no syncs our
  jitted step costs 1636 vs 1625 us (+0.7%); the whole loop +0.9% CPU
  time per step, +3.7% step-by-step alternated, and about +6% wall clock
  (roughly 0.1 ms per step: the sharded `device_put`, ~25 us more than a
  plain one, plus loop bookkeeping). For LeNet-5 (~35 ms steps) and
  ResNet-20 (~1 s) this is well under 1%.
* Compiling: the train state's init is compiled without XLA optimizations
  (`_RUN_ONCE_OPTIONS`), which cut LeNet-5's init compile from ~8 s to
  ~1.4 s on this machine; the step itself is compiled normally.

## Reading the numbers

On this shared 2-core machine other jobs come and go within seconds, so the
whole-loop wall-clock medians can differ by tens of percent in either
direction between runs of the *same* loop (see the per-run lines the bench
prints). The two measures that resist this are the process CPU time per
step and the step-by-step alternation; both put our loop within a few
percent of the plain one. Re-run on an idle machine for clean wall-clock
numbers.
'''


if __name__ == '__main__':
  main()
