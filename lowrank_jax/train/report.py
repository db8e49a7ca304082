"""Reports of pipeline runs: report.json, report.md and PNG plots.

``report`` is the dict a pipeline builds as it goes:
``{'pipeline', 'model', 'dataset', 'config', 'stages': [...], 'layers':
{path: {stage name: details}}}``, where each stage has its name, wall time,
params, FLOPs (multiply-adds) and validation/test accuracy, and each layer's
details hold its shape, VBMF / weakened / chosen ranks, singular values and
EVBMF thresholds, params and FLOPs before and after.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Mapping

import numpy as np

from lowrank_jax.train import atomic


def write_report(workdir: str, report: Mapping) -> None:
  """Writes report.json, report.md and the plots into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  atomic.write_text(os.path.join(workdir, 'report.json'),
                    json.dumps(report, indent=1, default=_plain))
  plots = write_plots(workdir, report)
  atomic.write_text(os.path.join(workdir, 'report.md'),
                    to_markdown(report, plots))


def _plain(x):
  if hasattr(x, 'tolist'):
    return np.asarray(x).tolist()
  raise TypeError(f'not JSON serializable: {type(x).__name__}')


def _fmt_ranks(r):
  return '–' if r is None or len(r) == 0 else '×'.join(str(int(x)) for x in r)


def _acc(stage, split='test'):
  value = stage.get(split, {}).get('accuracy')
  return '–' if value is None or value != value else f'{100 * value:.2f}%'


def reference_stage(stages):
  """The dense trained network that ratios are taken against: the
  'baseline' stage, or he2024's 'collapse' (its first stage is the wider
  over-parameterized network)."""
  return next((s for s in stages if s['name'] in ('baseline', 'collapse')),
              stages[0])


def to_markdown(report: Mapping, plots: Mapping[str, str] = ()) -> str:
  """The report as Markdown: stages, per-layer table, totals, plots."""
  lines = [f"# {report.get('pipeline')} on {report.get('model')} / "
           f"{report.get('dataset')}", '']
  stages = report.get('stages', [])
  if stages:
    base = reference_stage(stages)
    lines += ['## Stages', '',
              f"Ratios are against `{base['name']}`.", '',
              '| stage | params | FLOPs (MACs) | params ratio | FLOPs ratio |'
              ' val acc | test acc | wall time |',
              '|---|---:|---:|---:|---:|---:|---:|---:|']
    for s in stages:
      lines.append(
          f"| {s['name']} | {s['params']:,} | {s['flops']:,} | "
          f"{base['params'] / s['params']:.2f}× | "
          f"{base['flops'] / s['flops']:.2f}× | {_acc(s, 'validation')} | "
          f"{_acc(s)} | {s.get('wall_s', 0):.1f} s |")
    lines.append('')
    if report.get('stopped'):
      lines += [f"Stopped {report['stopped']}.", '']
  layers = report.get('layers', {})
  if layers:
    lines += ['## Layers', '',
              '| stage | layer | kernel | VBMF ranks | weakened | chosen | '
              'params before → after | FLOPs before → after | note |',
              '|---|---|---|---|---|---|---|---|---|']
    for path, per_stage in layers.items():
      for stage, d in per_stage.items():
        lines.append(
            f"| {stage} | `{path}` | {_fmt_ranks(d.get('kernel_shape'))} | "
            f"{_fmt_ranks(d.get('vbmf'))} | {_fmt_ranks(d.get('weakened'))} |"
            f" {_fmt_ranks(d.get('chosen'))} | {d.get('params_before', 0):,}"
            f" → {d.get('params_after', d.get('params_before', 0)):,} | "
            f"{d.get('flops_before', 0):,} → "
            f"{d.get('flops_after', d.get('flops_before', 0)):,} | "
            f"{d.get('kept', '')} |")
    lines.append('')
  for title, name in dict(plots).items():
    lines += [f'## {title}', '', f'![{title}]({name})', '']
  return '\n'.join(lines)


