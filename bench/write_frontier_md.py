"""The benchmark models' frontier section of docs/results.md and its plot.

Called by bench/write_results_md.py. For each model of bench/results.py
SETTINGS with FLOPs ``targets`` (untagged CPU rows of docs/results.json):
the table of direct / he2024 / musco, the fine-tuning schedule, the
rank-selection ablation (EVBMF vs uniform-ratio ranks), the plot
``docs/frontier_<model>.png`` and the goals, every number from the rows.
"""

from __future__ import annotations

import importlib
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = ('direct', 'he2024', 'musco')
ABLATION = ('direct_evbmf', 'direct_uniform')
LABELS = {'direct_evbmf': 'EVBMF ranks',
          'direct_uniform': 'uniform-ratio ranks at EVBMF\'s ratio'}


def pct(values):
  """'93.12 ± 0.05' (mean ± half-range, in %) of accuracies; '–' if none."""
  values = [v for v in values if v is not None]
  if not values:
    return '–'
  mean = 100 * statistics.mean(values)
  if len(values) == 1:
    return f'{mean:.2f}'
  spread = 100 * (max(values) - min(values)) / 2
  return f'{mean:.2f} ± {spread:.2f}'


def ratios(values):
  """'3.98×/4.01×': the distinct ratios, to two decimals."""
  values = sorted(set(round(v, 2) for v in values))
  return '/'.join(f'{v:.2f}×' for v in values) or '–'


def _mean(rows, field):
  return statistics.mean(r[field] for r in rows)


def _half_range(values):
  return (max(values) - min(values)) / 2


def _seeds(rows):
  return ','.join(str(s) for s in sorted({r['seed'] for r in rows}))


def groups(rows):
  """``{(pipeline, target): [rows over seeds]}``: targets for direct and
  he2024, None for musco (its own stages) and the ablation."""
  out = {}
  for r in rows:
    out.setdefault((r['pipeline'], r.get('target')), []).append(r)
  return out


