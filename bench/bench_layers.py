"""Layer benchmark: dense vs Tucker-2 vs CP vs SVD convs, measured wall time.

For every distinct conv shape (C_in, C_out, k, stride, input size) of the
chosen CIFAR-style models (32x32 inputs), each factored form is built at the
ranks that give fixed FLOP reductions (2x, 4x, 8x by default; solved with
``speed.rank_for_flop_ratio``) and timed against the dense conv of the same
shape: jitted forward, optionally forward+backward (VJP w.r.t. parameters and
input), on the default JAX backend. Reported per case: FLOP ratio, measured
speed-up, efficiency = speed-up / FLOP ratio, and the compile time (first
call) of both. All functions of one shape are timed interleaved, call by
call, and the median taken, so load from other processes hits all alike.

  python bench/bench_layers.py                      # default grid (< 10 min)
  python bench/bench_layers.py --quick              # a few shapes, seconds
  python bench/bench_layers.py --batch 1 --dtype bfloat16 --grad
  python bench/bench_layers.py --issue              # the issue's case

Results are printed; each run's section (replacing the one of the same
settings) goes in full to ``docs/logs/benchmarks_layers_log.md`` and
summarized (command, machine, efficiency table) to
``docs/benchmarks_layers.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import hostinfo  # noqa: E402
from lowrank_jax import counting  # noqa: E402
from lowrank_jax import forms  # noqa: E402
from lowrank_jax import models  # noqa: E402
from lowrank_jax import speed  # noqa: E402
from lowrank_jax.forms import base  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), '..', 'docs',
                   'benchmarks_layers.md')
LOG = os.path.join(os.path.dirname(__file__), '..', 'docs', 'logs',
                   'benchmarks_layers_log.md')
LOG_HEADER = """# Layer and network speed benchmarks: full runs

Every row of every run summarized in
[benchmarks_layers.md](../benchmarks_layers.md): per layer shape, form and
FLOP ratio, the ranks, dense and split times, speed-up, efficiency and compile
times. `bench/bench_layers.py` and `bench/bench_network.py` replace the section
of the same settings here (and its summary there) when their command is
re-run.
"""
SUMMARY_HEADER = """## Latest figures (generated; each replaced when its command is re-run)

One section per command: the command, its wall time and machine, and the
summary of its run (layer runs: median efficiency per form at FLOP ratio
>= 3; the single-layer case: dense against the library's default order;
network runs: the whole table). Every row of every run, under the same
commands, is in [logs/benchmarks_layers_log.md](logs/benchmarks_layers_log.md).

"""


# --------------------------------------------------------------- machine ---


def machine() -> str:
  """One line naming the CPU, core count, JAX version and backend."""
  cpu = hostinfo.cpu_name() or platform.processor() or platform.machine()
  devices = jax.devices()
  return (f'{cpu}, nproc {os.cpu_count()}, jax {jax.__version__}, '
          f'backend {jax.default_backend()} ({devices[0].device_kind}), '
          f'load avg {os.getloadavg()[0]:.1f} at start')


def update_doc(path: str, key: str, text: str) -> None:
  """Writes ``text`` as the section tagged ``key`` (replacing an old one)."""
  begin, end = f'<!-- begin {key} -->', f'<!-- end {key} -->'
  old = open(path).read() if os.path.exists(path) else ''
  block = f'{begin}\n{text.rstrip()}\n{end}\n'
  if begin in old and end in old:
    head, rest = old.split(begin, 1)
    new = head + block + rest.split(end, 1)[1].lstrip('\n')
  else:
    new = old.rstrip('\n') + ('\n\n' if old else '') + block
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(new)


def summary_of(body: str) -> str:
  """The summary page's version of a run's section: its header, command and
  machine lines, then its summary (a layer run's efficiency table; the
  single-layer case's dense and library-default rows; all of anything
  else)."""
  lines = body.rstrip('\n').split('\n')
  starts = [i for i, l in enumerate(lines)
            if l.startswith('| batch | dtype | mode | form |')]
  if starts:
    table = lines[starts[-1]:]
  elif any(l.startswith('| evaluation |') for l in lines):
    first = lines[next(i for i, l in enumerate(lines)
                       if l.startswith('| evaluation |')):]
    first = first[:next((i for i, l in enumerate(first)
                         if not l.startswith('|')), len(first))]
    table = first[:2] + [l for l in first[2:] if l.startswith('| dense conv')
                         or 'library default' in l]
  else:
    return '\n'.join(lines)
  head = [lines[0], ''] + [l for l in lines if l.startswith(('`python',
                                                               'Machine:'))]
  return '\n'.join(head + [''] + table)


def write_docs(key: str, body: str) -> None:
  """A run's section in full to the log, and summarized to the summary."""
  if not os.path.exists(LOG):
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    with open(LOG, 'w') as f:
      f.write(LOG_HEADER)
  update_doc(LOG, key, body)
  update_doc(DOC, key, summary_of(body))


