"""Own-model benchmark: a split network run by lowrank_jax vs the same built in.

A user's small VGG-style CNN (plain ``nn.Conv`` / ``nn.Dense``; convs
32-32-pool-64-64-pool, dense 128, 10 classes, 28x28x1 inputs) is split the
way the README's "Compress your own model" section does it: every 3x3 conv
but the first (C_in = 1) Tucker-2 at half ranks, both dense layers SVD at half
rank. Its forward is timed

* linen: ``lj.apply(model, split_variables, x)`` (the library's interceptor
  runs the split layers), against **the same network built in**: the
  architecture written by hand with each factored layer as explicit plain
  layers (Tucker-2: ``nn.Conv(R_in, (1, 1), use_bias=False)`` ->
  ``nn.Conv(R_out, (3, 3), use_bias=False)`` -> ``nn.Conv(C_out, (1, 1))``
  with the bias; SVD: ``nn.Dense(R, use_bias=False)`` -> ``nn.Dense(C_out)``),
  its variables copied from the split tree;
* NNX: the module returned by ``lj.tucker2_split`` / ``lj.svd_split`` (its
  split layers are ``lj.FormLayer`` s) against the same hand-written
  architecture in NNX (``nnx.Conv`` / ``nnx.Linear``), weights copied from the
  split module. Both are jitted two ways: ``nnx.split`` + ``jax.jit`` of a
  pure function of the state (the fair way: the compiled call only) and
  ``nnx.jit`` (adds NNX's per-call graph traversal, which differs with the
  number of modules);
* control: the unsplit variables through ``lj.apply`` vs ``model.apply``.

Before timing, every pair is checked to give the same logits
(``np.testing.assert_allclose``, rtol 1e-4; atol 1e-4 of the largest logit
for logits near zero). All functions of one batch size are jitted with
``jax.jit`` (or ``nnx.jit``), float32, each on its own copy of weights and
input, and timed interleaved, call by call, with
``lowrank_jax.speed.time_calls`` in this one process (medians, compile
excluded), so load from other processes hits all alike. ``time_calls`` runs
in blocks, each in a new random call order, with the times pooled: with one
fixed order, neighbours biased the times (see :func:`shuffled_time_calls`).
XLA's own FLOP count and instructions of each compiled function are
reported too (same work => same count).

  python bench/bench_own_model.py            # batch 128 and 1, about 2 min
  python bench/bench_own_model.py --no-doc   # print only

Writes ``docs/benchmarks_own_model.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import sys
import time
import timeit
from typing import NamedTuple

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import bench_layers  # noqa: E402  (machine line, built on hostinfo)
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import counting  # noqa: E402
from lowrank_jax import forms  # noqa: E402
from lowrank_jax.forms import base  # noqa: E402
from lowrank_jax import speed  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs',
                   'benchmarks_own_model.md')
INPUT = (28, 28, 1)
WIDTHS = (32, 32, 'M', 64, 64, 'M')
HIDDEN, CLASSES = 128, 10
BAND = (0.9, 1.1)   # ratios inside this band count as "equal within noise"
TOL = 1e-4          # rtol of the output checks; atol = TOL * max |logit|


# ---------------------------------------------------------------- models ---


def _conv_channels():
  """[(C_in, C_out)] of the convs, in order."""
  out, c = [], INPUT[-1]
  for w in WIDTHS:
    if w != 'M':
      out.append((c, w))
      c = w
  return out


def _flat_features():
  pools = sum(w == 'M' for w in WIDTHS)
  h, w = INPUT[0] // 2 ** pools, INPUT[1] // 2 ** pools
  return h * w * _conv_channels()[-1][1]


def split_ranks():
  """Tucker-2 ranks of the convs, SVD ranks of the dense layers, by index.

  Half ranks; the first conv (C_in = 1) stays dense.
  """
  tucker = {i: (c_in // 2, c_out // 2)
            for i, (c_in, c_out) in enumerate(_conv_channels()) if i > 0}
  svd = {0: min(_flat_features(), HIDDEN) // 2, 1: min(HIDDEN, CLASSES) // 2}
  return tucker, svd


class VGG(nn.Module):
  """The user's model: plain linen layers, auto-named Conv_i / Dense_i."""

  @nn.compact
  def __call__(self, x):
    for w in WIDTHS:
      if w == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2))
      else:
        x = nn.relu(nn.Conv(w, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(HIDDEN)(x))
    return nn.Dense(CLASSES)(x)


class HandVGG(nn.Module):
  """The same network with the factored layers written as plain layers."""
  tucker: dict
  svd: dict

  @nn.compact
  def __call__(self, x):
    i = 0
    for w in WIDTHS:
      if w == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      if i in self.tucker:
        r_in, r_out = self.tucker[i]
        x = nn.Conv(r_in, (1, 1), use_bias=False, name=f'Conv_{i}_in')(x)
        x = nn.Conv(r_out, (3, 3), use_bias=False, name=f'Conv_{i}_core')(x)
        x = nn.Conv(w, (1, 1), name=f'Conv_{i}_out')(x)
      else:
        x = nn.Conv(w, (3, 3), name=f'Conv_{i}')(x)
      x = nn.relu(x)
      i += 1
    x = x.reshape(x.shape[0], -1)
    for j, features in enumerate((HIDDEN, CLASSES)):
      if j in self.svd:
        x = nn.Dense(self.svd[j], use_bias=False, name=f'Dense_{j}_u')(x)
        x = nn.Dense(features, name=f'Dense_{j}_v')(x)
      else:
        x = nn.Dense(features, name=f'Dense_{j}')(x)
      if j == 0:
        x = nn.relu(x)
    return x


def hand_variables(split):
  """HandVGG's variables, copied from the split tree of VGG."""
  out = {}
  for name, layer in split['params'].items():
    if 'core' in layer:        # Tucker-2
      out[f'{name}_in'] = {'kernel': layer['u_in'][None, None]}
      out[f'{name}_core'] = {'kernel': layer['core']}
      out[f'{name}_out'] = {'kernel': layer['u_out'][None, None],
                            'bias': layer['bias']}
    elif 'u' in layer:         # SVD
      out[f'{name}_u'] = {'kernel': layer['u']}
      out[f'{name}_v'] = {'kernel': layer['v'], 'bias': layer['bias']}
    else:
      out[name] = dict(layer)
  return {'params': out}


def _nnx_forward(conv, dense, x):
  """The VGG forward of both NNX models; ``conv(i)`` / ``dense(j)`` give the
  i-th conv and j-th dense layer (a plain layer or a factored one)."""
  i = 0
  for w in WIDTHS:
    if w == 'M':
      x = nnx.max_pool(x, (2, 2), (2, 2))
    else:
      x = nnx.relu(conv(i)(x))
      i += 1
  x = x.reshape(x.shape[0], -1)
  return dense(1)(nnx.relu(dense(0)(x)))


class NNXVGG(nnx.Module):
  """The user's model in NNX: attributes conv0..conv3, dense0, dense1."""

  def __init__(self, rngs: nnx.Rngs):
    for i, (c_in, c_out) in enumerate(_conv_channels()):
      setattr(self, f'conv{i}', nnx.Conv(c_in, c_out, (3, 3), rngs=rngs))
    self.dense0 = nnx.Linear(_flat_features(), HIDDEN, rngs=rngs)
    self.dense1 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x):
    return _nnx_forward(lambda i: getattr(self, f'conv{i}'),
                        lambda j: getattr(self, f'dense{j}'), x)


