"""Whole-network efficiency of Tucker-2 splits, and where the time goes.

Efficiency = speed-up / FLOP ratio of the forward pass. The case: every 3x3
conv with at least 64 input channels Tucker-2 split at quarter ranks
``(C_in // 4, C_out // 4)``, every other layer dense, batch 128, float32,
``lj.apply(model, variables, x, train=False)`` under ``jax.jit`` (random
factors of those shapes: timing does not depend on the values).

For each network it times, interleaved in one process (medians; wall time
and process CPU time, which load from other processes disturbs less):

* the dense network, the split network as shipped, and the split network
  with every core of at most 16 channels folded into its input factor
  (``lj.fold_cores``: a k x k conv to R_out channels, then a 1x1), all
  three in one ``lj.time_networks`` run;
* each split layer alone, split and as its merged dense conv, on an input of
  the shape it sees in the network (``lowrank_jax.speed.time_layers``).

Each network has two rows: as shipped, and with the network-level choice:
``lj.fastest_network`` (its own interleaved calls, ``--clock``) picks the
split or the folded network, and the row shows the picked one from the
three-way run above, so the choice and the reported times are separate
measurements. A folded core costs multiply-adds: the FLOP ratio and the
efficiencies stay those of the split (the ratio as run in brackets), so
folding counts only by the time it saves.

The difference network - sum of the split layers alone is the time spent
outside them (the unsplit layers, BatchNorm, ReLU, pooling, the head, and
whatever fusion across layers gains or loses); it bounds the efficiency.

  python bench/bench_efficiency.py                     # vgg16,resnet18,resnet20
  python bench/bench_efficiency.py --models vgg16 --rounds 1 --no-doc

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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import bench_layers  # noqa: E402  (random factors of given shapes)
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


def _layer_ms(layers):
  """(dense ms, split ms) summed over ``{path: LayerTiming}``."""
  return (sum(t.dense_s for t in layers.values()) * 1e3,
          sum(t.split_s for t in layers.values()) * 1e3)


def _result(label, t, dense_t, flop_ratio_run, layers, common):
  layer_dense, layer_split = _layer_ms(layers)
  return dict(
      common, name=label, flop_ratio_run=flop_ratio_run,
      dense_ms=dense_t.wall_s * 1e3, split_ms=t.wall_s * 1e3,
      speedup_wall=dense_t.wall_s / t.wall_s,
      speedup_cpu=dense_t.cpu_s / t.cpu_s, layer_dense_ms=layer_dense,
      layer_split_ms=layer_split,
      outside_dense_ms=dense_t.wall_s * 1e3 - layer_dense,
      outside_split_ms=t.wall_s * 1e3 - layer_split)


def bench_model(name, batch, rounds, clock):
  """Rows (as shipped, with the network-level choice), and the choice."""
  model = models.get_model(name)
  shape = (batch, 32, 32, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  dense = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                       train=False))(x)
  split, paths = quarter_split(model, dense, shape)
  folded, actions = lj.fold_cores(split, report=True)
  nets = {'split': split, 'folded': folded}
  _, choice = lj.fastest_network(nets, shape, model=model, clock=clock,
                                 rounds=rounds, train=False)
  nets['dense'] = dense
  times = speed.time_networks(nets, shape, model=model, rounds=rounds,
                              train=False)
  macs = {k: lj.count_flops(model, v, shape, train=False).total
          for k, v in nets.items()}
  per_layer = [lj.count_flops(model, v, shape, train=False).per_layer
               for v in (dense, split)]
  common = dict(layers=len(paths), flop_ratio=macs['dense'] / macs['split'],
                layer_flop_ratio=sum(per_layer[0][p].macs for p in paths) /
                sum(per_layer[1][p].macs for p in paths))
  layers = speed.time_layers(model, split, shape, train=False)
  fold = [tree.exact(a.path) for a in actions if a.action == 'folded']
  chosen, label = layers, f'{name}, choice: {choice.chosen}'
  if choice.chosen == 'folded':
    label += f' ({len(fold)} core{"s" if len(fold) != 1 else ""})'
    chosen = {**layers, **speed.time_layers(model, folded, shape,
                                            select=fold, train=False)}
  return [_result(name, times['split'], times['dense'], common['flop_ratio'],
                  layers, common),
          _result(label, times[choice.chosen], times['dense'],
                  macs['dense'] / macs[choice.chosen], chosen, common)], choice


def rows(r):
  eff = r['speedup_wall'] / r['flop_ratio']
  eff_cpu = r['speedup_cpu'] / r['flop_ratio']
  layer_speedup = r['layer_dense_ms'] / r['layer_split_ms']
  ratio = f'{r["flop_ratio"]:.2f}' + (
      f' ({r["flop_ratio_run"]:.2f} as run)'
      if abs(r['flop_ratio_run'] - r['flop_ratio']) > 5e-3 else '')
  return (f'| {r["name"]} | {r["layers"]} | {ratio} | '
          f'{r["dense_ms"]:.0f} / {r["split_ms"]:.0f} | '
          f'{r["speedup_wall"]:.2f} / {r["speedup_cpu"]:.2f} | '
          f'**{eff:.2f}** / {eff_cpu:.2f} | '
          f'{r["layer_dense_ms"]:.0f} / {r["layer_split_ms"]:.0f} '
          f'({layer_speedup:.2f}x at {r["layer_flop_ratio"]:.2f}x fewer '
          f'FLOPs: {layer_speedup / r["layer_flop_ratio"]:.2f}) | '
          f'{r["outside_dense_ms"]:.0f} / {r["outside_split_ms"]:.0f} |')


def goal_line(results, goal=0.65):
  """The vgg16 goal (wall efficiency >= 0.65 at the split's FLOP ratio),
  as split and with the network-level choice."""
  parts = []
  for r in results:
    eff = r['speedup_wall'] / r['flop_ratio']
    part = f'{r["name"]}: {eff:.2f} ({"met" if eff >= goal else "not met"})'
    if abs(r['flop_ratio_run'] - r['flop_ratio']) > 5e-3:
      run = r['speedup_wall'] / r['flop_ratio_run']
      part += (f', {run:.2f} at its own {r["flop_ratio_run"]:.2f}x fewer '
               f'FLOPs ({"met" if run >= goal else "not met"})')
    parts.append(part)
  return (f'Goal, wall efficiency >= {goal} on vgg16 (at the split\'s FLOP '
          'ratio unless said): ' + '; '.join(parts) + '.')


def choice_line(name, choice):
  ms = ', '.join(f'{k} {getattr(t, choice.clock + "_s") * 1e3:.0f}'
                 for k, t in choice.timings.items())
  return f'{name} {ms} -> {choice.chosen}'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='vgg16,resnet18,resnet20')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=8)
  p.add_argument('--clock', default='wall', choices=('wall', 'cpu'),
                 help='the time lj.fastest_network compares')
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
  choices, goal = [], None
  for name in args.models.split(','):
    results, choice = bench_model(name, args.batch, args.rounds, args.clock)
    if name == 'vgg16':
      goal = results
    for r in results:
      lines.append(rows(r))
      print(lines[-1], flush=True)
    choices.append(choice_line(name, choice))
  lines += ['', f'Network-level choice (`lj.fastest_network`, {args.clock} '
            f'ms, {args.rounds} rounds, its own interleaved calls): ' +
            '; '.join(choices) + '.']
  if goal:
    lines += ['', goal_line(goal)]
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