# ---------------------------------------------------------------- shapes ---


def conv_shapes(model_names):
  """Distinct layer shapes of the models at batch 1 (32x32x3 inputs).

  Returns:
    ``{key: (kind, kernel_shape, spec, in_shape_b1, out_shape_b1, [paths])}``
    with key ``(kind, C_in, C_out, k, stride, H_in)``; kind is 'kxk', '1x1'
    or 'fc'.
  """
  shapes = {}
  for name in model_names:
    model = models.get_model(name)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                           train=False))
    for path, call in counting.called_layers(model, variables,
                                             (1, 32, 32, 3)).items():
      kshape = tuple(call.variables['kernel'].shape)
      if len(kshape) == 2:
        kind, key = 'fc', ('fc', kshape[0], kshape[1], 1, 1, 1)
      else:
        kind = '1x1' if kshape[:2] == (1, 1) else 'kxk'
        key = (kind, kshape[2], kshape[3], kshape[0], call.spec.strides[0],
               call.in_shape[1])
      if key not in shapes:
        shapes[key] = (kind, kshape, call.spec, call.in_shape,
                       call.out_shape, [])
      shapes[key][5].append(f'{name}:{path}')
  return shapes


FORMS_OF = {'kxk': ('tucker2', 'cp', 'svd'), '1x1': ('svd',), 'fc': ('svd',)}


def _random_variables(form, kernel_shape, ranks, dtype, key):
  """Random variables of a form (timing does not depend on the values)."""
  shapes = jax.tree.map(lambda s: s.shape,
                        forms.stand_in(form, kernel_shape, ranks))
  keys = iter(jax.random.split(key, len(shapes)))
  return {k: (jax.random.normal(next(keys), s) /
              np.sqrt(max(np.prod(s[:-1]), 1))).astype(dtype)
          for k, s in shapes.items()}


def _with_batch(shape, batch):
  return (batch,) + tuple(shape[1:])


def _fn(form_name, spec, grad):
  form = forms.get(form_name)

  def fwd(v, x):
    return form.forward(v, x, spec)

  if not grad:
    return jax.jit(fwd)

  def fwd_bwd(v, x, ct):
    _, pull = jax.vjp(fwd, v, x)
    return pull(ct)

  return jax.jit(fwd_bwd)


# ------------------------------------------------------------------ bench ---