class HandNNXVGG(nnx.Module):
  """NNXVGG with the factored layers written as plain nnx.Conv / Linear."""

  def __init__(self, tucker, svd, rngs: nnx.Rngs):
    self.convs = nnx.List()
    for i, (c_in, c_out) in enumerate(_conv_channels()):
      if i in tucker:
        r_in, r_out = tucker[i]
        self.convs.append(nnx.Sequential(
            nnx.Conv(c_in, r_in, (1, 1), use_bias=False, rngs=rngs),
            nnx.Conv(r_in, r_out, (3, 3), use_bias=False, rngs=rngs),
            nnx.Conv(r_out, c_out, (1, 1), rngs=rngs)))
      else:
        self.convs.append(nnx.Conv(c_in, c_out, (3, 3), rngs=rngs))
    self.denses = nnx.List()
    for j, (f_in, f_out) in enumerate(((_flat_features(), HIDDEN),
                                       (HIDDEN, CLASSES))):
      if j in svd:
        self.denses.append(nnx.Sequential(
            nnx.Linear(f_in, svd[j], use_bias=False, rngs=rngs),
            nnx.Linear(svd[j], f_out, rngs=rngs)))
      else:
        self.denses.append(nnx.Linear(f_in, f_out, rngs=rngs))

  def __call__(self, x):
    return _nnx_forward(lambda i: self.convs[i], lambda j: self.denses[j], x)


