"""Writes docs/results.md from docs/results.json and docs/results_adtn.json.

  python bench/write_results_md.py

The JSON files are written by bench/results.py and bench/results_adtn.py;
nothing here is typed in by hand: every number comes from a run's report.
The benchmark models' frontier sections and their plots
(docs/frontier_<model>.png) come from bench/write_frontier_md.py.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess

import hostinfo
import results as results_settings
import results_adtn as adtn_settings
import results_rows
import write_frontier_md
from write_frontier_md import pct as _pct
from write_frontier_md import ratios as _ratio

from lowrank_jax.train import pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')



def _portable(command: str) -> str:
  """A recorded command with this checkout's absolute path made relative."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return command.replace(root + os.sep, '')

def machine() -> str:
  cpu = hostinfo.cpu_name()
  import jax
  return (f'{cpu or platform.processor()}, {os.cpu_count()} cores, '
          f'{platform.system()} {platform.machine()}, Python '
          f'{platform.python_version()}, jax {jax.__version__} '
          f'({jax.default_backend()})')


def _schedule(s):
  """'3 epochs on 2,500 images' from a bench/results.py setting."""
  images = f'{s["train_subset"]:,}' if s['train_subset'] else 'all training'
  return f'{s["num_epochs"]} epochs on {images} images'


def _verdict(rows, models, goal_rows=None):
  """Lines computed from the rows: he2024 - direct, the goals, CPU time."""
  lines = ['', '**He et al. vs direct at the same FLOPs ratio** (he2024 final '
           '− direct final, points): ']
  parts = []
  for m in models:
    d = [r['final_acc'] for r in rows.values()
         if r['model'] == m and r['pipeline'] == 'direct']
    h = [r['final_acc'] for r in rows.values()
         if r['model'] == m and r['pipeline'] == 'he2024']
    if d and h:
      n = len({r['seed'] for r in rows.values() if r['model'] == m})
      gain = 100 * (statistics.mean(h) - statistics.mean(d))
      parts.append(f'{m} {gain:+.2f} '
                   f'({n} seed{"s" if n > 1 else ""})')
  lines[-1] += '; '.join(parts) + '.'
  vgg = [r for r in rows.values() if r['model'] == 'vgg16'
         and r['pipeline'] in ('direct', 'he2024', 'musco')]
  base = [r['trained_acc'] for r in vgg if r['pipeline'] == 'direct']
  if base:
    base = statistics.mean(base)
    s = results_settings.SETTINGS['vgg16']
    best = max(vgg, key=lambda r: (r['flops_ratio'] >= 4, r['final_acc']))
    lines += ['', f'**Goal: VGG-16 at ≥ 4× fewer FLOPs within 0.5 points of '
              f'the baseline.** Not met on the CPU schedule: the best run at '
              f'≥ 4× ({best["pipeline"]}, {best["flops_ratio"]:.2f}×) ends at '
              f'{100 * best["final_acc"]:.2f}% against a baseline of '
              f'{100 * base:.2f}%, and that baseline ({_schedule(s)}) is '
              'itself far from trained; with '
              f'{s["finetune_epochs"]} fine-tuning epoch(s) the compressed '
              'network cannot recover. The longer schedule '
              'this goal needs waits for a session with a GPU.']
  small = [r for r in (goal_rows or rows).values() if r['params'] < 100_000]
  if small:
    top = max(small, key=lambda r: r['final_acc'])
    met = 'Met' if top['final_acc'] >= 0.93 else 'Not met'
    lines += ['', f'**Goal: < 100k parameters at ≥ 93%, on these models** '
              '(the benchmark model\'s frontier section answers it for its '
              f'own rows). {met}: the best '
              f'compressed network under 100k parameters is '
              f'{top["model"]}/{top["pipeline"]}'
              + (f' at {top["target"]:g}× FLOPs' if top.get('target') else '')
              + (f' on {top["device"]}' if top.get('device') else '') +
              f' with {top["params"]:,} parameters at '
              f'{100 * top["final_acc"]:.2f}%.']
  total = sum(r['run_s'] for r in rows.values())
  first_seed = {m: sum(r['run_s'] for r in rows.values()
                       if r['model'] == m and r['seed'] == 0) for m in models}
  lines += ['', f'CPU time of all runs in this table: {total / 60:.0f} min '
            f'({len(rows)} runs; one seed of each model: '
            + ', '.join(f'{m} {t / 60:.0f} min' for m, t in first_seed.items())
            + ').']
  return lines