def schedule_text(model, s):
  """The schedule the rows ran, from SETTINGS ``s`` and configs/<model>.py."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  c = importlib.import_module(f'configs.{model}').get_config()
  images = f'{s["train_subset"]:,}' if s['train_subset'] else 'all training'
  he_epochs = c.he2024.num_epochs or s['num_epochs']
  musco_epochs = s.get('musco_finetune_epochs', s['finetune_epochs'])
  nesterov = ' (Nesterov)' if c.get('nesterov') else ''
  return (f'**Schedule** (bench/results.py SETTINGS, configs/{model}.py): '
          f'the dense baseline trains {s["num_epochs"]} epochs on {images} '
          f'images ({c.optimizer} optimizer{nesterov}, lr '
          f'{c.learning_rate:g}, '
          f'{c.schedule} with {c.warmup_epochs:g} warm-up epoch(s), batch '
          f'{c.batch_size}, weight decay {c.weight_decay:g}); he2024 trains '
          f'its over-parameterized network (expansion '
          f'{c.he2024.expansion:g}, orthogonal penalty '
          f'{c.he2024.penalty_weight:g}) for {he_epochs} epochs the same '
          f'way. Fine-tuning after a split: {s["finetune_epochs"]} epochs at '
          f'lr {c.finetune.learning_rate:g} ({c.finetune.warmup_epochs:g} '
          f'warm-up); musco: {s["musco_stages"]} stages × {musco_epochs} '
          f'epochs (weakened VBMF, w = {c.musco.weaken:g}, early stopping '
          f'after {c.musco.patience}) from the direct baseline. Flags of '
          f'every row: `{" ".join(s["extra"])}`.')


def frontier_table(rows):
  """Lines of the direct / he2024 / musco table, by FLOPs target (musco
  at its measured ratio)."""
  out = ['| target | pipeline | seeds | dense baseline | trained | '
         'split → final | params | params · FLOPs ratio |',
         '|---|---|---|---|---|---|---|---|']
  mine = groups([r for r in rows if r['pipeline'] in PIPELINES])
  order = sorted(mine, key=lambda k: (k[1] or _mean(mine[k], 'flops_ratio'),
                                      PIPELINES.index(k[0])))
  for pipeline, target in order:
    rs = mine[(pipeline, target)]
    params = '/'.join(sorted({f'{r["params"]:,}' for r in rs}))
    out.append(
        f'| {f"{target:g}×" if target else "its stages"} | {pipeline} | '
        f'{_seeds(rs)} | {pct([r.get("baseline_acc") for r in rs])} | '
        + (pct([r['trained_acc'] for r in rs]) if pipeline == 'he2024'
           else '–') +
        f' | {pct([r["after_compress_acc"] for r in rs])} → '
        f'**{pct([r["final_acc"] for r in rs])}** | {params} | '
        f'{ratios([r["params_ratio"] for r in rs])} · '
        f'{ratios([r["flops_ratio"] for r in rs])} |')
  return out


def compare(name_a, a, name_b, b):
  """'+0.12 points (per seed ...; within the seeds' spread)': mean of a −
  mean of b, in points, over the seeds both sides have (all seeds when
  they share none). The spread is the larger half-range over those seeds
  of the two; with fewer than two seeds on a side it is unknown. ``a``,
  ``b``: {seed: acc}."""
  paired = [s for s in sorted(a) if s in b]
  if paired:
    a, b = {s: a[s] for s in paired}, {s: b[s] for s in paired}
  diff = 100 * (statistics.mean(a.values()) - statistics.mean(b.values()))
  text = f'{diff:+.2f} points ({name_a} − {name_b}'
  if paired:
    text += '; per seed ' + ', '.join(f'{s}: {100 * (a[s] - b[s]):+.2f}'
                                      for s in paired)
  if len(a) < 2 or len(b) < 2:
    return text + '; one seed: spread unknown)', 'unknown'
  spread = 100 * max(_half_range(list(a.values())),
                     _half_range(list(b.values())))
  if abs(diff) <= spread:
    return text + f"; within the seeds' spread, ±{spread:.2f})", 'within'
  verdict = 'ahead' if diff > 0 else 'behind'
  return (text + f"; {name_a} {verdict} beyond the seeds' spread, "
          f'±{spread:.2f})', verdict)


def _by_seed(rows):
  return {r['seed']: r['final_acc'] for r in rows}


def _tally(verdicts, name_a, name_b):
  """'he2024 ahead of direct beyond the seeds' spread at 1 of 5 targets,
  ...' from :func:`compare`'s verdicts."""
  if all(v == 'unknown' for v in verdicts):
    return ('One seed only: the seeds\' spread is unknown, so no difference '
            'below can be told apart from seed noise')
  count = {v: verdicts.count(v) for v in ('ahead', 'behind', 'within',
                                          'unknown')}
  return (f'{name_a} ahead of {name_b} beyond the seeds\' spread at '
          f'{count["ahead"]} of {len(verdicts)} targets, behind at '
          f'{count["behind"]}, within the spread at {count["within"]}'
          + (f', spread unknown (one seed) at {count["unknown"]}'
             if count['unknown'] else ''))


def he2024_vs_direct(rows):
  """Lines answering: does he2024 beat direct at the same FLOPs target?"""
  g = groups(rows)
  targets = sorted(t for p, t in g if p == 'he2024' and ('direct', t) in g)
  head = ('**Does he2024 (over-parameterized training with the orthogonal '
          'penalty) beat direct at the same FLOPs ratio?** ')
  if not targets:
    return [head + 'Not measured yet (no target has both rows).']
  parts, verdicts = [], []
  for t in targets:
    text, v = compare('he2024', _by_seed(g[('he2024', t)]), 'direct',
                      _by_seed(g[('direct', t)]))
    parts.append(f'{t:g}×: {text}')
    verdicts.append(v)
  return [head + _tally(verdicts, 'he2024', 'direct') + '. Per target: '
          + '; '.join(parts) + '.']


# How far (as a factor) a direct row may lie from musco's ratio, outside
# the rows, and still stand in for direct there.
NEAR = 1.1


def direct_at(direct, ratio):
  """``(accuracy, how)``: one seed's direct rows at a FLOPs ratio,
  interpolated linearly in log(ratio) between the measured rows around
  it, or the nearest row when it lies outside them but within a factor
  ``NEAR``; beyond that the accuracy is None (nothing to compare with)."""
  pts = sorted((r['flops_ratio'], r['final_acc']) for r in direct)
  below = [p for p in pts if p[0] <= ratio]
  above = [p for p in pts if p[0] >= ratio]
  if below and above:
    (x0, y0), (x1, y1) = below[-1], above[0]
    w = 0 if x1 == x0 else math.log(ratio / x0) / math.log(x1 / x0)
    return y0 + w * (y1 - y0), (f'interpolated between its {x0:.2f}× '
                                f'and {x1:.2f}× rows')
  x, y = min(pts, key=lambda p: abs(math.log(p[0] / ratio)))
  if abs(math.log(x / ratio)) > math.log(NEAR):
    lo, hi = f'{pts[0][0]:.2f}×', f'{pts[-1][0]:.2f}×'
    return None, 'not compared: its rows ' + (
        f'span {lo}–{hi}' if lo != hi else f'are at {lo}')
  return y, f'from its nearest row, at {x:.2f}× (not the same ratio)'


def musco_vs_direct(rows):
  """Lines answering: does multi-stage musco beat one-shot direct at the
  ratio musco reached? Per seed against that seed's direct rows, where
  they reach that ratio (:func:`direct_at`)."""
  head = ('**Does multi-stage (musco) beat one-shot direct at the same '
          'FLOPs ratio?** ')
  musco = [r for r in rows if r['pipeline'] == 'musco']
  direct = [r for r in rows if r['pipeline'] == 'direct']
  pairs = [(m, [d for d in direct if d['seed'] == m['seed']]) for m in musco]
  pairs = [(m, ds) for m, ds in pairs if ds]
  if not pairs:
    return [head + 'Not measured yet (no seed has musco and direct rows).']
  at = {m['seed']: direct_at(ds, m['flops_ratio']) for m, ds in pairs}
  hows = '; '.join(f'seed {m["seed"]}: musco at {m["flops_ratio"]:.2f}×, '
                   f'direct {at[m["seed"]][1]}' for m, _ in pairs)
  pairs = [(m, ds) for m, ds in pairs if at[m['seed']][0] is not None]
  if not pairs:
    return [head + 'Not measured yet: no seed has direct rows at or near '
            f'musco\'s ratio ({hows}); direct at targets on both sides of '
            'it would answer it.']
  text, _ = compare('musco', _by_seed(m for m, _ in pairs), 'direct',
                    {m['seed']: at[m['seed']][0] for m, _ in pairs})
  return [head + f'At musco\'s measured ratio: {text}. Direct is taken '
          f'there per seed, from that seed\'s direct rows ({hows}).']


def ablation(rows, model):
  """Lines of the rank-selection ablation: EVBMF vs uniform-ratio ranks."""
  out = ['', '### Rank selection: EVBMF vs uniform-ratio ranks', '',
         'From the same direct baseline, split once with EVBMF ranks '
         '(`rank_rule=vbmf`) and once with uniform-ratio ranks '
         '(`rank_rule=flops_ratio`: each layer keeps ceil(f · size) ranks '
         'per mode, one f for the network) at the FLOPs ratio EVBMF '
         'reached; fine-tuned alike. So the comparison is at EVBMF\'s own '
         'ratio, whatever it is.', '']
  g = groups([r for r in rows if r['pipeline'] in ABLATION])
  if not g:
    return out + ['Not run yet: `python bench/results.py --models '
                  f'{model} --ablation --seeds 0 1`.']
  out += ['| ranks | seeds | dense baseline | split → final | params | '
          'params · FLOPs ratio |', '|---|---|---|---|---|---|']
  for p in ABLATION:
    rs = [r for (q, _), v in g.items() if q == p for r in v]
    if rs:
      out.append(f'| {LABELS[p]} | {_seeds(rs)} | '
                 f'{pct([r.get("baseline_acc") for r in rs])} | '
                 f'{pct([r["after_compress_acc"] for r in rs])} → '
                 f'**{pct([r["final_acc"] for r in rs])}** | '
                 + '/'.join(sorted({f'{r["params"]:,}' for r in rs})) +
                 f' | {ratios([r["params_ratio"] for r in rs])} · '
                 f'{ratios([r["flops_ratio"] for r in rs])} |')
  e = [r for r in rows if r['pipeline'] == 'direct_evbmf']
  u = [r for r in rows if r['pipeline'] == 'direct_uniform']
  if e and u:
    text, _ = compare('EVBMF', _by_seed(e), 'uniform', _by_seed(u))
    out += ['', f'EVBMF − uniform at EVBMF\'s ratio: {text}.']
  return out


def _long_finetune_groups(rows):
  """``{(pipeline, target): rows}`` of the longer fine-tuning rows
  (``<pipeline>_ft<N>``, bench/results.py --finetune-epochs)."""
  return {k: v for k, v in groups(rows).items()
          if k[0].split('_ft')[0] in PIPELINES and '_ft' in k[0]}


def long_finetune(rows, model, intro=True):
  """Lines of the longer fine-tuning rows against the plain rows at the
  same target: the same split, only the fine-tuning epochs differ (with
  ``intro``, under a heading and its text)."""
  g = _long_finetune_groups(rows)
  if not g:
    return []
  plain = groups(rows)
  out = []
  if intro:
    out += ['', '### Longer fine-tuning', '',
            'The same splits as the rows above (direct from the same dense '
            'baseline, he2024 from the same collapsed network, same ranks), '
            'fine-tuned for more epochs at the same peak learning rate and '
            'schedule shape: does the gap to the dense baseline close with '
            'fine-tuning, or is it the capacity of the split network? '
            f'`python bench/results.py --models {model} --finetune-epochs N '
            '--targets T --pipelines he2024 direct --seeds 0 1`.']
  out += ['',
          '| target | pipeline | fine-tuning epochs | seeds | dense baseline '
          "| final | same split, schedule's epochs | longer − schedule's |",
          '|---|---|---|---|---|---|---|---|']
  for (label, target), rs in sorted(g.items(), key=lambda kv: kv[0][::-1]):
    base = plain.get((label.split('_ft')[0], target), [])
    same = [b for b in base if b['seed'] in {r['seed'] for r in rs}]
    gain = (compare(label, _by_seed(rs), 'schedule', _by_seed(same))[0]
            if same else 'no plain row')
    kd = rs[0].get('distill_weight')
    out.append(f'| {target:g}× | {label.split("_ft")[0]}'
               + (f', distilled ({kd:g})' if kd else '') + ' | '
               f'{rs[0].get("finetune_epochs", "?")} | {_seeds(rs)} | '
               f'{pct([r.get("baseline_acc") for r in rs])} | '
               f'**{pct([r["final_acc"] for r in rs])}** | '
               f'{pct([b["final_acc"] for b in same])} | {gain} |')
  return out + _distilled_vs_not(g)


def _distilled_vs_not(g):
  """Lines comparing each distilled group (``..._kd<w>``) with the group
  fine-tuned as long without distillation, where both exist."""
  out = []
  for (label, target), rs in sorted(g.items(), key=lambda kv: kv[0][::-1]):
    plain = g.get((label.split('_kd')[0], target))
    if '_kd' not in label or not plain:
      continue
    text, _ = compare(label, _by_seed(rs), label.split('_kd')[0],
                      _by_seed(plain))
    out += ['', f'Distilled from the network before the split (weight '
            f'{rs[0]["distill_weight"]:g}, temperature 4) against the same '
            f'{rs[0].get("finetune_epochs", "?")} fine-tuning epochs '
            f'without, at the {target:g}× target: {text}.']
  return out


def distilled_section(rows, command):
  """Lines of the distillation check (docs/results_distill.json): one
  model's direct and he2024 rows at one target, trained again on one VM,
  and that split fine-tuned longer with and without distillation;
  ``command`` made the base rows."""
  if not rows:
    return []
  model = rows[0]['model']
  out = ['', f'### Distillation on a split of {model}', '',
         'Does fine-tuning distilled from the network before the split '
         '(`finetune.distill_weight`, temperature 4) close the gap? The '
         'dense baseline and the he2024 network of the seed below trained '
         'again on one VM (training differs across CPUs, so these rows are '
         'compared only with each other), split at the same target, then '
         'fine-tuned for the schedule\'s epochs, for longer, and for longer '
         f'distilled: `{command}`, then the same with `--finetune-epochs N '
         '--pipelines he2024` and `--distill W`.']
  out += long_finetune(rows, model, intro=False)
  return out + ['', goal_half_point(rows)[0].replace(
      'with the best pipeline', 'with the best of these rows')]


def long_label(pipeline):
  """'he2024, fine-tuned 10 epochs[, distilled (0.5)]' for a longer
  fine-tuning row's pipeline (``he2024_ft10[_kd0.5]``)."""
  base, _, rest = pipeline.partition('_ft')
  epochs, _, kd = rest.partition('_kd')
  return (f'{base}, fine-tuned {epochs} epochs'
          + (f', distilled ({kd})' if kd else ''))


