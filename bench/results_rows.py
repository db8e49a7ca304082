"""Rows of docs/results.json read from the runs' reports (bench/results.py).

A row is one train.py run, named by :func:`row_name` and summarized from
its workdir's report.json by :func:`summarize`; :func:`refresh` re-reads
the rows already recorded (``python bench/results.py --refresh``).
"""

from __future__ import annotations

import json
import os
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A FLOPs ratio at or below this is "no fewer FLOPs" (rounding of counts).
NO_FEWER_FLOPS = 1.001


def row_name(model, pipeline, seed, s, target=None, device=''):
  """``(key in results.json, workdir name)`` of one row.

  The model's first target keeps the plain names (``vgg7/direct/0``,
  ``vgg7_direct_s0``); other targets add ``@<t>x``; a device prefixes the
  key (``H100:vgg16/direct/0``). An '@' becomes '_' in the workdir name.
  """
  tag = ''
  if pipeline in ('direct', 'he2024') and target and target != s['target']:
    tag = f'@{target:g}x'
  key = f'{model}/{pipeline}{tag}/{seed}'
  name = f'{model}_{pipeline}{tag}_s{seed}'.replace('@', '_')
  return (f'{device}:{key}' if device else key), name


def reached_ratio(workdir):
  """The FLOPs ratio a direct run reached (baseline / compress stage, from
  its report.json; fine-tuning keeps it), or None before its split."""
  path = os.path.join(workdir, 'report.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stages = {s['name']: s for s in json.load(f)['stages']}
  if 'baseline' not in stages or 'compress' not in stages:
    return None
  return stages['baseline']['flops'] / stages['compress']['flops']


def summarize(workdir):
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  stages = report['stages']
  base, last = stages[0], stages[-1]
  # he2024's first stage is the over-parameterized init: use the collapsed
  # trained network as its "before compression" point.
  trained = next((s for s in stages if s['name'] in ('baseline', 'collapse')),
                 base)
  dense = next((s for s in stages if s['name'] in ('baseline', 'collapse')),
               base)
  compressed = [s for s in stages if s['name'].endswith('compress')]
  return {
      'trained_acc': trained['test']['accuracy'],
      'after_compress_acc': compressed[-1]['test']['accuracy']
                            if compressed else None,
      'final_acc': last['test']['accuracy'],
      'params_ratio': dense['params'] / last['params'],
      'flops_ratio': dense['flops'] / last['flops'],
      'params': last['params'], 'flops': last['flops'],
      'wall_s': sum(s.get('wall_s', 0) for s in stages),
      'stopped': report.get('stopped'),
  }


def _stage_acc(workdir, name):
  """Test accuracy of stage ``name`` in ``workdir``/report.json, or None."""
  path = os.path.join(workdir, 'report.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stages = json.load(f)['stages']
  return next((s['test']['accuracy'] for s in stages if s['name'] == name),
              None)


def dense_baseline_acc(workdir, model, seed):
  """The dense baseline a row is compared with: its run's own 'baseline'
  stage (direct, musco, adtn), else (he2024, which trains its own network)
  the 'baseline' stage of the same model and seed's direct run beside it:
  the plain network trained with the same schedule. None if not run."""
  own = _stage_acc(workdir, 'baseline')
  if own is not None:
    return own
  direct = row_name(model, 'direct', seed, {})[1]
  return _stage_acc(os.path.join(os.path.dirname(workdir), direct),
                    'baseline')


def workdir_of(row):
  """The workdir named in a row's recorded command."""
  arg = next(a for a in shlex.split(row['command'])
             if a.startswith('--workdir='))
  return os.path.join(ROOT, arg.split('=', 1)[1])


def refresh(results):
  """Re-summarizes each row of ``results`` from its workdir's report (in
  place; commands, run times and tags kept). A row whose report is gone
  keeps its numbers and takes ``baseline_acc`` from the rows: a run's
  trained_acc is its 'baseline' stage except for he2024, which takes the
  direct row of the same model, seed and device. A row whose workdir now
  holds a run that has not reached its split (the workdir lost and started
  again) keeps its numbers too, with a warning. Returns the keys whose
  report was read."""
  read = []
  for key, row in results.items():
    workdir = workdir_of(row)
    if not os.path.exists(os.path.join(workdir, 'report.json')):
      continue
    summary = summarize(workdir)
    if _behind(row, summary):
      print(f'# {key}: kept; {workdir}/report.json is of a run that has not '
            'reached this row\'s split yet', flush=True)
      continue
    row.update(summary, baseline_acc=dense_baseline_acc(
        workdir, row['model'], row['seed']))
    read.append(key)
  for row in results.values():
    if row.get('baseline_acc') is None and row['pipeline'] != 'he2024':
      row['baseline_acc'] = row['trained_acc']
  for row in results.values():
    if row.get('baseline_acc') is None:
      row['baseline_acc'] = next(
          (r['baseline_acc'] for r in results.values()
           if r['pipeline'] == 'direct' and r['model'] == row['model'] and
           r['seed'] == row['seed'] and r.get('device') == row.get('device')),
          None)
  return read


def _behind(row, summary) -> bool:
  """True if ``summary`` (a workdir's report now) is of a run before the
  split that ``row`` recorded: no compress stage, or no fewer FLOPs."""
  return ((row.get('after_compress_acc') is not None
           and summary['after_compress_acc'] is None)
          or (row.get('flops_ratio', 1.0) > NO_FEWER_FLOPS
              and summary['flops_ratio'] <= NO_FEWER_FLOPS))