def bench_shape(entry, *, batch, dtype, grad, ratios, form_names, repeats,
                min_time_s, round_to):
  """Times dense and every (form, ratio) variant of one shape, interleaved."""
  kind, kshape, spec, in1, out1, _ = entry
  in_shape, out_shape = _with_batch(in1, batch), _with_batch(out1, batch)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, in_shape, dtype)
  ct = jax.random.normal(jax.random.fold_in(key, 1), out_shape, dtype)
  dense_macs = speed.split_macs('dense', kshape, (), in_shape, out_shape,
                                spec)
  variants = [('dense', (), 'dense', 1.0)]
  for form in form_names:
    if form not in FORMS_OF[kind]:
      continue
    for ratio in ratios:
      ranks = speed.rank_for_flop_ratio(form, kshape, ratio, in_shape,
                                        out_shape, spec)
      if ranks is None:
        continue
      variants.append((form, ranks, f'{ratio:g}x', ratio))
      if round_to > 1:
        bounds = ((kshape[-2], kshape[-1]) if form == 'tucker2' else
                  (min(int(np.prod(kshape[:-1])), kshape[-1]),) if
                  form == 'svd' else (10 ** 9,))
        for mode in ('down', 'up'):
          rounded = tuple(speed.round_rank(r, round_to, bound=b, mode=mode)
                          for r, b in zip(ranks, bounds))
          if rounded != ranks:
            variants.append((form, rounded, f'{ratio:g}x~{mode}{round_to}',
                             ratio))
  fns, args = [], []
  spec_run = spec if kind != 'fc' else base.DENSE
  for i, (form, ranks, _, _) in enumerate(variants):
    if form == 'dense':
      v = {'kernel': (jax.random.normal(jax.random.fold_in(key, 2), kshape) /
                      np.sqrt(np.prod(kshape[:-1]))).astype(dtype)}
    else:
      v = _random_variables(form, kshape, ranks, dtype,
                            jax.random.fold_in(key, 10 + i))
    fns.append(_fn(form, spec_run, grad))
    args.append((v, x, ct) if grad else (v, x))
  measured = speed.time_calls(fns, args, repeats=repeats,
                              min_time_s=min_time_s)
  dense_t = measured[0]
  rows = []
  for (form, ranks, label, _), m in zip(variants, measured):
    macs = (dense_macs if form == 'dense' else
            speed.split_macs(form, kshape, ranks, in_shape, out_shape, spec))
    flop_ratio = dense_macs / macs
    speedup = dense_t.median_s / m.median_s
    rows.append(dict(form=form, ranks=ranks, label=label,
                     flop_ratio=flop_ratio, ms=m.median_s * 1e3,
                     speedup=speedup, eff=speedup / flop_ratio,
                     compile_s=m.compile_s, n=len(m.times_s)))
  return rows


def shape_name(key):
  kind, c_in, c_out, k, s, h = key
  if kind == 'fc':
    return f'fc {c_in}->{c_out}'
  return f'{k}x{k} {c_in}->{c_out} s{s} @{h}x{h}'


def run(args):
  model_names = args.models.split(',')
  shapes = conv_shapes(model_names)
  if args.quick:
    keep = [('kxk', 128, 128, 3, 1, 16), ('kxk', 64, 128, 3, 2, 32),
            ('kxk', 512, 512, 3, 1, 4), ('1x1', 128, 256, 1, 2, 16)]
    shapes = {k: v for k, v in shapes.items() if k in keep}
  if args.shapes:
    pattern = re.compile(args.shapes)
    shapes = {k: v for k, v in shapes.items()
              if pattern.search(shape_name(k))}
  ratios = [float(r) for r in args.ratios.split(',')]
  form_names = args.forms.split(',')
  print(machine(), flush=True)
  lines = []
  summary = []
  start = time.perf_counter()
  for batch in [int(b) for b in args.batch.split(',')]:
    for dtype_name in args.dtype.split(','):
      dtype = jnp.dtype(dtype_name)
      for grad in ([False, True] if args.grad == 'both' else
                   [args.grad == 'only']):
        mode = 'fwd+bwd' if grad else 'fwd'
        lines.append(f'\n#### batch {batch}, {dtype_name}, {mode}\n')
        lines.append('| layer shape | form | ranks | FLOP ratio | dense ms '
                     '| split ms | speed-up | efficiency | compile s |')
        lines.append('|---|---|---|---:|---:|---:|---:|---:|---:|')
        for key, entry in shapes.items():
          rows = bench_shape(entry, batch=batch, dtype=dtype, grad=grad,
                             ratios=ratios, form_names=form_names,
                             repeats=args.repeats,
                             min_time_s=args.min_time,
                             round_to=args.round_to)
          dense_ms = rows[0]['ms']
          for r in rows[1:]:
            ranks = 'x'.join(map(str, r['ranks']))
            line = (f'| {shape_name(key)} | {r["form"]} {r["label"]} | '
                    f'{ranks} | {r["flop_ratio"]:.2f} | {dense_ms:.3f} | '
                    f'{r["ms"]:.3f} | {r["speedup"]:.2f} | {r["eff"]:.2f} | '
                    f'{rows[0]["compile_s"]:.2f} / {r["compile_s"]:.2f} |')
            lines.append(line)
            print(f'b{batch} {dtype_name} {mode} {line}', flush=True)
            summary.append(dict(r, batch=batch, dtype=dtype_name, mode=mode))
  elapsed = time.perf_counter() - start
  lines.append('')
  lines.append(_summarize(summary))
  return lines, elapsed, shapes


