"""Which op runs the 1x1 stages of a factored layer, measured in networks.

A Tucker-2 / SVD / CP layer has 1x1 stages on NHWC activations. They can
run as a ``dot_general`` on the channel axis or as a 1x1
``conv_general_dilated`` (what ``nn.Conv`` runs): the same numbers, different
programs. ``lowrank_jax.forms.base.POINTWISE_CONV_MAX_CHANNELS`` picks: conv
where both channel counts of the stage are at most that, dot_general above.
This bench times whole split networks under each choice, interleaved in one
process (random call order per round; wall time and process CPU time, whose
ratios load from other processes disturbs less):

* ``dot``: every 1x1 stage a dot_general (threshold 0);
* ``rule``: the library default;
* ``conv``: every 1x1 stage a 1x1 conv.

Networks: the small VGG of bench_own_model.py (half ranks, as the README's
own-model section) and resnet20 / vgg16 / resnet18 from lowrank_jax.models
with every layer split for a 4x FLOP cut (bench_network.compress: random
factors of those shapes). Speed-up = dense time / split time.

  python bench/bench_pointwise.py                       # batch 128
  python bench/bench_pointwise.py --models smallvgg --batch 1 --rounds 200

Writes ``docs/benchmarks_pointwise.md`` (one section per command, newest
last).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import bench_network  # noqa: E402
import bench_own_model  # noqa: E402
import hostinfo  # noqa: E402
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax import speed  # noqa: E402
from lowrank_jax.forms import base  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs',
                   'benchmarks_pointwise.md')
CHOICES = {'dot': 0, 'rule': base.POINTWISE_CONV_MAX_CHANNELS,
           'conv': 1 << 30}


def network(name, batch):
  """(apply(v, x), dense variables, split variables, x)."""
  key = jax.random.PRNGKey(0)
  if name == 'smallvgg':
    model = bench_own_model.VGG()
    x = jax.random.normal(key, (batch,) + bench_own_model.INPUT)
    variables = model.init(jax.random.PRNGKey(1), x)
    tucker, svd = bench_own_model.split_ranks()
    ranks = {f'Conv_{i}': r for i, r in tucker.items()}
    ranks.update({f'Dense_{j}': (r,) for j, r in svd.items()})
    return (lambda v, x: lj.apply(model, v, x), variables,
            lj.decompose(variables, ranks), x)
  model = models.get_model(name)
  x = jax.random.normal(key, (batch, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                           train=False))(x)
  split, _ = bench_network.compress(model, variables, x.shape, 4.0)
  return (lambda v, x: lj.apply(model, v, x, train=False), variables, split,
          x)


def compiled(apply, variables, x, threshold):
  """``jax.jit(apply)`` traced and compiled with the given threshold."""
  saved = base.POINTWISE_CONV_MAX_CHANNELS
  base.POINTWISE_CONV_MAX_CHANNELS = threshold
  try:
    return jax.jit(apply).lower(variables, x).compile()
  finally:
    base.POINTWISE_CONV_MAX_CHANNELS = saved


# {label: (wall s, CPU s) per call}, medians of calls in a new random order
# each round: the library's timer of whole networks.
time_interleaved = speed.time_interleaved


def bench_model(name, batch, rounds):
  apply, dense, split, x = network(name, batch)
  fns = {'dense': compiled(apply, dense, x, 0)}
  args = {'dense': (dense, x)}
  for label, threshold in CHOICES.items():
    fns[label] = compiled(apply, split, x, threshold)
    args[label] = (split, x)
  ref = np.asarray(fns['dot'](split, x))
  for label in ('rule', 'conv'):
    out = np.asarray(fns[label](split, x))
    np.testing.assert_allclose(out, ref, rtol=1e-4,
                               atol=1e-4 * float(np.abs(ref).max()))
  for f, a in zip(fns.values(), args.values()):   # warm
    jax.block_until_ready(f(*a))
  return time_interleaved(fns, args, rounds)


def row(name, batch, times):
  wall0, cpu0 = times['dense']
  cells = []
  for label in CHOICES:
    wall, cpu = times[label]
    cells.append(f'{wall0 / wall:.2f} / {cpu0 / cpu:.2f}')
  best = max(CHOICES, key=lambda k: cpu0 / times[k][1])
  return (f'| {name} | {batch} | {wall0 * 1e3:.1f} | ' + ' | '.join(cells) +
          f' | {best} |')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='smallvgg,resnet20,vgg16,resnet18')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=12)
  p.add_argument('--no-doc', action='store_true')
  args = p.parse_args(argv)
  command = 'python bench/bench_pointwise.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  lines = [
      '| network | batch | dense ms (wall) | speed-up, dot: wall / CPU | '
      f'speed-up, rule (<= {base.POINTWISE_CONV_MAX_CHANNELS} channels '
      'conv): wall / CPU | speed-up, conv: wall / CPU | best by CPU |',
      '|---|---:|---:|---:|---:|---:|---|']
  for name in args.models.split(','):
    line = row(name, args.batch, bench_model(name, args.batch, args.rounds))
    print(line, flush=True)
    lines.append(line)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  took = time.perf_counter() - start
  section = [f'## `{command.strip()}`', '',
             f'{stamp}, {took:.0f} s. {hostinfo.machine_line()}', ''] + lines
  print('\n'.join(section))
  if not args.no_doc:
    if not os.path.exists(DOC):
      with open(DOC, 'w') as f:
        f.write('# The op of the 1x1 stages, measured in whole networks\n\n'
                'Written by `bench/bench_pointwise.py` (its docstring says '
                'what is timed); nothing typed in by hand. Speed-up = dense '
                'network time / split network time, same process, '
                'interleaved; "CPU" uses process CPU time, which load from '
                'other processes disturbs less than wall time.\n')
    with open(DOC, 'a') as f:
      f.write('\n' + '\n'.join(section) + '\n')


if __name__ == '__main__':
  main()