def _label(pipeline, target):
  return f'{pipeline} at the {target:g}× target' if target else pipeline


def _seed_note(rs):
  n = len({r['seed'] for r in rs})
  return f'{n} seeds' if n > 1 else 'one seed: spread unknown'


def goal_half_point(rows):
  """Goal: ≤ 0.5 points below the dense baseline at ≥ 4× fewer FLOPs
  (every seed's measured ratio), best group, on a ≥ 93% baseline."""
  head = ('**Goal: ≤ 0.5 points below the dense baseline at ≥ 4× fewer '
          'FLOPs, with the best pipeline, on a ≥ 93% baseline:')
  cands = [(k, rs) for k, rs in groups(rows).items()
           if all(r['flops_ratio'] >= 4 - 1e-9 and
                  r.get('baseline_acc') is not None for r in rs)]
  if not cands:
    return [head + ' not measured yet.** No row at ≥ 4× fewer FLOPs yet.']
  (p, t), rs = max(cands, key=lambda kv: _mean(kv[1], 'final_acc') -
                   _mean(kv[1], 'baseline_acc'))
  base = _mean(rs, 'baseline_acc')
  gap = 100 * (base - _mean(rs, 'final_acc'))
  met = gap <= 0.5 and base >= 0.93
  why = [w for w, bad in (('more than 0.5', gap > 0.5),
                          ('the baseline is under 93%', base < 0.93)) if bad]
  return [f'{head} {"met" if met else "not met"}.** Best at ≥ 4×: '
          f'{_label(p, t)} ({ratios([r["flops_ratio"] for r in rs])} fewer '
          f'FLOPs, {_seed_note(rs)}) ends at '
          f'{pct([r["final_acc"] for r in rs])}% against its dense baseline '
          f'{pct([r["baseline_acc"] for r in rs])}%: {abs(gap):.2f} points '
          + ('below' if gap >= 0 else 'above')
          + (f' ({"; ".join(why)}).' if why else '.')]


