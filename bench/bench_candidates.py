"""Training throughput of benchmark-model candidates, in wall and CPU time.

For each candidate: params, MACs per image, and the median over timed
intervals of images/s (wall) and process CPU seconds per image, for the
training step of ``train.loop`` (``steps.make_train_step``, momentum SGD)
fed by ``data.iterate_batches`` with augmentation (host work included).
CPU seconds per image are the load-insensitive figure: on a shared
machine the wall figure only bounds the idle one from below, and
``cpu_s/img`` divided by the cores used gives an idle estimate
(docs/benchmark_model.md calibrates that division against a reference
measured on the idle machine).

  nice -n 19 python bench/bench_candidates.py \\
      --candidates 'a16=16,16,M,32,32,M,64,64' resnet8 vgg7 --steps 26

``vgg_a16`` is also a model factory for train.py
(``--config.model=bench.bench_candidates:vgg_a16``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from lowrank_jax import count_flops, count_params  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax.train import data, optim, sharding  # noqa: E402
from lowrank_jax.train import state as state_lib  # noqa: E402
from lowrank_jax.train import steps as steps_lib  # noqa: E402

def vgg_a16(num_classes: int = 10):
  """The reference 6-conv net: two convs at each of 28, 14, 7 (72.7k)."""
  return models.SmallVGG(layers=(16, 16, 'M', 32, 32, 'M', 64, 64),
                         num_classes=num_classes)


EXTRA = {'resnet8': functools.partial(models.ResNet, stage_sizes=(1, 1, 1),
                                      widths=(16, 32, 64))}


def make_model(spec: str):
  """``name=16,16,M,...`` (a SmallVGG), or a name in MODELS / EXTRA."""
  name, _, layers = spec.partition('=')
  if layers:
    return name, models.SmallVGG(
        layers=tuple(v if v == 'M' else int(v) for v in layers.split(',')))
  if name in EXTRA:
    return name, EXTRA[name]()
  return name, models.get_model(name)


def measure(model, dataset, *, batch, steps, interval, config):
  """Median wall img/s and CPU s/img over ``interval``-step intervals of
  ``steps`` training steps, the first interval (compilation) left out."""
  steps_per_epoch = data.num_batches(len(dataset.train.labels), batch)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  mesh = sharding.make_mesh()
  state = state_lib.create_train_state(config, model, None, (1, 28, 28, 1),
                                       jax.random.PRNGKey(0), tx=tx,
                                       mesh=mesh)
  step = steps_lib.make_train_step(model, learning_rate_fn=schedule,
                                   mesh=mesh)
  batches = data.iterate_batches(dataset.train, batch, mean=dataset.mean,
                                 std=dataset.std, seed=0, epoch=0,
                                 augment=True, pad_crop=config.pad_crop)
  marks, t0 = [], time.perf_counter()
  first_s = None
  for i, (x, y) in enumerate(batches):
    if i == steps:
      break
    state, metrics = step(state, sharding.shard_batch((x, y), mesh))
    if i == 0:
      jax.block_until_ready(metrics)
      first_s = time.perf_counter() - t0
    if i % interval == 0:
      jax.block_until_ready(metrics)
      marks.append((time.perf_counter(), time.process_time()))
  walls = [(b[0] - a[0]) for a, b in zip(marks[1:], marks[2:])]
  cpus = [(b[1] - a[1]) for a, b in zip(marks[1:], marks[2:])]
  n = interval * batch
  return {'img_per_s': n / statistics.median(walls),
          'cpu_s_per_img': statistics.median(cpus) / n,
          'intervals': len(walls), 'first_step_s': first_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--candidates', nargs='+', required=True)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--interval', type=int, default=5)
  parser.add_argument('--out', default='', help='append JSON lines here')
  args = parser.parse_args()
  config = default.get_config()
  dataset = data.load_dataset('fashion_mnist_local', validation_size=5000)
  for spec in args.candidates:
    name, model = make_model(spec)
    variables = state_lib.init_variables(model, (1, 28, 28, 1),
                                         jax.random.PRNGKey(0))
    row = {'candidate': spec, 'batch': args.batch,
           'params': count_params(variables),
           'macs': int(count_flops(model, variables, (1, 28, 28, 1)).total),
           'load_avg': os.getloadavg()[0]}
    row.update(measure(model, dataset, batch=args.batch, steps=args.steps,
                       interval=args.interval, config=config))
    row['load_avg_end'] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  main()