def _summarize(rows):
  """Median efficiency per (batch, dtype, mode, form) for FLOP ratio >= 3."""
  out = ['| batch | dtype | mode | form | cases (FLOP ratio >= 3) | '
         'median efficiency | min | cases with efficiency >= 0.6 |',
         '|---:|---|---|---|---:|---:|---:|---:|']
  groups = {}
  for r in rows:
    if r['flop_ratio'] >= 3 and '~' not in r['label']:
      groups.setdefault((r['batch'], r['dtype'], r['mode'], r['form']),
                        []).append(r['eff'])
  for (b, d, m, f), effs in groups.items():
    effs = np.array(effs)
    out.append(f'| {b} | {d} | {m} | {f} | {len(effs)} | '
               f'{np.median(effs):.2f} | {effs.min():.2f} | '
               f'{(effs >= 0.6).sum()} |')
  return '\n'.join(out)


def issue_case(args):
  """The issue's layer: 3x3 conv 128->128, batch 64 of 32x32, ranks 32/32."""
  spec = base.LayerSpec('conv')
  key = jax.random.PRNGKey(0)
  lines = ['| evaluation | dtype | mode | ms | speed-up vs dense |',
           '|---|---|---|---:|---:|']
  for dtype_name in args.dtype.split(','):
    dtype = jnp.dtype(dtype_name)
    x = jax.random.normal(key, (64, 32, 32, 128), dtype)
    kernel = (jax.random.normal(key, (3, 3, 128, 128)) / 34).astype(dtype)
    v = _random_variables('tucker2', (3, 3, 128, 128), (32, 32), dtype, key)
    orders = getattr(forms.tucker2, 'ORDERS', ())
    for grad in ([False, True] if args.grad == 'both' else
                 [args.grad == 'only']):
      ct = jax.random.normal(key, x.shape, dtype)
      fns = [_fn('dense', spec, grad), _fn('tucker2', spec, grad)]
      names = ['dense conv', 'tucker2.forward (library default)']
      vals = [{'kernel': kernel}, v]
      for order in orders:
        f = lambda v, x, o=order: forms.tucker2.forward_order(v, x, spec, o)
        if grad:
          g = f
          f = lambda v, x, ct, g=g: jax.vjp(g, v, x)[1](ct)
        fns.append(jax.jit(f))
        names.append(f'tucker2 order {order!r}')
        vals.append(v)
      measured = speed.time_calls(
          fns, [(a, x, ct) if grad else (a, x) for a in vals],
          repeats=args.repeats, min_time_s=args.min_time)
      for name, m in zip(names, measured):
        lines.append(f'| {name} | {dtype_name} | '
                     f'{"fwd+bwd" if grad else "fwd"} | '
                     f'{m.median_s * 1e3:.2f} | '
                     f'{measured[0].median_s / m.median_s:.2f} |')
  # Is a 1x1 conv better as dot_general (base.channel_matmul) than as a conv?
  lines += ['', '| 1x1 conv, batch 64, 32x32 | dtype | lax conv ms | '
            'dot_general ms | conv / dot |', '|---|---|---:|---:|---:|']
  for dtype_name in args.dtype.split(','):
    dtype = jnp.dtype(dtype_name)
    for c_in, c_out in ((128, 32), (32, 128), (128, 128)):
      x = jax.random.normal(key, (64, 32, 32, c_in), dtype)
      w = jax.random.normal(key, (c_in, c_out), dtype)
      conv_t, dot_t = speed.time_calls(
          [jax.jit(lambda w, x: _lax_conv(x, w[None, None], spec)),
           jax.jit(lambda w, x: base.channel_matmul(x, w))],
          [(w, x), (w, x)], repeats=args.repeats, min_time_s=args.min_time)
      lines.append(f'| {c_in}->{c_out} | {dtype_name} | '
                   f'{conv_t.median_s * 1e3:.2f} | {dot_t.median_s * 1e3:.2f}'
                   f' | {conv_t.median_s / dot_t.median_s:.2f} |')
  return lines