def goal_small(rows):
  """Goal: a compressed network under 100k parameters at ≥ 93% (mean over
  the seeds of the best group)."""
  head = ('**Goal: a compressed network under 100k parameters at ≥ 93% '
          'test accuracy:')
  cands = [(k, rs) for k, rs in groups(rows).items()
           if all(r['params'] < 100_000 for r in rs)]
  if not cands:
    return [head + ' not measured yet.** No compressed row under 100k.']
  (p, t), rs = max(cands, key=lambda kv: _mean(kv[1], 'final_acc'))
  met = _mean(rs, 'final_acc') >= 0.93
  params = '/'.join(sorted({f'{r["params"]:,}' for r in rs}))
  return [f'{head} {"met" if met else "not met"}.** The best group under '
          f'100k parameters is {_label(p, t)} ({params} parameters, '
          f'{_seed_note(rs)}) at {pct([r["final_acc"] for r in rs])}% (mean '
          f'over seeds; best single run '
          f'{100 * max(r["final_acc"] for r in rs):.2f}%).']


def plot_frontier(rows, model, path):
  """Final test accuracy against the measured FLOPs ratio, per pipeline
  (bars: min–max over seeds), the dense baseline as a line; to ``path``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4))
  styles = dict(direct='o-', he2024='s-', musco='D', direct_evbmf='^',
                direct_uniform='v')
  g, xs = groups(rows), []
  longer = sorted({p for p, _ in _long_finetune_groups(rows)})
  for i, p in enumerate(PIPELINES + ABLATION + tuple(longer)):
    pts = sorted((_mean(rs, 'flops_ratio'), [100 * r['final_acc'] for r in rs])
                 for (q, _), rs in g.items() if q == p)
    if not pts:
      continue
    x = [x for x, _ in pts]
    y = [statistics.mean(a) for _, a in pts]
    err = [[m - min(a) for m, (_, a) in zip(y, pts)],
           [max(a) - m for m, (_, a) in zip(y, pts)]]
    label = LABELS.get(p, long_label(p) if '_ft' in p else p)
    ax.errorbar(x, y, yerr=err, fmt=styles.get(p, '*'), color=f'C{i}',
                capsize=3, ms=6 if p in longer else 4, lw=1, label=label)
    xs += x
  base = {r['seed']: r['baseline_acc'] for r in rows
          if r['pipeline'] == 'direct' and r.get('baseline_acc') is not None}
  if base:
    b = 100 * statistics.mean(base.values())
    ax.axhline(b, color='gray', ls='--', lw=0.8,
               label=f'dense baseline {pct(base.values())}%')
    ax.axhline(b - 0.5, color='gray', ls=':', lw=0.8,
               label='baseline − 0.5 points')
  ax.set_xscale('log')
  ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64)
           if xs and min(xs) / 1.2 <= t <= max(xs) * 1.2]
  ax.set_xticks(ticks, [f'{t:g}×' for t in ticks])
  ax.minorticks_off()
  ax.set(xlabel='FLOPs ratio (dense / compressed, measured)',
         ylabel='final test accuracy (%)',
         title=f'{model}: accuracy against FLOPs (seeds {_seeds(rows)}; '
         'bars: min–max)')
  ax.legend(fontsize=7, loc='lower left')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# How each frontier model is named in its section's title.
ABOUT = {'vgg7b': 'the benchmark model vgg7b',
         'vgg7w': 'vgg7w, the benchmark model at twice the width (288k '
                  'parameters, room to compress)'}


def baselines_note(rows):
  """Lines naming each seed whose rows start from more than one dense
  baseline (a baseline trained again: training is not bitwise equal across
  machines), so a difference between such rows is read with that in
  mind."""
  out = []
  for seed in sorted({r['seed'] for r in rows}):
    by_acc = {}
    for r in rows:
      if r['seed'] == seed and r.get('baseline_acc') is not None:
        by_acc.setdefault(r['baseline_acc'], []).append(
            r['pipeline'] if r['pipeline'] in ABLATION
            else _label(r['pipeline'], r.get('target')))
    if len(by_acc) > 1:
      parts = '; '.join(f'{100 * acc:.2f}% for {", ".join(sorted(set(ps)))}'
                        for acc, ps in sorted(by_acc.items()))
      out.append(f'Seed {seed}: its rows start from {len(by_acc)} trainings '
                 f'of the dense baseline ({parts}); each row is compared '
                 'with its own.')
  return [''] + out if out else []


def missing(rows, s):
  """The frontier's rows not in ``rows`` yet (pipeline and target)."""
  have = {(r['pipeline'], r.get('target')) for r in rows}
  want = [(p, t) for p in ('direct', 'he2024') for t in s['targets']]
  want.append(('musco', None))
  return [_label(p, t) for p, t in want if (p, t) not in have]


