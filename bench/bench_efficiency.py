"""Whole-network efficiency of Tucker-2 splits, and where the time goes.

Efficiency = speed-up / FLOP ratio of the forward pass. The case: every 3x3
conv with at least 64 input channels Tucker-2 split at quarter ranks
``(C_in // 4, C_out // 4)``, every other layer dense, batch 128, float32,
``lj.apply(model, variables, x, train=False)`` under ``jax.jit`` (random
factors of those shapes: timing does not depend on the values).

For each network it times, interleaved in one process (medians; wall time
and process CPU time, which load from other processes disturbs less):

* the dense and the split network;
* each split layer alone, split and as its merged dense conv, on an input of
  the shape it sees in the network (``lowrank_jax.speed.time_layers``).

The difference network - sum of the split layers alone is the time spent
outside them (the unsplit layers, BatchNorm, ReLU, pooling, the head, and
whatever fusion across layers gains or loses); it bounds the efficiency.

  python bench/bench_efficiency.py                     # vgg16,resnet18,resnet20

Writes ``docs/benchmarks_efficiency.md`` (one section per command, newest
last).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import bench_layers  # noqa: E402  (random factors of given shapes)
import bench_pointwise  # noqa: E402  (the interleaved wall + CPU timer)
import hostinfo  # noqa: E402
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import counting  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax import speed  # noqa: E402
from lowrank_jax import tree  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs',
                   'benchmarks_efficiency.md')


def quarter_split(model, variables, shape):
  """Every 3x3 conv with C_in >= 64 as Tucker-2 at (C_in//4, C_out//4)."""
  calls = counting.called_layers(model, variables, shape, train=False)
  params, rebuild = tree.split_variables(variables)
  new = {}
  for i, (path, call) in enumerate(calls.items()):
    kshape = tuple(call.variables['kernel'].shape)
    if len(kshape) == 4 and kshape[:2] == (3, 3) and kshape[2] >= 64:
      v = bench_layers._random_variables(  # pylint: disable=protected-access
          'tucker2', kshape, (kshape[2] // 4, kshape[3] // 4), jnp.float32,
          jax.random.PRNGKey(i))
      if 'bias' in call.variables:
        v['bias'] = call.variables['bias']
      new[path] = v
  return rebuild(tree.replace_layers(params, new)), sorted(new)


def time_networks(model, dense, split, x, rounds):
  """(dense, split) medians of (wall s, CPU s), interleaved."""
  fn = jax.jit(lambda v, x: lj.apply(model, v, x, train=False))
  for v in (dense, split):
    jax.block_until_ready(fn(v, x))
  times = bench_pointwise.time_interleaved(
      {'dense': fn, 'split': fn}, {'dense': (dense, x), 'split': (split, x)},
      rounds)
  return [times['dense'], times['split']]


def bench_model(name, batch, rounds):
  model = models.get_model(name)
  shape = (batch, 32, 32, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  dense = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                       train=False))(x)
  split, paths = quarter_split(model, dense, shape)
  macs = [lj.count_flops(model, v, shape, train=False) for v in (dense, split)]
  (dw, dc), (sw, sc) = time_networks(model, dense, split, x, rounds)
  layers = speed.time_layers(model, split, shape, train=False)
  layer_dense = sum(t.dense_s for t in layers.values())
  layer_split = sum(t.split_s for t in layers.values())
  split_macs = sum(macs[1].per_layer[p].macs for p in paths)
  dense_macs = sum(macs[0].per_layer[p].macs for p in paths)
  return dict(
      name=name, layers=len(paths), flop_ratio=macs[0].total / macs[1].total,
      dense_ms=dw * 1e3, split_ms=sw * 1e3, speedup_wall=dw / sw,
      speedup_cpu=dc / sc, layer_dense_ms=layer_dense * 1e3,
      layer_split_ms=layer_split * 1e3,
      layer_flop_ratio=dense_macs / split_macs,
      outside_dense_ms=(dw - layer_dense) * 1e3,
      outside_split_ms=(sw - layer_split) * 1e3)


def rows(r):
  eff = r['speedup_wall'] / r['flop_ratio']
  eff_cpu = r['speedup_cpu'] / r['flop_ratio']
  layer_speedup = r['layer_dense_ms'] / r['layer_split_ms']
  return (f'| {r["name"]} | {r["layers"]} | {r["flop_ratio"]:.2f} | '
          f'{r["dense_ms"]:.0f} / {r["split_ms"]:.0f} | '
          f'{r["speedup_wall"]:.2f} / {r["speedup_cpu"]:.2f} | '
          f'**{eff:.2f}** / {eff_cpu:.2f} | '
          f'{r["layer_dense_ms"]:.0f} / {r["layer_split_ms"]:.0f} '
          f'({layer_speedup:.2f}x at {r["layer_flop_ratio"]:.2f}x fewer '
          f'FLOPs: {layer_speedup / r["layer_flop_ratio"]:.2f}) | '
          f'{r["outside_dense_ms"]:.0f} / {r["outside_split_ms"]:.0f} |')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='vgg16,resnet18,resnet20')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=8)
  p.add_argument('--no-doc', action='store_true')
  args = p.parse_args(argv)
  command = 'python bench/bench_efficiency.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  lines = [
      '| network | split layers | FLOP ratio | ms dense / split | speed-up '
      'wall / CPU | efficiency wall / CPU | split layers alone: ms dense / '
      'split (speed-up at their FLOP ratio: efficiency) | ms outside the '
      'split layers: dense / split network |',
      '|---|---:|---:|---:|---:|---:|---|---:|']
  for name in args.models.split(','):
    line = rows(bench_model(name, args.batch, args.rounds))
    print(line, flush=True)
    lines.append(line)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  took = time.perf_counter() - start
  section = [f'## `{command.strip()}`', '',
             f'{stamp}, {took:.0f} s, batch {args.batch}. '
             f'{hostinfo.machine_line()}', ''] + lines
  print('\n'.join(section))
  if not args.no_doc:
    if not os.path.exists(DOC):
      with open(DOC, 'w') as f:
        f.write('# Whole-network efficiency of Tucker-2 splits\n\n'
                'Written by `bench/bench_efficiency.py` (its docstring says '
                'what is timed); nothing typed in by hand. Efficiency = '
                'speed-up / FLOP ratio; the goal is >= 0.65 on VGG-16.\n')
    with open(DOC, 'a') as f:
      f.write('\n' + '\n'.join(section) + '\n')


if __name__ == '__main__':
  main()