def _set(param, value):
  assert param[...].shape == value.shape, (param[...].shape, value.shape)
  param[...] = jnp.asarray(value)


def nnx_from_linen(variables) -> NNXVGG:
  """NNXVGG holding the linen model's (dense) weights."""
  m = NNXVGG(nnx.Rngs(0))
  p = variables['params']
  for i in range(len(_conv_channels())):
    _set(getattr(m, f'conv{i}').kernel, p[f'Conv_{i}']['kernel'])
    _set(getattr(m, f'conv{i}').bias, p[f'Conv_{i}']['bias'])
  for j in range(2):
    _set(getattr(m, f'dense{j}').kernel, p[f'Dense_{j}']['kernel'])
    _set(getattr(m, f'dense{j}').bias, p[f'Dense_{j}']['bias'])
  return m


def hand_nnx_from_split(split: NNXVGG, tucker, svd) -> HandNNXVGG:
  """HandNNXVGG with the factors of the split NNX module copied in."""
  m = HandNNXVGG(tucker, svd, nnx.Rngs(1))
  for i in range(len(_conv_channels())):
    src = getattr(split, f'conv{i}')
    if i in tucker:
      assert isinstance(src, lj.FormLayer) and src.form == 'tucker2'
      first, core, last = m.convs[i].layers
      _set(first.kernel, src.u_in[...][None, None])
      _set(core.kernel, src.core[...])
      _set(last.kernel, src.u_out[...][None, None])
      _set(last.bias, src.bias[...])
    else:
      _set(m.convs[i].kernel, src.kernel[...])
      _set(m.convs[i].bias, src.bias[...])
  for j in range(2):
    src = getattr(split, f'dense{j}')
    if j in svd:
      assert isinstance(src, lj.FormLayer) and src.form == 'svd'
      first, last = m.denses[j].layers
      _set(first.kernel, src.u[...])
      _set(last.kernel, src.v[...])
      _set(last.bias, src.bias[...])
    else:
      _set(m.denses[j].kernel, src.kernel[...])
      _set(m.denses[j].bias, src.bias[...])
  return m


# ----------------------------------------------------------------- bench ---


def _copy(tree):
  """Fresh buffers for every array, so no function reads another's weights
  (or input) warm from cache in the interleaved timing."""
  return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def _pure(module):
  """``nnx.split`` + ``jax.jit`` of a pure function of the state."""
  graphdef, state = nnx.split(module)
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return fn, (_copy(state),)


def _nnx_jit(module):
  """``nnx.jit`` of the module's call, on a copy of the module."""
  graphdef, state = nnx.split(module)
  fn = nnx.jit(lambda module, x: module(x))
  return fn, (nnx.merge(graphdef, _copy(state)),)


class Compiled(NamedTuple):
  """What XLA made of one jitted function (None where it has no ``lower``)."""
  flops: float | None
  ops: collections.Counter | None   # optimized HLO instructions, names cut