def _pipeline_rows(rows, models):
  """One line per model of the direct / he2024 / musco table."""
  out = []
  for m in models:
    get = lambda p: [r for r in rows.values()
                     if r['model'] == m and r['pipeline'] == p]
    d, h, mu = get('direct'), get('he2024'), get('musco')
    seeds = sorted({r['seed'] for r in d + h + mu})
    out.append(
        f'| {m} | {",".join(map(str, seeds))} | '
        f'{_pct([r["trained_acc"] for r in d])} | '
        f'{_pct([r["after_compress_acc"] for r in d])} → '
        f'**{_pct([r["final_acc"] for r in d])}** | '
        f'{_pct([r["trained_acc"] for r in h])} → '
        f'{_pct([r["after_compress_acc"] for r in h])} → '
        f'**{_pct([r["final_acc"] for r in h])}** | '
        f'{_ratio([r["params_ratio"] for r in d + h])} · '
        f'{_ratio([r["flops_ratio"] for r in d + h])} | '
        f'**{_pct([r["final_acc"] for r in mu])}** | '
        f'{_ratio([r["params_ratio"] for r in mu])} · '
        f'{_ratio([r["flops_ratio"] for r in mu])} |')
  return out


def _gpu_sections(rows):
  """Full-schedule rows per device (bench/gpu_suite.sh)."""
  out = []
  for device in sorted({r['device'] for r in rows.values()
                        if r.get('device')}):
    mine = {k: r for k, r in rows.items() if r.get('device') == device}
    models = [m for m in ('resnet20', 'vgg16', 'resnet18')
              if any(r['model'] == m for r in mine.values())]
    out += ['', f'## Full schedules on {device}', '',
            'Written by `bench/gpu_suite.sh` (bench/results.py '
            '`--schedule full`): the configs\' own epochs on all training '
            'images. Columns as in the first table.', '',
            '| model | seeds | baseline (trained) | direct split → final | '
            'he2024 trained → split → final | direct/he2024 params · FLOPs '
            'ratio | musco final | musco params · FLOPs ratio |',
            '|---|---|---|---|---|---|---|---|']
    out += _pipeline_rows(mine, models)
    for r in mine.values():
      if r['pipeline'] == 'adtn':
        out += ['', f'{r["model"]} (ADTN, full schedule): trained '
                f'{_pct([r["trained_acc"]])} → final '
                f'**{_pct([r["final_acc"]])}**, {r["params"]:,} params '
                f'({r["params_ratio"]:.2f}× fewer).']
  return out


def _sweep_order(x):
  return (x['key'], bool(x.get('normalize')), x.get('distill_weight', 0.0),
          x['train_epochs'], adtn_settings.train_lr_of(x), x['depth'])


def _sweep_label(x):
  """'M=4 24 epochs', with ' at lr 0.01' where the rate is not the
  row's default, ' normalized' for the normalized decode and ' distilled
  (0.5)' for training distilled from the baseline at that weight."""
  lr = adtn_settings.train_lr_of(x)
  kd = x.get('distill_weight', 0.0)
  return (f'M={x["depth"]} {x["train_epochs"]} epochs'
          + ('' if lr == adtn_settings.default_train_lr(x['key'])
             else f' at lr {lr:g}')
          + (' normalized' if x.get('normalize') else '')
          + (f' distilled ({kd:g})' if kd else ''))


