"""Network benchmark: inference throughput of baseline vs compressed models.

For each model (random-init weights: timing does not depend on the values),
measures jitted ``lj.apply(model, variables, x, train=False)`` on a batch of
32x32x3 images (median of repeats, compile excluded) for

* ``baseline``: every layer dense;
* ``compressed``: k x k convs Tucker-2 and dense layers / 1x1 convs SVD, each
  at the ranks that cut its FLOPs by ``--ratio`` (layers that cannot reach
  the ratio, e.g. a 3-channel stem, stay dense);
* ``never_slower``: ``compressed`` after ``speed.never_slower`` (split layers
  slower than their dense form at this batch size merged back).

All variants of one model are timed interleaved in the same process, and the
results replace the section of the same settings in
``docs/benchmarks_layers.md`` (and in its log, ``docs/logs/``).

  python bench/bench_network.py                       # resnet20,resnet18,vgg16
  python bench/bench_network.py --models vgg16 --legacy  # forms before
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import bench_layers  # noqa: E402
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import count_flops  # noqa: E402
from lowrank_jax import counting  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax import speed  # noqa: E402
from lowrank_jax import tree  # noqa: E402


def compress(model, variables, input_shape, ratio):
  """Tucker-2 on k x k convs, SVD on 1x1 convs and dense layers, per-layer
  ranks for a ``ratio`` FLOP reduction (random factors of those shapes)."""
  calls = counting.called_layers(model, variables, input_shape)
  params, rebuild = tree.split_variables(variables)
  new, ranks = {}, {}
  key = jax.random.PRNGKey(7)
  for i, (path, call) in enumerate(calls.items()):
    kshape = tuple(call.variables['kernel'].shape)
    form = 'tucker2' if len(kshape) == 4 and kshape[:2] != (1, 1) else 'svd'
    r = speed.rank_for_flop_ratio(form, kshape, ratio, call.in_shape,
                                  call.out_shape, call.spec)
    if r is None:
      continue
    v = bench_layers._random_variables(form, kshape, r, jnp.float32,
                                       jax.random.fold_in(key, i))
    if 'bias' in call.variables:
      v['bias'] = call.variables['bias']
    new[path], ranks[path] = v, r
  return rebuild(tree.replace_layers(params, new)), ranks


def bench_model(name, args):
  model = models.get_model(name, dtype=jnp.dtype(args.dtype))
  shape = (args.batch, 32, 32, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                           train=False))(x)
  compressed, ranks = compress(model, variables, shape, args.ratio)
  start = time.perf_counter()
  merged, report = speed.never_slower(model, compressed, shape,
                                      dtype=jnp.dtype(args.dtype),
                                      repeats=args.layer_repeats,
                                      margin=args.margin)
  never_slower_s = time.perf_counter() - start
  variants = {'baseline': variables, 'compressed': compressed,
              'never_slower': merged}
  apply = jax.jit(lambda v, x: lj.apply(model, v, x, train=False))
  fns = [apply] * len(variants)
  measured = speed.time_calls(fns, [(v, x) for v in variants.values()],
                              repeats=args.repeats, min_time_s=args.min_time)
  base_macs = count_flops(model, variables, shape).total
  rows = []
  for (label, v), m in zip(variants.items(), measured):
    macs = count_flops(model, v, shape).total
    rows.append(dict(model=name, variant=label, macs=macs,
                     flop_ratio=base_macs / macs, ms=m.median_s * 1e3,
                     ips=args.batch / m.median_s,
                     speedup=measured[0].median_s / m.median_s,
                     compile_s=m.compile_s))
  return rows, report, ranks, never_slower_s


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20,resnet18,vgg16')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--ratio', type=float, default=4.0)
  p.add_argument('--margin', type=float, default=1.0)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--layer-repeats', type=int, default=5)
  p.add_argument('--min-time', type=float, default=1.0)
  p.add_argument('--legacy', action='store_true',
                 help='time the forms as before the speed work')
  p.add_argument('--no-doc', action='store_true')
  args = p.parse_args(argv)
  command = 'python bench/bench_network.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  if args.legacy:
    bench_layers.use_legacy_forms()
  machine = bench_layers.machine()
  print(machine, flush=True)
  start = time.perf_counter()
  lines = ['| model | variant | GMACs/batch | FLOP ratio | ms/batch | '
           'images/s | speed-up | compile s |',
           '|---|---|---:|---:|---:|---:|---:|---:|']
  notes = []
  for name in args.models.split(','):
    rows, report, ranks, ns_s = bench_model(name, args)
    for r in rows:
      line = (f'| {r["model"]} | {r["variant"]} | {r["macs"] / 1e9:.2f} | '
              f'{r["flop_ratio"]:.2f} | {r["ms"]:.1f} | {r["ips"]:.0f} | '
              f'{r["speedup"]:.2f} | {r["compile_s"]:.1f} |')
      lines.append(line)
      print(line, flush=True)
    merged = ', '.join(f'`{p}` ({report.timings[p].speedup:.2f}x)'
                       for p in report.merged) or 'none'
    notes.append(f'- {name}: {len(ranks)} layers split; never_slower '
                 f'({ns_s:.0f} s of layer timing) merged back: {merged}.')
    print(notes[-1], flush=True)
  elapsed = time.perf_counter() - start
  body = '\n'.join(
      [f'### Network throughput: batch {args.batch}, {args.dtype}, '
       f'{args.ratio:g}x FLOP reduction per layer'
       + (', LEGACY forms (before)' if args.legacy else ''), '',
       f'`{command}` — {elapsed:.0f} s wall.', f'Machine: {machine}.', '']
      + lines + [''] + notes)
  print(f'\n{elapsed:.0f} s')
  if not args.no_doc:
    key = (f'network models={args.models} batch={args.batch} '
           f'dtype={args.dtype} ratio={args.ratio} legacy={args.legacy}')
    bench_layers.write_docs(key, body)


if __name__ == '__main__':
  main()