def _compiled(fn, args) -> Compiled:
  if not hasattr(fn, 'lower'):
    return Compiled(None, None)
  try:
    compiled = fn.lower(*args).compile()
  except Exception:  # pylint: disable=broad-except
    return Compiled(None, None)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ops = collections.Counter()
  for line in compiled.as_text().splitlines():
    if ' = ' in line and not line.startswith('HloModule'):
      rhs = re.sub(r', metadata=\{[^}]*\}', '', line.split(' = ', 1)[1])
      rhs = re.sub(r'parameter\(\d+\)', 'parameter()', rhs)
      ops[re.sub(r'%[\w.\-]+', '%', rhs)] += 1
  return Compiled(cost.get('flops') if cost else None, ops)


def _op_count(ops, opcode):
  return sum(n for k, n in ops.items() if re.search(rf'\b{opcode}\(', k))


def _compute(ops):
  """The instructions without parameters and bitcasts (a bitcast moves no
  data: a (C_in, C_out) factor passed where nn.Conv has (1, 1, C_in, C_out))."""
  return collections.Counter({k: n for k, n in ops.items()
                              if not re.search(r'\b(parameter|bitcast)\(', k)})


def _compare(a: Compiled, b: Compiled) -> str:
  """Whether two compiled programs hold the same instructions."""
  if a.ops is None or b.ops is None:
    return '—'
  if a.ops == b.ops:
    return 'identical'
  if _compute(a.ops) == _compute(b.ops):
    return 'same ops (weights passed in other shapes: free bitcasts)'
  diffs = [f'{op} {_op_count(a.ops, op)} vs {_op_count(b.ops, op)}'
           for op in ('convolution', 'dot', 'fusion')
           if _op_count(a.ops, op) != _op_count(b.ops, op)]
  return 'differ' + (': ' + ', '.join(diffs) if diffs else
                     ' (same op counts)')


def _check(out, ref, what):
  out, ref = np.asarray(out), np.asarray(ref)
  np.testing.assert_allclose(out, ref, rtol=TOL,
                             atol=TOL * float(np.abs(ref).max()),
                             err_msg=what)
  return float(np.abs(out - ref).max() / np.abs(ref).max())


def layer_orders(model, split, shape):
  """{path: evaluation order lj picks} for the split layers at ``shape``."""
  out = {}
  for path, call in counting.called_layers(model, split, shape).items():
    form = forms.identify(set(call.variables) - {'bias'}, strict=False)
    if form in (None, 'dense'):
      continue
    mod = forms.get(form)
    v = {k: a for k, a in call.variables.items() if k != 'bias'}
    out[path] = f'{form}:{mod.choose_order(v, call.in_shape, call.spec)}'
  return out


def shuffled_time_calls(fns, args, *, blocks, repeats, min_time_s, seed=0):
  """``speed.time_calls`` in ``blocks`` blocks, each in a new call order.

  ``time_calls`` calls the functions in a fixed order each round; in trial
  runs on this machine a call right after an ``nnx.jit`` call (batch 1)
  measured slower, whatever the function, so neighbours bias a fixed order.
  A fresh random order per block (seeded) gives every function varied
  neighbours and positions; the times of all blocks are pooled. Round k of
  every function comes from the same block and round, so per-round ratios
  stay paired.
  """
  rng = np.random.default_rng(seed)
  times = [[] for _ in fns]
  for _ in range(blocks):
    order = rng.permutation(len(fns))
    measured = speed.time_calls([fns[i] for i in order],
                                [args[i] for i in order], repeats=repeats,
                                min_time_s=min_time_s / blocks)
    for i, m in zip(order, measured):
      times[i].extend(m.times_s)
  return [speed.Measured(float(np.median(t)), float('nan'), tuple(t))
          for t in times]


