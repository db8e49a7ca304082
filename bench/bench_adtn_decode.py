"""ADTN decode gate by gate against blocks of gates, and an FC-2 train step.

Timed in one process, interleaved (every round times each variant once, so
load drifts hit all alike; medians over rounds):

  * ``forms.adtn.contract`` (the decode: M layers of a staircase of Q-1
    gates) forward, and its gradient (of the state times a fixed probe), for
    Q=18 (FC-2's fc1, 784 x 256) and Q=16 (LeNet-5's fc1, 400 x 120) at
    M = 4, 8, 16, with ``block`` = 1 (gate by gate, the code before blocks),
    2, 3 (the default, ``forms.adtn.BLOCK``) and 4;
  * a whole jitted training step (``lj.apply``, cross-entropy, Adam) of FC-2
    with fc1 encoded at M=8 (``lj.adtn_encode``, no fit steps), on real
    Fashion-MNIST batches of 128, gate by gate against the default.

Each variant is checked against block 1 before timing (the same state and
gradient up to float32 round-off).

Run:  python bench/bench_adtn_decode.py     (writes
      docs/benchmarks_adtn_decode.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hostinfo  # noqa: E402
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax.forms import adtn as adtn_form  # noqa: E402
from lowrank_jax.train import data  # noqa: E402

BLOCKS = (1, 2, 3, 4)
WORKLOADS = (('FC-2 fc1', 18), ('LeNet-5 fc1', 16))
DEPTHS = (4, 8, 16)
BATCH = 128


def _median_ms(fns, args, rounds):
  """{name: median ms} of jitted ``fns`` on ``args``, interleaved."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _rel_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def decode_rows(rounds):
  """Rows (workload, Q, M, pass, {block: ms}, worst rel. diff vs block 1)."""
  rows = []
  for name, q in WORKLOADS:
    probe = jax.random.normal(jax.random.PRNGKey(1), (2 ** q,))
    for m in DEPTHS:
      gates = (jnp.eye(4).reshape(2, 2, 2, 2) + 0.1 * jax.random.normal(
          jax.random.PRNGKey(m), (m, q - 1, 2, 2, 2, 2)))
      fwd = {b: jax.jit(lambda g, b=b: adtn_form.contract(g, block=b))
             for b in BLOCKS}
      grad = {b: jax.jit(jax.grad(lambda g, b=b: jnp.sum(
          adtn_form.contract(g, block=b) * probe))) for b in BLOCKS}
      for what, fns in (('forward', fwd), ('gradient', grad)):
        outs = {b: fn(gates) for b, fn in fns.items()}
        diff = max(_rel_diff(out, outs[1]) for out in outs.values())
        rows.append((name, q, m, what, _median_ms(fns, (gates,), rounds),
                     diff))
        print(rows[-1], flush=True)
  return rows


def _train_step(model, tx):
  def loss_fn(params, x, y):
    logits = lj.apply(model, {'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step)


def train_step_row(rounds, depth=8):
  """FC-2, fc1 encoded at ``depth``: {label: ms per step}, loss diff."""
  dataset = data.load_dataset('fashion_mnist_local', validation_size=5000)
  x, y = next(data.iterate_batches(dataset.train, BATCH, mean=dataset.mean,
                                   std=dataset.std, seed=0))
  x, y = jnp.asarray(x), jnp.asarray(y)
  model = models.get_model('fc2', num_classes=10)
  params = model.init(jax.random.PRNGKey(0), x[:1])['params']
  params = lj.adtn_encode(params, select='fc1', depth=depth, steps=0,
                          key=jax.random.PRNGKey(0))
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  steps, losses, default = {}, [], adtn_form.BLOCK
  try:
    for block, label in ((1, 'gate by gate'),
                         (default, f'blocks of {default}')):
      adtn_form.BLOCK = block  # read when the step is traced: its 1st call
      steps[label] = _train_step(model, tx)
      losses.append(float(steps[label](params, opt_state, x, y)[2]))
  finally:
    adtn_form.BLOCK = default
  return (_median_ms(steps, (params, opt_state, x, y), rounds),
          abs(losses[0] - losses[1]))


def write(path, rows, step_ms, loss_diff, command, seconds):
  lines = [
      '## ADTN decode: blocks of gates (`forms.adtn.contract`)', '',
      f'Command: `{command}` ({seconds:.0f} s in all).', '',
      hostinfo.machine_line(), '',
      'Times are medians over interleaved rounds in one process (ms), '
      'compile excluded; "vs 1" is block 1 (gate by gate) over the row\'s '
      'default block (higher: faster). Diff: the largest relative '
      'difference of any block\'s output from block 1 (float32 round-off).',
      '', '| workload | Q | M | pass | ' + ' | '.join(
          f'block {b}' for b in BLOCKS) + ' | vs 1 | diff |',
      '|---|---:|---:|---|' + '---:|' * (len(BLOCKS) + 2)]
  default = adtn_form.BLOCK
  for name, q, m, what, ms, diff in rows:
    lines.append(f'| {name} | {q} | {m} | {what} | ' + ' | '.join(
        f'{ms[b]:.2f}' for b in BLOCKS) +
        f' | {ms[1] / ms[default]:.2f}x | {diff:.1e} |')
  (slow, fast) = step_ms.values()
  lines += [
      '', f'FC-2 training step, fc1 encoded at M=8 (Q=18), batch {BATCH}, '
      'Adam, real Fashion-MNIST: ' + ', '.join(
          f'{label} {ms:.1f} ms' for label, ms in step_ms.items()) +
      f': **{slow / fast:.2f}x** faster per step (loss difference '
      f'{loss_diff:.1e}).', '']
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'docs', 'benchmarks_adtn_decode.md'))
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  rows = decode_rows(args.rounds)
  step_ms, loss_diff = train_step_row(args.rounds)
  print(step_ms, loss_diff)
  command = 'python bench/bench_adtn_decode.py' + (
      f' --rounds {args.rounds}' if args.rounds != 7 else '')
  write(args.out, rows, step_ms, loss_diff, command,
        time.perf_counter() - t0)
  print('wrote', args.out)


if __name__ == '__main__':
  main()