def _collapsed_note(key, runs, factor=pipelines.COLLAPSE_FACTOR):
  """A line naming the runs whose decoded kernels' norms fell more than
  ``factor``-fold in training (``kernel_norms`` of the rows; older rows
  carry no ``collapsed_layers``)."""
  def norms(x, only=None):
    return (f'{_sweep_label(x)} ({_pct([x["adtn_final_acc"]])}%: '
            + ', '.join(f'{p} {a:.3g} → {b:.3g}' for p, (a, b) in
                        sorted(x['kernel_norms'].items())
                        if only is None or p in only) + ')')
  parts, kept = [], []
  for x in runs:
    fell = pipelines.collapsed_layers(x.get('kernel_norms') or {}, factor)
    if fell:
      parts.append(norms(x, fell))
    elif x.get('normalize') and x.get('kernel_norms'):
      kept.append(norms(x))
  if not parts:
    return []
  return ['', f'{key}: in ' + '; '.join(parts) + ', the decoded kernels\' '
          f'norms fell more than {factor:g}-fold in training (norm after '
          'encoding → after training, from the runs\' saved stages), so '
          'those layers passed almost nothing: the network fell to chance '
          'although the SVD side at the same budget trained.'
          + (' With the normalized decode the norms stay at the learned '
             'scale: ' + '; '.join(kept) + '.' if kept else '')]