def bench_batch(batch, setup, args):
  model, variables, split, hand, hand_vars, nnx_split, nnx_hand = setup
  x = jax.random.normal(jax.random.PRNGKey(batch), (batch,) + INPUT,
                        jnp.float32)
  rows = {  # label -> (fn, args); every function gets its own copies
      'linen dense: model.apply': (
          jax.jit(lambda v, x: model.apply(v, x)), _copy((variables, x))),
      'linen dense: lj.apply': (
          jax.jit(lambda v, x: lj.apply(model, v, x)), _copy((variables, x))),
      'linen split: lj.apply': (
          jax.jit(lambda v, x: lj.apply(model, v, x)), _copy((split, x))),
      'linen hand-written: model.apply': (
          jax.jit(lambda v, x: hand.apply(v, x)), _copy((hand_vars, x))),
  }
  for label, module in (('NNX split (FormLayer)', nnx_split),
                        ('NNX hand-written', nnx_hand)):
    fn, a = _pure(module)
    rows[f'{label}: nnx.split + jax.jit'] = (fn, a + (_copy(x),))
    fn, a = _nnx_jit(module)
    rows[f'{label}: nnx.jit'] = (fn, a + (_copy(x),))
  outs, first_s = {}, {}
  for label, (f, a) in rows.items():   # first call: trace + compile + run
    t0 = time.perf_counter()
    outs[label] = jax.device_get(f(*a))
    first_s[label] = time.perf_counter() - t0
  errs = {}
  errs['linen dense: lj.apply vs model.apply'] = _check(
      outs['linen dense: lj.apply'], outs['linen dense: model.apply'],
      'dense control')
  hand_ref = outs['linen hand-written: model.apply']
  for label in rows:
    if label != 'linen hand-written: model.apply' and (
        'split' in label or 'hand' in label):
      errs[f'{label} vs linen hand-written'] = _check(outs[label], hand_ref,
                                                      label)
  compiled = {label: _compiled(f, a) for label, (f, a) in rows.items()}
  for label in rows:   # nnx.jit compiles the forward its pure twin does
    if label.endswith(': nnx.jit'):
      compiled[label] = compiled[label.replace(': nnx.jit',
                                               ': nnx.split + jax.jit')]
  med = shuffled_time_calls([f for f, _ in rows.values()],
                            [a for _, a in rows.values()],
                            blocks=args.blocks, repeats=args.repeats,
                            min_time_s=args.min_time, seed=batch)
  med = dict(zip(rows, med))
  ratios = [  # (name, numerator, denominator, counts for the verdict)
      ('control: lj.apply dense / model.apply dense',
       'linen dense: lj.apply', 'linen dense: model.apply', True),
      ('linen: lj.apply split / hand-written',
       'linen split: lj.apply', 'linen hand-written: model.apply', True),
      ('NNX (nnx.split + jax.jit): FormLayer module / hand-written NNX',
       'NNX split (FormLayer): nnx.split + jax.jit',
       'NNX hand-written: nnx.split + jax.jit', True),
      ('NNX (nnx.jit): FormLayer module / hand-written NNX',
       'NNX split (FormLayer): nnx.jit', 'NNX hand-written: nnx.jit', True),
      # Across frameworks: adds NNX's dispatch (flattening an nnx.State)
      # to the comparison, as the hand-written NNX / linen pair shows.
      ('across frameworks: NNX FormLayer module (nnx.split + jax.jit) / '
       'hand-written linen',
       'NNX split (FormLayer): nnx.split + jax.jit',
       'linen hand-written: model.apply', False),
      ('same program: NNX FormLayer module (nnx.split + jax.jit) / linen '
       'lj.apply split',
       'NNX split (FormLayer): nnx.split + jax.jit', 'linen split: lj.apply',
       False),
      ('same program: hand-written NNX (nnx.split + jax.jit) / hand-written '
       'linen',
       'NNX hand-written: nnx.split + jax.jit',
       'linen hand-written: model.apply', False),
  ]
  ratio_rows = []
  for name, a, b, main in ratios:
    paired = np.median(np.asarray(med[a].times_s) / np.asarray(med[b].times_s))
    ratio_rows.append(dict(
        name=name, ratio=med[a].median_s / med[b].median_s,
        paired=float(paired),
        fastest=min(med[a].times_s) / min(med[b].times_s),
        programs=_compare(compiled[a], compiled[b]), main=main))
  return dict(med=med, first_s=first_s, compiled=compiled,
              ratios=ratio_rows, errs=errs)


