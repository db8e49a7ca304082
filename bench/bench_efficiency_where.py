"""Where a Tucker-2 split network loses time on XLA:CPU: HLO and variants.

The companion of bench_efficiency.py (same networks, same quarter-rank
split, batch 128, ``lj.apply(..., train=False)`` under ``jax.jit``). It
answers "why is the split network's efficiency below its layers'" with three
kinds of evidence, all from runs:

1. Which convs XLA:CPU hands to its YNNPACK library fusion: a 3x3 conv of
   16 -> 16 channels and of 17 -> 17 channels, compiled alone.
2. The optimized HLO of the dense and the split network (compile only): YNN
   fusions (how many; instructions in the largest), convs left to XLA's own
   emitter, activation-sized buffers built from per-channel vectors only
   (broadcasts of BatchNorm statistics or of relu's zero, materialized because
   a fusion boundary cuts their users apart), copies and transposes.
3. Whole-network CPU-time speed-ups over the dense network, interleaved in one
   process (bench_pointwise.time_interleaved), of variants of the split:
   ``library`` (the forms as shipped); Tucker-2 layers whose core has at most
   16 channels run as ``fold_in`` / ``fold_out`` (see tucker2.ORDERS) or with
   the core zero-padded to 17 channels (same function, one more channel);
   every 1x1 stage as a dot_general (``1x1 dot``) or as a 1x1 conv
   (``1x1 conv``). The variants are the library's own orders and ops chosen
   per layer by patching ``tucker2.forward`` / the pointwise threshold while
   tracing; outputs are checked equal to the library's.

Plus, for the first network, the time per XLA:CPU thunk (``jax.profiler``
trace) of the split network as shipped and with the best variant.

  python bench/bench_efficiency_where.py                # vgg16,resnet18,resnet20,vgg7b
  python bench/bench_efficiency_where.py --models vgg7b@3 --rounds 10

``NAME@R`` splits every conv for an R-fold FLOP cut (bench_network.compress)
instead of the quarter ranks. vgg7/vgg7b/vgg8 get 28x28x1 inputs (their
data), the rest 32x32x3. Appends a "Where the time goes" section to
docs/benchmarks_efficiency.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))

import bench_efficiency  # noqa: E402  (the quarter split, the doc)
import bench_network  # noqa: E402  (split for a FLOP ratio)
import bench_pointwise  # noqa: E402  (the interleaved wall + CPU timer)
import hostinfo  # noqa: E402
import lowrank_jax as lj  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax import tree  # noqa: E402
from lowrank_jax.forms import base  # noqa: E402
from lowrank_jax.forms import tucker2  # noqa: E402

# A Tucker-2 core with at most this many channels in and out is what the
# variants re-route (YNNPACK's fusion took a 17-channel conv, not a
# 16-channel one, in the first check of this bench).
SMALL_CORE = 16


def _pad_core(v, width):
  """The same layer with its core zero-padded to ``width`` channels."""
  r_in, r_out = v['core'].shape[2:]
  return {'u_in': jnp.pad(v['u_in'], ((0, 0), (0, width - r_in))),
          'core': jnp.pad(v['core'], ((0, 0), (0, 0), (0, width - r_in),
                                      (0, width - r_out))),
          'u_out': jnp.pad(v['u_out'], ((0, width - r_out), (0, 0)))}


def _small_core_forward(how):
  library = tucker2.forward

  def forward(v, x, spec):
    if max(v['core'].shape[2:]) > SMALL_CORE:
      return library(v, x, spec)
    if how == 'pad':
      return tucker2.forward_order(_pad_core(v, SMALL_CORE + 1), x, spec,
                                   'factored')
    return tucker2.forward_order(v, x, spec, how)
  return forward


# label: (tucker2 forward for cores of <= SMALL_CORE channels, 1x1 threshold)
VARIANTS = {
    'library': (None, None),
    'fold_in': ('fold_in', None),
    'fold_out': ('fold_out', None),
    'pad 17': ('pad', None),
    '1x1 dot': (None, 0),
    '1x1 conv': (None, 1 << 30),
}


@contextlib.contextmanager
def variant(label):
  """Traces inside run the split network as ``VARIANTS[label]`` says."""
  how, threshold = VARIANTS[label]
  saved = tucker2.forward, base.POINTWISE_CONV_MAX_CHANNELS
  if how is not None:
    tucker2.forward = _small_core_forward(how)
  if threshold is not None:
    base.POINTWISE_CONV_MAX_CHANNELS = threshold
  try:
    yield
  finally:
    tucker2.forward, base.POINTWISE_CONV_MAX_CHANNELS = saved


def compiled(model, variables, x, label='library'):
  # A fresh function per variant: jax.jit caches traces by function, and the
  # variant only acts while tracing.
  with variant(label):
    return jax.jit(lambda v, x: lj.apply(model, v, x, train=False)).lower(
        variables, x).compile()


# --- the optimized HLO -------------------------------------------------------

def _computations(text):
  return {m.group(1): m.group(2) for m in re.finditer(
      r'^(?:ENTRY )?%(\S+) .*?\{\n(.*?)\n\}', text, re.S | re.M)}


def _elements(shape):
  dims = re.match(r'\w+\[([\d,]*)\]', shape).group(1)
  return int(np.prod([int(d) for d in dims.split(',') if d]))


def hlo_summary(text):
  """Counts over the entry computation of an optimized XLA:CPU module."""
  comps = _computations(text)
  entry = text[text.index('\nENTRY'):]
  shapes, ynn, xla_convs, built = {}, [], [], 0
  for line in entry.splitlines()[1:]:
    m = re.match(r'\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*?)\)(.*)', line)
    if not m:
      continue
    name, shape, op, operands, rest = m.groups()
    shapes[name] = shape
    if op == 'convolution':
      xla_convs.append(shape.split('{')[0])
    if op != 'fusion':
      continue
    body = comps[re.search(r'calls=%([\w.-]+)', rest).group(1)]
    if '__ynn_fusion' in rest:
      ynn.append(sum(' = ' in l and ' parameter(' not in l
                     for l in body.splitlines()))
    elif 'kind=kLoop' in rest and _elements(shape) >= 1 << 18 and all(
        _elements(shapes.get(o, 'f32[]')) <= 4096
        for o in re.findall(r'%([\w.-]+)', operands)):
      built += 1
  copies = len(re.findall(r' (?:copy|transpose)\(', text))
  return dict(ynn=len(ynn), largest=max(ynn, default=0),
              xla_convs=xla_convs, built=built, copies=copies)


def describe(text):
  """{entry instruction: 'its layer/op (convs+dots inside)'} of a module."""
  comps = _computations(text)
  out = {}
  for line in text[text.index('\nENTRY'):].splitlines()[1:]:
    m = re.match(r'\s+(?:ROOT )?%(\S+) = ', line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if not m or not op_name:
      continue
    called = re.search(r'calls=%([\w.-]+)', line)
    body = comps.get(called.group(1), '') if called else ''
    n = len(re.findall(r' (?:convolution|dot)\(', body))
    where = '/'.join(op_name.group(1).split('/')[2:])
    out[m.group(1)] = where + (f', {n} convs+dots' if n > 1 else '')
  return out


def ynn_takes(channels):
  """Whether XLA:CPU puts a 3x3 conv of ``channels`` in and out into YNN."""
  x = jax.ShapeDtypeStruct((8, 16, 16, channels), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.float32)
  text = jax.jit(lambda x, w: base.conv(x, w, base.LayerSpec('conv'))).lower(
      x, w).compile().as_text()
  return '__ynn_fusion' in text


# --- the time per thunk ------------------------------------------------------

def thunk_ms(fn, args, calls=3):
  """(ms per call, {thunk name: ms per call}) from a jax.profiler trace.

  A thunk's span is its HLO instruction's name. XLA's own convs run
  asynchronously on the intra-op thread pool, so their spans cover little
  more than the dispatch: the per-call total minus the thunks listed bounds
  them.
  """
  folder = tempfile.mkdtemp()
  try:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(folder, '**', '*perfetto_trace.json.gz'),
                     recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total, thunks = 0.0, collections.Counter()
  for e in events:
    name, ms = e.get('name', ''), e.get('dur', 0) / 1e3 / calls
    if e.get('ph') != 'X':
      continue
    if name == 'ThunkExecutor::Execute (wait for completion)':
      total += ms
    elif re.fullmatch(r'[a-z][a-z0-9_]*(\.\d+)?', name):
      thunks[name] += ms
  return total, thunks


# --- one network -------------------------------------------------------------

def input_shape(name, batch):
  return (batch, 28, 28, 1) if name.startswith('vgg7') or name == 'vgg8' \
      else (batch, 32, 32, 3)


def bench_model(spec, batch, rounds, labels):
  name, _, ratio = spec.partition('@')
  model = models.get_model(name)
  shape = input_shape(name, batch)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  dense = jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                       train=False))(x)
  if ratio:
    split, ranks = bench_network.compress(model, dense, shape, float(ratio))
    cores = [r for p, r in ranks.items() if len(r) == 2]
  else:
    split, paths = bench_efficiency.quarter_split(model, dense, shape)
    params = split['params']
    cores = [tucker2.ranks(tree.get_layer(params, p)) for p in paths]
  fns = {'dense': compiled(model, dense, x)}
  args = {'dense': (dense, x)}
  for label in labels:
    fns[label] = compiled(model, split, x, label)
    args[label] = (split, x)
  ref = np.asarray(fns['library'](split, x))
  scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=1.0))
  for label in labels:
    np.testing.assert_allclose(np.asarray(fns[label](split, x)), ref,
                               rtol=1e-3, atol=1e-4 * scale)
  for label in fns:
    jax.block_until_ready(fns[label](*args[label]))
  times = bench_pointwise.time_interleaved(fns, args, rounds)
  return dict(
      name=spec, shape=shape, layers=len(cores),
      small=sum(max(r) <= SMALL_CORE for r in cores), times=times,
      hlo={k: hlo_summary(f.as_text()) for k, f in
           (('dense', fns['dense']), ('split', fns['library']))},
      fns=fns, args=args)


def hlo_cells(h):
  convs = collections.Counter(h['xla_convs'])
  where = ', '.join(f'{n}x {s}' for s, n in convs.items()) or 'none'
  return (f'{h["ynn"]} ({h["largest"]}) | {where} | {h["built"]} | '
          f'{h["copies"]}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='vgg16,resnet18,resnet20,vgg7b')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--rounds', type=int, default=4)
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--no-doc', action='store_true')
  args = p.parse_args(argv)
  command = 'python bench/bench_efficiency_where.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  labels = args.variants.split(',')
  if labels[0] != 'library':
    raise SystemExit('--variants must start with library')
  start = time.perf_counter()
  takes = {c: ynn_takes(c) for c in (SMALL_CORE, SMALL_CORE + 1)}
  results = []
  for spec in args.models.split(','):
    results.append(bench_model(spec, args.batch, args.rounds, labels))
    r = results[-1]
    print(r['name'], {k: round(r['times']['dense'][1] / v[1], 2)
                      for k, v in r['times'].items()}, flush=True)

  lines = ['Does XLA:CPU put a 3x3 conv into a YNN fusion (compiled alone)? ' +
           ', '.join(f'{c} -> {c} channels: {"yes" if t else "no"}'
                     for c, t in takes.items()) + '.', '',
           '| network | input | split layers (cores <= '
           f'{SMALL_CORE} channels) | net | YNN fusions (instructions in the '
           'largest) | convs left to XLA | activation-sized broadcasts '
           'built | copies + transposes |',
           '|---|---|---|---|---:|---|---:|---:|']
  for r in results:
    for net in ('dense', 'split'):
      lines.append(f'| {r["name"]} | {"x".join(map(str, r["shape"][1:]))} | '
                   f'{r["layers"]} ({r["small"]}) | {net} | '
                   f'{hlo_cells(r["hlo"][net])} |')
  lines += ['', 'Whole-network speed-up over the dense network, CPU time '
            '(wall in brackets), medians of interleaved calls:', '',
            '| network | dense ms CPU | ' + ' | '.join(labels) + ' |',
            '|---|---:|' + '---:|' * len(labels)]
  for r in results:
    wall0, cpu0 = r['times']['dense']
    cells = [f'{cpu0 / r["times"][k][1]:.2f} ({wall0 / r["times"][k][0]:.2f})'
             for k in labels]
    lines.append(f'| {r["name"]} | {cpu0 * 1e3:.0f} | ' + ' | '.join(cells) +
                 ' |')
  fastest = []
  for r in results:
    k = min(labels, key=lambda k: r['times'][k][1])
    fastest.append(f'{r["name"]} {k}' + (
        f' ({r["times"]["library"][1] / r["times"][k][1]:.2f}x the library)'
        if k != 'library' else ''))
  lines += ['', 'Fastest by CPU time: ' + ', '.join(fastest) + '.']
  first = results[0]
  best = max(labels, key=lambda k: -first['times'][k][1])
  profiled = ['library'] + ([best] if best != 'library' else [])
  lines += ['', f'Time per XLA:CPU thunk of the split {first["name"]} '
            '(ms per call, jax.profiler trace of 3 calls; the 8 longest):',
            '']
  for label in profiled:
    total, ms = thunk_ms(first['fns'][label], first['args'][label])
    names = describe(first['fns'][label].as_text())
    top = ', '.join(f'{n} ({names.get(n, "?")}) {t:.1f}'
                    for n, t in ms.most_common(8))
    lines.append(f'* {label}: {total:.0f} ms per call, thunks '
                 f'{sum(ms.values()):.0f} ms; {top}')
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')
  took = time.perf_counter() - start
  section = [f'## Where the time goes: `{command.strip()}`', '',
             f'{stamp}, {took:.0f} s, batch {args.batch}. '
             f'{hostinfo.machine_line()} What each column and variant is: '
             'the docstring of bench/bench_efficiency_where.py.', ''] + lines
  print('\n'.join(section))
  if not args.no_doc:
    with open(bench_efficiency.DOC, 'a') as f:
      f.write('\n' + '\n'.join(section) + '\n')


if __name__ == '__main__':
  main()