def write_plots(workdir: str, report: Mapping) -> dict[str, str]:
  """Spectra with EVBMF thresholds, ranks per layer, accuracy vs FLOPs.

  Each PNG carries the SHA-256 of the data it shows (a PNG text field): a
  plot whose data has not changed since it was written (the spectra and
  ranks, after the first compression) is not drawn again. A PNG is
  written to a temporary file and then renamed over the old one.

  Returns:
    ``{title: file name}`` of the PNGs in the report.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  last = {}   # each layer's first compression
  for path, per_stage in report.get('layers', {}).items():
    if per_stage:
      last[path] = per_stage[list(per_stage)[0]]
  spectra = {p: d for p, d in last.items() if d.get('singular_values')}
  plots = (('Spectra and EVBMF thresholds', 'spectra.png', _plot_spectra,
            spectra, bool(spectra)),
           ('Ranks per layer', 'ranks.png', _plot_ranks, last, bool(last)),
           ('Accuracy against FLOPs', 'accuracy_flops.png',
            _plot_accuracy_flops, report, len(report.get('stages', [])) > 1))
  written = {}
  for title, name, plot, data, wanted in plots:
    if not wanted:
      continue
    path = os.path.join(workdir, name)
    digest = hashlib.sha256(json.dumps(
        data, sort_keys=True, default=_plain).encode()).hexdigest()
    if _png_digest(path) != digest:
      fig = plot(plt, data)
      try:
        fig.tight_layout()
        with atomic.replacing(path) as tmp:
          fig.savefig(tmp, dpi=110, format='png',
                      metadata={_DIGEST_KEY: digest})
      finally:
        plt.close(fig)
    written[title] = name
  return written


_DIGEST_KEY = 'Data SHA-256'


def _png_digest(path):
  """The data digest a plot of :func:`write_plots` carries, or None."""
  from PIL import Image  # matplotlib's own dependency
  try:
    with Image.open(path) as image:
      return image.text.get(_DIGEST_KEY)
  except (OSError, ValueError, AttributeError):  # absent, cut, not a PNG
    return None


def _plot_spectra(plt, spectra):
  """One panel per layer: singular values, thresholds, chosen ranks."""
  n = len(spectra)
  cols = min(4, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows),
                           squeeze=False)
  for ax, (path, d) in zip(axes.flat, spectra.items()):
    svs = d['singular_values']
    thresholds = d.get('threshold') or []
    labels = ('in', 'out') if len(svs) == 2 else ('',)
    for i, (s, label) in enumerate(zip(svs, labels)):
      s = np.asarray(s, float)
      ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12),
                  f'C{i}.-', ms=2, lw=0.8, label=f'σ {label}'.strip())
      if i < len(thresholds):
        ax.axhline(float(thresholds[i]), color=f'C{i}', ls='--', lw=0.8)
    for r in d.get('chosen') or []:
      ax.axvline(int(r), color='k', ls=':', lw=0.8)
    if len(svs) == 2:
      ax.legend(fontsize=6)
    ax.set_title(path, fontsize=8)
    ax.tick_params(labelsize=6)
  for ax in list(axes.flat)[n:]:
    ax.axis('off')
  fig.suptitle('Singular values (dots), EVBMF thresholds (dashed), chosen '
               'ranks (dotted)', fontsize=9)
  return fig


def _plot_ranks(plt, last):
  """Bars per layer: full width, VBMF rank and chosen rank."""
  paths = list(last)
  full = [max(d.get('kernel_shape', [0])[-1:] or [0]) for d in last.values()]
  chosen = [max(d.get('chosen') or [0]) for d in last.values()]
  vb = [max(d.get('vbmf') or [0]) for d in last.values()]
  x = np.arange(len(paths))
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(paths)), 3.2))
  ax.bar(x - 0.27, full, 0.27, label='C_out (full)')
  ax.bar(x, vb, 0.27, label='VBMF rank (max mode)')
  ax.bar(x + 0.27, chosen, 0.27, label='chosen (max mode)')
  ax.set_xticks(x, paths, rotation=75, fontsize=6)
  ax.set_yscale('log')
  ax.legend(fontsize=7)
  ax.set_title('Ranks per layer', fontsize=9)
  return fig


def _plot_accuracy_flops(plt, report):
  """Test accuracy against multiply-adds, one point per stage."""
  stages = report['stages']
  fig, ax = plt.subplots(figsize=(5, 3.2))
  flops = [s['flops'] for s in stages]
  acc = [100 * s.get('test', {}).get('accuracy', float('nan'))
         for s in stages]
  ax.plot(flops, acc, 'o-')
  for f, a, s in zip(flops, acc, stages):
    ax.annotate(s['name'], (f, a), fontsize=6, xytext=(3, 3),
                textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('multiply-adds per image')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(f"{report.get('pipeline')}: accuracy against FLOPs",
               fontsize=9)
  return fig