def make_verdict(all_ratios) -> str:
  """One line from the ratios: [(batch, ratio row of bench_batch)].

  A ratio is "equal within noise" inside ``BAND`` or inside the spread that
  pairs of identical compiled programs measured at the same batch size (what
  this run's timing cannot tell apart); below that it is "faster".
  """
  noise = {}
  for b, r in all_ratios:
    if r['programs'] == 'identical' and not r['name'].startswith(
        'NNX (nnx.jit)'):
      lo, hi = noise.get(b, (r['ratio'], r['ratio']))
      noise[b] = (min(lo, r['ratio']), max(hi, r['ratio']))

  def verdict(b, ratio):
    lo, hi = noise.get(b, BAND)
    if min(BAND[0], lo) <= ratio <= max(BAND[1], hi):
      return 'equal'
    return 'slower' if ratio > 1 else 'faster'

  main = [(b, r, verdict(b, r['ratio'])) for b, r in all_ratios if r['main']]
  slower = [(b, r) for b, r, v in main if v == 'slower']
  faster = [(b, r) for b, r, v in main if v == 'faster']
  head = ('NOT equal: the FormLayer / lj.apply side is slower in '
          if slower else 'equal within noise or faster: ')
  parts = [f'batch {b}, {r["name"]} = {r["ratio"]:.3f} (slower; compiled '
           f'programs {r["programs"]})' for b, r in slower]
  parts += [f'batch {b}, {r["name"]} = {r["ratio"]:.3f} (the FormLayer / '
            f'lj.apply side is faster; compiled programs {r["programs"]})'
            for b, r in faster]
  lo, hi = (f(r['ratio'] for _, r, v in main if v == 'equal')
            for f in (min, max))
  line = head + '; '.join(parts + [
      f'every other ratio is equal within noise ({lo:.3f} to {hi:.3f})'])
  spread = '; '.join(f'batch {b}: {lo:.3f} to {hi:.3f}'
                     for b, (lo, hi) in sorted(noise.items()))
  return (line + f'. Band [{BAND[0]}, {BAND[1]}], widened to the noise of '
          f'this run: pairs with identical compiled programs measured '
          f'{spread}.')