def _legacy_cp_forward(v, x, spec):
  """CP forward as it was before the speed work: two depthwise convs."""
  rank = v['cp_in'].shape[1]
  y = base.channel_matmul(x, v['cp_in'])
  (sh, sw), (dh, dw) = spec.strides, spec.dilation
  pad_h, pad_w = (base.axis_padding(spec.padding, a) for a in (0, 1))
  vert = base.LayerSpec('conv', (sh, 1), pad_h if isinstance(pad_h, str)
                        else (pad_h, (0, 0)), (dh, 1), rank)
  horiz = base.LayerSpec('conv', (1, sw), pad_w if isinstance(pad_w, str)
                         else ((0, 0), pad_w), (1, dw), rank)
  y = _lax_conv(y, v['cp_h'][:, None, None, :], vert)
  y = _lax_conv(y, v['cp_w'][None, :, None, :], horiz)
  return base.channel_matmul(y, v['cp_out'])


def _lax_conv(x, kernel, spec, *, groups=None):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=tuple(spec.strides),
      padding=base._lax_padding(spec.padding),
      rhs_dilation=tuple(spec.dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=spec.groups if groups is None else groups)


def use_legacy_forms():
  """Runs the forms as before the speed work (for before/after numbers).

  Every conv goes straight to ``lax.conv_general_dilated`` (no patch-matmul
  path for maps smaller than the window), Tucker-2 and SVD always run
  factored (no order choice), CP runs its depthwise filters as grouped convs.
  """
  base.conv = _lax_conv
  for name in ('tucker2', 'svd'):
    module = forms.get(name)
    module.forward = (lambda m: lambda v, x, spec: m.forward_order(
        v, x, spec, 'factored'))(module)
  forms.get('cp').forward = _legacy_cp_forward


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet18,vgg16')
  p.add_argument('--batch', default='128', help='comma list, e.g. 1,128')
  p.add_argument('--dtype', default='float32', help='float32,bfloat16')
  p.add_argument('--grad', default='no', choices=['no', 'only', 'both'],
                 help='time forward+backward instead of / besides forward')
  p.add_argument('--ratios', default='2,4,8')
  p.add_argument('--forms', default='tucker2,cp,svd')
  p.add_argument('--shapes', default='', help='regex on the shape name')
  p.add_argument('--round-to', type=int, default=0,
                 help='also time ranks rounded to this multiple')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--min-time', type=float, default=0.2,
                 help='least total timed seconds per function')
  p.add_argument('--quick', action='store_true')
  p.add_argument('--issue', action='store_true')
  p.add_argument('--no-doc', action='store_true')
  p.add_argument('--legacy', action='store_true',
                 help='time the forms as before the speed work')
  p.add_argument('--tag', default='', help='doc section key (default: args)')
  args = p.parse_args(argv)
  command = 'python bench/bench_layers.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  if args.legacy:
    use_legacy_forms()
  start = time.perf_counter()
  if args.issue:
    lines = issue_case(args)
    text = '\n'.join(lines)
    print(text)
    elapsed = time.perf_counter() - start
    key = args.tag or f'issue {args.dtype} {args.grad} {args.legacy}'
    header = ('### Issue case: 3x3 conv 128->128, batch 64, 32x32, ranks '
              '32/32' + (', LEGACY forms (before)' if args.legacy else ''))
  else:
    lines, elapsed, _ = run(args)
    text = '\n'.join(lines)
    print(lines[-1])
    key = args.tag or ' '.join(
        f'{k}={getattr(args, k)}' for k in ('models', 'batch', 'dtype', 'grad',
                                            'ratios', 'forms', 'shapes',
                                            'round_to', 'quick', 'legacy'))
    header = (f'### Layers: {args.models}, batch {args.batch}, {args.dtype}'
              + (', LEGACY forms (before)' if args.legacy else ''))
  elapsed = time.perf_counter() - start
  body = (f'{header}\n\n`{command}` — {elapsed:.0f} s wall.\n'
          f'Machine: {machine()}.\n{text}\n')
  print(f'\n{elapsed:.0f} s')
  if not args.no_doc:
    write_docs(key, body)


if __name__ == '__main__':
  main()