def adtn_depth_sweep(sweep, rows=None):
  """Lines of the ADTN depth sweep (``"_depth_sweep"`` of results_adtn.json).

  One table row per run (model, depth M, end-to-end epochs), with the rows of
  the main table (``rows``: ``{key: row}``) of the swept models as references,
  then per model whether an ADTN came within 0.5 points of its baseline, and
  the commands.
  """
  swept = sweep['runs']
  refs = [dict(r, key=key, reference=True, train_epochs=r.get(
              'train_epochs', adtn_settings.SETTINGS[key]['train_epochs']))
          for key, r in (rows or {}).items()
          if key in {x['key'] for x in swept}]
  runs = sorted(swept + refs, key=_sweep_order)
  if not swept:
    return []
  out = ['', '### More capacity: ADTN depth and training length', '',
         'Do the ADTN rows come within 0.5 points of their baselines with '
         'more capacity? Whole rows (ADTN and SVD at its budget, same '
         'baseline and initial fit as the rows above) at larger depths M, '
         'with more end-to-end epochs, at another peak learning rate '
         '(lr, both sides), with the normalized decode (decode: '
         '"normalized", `adtn.normalize=True`: the decoded entries divided '
         'by their norm, so the kernel\'s norm is the learned scale\'s and '
         'cannot collapse with the gates\' product; "plain" otherwise) or '
         'distilled from the baseline (decode "+ distilled (w)", both '
         'sides: `finetune.distill_weight=w`, temperature 4); '
         'one seed each; '
         'parameters of the encoded layers without their biases (which '
         'neither form changes), SVD at the smallest rank whose factors are '
         'not below the ADTN\'s. Gap: baseline minus ADTN after training, '
         'in points. "row above": the model\'s row of the first ADTN table.',
         '',
         '| model | M | epochs | lr | decode | ADTN params (dense) | baseline '
         '| ADTN after encoding → after training | gap | SVD rank (params) | '
         'SVD after split → after training | ADTN training time |',
         '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for x in runs:
    gap = 100 * (x['baseline_acc'] - x['adtn_final_acc'])
    ranks = '/'.join(str(r) for r in x['svd_ranks'].values())
    train_s = x.get('adtn_train_s')
    factors = x.get('svd_factor_params')
    out.append(
        f'| {x["key"]}{" (row above)" if x.get("reference") else ""} | '
        f'{x["depth"]} | {x["train_epochs"]} | '
        f'{adtn_settings.train_lr_of(x):g} | '
        f'{"normalized" if x.get("normalize") else "plain"}'
        + (f' + distilled ({x["distill_weight"]:g})'
           if x.get('distill_weight') else '') + ' | '
        f'{x["adtn_params"]:,} ({x["dense_params"]:,}) | '
        f'{_pct([x["baseline_acc"]])} | '
        f'{_pct([x["adtn_after_encode_acc"]])} → '
        f'**{_pct([x["adtn_final_acc"]])}** | {gap:.2f} | '
        f'{ranks} ({"–" if factors is None else f"{factors:,}"}) | '
        f'{_pct([x["svd_after_split_acc"]])} → '
        f'**{_pct([x["svd_final_acc"]])}** | '
        + (f'{train_s:.0f} s' if train_s is not None else '–') + ' |')
  for key in sorted({x['key'] for x in runs}):
    mine = [x for x in runs if x['key'] == key]
    gaps = {id(x): 100 * (x['baseline_acc'] - x['adtn_final_acc'])
            for x in mine}
    met = [x for x in mine if gaps[id(x)] <= 0.5]
    best = min(mine, key=lambda x: gaps[id(x)])
    if met:
      x = min(met, key=lambda x: x['adtn_params'])
      verdict = (f'within 0.5 points of its baseline at {_sweep_label(x)}: '
                 f'{_pct([x["adtn_final_acc"]])}'
                 f'% against {_pct([x["baseline_acc"]])}% with '
                 f'{x["adtn_params"]:,} parameters for '
                 f'{x["dense_params"]:,} dense weights (one seed; its '
                 f'{x["train_epochs"]} end-to-end epochs come on top of the '
                 'baseline\'s training, which the dense baseline does not '
                 'get; the SVD at its budget, trained as long, '
                 f'{_pct([x["svd_final_acc"]])}%)')
    else:
      verdict = (f'*not* within 0.5 points of its baseline in any run ('
                 + ', '.join(_sweep_label(x) for x in mine) + '); '
                 f'closest {_sweep_label(best)}: '
                 f'{_pct([best["adtn_final_acc"]])}% against '
                 f'{_pct([best["baseline_acc"]])}%, '
                 f'{gaps[id(best)]:.2f} points below, with '
                 f'{best["adtn_params"]:,} parameters for '
                 f'{best["dense_params"]:,} dense weights')
    svd_best = max(mine, key=lambda x: x['svd_final_acc'])
    out += ['', f'{key}: ADTN {verdict}. SVD at the same budgets: best '
            f'{_pct([svd_best["svd_final_acc"]])}% (rank '
            f'{"/".join(str(r) for r in svd_best["svd_ranks"].values())}'
            + (f', {svd_best["svd_factor_params"]:,} parameters'
               if svd_best.get('svd_factor_params') else '') + ').']
    out += _collapsed_note(key, mine)
  commands = {}
  for x in swept:
    setting = adtn_settings.SETTINGS[x['key']]
    extra = ('' if x['train_epochs'] == setting['train_epochs']
             else f' --train-epochs {x["train_epochs"]}')
    lr = adtn_settings.train_lr_of(x)
    if lr != adtn_settings.default_train_lr(x['key']):
      extra += f' --train-lr {lr:g}'
    if x.get('normalize'):
      extra += ' --normalize'
    if x.get('distill_weight'):
      extra += f' --distill {x["distill_weight"]:g}'
    commands.setdefault((x['key'], extra), []).append(str(x['depth']))
  out += ['', 'Made by ' + '; '.join(
      f'`python bench/results_adtn.py --depth-sweep {" ".join(d)} '
      f'--models {key}{extra}`' for (key, extra), d in commands.items())
      + '. Runs:', '']
  for x in sorted(swept, key=_sweep_order):
    svd = ('SVD side kept from the previous run' if x.get('svd_reused')
           else 'then the SVD side')
    out.append(f'* `{x["key"]}` {_sweep_label(x)} '
               f'({x["run_s"]:.0f} s, {svd}): `{_portable(x["command"])}`')
  return out


def _distill_lines(path):
  """The distillation check's section and runs, from ``path`` (rows of
  bench/results.py ``--results docs/results_distill.json``), if any."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = json.load(f)
  base = [r for r in rows.values() if r['pipeline'] in ('direct', 'he2024')]
  if not base:
    return []
  root = os.path.dirname(results_rows.workdir_of(base[0]))
  command = (
      f'python bench/results.py --models {base[0]["model"]} --seeds '
      + ' '.join(str(x) for x in sorted({r['seed'] for r in base}))
      + ' --targets ' + ' '.join(f'{t:g}' for t in sorted(
          {r['target'] for r in base}))
      + ' --pipelines direct he2024 --root '
      + os.path.relpath(root, results_rows.ROOT)
      + ' --results docs/results_distill.json')
  out = write_frontier_md.distilled_section(list(rows.values()), command)
  out += ['', 'Its runs:', '']
  for key, r in rows.items():
    secs = r.get('wall_s', r['run_s'])
    out.append(f'* `{key}` ({secs:.0f} s): `{_portable(r["command"])}`')
  return out


def main():
  with open(os.path.join(DOCS, 'results.json')) as f:
    rows = json.load(f)
  adtn = {}
  if os.path.exists(os.path.join(DOCS, 'results_adtn.json')):
    with open(os.path.join(DOCS, 'results_adtn.json')) as f:
      adtn = json.load(f)
  # The 90-minute CPU table: untagged rows of the SETTINGS models without
  # a frontier; vgg7's frontier and device-tagged (GPU) rows get their own
  # sections.
  all_rows = rows
  rows = {k: r for k, r in all_rows.items() if not r.get('device')
          and not results_settings.SETTINGS.get(r['model'], {}).get('targets')}
  models = sorted({r['model'] for r in rows.values()},
                  key=['lenet5', 'resnet20', 'vgg16', 'resnet18'].index)
  out = ['# Measured results', '',
         'Fashion-MNIST (offline, Debian `dataset-fashion-mnist`), test '
         'accuracy in %. Written by `python bench/write_results_md.py` from '
         'the reports of the runs below; each run\'s exact command is listed '
         'under the tables.', '',
         f'Page written on: {machine()}. The runs are those of several '
         'sessions, each on a 2-core CPU VM: AMD EPYC VMs at first, '
         'an Intel Xeon VM since 2026-12-07 (the training is not bitwise '
         'equal across CPUs). No GPU was lent, so only the CPU schedules '
         'were run.', '',
         '**CPU budget.** The whole table must run within 90 minutes on 2 '
         'cores, so epochs are few and ResNet-20 / VGG-16 train on subsets '
         '(settings in `bench/results.py`: ' + '; '.join(
             f'{m} {_schedule(s)}' + (f', tested on {s["test_subset"]:,} '
                                      'test images' if s.get('test_subset')
                                      else '')
             for m, s in results_settings.SETTINGS.items()
             if not s.get('targets')) +
         '). These are far from '
         'converged baselines: the accuracy *differences* between pipelines '
         'at a matched ratio are the point, not the absolute numbers.', '',
         '## Direct vs He et al. 2024 vs MUSCO', '',
         '`direct` and `he2024` use `rank_rule=flops_ratio` with the same '
         'network-wide FLOPs target, so they are compared at exactly the '
         'same compression; `musco` uses weakened VBMF (w = 0.8) from the '
         'direct run\'s baseline and reaches whatever ratio its stages '
         'reach. "trained" is the network before compression (the baseline, '
         'or the collapsed over-parameterized network for he2024); '
         '"split" right after the split, "final" after fine-tuning. Mean ± '
         'half-range over seeds where there are several.', '',
         '| model | seeds | baseline (trained) | direct split → final | '
         'he2024 trained → split → final | direct/he2024 params · FLOPs '
         'ratio | musco final | musco params · FLOPs ratio |',
         '|---|---|---|---|---|---|---|---|']
  out += _pipeline_rows(rows, models)
  # The goal of < 100k parameters over the table's and the GPU rows; the
  # frontier section states it for its own model.
  goal_rows = {k: r for k, r in all_rows.items() if k in rows or
               r.get('device')}
  out += _verdict(rows, models, goal_rows)
  out += write_frontier_md.section(all_rows, results_settings.SETTINGS, DOCS)
  out += _distill_lines(os.path.join(DOCS, 'results_distill.json'))
  out += _gpu_sections(all_rows)
  missing = [m for m in ('lenet5', 'resnet20', 'vgg16') if m not in models]
  if missing:
    out += ['', f'Not run yet: {", ".join(missing)} (`python bench/results.py '
            f'--models {" ".join(missing)}`); the session that wrote this page '
            'ran out of time for them.']
  out += ['', '### Runs', '',
          'Each with the wall time of its stages (report.json; a resumed '
          'run counts each stage once) and its command.', '']
  for key, r in all_rows.items():
    secs = r.get('wall_s', r['run_s'])
    out.append(f'* `{key}` ({secs:.0f} s): `{_portable(r["command"])}`')
  if adtn:
    out += ['', '## ADTN (Qing et al. 2023) vs SVD at the same budget', '',
            'The selected dense layers are encoded as deep tensor networks '
            '(depth M, brick-wall 2×2×2×2 gates, ReLU between layers), '
            'fitted briefly to the baseline kernels, then the whole network '
            'trains end to end. SVD: the same layers split at the rank whose '
            'parameters are closest to (not below) the ADTN\'s, fine-tuned '
            'the same way. "One shared ADTN": the layers\' kernels are '
            'concatenated and encoded by a single network, as the paper does '
            'for VGG-16 (SVD then gets one rank r for all of them, the '
            'smallest whose factors are not below the ADTN\'s parameters).',
            '',
            f'Initial fit of the rows (`bench/results_adtn.py`): '
            f'`adtn.fit_steps={adtn_settings.FIT_STEPS}`, '
            f'`adtn.noise={adtn_settings.FIT_NOISE:g}` (std of the noise on '
            'the identity gates at init), `adtn.match_norm=True` (the fit '
            'rescaled to the kernel\'s norm), Adam at 1e-2; then 4 epochs of '
            'end-to-end training at 3e-3 from the baselines in '
            '`runs/adtn/baselines`. Rows marked "earlier code" were run '
            'before the least-squares fit scale (commit df39211), with 20 fit '
            'steps and noise 0.5, and not re-run since.',
            '',
            '| model | layers | params of those layers: dense → ADTN / SVD |'
            ' baseline | ADTN right after encoding → after training | SVD '
            'right after split → after training | decode time per step | '
            'whole model params |',
            '|---|---|---|---|---|---|---|---|']
    sweep = adtn.pop('_fit_sweep', None)
    others = adtn.pop('_other_fits', [])
    depth_sweep = adtn.pop('_depth_sweep', None)
    def label(m, r):   # rows without a fit_error predate the current fit
      return m if 'fit_error' in r else f'{m} (earlier code)'
    for m, r in adtn.items():
      out.append(
          f'| {label(m, r)} | {", ".join(r["layers"])} (M={r["depth"]}'
          f'{", one shared ADTN" if r.get("shared") else ""}) | '
          f'{r["dense_params"]:,} → {r["adtn_params"]:,} / '
          f'{r["svd_params"]:,} | {_pct([r["baseline_acc"]])} | '
          f'{_pct([r["adtn_after_encode_acc"]])} → '
          f'**{_pct([r["adtn_final_acc"]])}** | '
          f'{_pct([r["svd_after_split_acc"]])} → '
          f'**{_pct([r["svd_final_acc"]])}** | '
          f'{1000 * (r["decode_s_per_step"] or 0):.1f} ms | '
          f'{r["model_params_before"]:,} → {r["model_params_after"]:,} |')
    verdicts = []
    for m, r in adtn.items():
      if m == 'vgg16':
        continue
      gap = 100 * (r['baseline_acc'] - r['adtn_final_acc'])
      verdicts.append(
          f'{label(m, r)}: {_pct([r["adtn_final_acc"]])}% against '
          f'{_pct([r["baseline_acc"]])}%, {gap:.2f} points below — '
          + ('within' if gap <= 0.5 else '*not* within')
          + ' 0.5 points of its baseline')
    if verdicts:
      out += ['', 'Against the baselines (ADTN after training): '
              + '; '.join(verdicts) + '.'
              + (' With more depth and longer training, see "More '
                 'capacity" below.' if depth_sweep else '')]
    if sweep:
      runs = sweep['runs']
      pairs = ' '.join(f'{x["fit_steps"]}:{x["noise"]:g}' for x in runs)
      out += ['', f'Choosing the initial fit, measured on {sweep["model"]} '
              f'(ADTN side of its row only, same baseline and training; '
              f'`python bench/results_adtn.py --fit-sweep {pairs}`):', '',
              '| fit steps | init noise | fit error (least-squares scale) | '
              'rel. error (rescaled) | after encoding | after training |',
              '|---|---|---|---|---|---|']
      for x in runs:
        fit = x.get('fit_error')
        out.append(f'| {x["fit_steps"]} | {x["noise"]:g} | '
                   + (f'{fit:.4f}' if fit is not None else '–')
                   + f' | {x["rel_error"]:.3f} | '
                   f'{_pct([x["adtn_after_encode_acc"]])} | '
                   f'**{_pct([x["adtn_final_acc"]])}** |')
      best = max(runs, key=lambda x: x['adtn_final_acc'])
      tightest = min(runs, key=lambda x: x.get('fit_error') or 1.0)
      out += ['', f'Best after training: {best["fit_steps"]} fit steps, '
              f'noise {best["noise"]:g} (the rows above use '
              f'{adtn_settings.FIT_STEPS} and {adtn_settings.FIT_NOISE:g}; '
              'so does `configs/default.py`). '
              + ('It is not the closest fit: on these nearly full-rank '
                 'kernels no fit of this size gets far below the zero '
                 'kernel\'s error of 1, and what helps training is gates '
                 'that start close to identity (small noise), not the fit.'
                 if best is not tightest else 'It is also the closest fit.')]
      for x in others:
        row = adtn.get(x['key'], {})
        out += ['', f'Also measured on {x["key"]} (the row\'s run with '
                f'{x["fit_steps"]} fit steps, noise {x["noise"]:g}): '
                f'{_pct([x["adtn_final_acc"]])}% after training against '
                f'{_pct([row.get("adtn_final_acc")])}% in the row above, '
                + ('so on this model the fc2 choice is not the best one; '
                   'one seed each, so the gap may be within seed noise'
                   if x['adtn_final_acc'] > row.get('adtn_final_acc', 1)
                   else 'consistent with the fc2 choice')
                + f': `{_portable(x["command"])}`.']
      out += ['', 'Commands: ' + '; '.join(
          f'`{_portable(x["command"])}`' for x in runs) + '.']
    if 'vgg16' in adtn:
      r = adtn['vgg16']
      s = adtn_settings.SETTINGS['vgg16']
      o = s['overrides']
      out += ['', f'VGG-16, the paper\'s headline case ('
              + ('' if 'fit_error' in r else 'earlier code, ') +
              f'two linear layers, '
              f'{r["dense_params"]:,} weights, one network of '
              f'{r["adtn_params"]:,} parameters): the CPU run does *not* '
              f'reproduce "accuracy up, not down". From the '
              f'{_pct([r["baseline_acc"]])}% baseline of the table above '
              f'({_schedule(results_settings.SETTINGS["vgg16"])}), '
              f'{s["train_epochs"]} epochs of end-to-end training '
              f'({o["optimizer"]} {s["train_lr"]:g}, clip {o["grad_clip"]:g}; '
              f'VGG\'s SGD with momentum diverged to NaN) reach '
              f'{_pct([r["adtn_final_acc"]])}%, '
              + ('ahead of' if r['adtn_final_acc'] > r['svd_final_acc']
                 else 'not ahead of') +
              f' SVD at rank {max(r["svd_ranks"].values())} with more parameters '
              f'({_pct([r["svd_final_acc"]])}%) but far below the baseline: '
              'a few dozen steps cannot retrain a classifier whose initial fit '
              'has relative error > 1. It needs the paper\'s full schedule '
              '(a GPU session).']
    def errors(r):   # 'fc1 1.262 (fit 0.990)': rescaled, least-squares
      fit = r.get('fit_error') or {}
      return ', '.join(f'{p} {e:.3f}' + (f' (fit {fit[p]:.3f})'
                                         if fit.get(p) is not None else '')
                       for p, e in r['rel_error'].items())
    out += ['', 'Relative reconstruction errors of the initial fit, '
            '`||W - W_hat|| / ||W||` of the kernel training starts from '
            '(rescaled to the kernel\'s norm, `adtn.match_norm`), and in '
            'brackets where recorded at the least-squares scale (the fit '
            'itself; the zero kernel scores 1, see '
            '[benchmarks_adtn_fit.md](benchmarks_adtn_fit.md)): ' +
            '; '.join(f'{m}: {errors(r)}' for m, r in adtn.items()) + '.',
            '', '### Runs', '']
    for m, r in adtn.items():
      svd = ('the SVD side kept from the previous run of the row (same '
             'baseline, ranks and training; `--reuse`)' if r.get('svd_reused')
             else 'then the SVD comparison in the same script')
      out.append(f'* `{m}` ({r["run_s"]:.0f} s, {svd}, `python '
                 f'bench/results_adtn.py --models {m}`): '
                 f'`{_portable(r["command"])}`')
    if depth_sweep:
      out += adtn_depth_sweep(depth_sweep, adtn)
  path = os.path.join(DOCS, 'results.md')
  with open(path, 'w') as f:
    f.write('\n'.join(out) + '\n')
  print('wrote', path)


if __name__ == '__main__':
  main()