def _iqr(times):
  q1, q3 = np.percentile(times, [25, 75])
  return (q3 - q1) / np.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batches', default='128,1')
  p.add_argument('--blocks', type=int, default=16,
                 help='time_calls blocks, each in a new random call order')
  p.add_argument('--repeats', type=int, default=3,
                 help='rounds per block, at least')
  p.add_argument('--min-time', type=float, default=3.0,
                 help='timed seconds per function at least, all blocks')
  p.add_argument('--no-doc', action='store_true')
  args = p.parse_args(argv)
  command = ' '.join(['python bench/bench_own_model.py'] +
                     (sys.argv[1:] if argv is None else list(argv)))
  machine = bench_layers.machine()
  date = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  print(machine, flush=True)
  start = time.perf_counter()

  model = VGG()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1,) + INPUT))
  tucker, svd = split_ranks()
  split = lj.tucker2_split(variables, {f'Conv_{i}': r
                                       for i, r in tucker.items()})
  split = lj.svd_split(split, {f'Dense_{j}': r for j, r in svd.items()})
  hand = HandVGG(tucker, svd)
  hand_vars = hand_variables(split)
  shapes = jax.tree_util.tree_map(
      jnp.shape, hand.init(jax.random.PRNGKey(0), jnp.zeros((1,) + INPUT)))
  assert shapes == jax.tree_util.tree_map(jnp.shape, hand_vars), shapes
  nnx_dense = nnx_from_linen(variables)
  nnx_split = lj.tucker2_split(nnx_dense, {f'conv{i}': r
                                           for i, r in tucker.items()})
  nnx_split = lj.svd_split(nnx_split, {f'dense{j}': r for j, r in svd.items()})
  nnx_hand = hand_nnx_from_split(nnx_split, tucker, svd)
  setup = (model, variables, split, hand, hand_vars, nnx_split, nnx_hand)
  flatten_us = {
      name: timeit.timeit(lambda t=t: jax.tree_util.tree_flatten(t),
                          number=1000) * 1e3
      for name, t in (('dict', split), ('state', nnx.split(nnx_split)[1]))}
  rank_of = {**{f'Conv_{i}': r for i, r in tucker.items()},
             **{f'Dense_{j}': (r,) for j, r in svd.items()}}
  forms_line = ', '.join(
      f'`{k}` {v}' + (f' {rank_of[k]}' if k in rank_of else '')
      for k, v in lj.layer_forms(split).items())

  sections, all_ratios, checks = [], [], []
  for batch in (int(b) for b in args.batches.split(',')):
    orders = layer_orders(model, split, (batch,) + INPUT)
    res = bench_batch(batch, setup, args)
    rounds = len(next(iter(res['med'].values())).times_s)
    lines = [f'### Batch {batch}', '',
             f'{rounds} interleaved rounds. Orders lj picks for the split '
             'layers: ' + ', '.join(f'`{k}` {v}' for k, v in orders.items())
             + '.', '',
             '| function | median ms | IQR / median | images/s | '
             'XLA GFLOP | first call s |',
             '|---|---:|---:|---:|---:|---:|']
    for label, m in res['med'].items():
      f = None if label.endswith('nnx.jit') else res['compiled'][label].flops
      lines.append(
          f'| {label} | {m.median_s * 1e3:.3f} | {_iqr(m.times_s):.0%} | '
          f'{batch / m.median_s:.0f} | '
          f'{"—" if f is None else f"{f / 1e9:.4f}"} | '
          f'{res["first_s"][label]:.2f} |')
    lines += ['', '| ratio (time / time) | ratio of medians | '
              'median of per-round ratios | ratio of fastest calls | '
              'compiled programs |',
              '|---|---:|---:|---:|---|']
    for r in res['ratios']:
      lines.append(f'| {r["name"]} | {r["ratio"]:.3f} | {r["paired"]:.3f} | '
                   f'{r["fastest"]:.3f} | {r["programs"]} |')
      all_ratios.append((batch, r))
    sections.append('\n'.join(lines))
    checks += [f'batch {batch}: {k}: max |diff| / max |logit| = {e:.1e}'
               for k, e in res['errs'].items()]
    print('\n' + sections[-1], flush=True)
  elapsed = time.perf_counter() - start

  verdict = make_verdict(all_ratios)
  print('\nVerdict: ' + verdict)
  print(f'{elapsed:.0f} s')

  page = '\n'.join([
      '# Own model: split network through lowrank_jax vs the same network '
      'built in', '',
      'Generated by `bench/bench_own_model.py`; nothing typed in by hand. '
      'A plain linen VGG-style CNN (convs '
      + '-'.join('pool' if w == 'M' else str(w) for w in WIDTHS)
      + f', dense {HIDDEN}, {CLASSES} classes, '
      + 'x'.join(map(str, INPUT)) + ' inputs, float32) split as in the '
      'README section '
      '"Compress your own model": every 3x3 conv but the first Tucker-2 at '
      'half ranks, both dense layers SVD at half rank. Forms (ranks): '
      + forms_line
      + '.', '',
      '* **lj.apply** runs the split variables through the unmodified model '
      '(`nn.intercept_methods`). **Hand-written** is the same architecture '
      'with each factored layer written as plain layers (Tucker-2: '
      '`nn.Conv(R_in, (1, 1), use_bias=False)` -> `nn.Conv(R_out, (3, 3), '
      'use_bias=False)` -> `nn.Conv(C_out, (1, 1))` with the bias; SVD: '
      '`nn.Dense(R, use_bias=False)` -> `nn.Dense(C_out)`), its variables '
      'copied from the split tree. The split layers\' 1x1 stages of at most '
      f'{base.POINTWISE_CONV_MAX_CHANNELS} channels run as 1x1 convs '
      '(`lowrank_jax.forms.base.POINTWISE_CONV_MAX_CHANNELS`), the ops '
      '`nn.Conv` runs, so both sides compile to the same ops; while they ran '
      'as `dot_general`, batch 128 measured 1.21 to 1.26 here '
      '(`bench/bench_pointwise.py` times that choice on other networks).',
      '* **NNX split** is the module `lj.tucker2_split` / `lj.svd_split` '
      'return for an `nnx.Module` with the same weights (split layers are '
      '`lj.FormLayer`s); **NNX hand-written** is the hand-written '
      'architecture in `nnx.Conv` / `nnx.Linear` (`nnx.Sequential` per '
      'factored layer), weights copied from the split module. '
      '"nnx.split + jax.jit" jits a pure function of the state '
      '(`nnx.merge(graphdef, state)(x)`): the fair comparison of the '
      'compiled forward. "nnx.jit" also pays NNX\'s per-call graph '
      'traversal, which grows with the number of modules.',
      '* Control: the unsplit variables through `lj.apply` vs '
      '`model.apply`.',
      '* The "across frameworks" row (not in the verdict) compares the NNX '
      'module with the hand-written linen network: NNX\'s own dispatch '
      'included.',
      '* "same program" rows (not in the verdict) time NNX against linen on '
      'identical compiled programs: what is left is dispatch, where '
      '`jax.jit` flattens an `nnx.State` argument (for the split module: '
      f'{flatten_us["state"]:.0f} us per `tree_flatten` here) against a plain '
      f'dict ({flatten_us["dict"]:.0f} us), which shows at batch 1.',
      '',
      'All functions of one batch size are jitted and timed interleaved, call '
      'by call, in one process with `lowrank_jax.speed.time_calls` (median; '
      'compile excluded; "first call" = trace + compile + one run), in '
      f'{args.blocks} blocks, each in a new random call order, with the times '
      'pooled (in trial runs the call right after an `nnx.jit` call measured '
      'slower at batch 1, whichever function it was, so a fixed order '
      'biases), and every function gets its own copy of its weights and '
      'input (in trial runs with shared buffers, a call right after its twin '
      'ran warm from cache and the dense control left the band at batch 1 '
      'with identical programs). "Median of per-round ratios" pairs the two '
      'calls of the same round; "ratio of fastest calls" compares the '
      'minimums (load from other processes only adds time). The verdict '
      'reads the ratio of medians. Before '
      'timing, every split / hand-written output is checked against the '
      f'hand-written linen output (`assert_allclose`, rtol {TOL:g}, atol '
      f'{TOL:g} of '
      'the largest logit). XLA GFLOP is `cost_analysis()` of the compiled '
      'function (same work gives the same count; — for the `nnx.jit` rows, '
      'which compile the program of their `nnx.split + jax.jit` twin).', '',
      f'Command: `{command}` (from the repository root, {date}, '
      f'{elapsed:.0f} s in all).', '',
      f'Machine: {machine}; load avg {os.getloadavg()[0]:.1f} at the end. '
      f'The {os.cpu_count()} cores are shared with other jobs, so medians '
      'of one run can '
      'drift; the ratios of interleaved calls are the figures to read.', '',
      f'**Verdict** (band [{BAND[0]}, {BAND[1]}]): {verdict}', '',
      '\n\n'.join(sections), '',
      '### Output checks', '',
      '\n'.join(f'- {c}' for c in checks), ''])
  if not args.no_doc:
    with open(DOC, 'w') as f:
      f.write(page)
    print(f'wrote {os.path.normpath(DOC)}')


if __name__ == '__main__':
  main()