def section(all_rows, settings, docs):
  """The lines of each frontier model's section; writes its plot to
  ``docs/frontier_<model>.png``."""
  rows = [r for r in all_rows.values() if not r.get('device') and
          settings.get(r['model'], {}).get('targets')]
  out = []
  for model in sorted({r['model'] for r in rows}):
    mine = [r for r in rows if r['model'] == model]
    png = f'frontier_{model}.png'
    plot_frontier(mine, model, os.path.join(docs, png))
    seeds = sorted({r['seed'] for r in mine})
    todo = missing(mine, settings[model])
    out += ['', f'## Frontier of {ABOUT.get(model, model)} (CPU)', '',
            f'{model} (docs/benchmark_model.md) trained on all training '
            'images, then compressed by `direct` (from the dense baseline) '
            'and `he2024` (its own over-parameterized training, then the '
            'collapsed network split) at each network-wide FLOPs target '
            '(`rank_rule=flops_ratio`), and by `musco` (weakened-VBMF '
            'stages from the dense baseline) at whatever ratio its stages '
            'reach: its measured ratio is in the last column. "dense '
            'baseline": the plain network trained with this schedule (the '
            'direct run\'s baseline stage; he2024 is compared with the same '
            'seed\'s); "trained": he2024\'s collapsed network before the '
            'split; "split → final": right after the split and after '
            'fine-tuning. Test accuracy in %, mean ± half-range over seeds.',
            '', schedule_text(model, settings[model]), '']
    out += frontier_table(mine)
    out += baselines_note(mine)
    if len(seeds) == 1:
      out += ['', f'One seed so far (seed {seeds[0]}): the spread over seeds '
              'is unknown.']
    if todo:
      out += ['', 'Not in docs/results.json yet: ' + ', '.join(todo) + '.']
    out += ['', f'![{model}: final test accuracy against FLOPs ratio]({png})']
    out += ablation(mine, model)
    out += long_finetune(mine, model)
    out += ['', '### Goals and questions', '',
            'Computed from the rows above. Differences are in points of '
            'test accuracy between means over seeds; "the seeds\' spread" '
            'is the larger half-range over seeds of the two sides.', '']
    for lines in (goal_half_point(mine), goal_small(mine),
                  he2024_vs_direct(mine), musco_vs_direct(mine)):
      out += lines + ['']
    out.pop()
  return out
