"""Runs the measured results table of docs/results.md.

Every row is one ``train.py`` command, run as a subprocess and recorded
verbatim, so each figure in the doc comes with the command that made it:

  python bench/results.py --models lenet5 --seeds 0 1
  python bench/results.py --models resnet20 vgg16 --seeds 0
  python bench/results.py --models vgg7 --pipelines direct he2024 \
      --targets 2 3 4 6 8 --seeds 0 1          # the vgg7 frontier
  python bench/results.py --schedule full --device auto --models resnet20

For each model and seed: ``direct`` (baseline -> ranks -> Tucker-2/SVD ->
fine-tune), ``he2024`` (over-parameterized training with the orthogonality
penalty -> collapse -> ranks -> split -> fine-tune) at the *same* FLOPs
target (``rank_rule=flops_ratio``), and ``musco`` (weakened-VBMF stages from
the direct run's baseline). Results are collected from each run's
report.json into docs/results.md (rows are kept per model/seed, so models
can be run separately).

``--targets`` runs direct and he2024 at several FLOPs targets (a frontier);
direct at a target other than the model's first reuses the baseline of
the first target's direct run (``compress.pretrained``), and he2024 the
collapsed network of the first target's he2024 run (``he2024.trained``),
so each trains once per seed. ``--schedule full`` runs the configs' own schedules
on all training images (FULL_SETTINGS; meant for a GPU, see
bench/gpu_suite.sh) and ``--device`` tags each row and its key with the
device, so full-schedule rows sit beside the CPU ones. Every run keeps
checkpoints and re-running the same command resumes an interrupted run
(train.py resumes from its workdir); ``--skip-done`` skips rows already in
docs/results.json. ``--dry-run`` prints the commands without running them.

Each row keeps the dense baseline it is compared with (``baseline_acc``:
the run's own baseline stage; for he2024 the same model and seed's direct
baseline). ``--refresh`` re-summarizes the rows already in the results
file from their workdirs' reports (fills fields added since), running
nothing. ``--ablation`` runs the rank-selection ablation instead of the
pipelines: per seed, from the direct baseline, EVBMF ranks
(``direct_evbmf``) and then uniform-ratio ranks at the FLOPs ratio EVBMF
reached (``direct_uniform@evbmf``)::

  python bench/results.py --models vgg7b --ablation --seeds 0 1

``--finetune-epochs N`` runs, instead of the pipelines, direct and he2024
at ``--targets`` fine-tuned N epochs from the plain rows' baseline and
collapsed network (rows ``direct_ft<N>``, ``he2024_ft<N>``): is the gap
the fine-tuning schedule or the capacity?::

  python bench/results.py --models vgg7b --finetune-epochs 10 --targets 4

With ``--distill W`` those rows fine-tune distilled from the network before
the split at weight W (``finetune.distill_weight``; rows
``<pipeline>_ft<N>_kd<W>``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time

from results_rows import NO_FEWER_FLOPS
from results_rows import ROOT
from results_rows import dense_baseline_acc
from results_rows import reached_ratio
from results_rows import refresh
from results_rows import row_name
from results_rows import summarize

RESULTS_JSON = os.path.join(ROOT, 'docs', 'results.json')

# CPU-sized settings per model (2 cores): epochs and subsets chosen so the
# whole table fits in 90 minutes; see docs/results.md.
SETTINGS = {
    'lenet5': dict(train_subset=None, num_epochs=8, target=1.4,
                   finetune_epochs=2, musco_stages=3, validation_size=5000,
                   extra=['--config.compress.exclude=conv1']),
    'resnet20': dict(train_subset=12000, num_epochs=4, target=2.0,
                     finetune_epochs=1, musco_stages=2, validation_size=2000,
                     extra=['--config.compress.exclude=conv1|head']),
    'vgg16': dict(train_subset=2500, num_epochs=3, target=4.0,
                  finetune_epochs=1, musco_stages=2, validation_size=500,
                  test_subset=2000,
                  extra=['--config.compress.exclude=conv1_1|head',
                         '--config.eval_batch_size=500']),
    # The benchmark model (docs/benchmark_model.md): its full schedule on
    # all images, a converged baseline (>= 93%) on 2 cores. Not part of
    # the 90-minute table: its frontier (targets) runs separately.
    'vgg7': dict(train_subset=None, num_epochs=15, target=4.0,
                 targets=(2.0, 3.0, 4.0, 6.0, 8.0), finetune_epochs=3,
                 musco_stages=3, validation_size=5000,
                 checkpoint_every_steps=430,
                 extra=['--config.compress.exclude=conv1_1|head']),
    # The chosen one: a16 of docs/benchmark_model.md (93.29% at 20 epochs).
    'vgg7b': dict(train_subset=None, num_epochs=20, target=4.0,
                  targets=(2.0, 3.0, 4.0, 6.0, 8.0), finetune_epochs=3,
                  musco_stages=3, validation_size=5000,
                  checkpoint_every_steps=430,
                  # Rank floor 4 (default 8): the 16-channel convs at floor
                  # 8 stop the network at 5.6x fewer FLOPs.
                  extra=['--config.compress.exclude=conv1_1|head',
                         '--config.compress.min_rank_kxk=4']),
    # vgg7b at twice the width (288k params): a network with room to be
    # compressed 4x. Its baseline costs ~2.7x vgg7b's CPU time (about an
    # hour on 2 idle cores), so only the 4x target is planned.
    'vgg7w': dict(train_subset=None, num_epochs=20, target=4.0,
                  targets=(4.0,), finetune_epochs=3,
                  musco_stages=3, validation_size=5000,
                  checkpoint_every_steps=430,
                  extra=['--config.compress.exclude=conv1_1|head']),
    'vgg8': dict(train_subset=None, num_epochs=20, target=4.0,
                 targets=(2.0, 3.0, 4.0, 6.0, 8.0), finetune_epochs=3,
                 musco_stages=3, validation_size=5000,
                 checkpoint_every_steps=430,
                 extra=['--config.compress.exclude=conv1_1|head']),
}

# Full schedules (a GPU): the configs' own epochs on all training images,
# the defaults' fine-tuning (5 epochs) and MUSCO (4 stages of 3 epochs).
# vgg16_adtn is the shared-ADTN classifier job, from the vgg16 direct
# run's baseline.
_FULL = dict(train_subset=None, num_epochs=30, finetune_epochs=5,
             musco_stages=4, musco_finetune_epochs=3, validation_size=5000,
             checkpoint_every_steps=430)
FULL_SETTINGS = {
    'resnet20': dict(_FULL, target=2.0,
                     extra=['--config.compress.exclude=conv1|head']),
    'resnet18': dict(_FULL, target=4.0,
                     extra=['--config.compress.exclude=conv1|head']),
    'vgg16': dict(_FULL, target=4.0,
                  extra=['--config.compress.exclude=conv1_1|head']),
    'vgg16_adtn': dict(_FULL, finetune_epochs=30, pipelines=('adtn',),
                       pretrained_from='vgg16', extra=[]),
}
PIPELINES = ('direct', 'he2024', 'musco')


def command(model, pipeline, seed, workdir, s, pretrained=None,
            target=None, trained=None, rank_rule='flops_ratio'):
  """The train.py command of one row; ``target`` overrides s['target'];
  ``trained`` (he2024) is an earlier he2024 run's collapsed network;
  ``rank_rule`` other than flops_ratio (direct) takes no target."""
  musco_epochs = s.get('musco_finetune_epochs', s['finetune_epochs'])
  args = [sys.executable, 'train.py', f'--config=configs/{model}.py',
          f'--workdir={workdir}', f'--config.pipeline={pipeline}',
          f'--config.seed={seed}', f'--config.num_epochs={s["num_epochs"]}',
          f'--config.validation_size={s["validation_size"]}',
          f'--config.finetune.num_epochs={s["finetune_epochs"]}',
          f'--config.musco.n_stages={s["musco_stages"]}',
          f'--config.musco.finetune_epochs={musco_epochs}',
          '--config.progress=False',
          f'--config.checkpoint_every_steps='
          f'{s.get("checkpoint_every_steps", 0)}']
  if s['train_subset']:
    args.append(f'--config.train_subset={s["train_subset"]}')
  if s.get('test_subset'):
    args.append(f'--config.test_subset={s["test_subset"]}')
  if pipeline in ('direct', 'he2024') and rank_rule == 'flops_ratio':
    args += ['--config.compress.rank_rule=flops_ratio',
             f'--config.compress.target_ratio={target or s["target"]}']
  elif pipeline in ('direct', 'he2024'):
    args.append(f'--config.compress.rank_rule={rank_rule}')
  if pretrained:
    args.append(f'--config.compress.pretrained={pretrained}')
  if trained:
    args.append(f'--config.he2024.trained={trained}')
  return args + s['extra']


def plan(models, seeds, pipelines, targets, settings):
  """The rows to run, in order: ``[(model, pipeline, seed, target)]``.

  Per model and seed: direct at every target (the first one trains the
  baseline the others and musco start from), then he2024 at every target,
  then musco, then the model's other pipelines (adtn).
  """
  rows = []
  for model in models:
    s = settings[model]
    own = s.get('pipelines', PIPELINES)
    # The model's own target first: its direct run trains the baseline.
    model_targets = sorted(targets or [s.get('target')],
                           key=lambda t: t != s.get('target'))
    for seed in seeds:
      for pipeline in [p for p in pipelines if p in own]:
        for t in (model_targets if pipeline in ('direct', 'he2024')
                  else [None]):
          rows.append((model, pipeline, seed, t))
  return rows


def baseline_path(root, model, seed, settings):
  """The dense baseline of ``model`` and ``seed`` that other rows start
  from: the first target's direct run's ``stages/baseline``."""
  source = settings[model].get('pretrained_from', model)
  name = row_name(source, 'direct', seed, settings[source])[1]
  return os.path.join(root, name, 'stages', 'baseline')


def _reused_stage(root, rows, settings, model, pipeline, seed, stage):
  """``stage`` of ``model``'s ``pipeline`` run at its own target, which the
  other targets start from: its path when that run is planned in ``rows``
  or done, else None."""
  s = settings[model]
  path = os.path.join(root, row_name(model, pipeline, seed, s)[1], 'stages',
                      stage)
  planned = (model, pipeline, seed, s.get('target')) in rows
  return path if planned or os.path.isdir(path) else None


def planned_commands(rows, settings, root, device):
  """Yields ``(key, workdir, args, meta, needs)`` for the rows of
  :func:`plan`; ``meta`` goes into the row, ``needs`` lists the paths the
  command reads (none: a missing baseline fails in train.py)."""
  for model, pipeline, seed, target in rows:
    s = settings[model]
    key, name = row_name(model, pipeline, seed, s, target, device)
    workdir = os.path.join(root, name)
    other_target = target != s.get('target')
    pretrained = trained = None
    if pipeline in ('musco', 'adtn'):
      pretrained = baseline_path(root, model, seed, settings)
    elif pipeline == 'direct' and other_target:
      pretrained = _reused_stage(root, rows, settings,
                                 s.get('pretrained_from', model), 'direct',
                                 seed, 'baseline')
    elif pipeline == 'he2024' and target and other_target:
      # he2024 trains its over-parameterized network once per seed, at the
      # model's own target; the other targets split that run's collapse.
      trained = _reused_stage(root, rows, settings, model, 'he2024', seed,
                              'collapse')
    meta = dict(model=model, pipeline=pipeline, seed=seed)
    if pipeline in ('direct', 'he2024'):
      meta['target'] = target or s['target']
    yield key, workdir, command(model, pipeline, seed, workdir, s, pretrained,
                                target, trained), meta, []


def ablation_commands(models, seeds, settings, root, device):
  """The rank-selection ablation: EVBMF ranks against uniform-ratio ranks
  at the same FLOPs, per model and seed, both from the direct baseline and
  fine-tuned alike. Yields as :func:`planned_commands`: (a) ``direct_evbmf``
  (``rank_rule=vbmf``), then (b) ``direct_uniform@evbmf``
  (``rank_rule=flops_ratio``: every layer keeps ceil(f * size) ranks per
  mode, one f for the network) at the FLOPs ratio (a) reached. (b) is
  built after (a) ran, from (a)'s report; before that (a dry run) its
  target is a placeholder."""
  for model in models:
    s = settings[model]
    for seed in seeds:
      pretrained = baseline_path(root, model, seed, settings)
      key, name = row_name(model, 'direct_evbmf', seed, s, device=device)
      workdir = os.path.join(root, name)
      yield key, workdir, command(
          model, 'direct', seed, workdir, s, pretrained, rank_rule='vbmf'), \
          dict(model=model, pipeline='direct_evbmf', seed=seed,
               rank_rule='vbmf'), [pretrained]
      ratio = reached_ratio(workdir)
      key_b, name_b = row_name(model, 'direct_uniform@evbmf', seed, s,
                               device=device)
      if ratio is not None and ratio <= NO_FEWER_FLOPS:
        print(f'# {key_b}: {key} reached {ratio:.3f}x fewer FLOPs, nothing '
              'to match', flush=True)
        continue
      target = round(ratio, 4) if ratio else f'<FLOPs ratio of {key}>'
      workdir_b = os.path.join(root, name_b)
      yield key_b, workdir_b, command(
          model, 'direct', seed, workdir_b, s, pretrained, target), \
          dict(model=model, pipeline='direct_uniform', seed=seed,
               rank_rule='flops_ratio', target=target, matches=key), \
          [pretrained, os.path.join(workdir, 'report.json')]


def long_finetune_commands(models, seeds, pipelines, targets, epochs,
                           settings, root, device, distill=0.0):
  """Longer fine-tuning of the frontier's splits: ``direct`` and ``he2024``
  at ``targets`` (default: the model's own) fine-tuned ``epochs`` epochs
  instead of the schedule's, from the same dense baseline (direct) or the
  same collapsed network (he2024) as the plain rows, so only the
  fine-tuning differs. Rows are ``<pipeline>_ft<epochs>`` (key
  ``vgg7b/he2024_ft10@4x/0``), ``<pipeline>_ft<epochs>_kd<distill>`` when
  distilled from that network; yields as :func:`planned_commands`."""
  for model in models:
    s = settings[model]
    s = dict(s, finetune_epochs=epochs, musco_finetune_epochs=s.get(
        'musco_finetune_epochs', s['finetune_epochs']))
    for seed, pipeline, target in [
        (seed, p, t) for seed in seeds for p in pipelines
        if p in ('direct', 'he2024') for t in targets or [s['target']]]:
      source = row_name(model, pipeline, seed, s)[1]
      stage = os.path.join(root, source, 'stages',
                           'baseline' if pipeline == 'direct' else 'collapse')
      label = f'{pipeline}_ft{epochs}' + (f'_kd{distill:g}' if distill
                                          else '')
      key, name = row_name(model, label, seed, s, device=device)
      key = key.replace(f'/{label}/', f'/{label}@{target:g}x/')
      workdir = os.path.join(root, f'{name}_{target:g}x')
      args = command(model, pipeline, seed, workdir, s,
                     pretrained=stage if pipeline == 'direct' else None,
                     target=target,
                     trained=stage if pipeline == 'he2024' else None)
      meta = dict(model=model, pipeline=label, seed=seed, target=target,
                  finetune_epochs=epochs)
      if distill:
        args.append(f'--config.finetune.distill_weight={distill}')
        meta['distill_weight'] = distill
      yield key, workdir, args, meta, [stage]


def run(args, log, timeout=None):
  """Runs one row's command, its output to ``log``; ``timeout`` (s) kills
  it (subprocess.TimeoutExpired; its workdir resumes on the next run)."""
  shown = ' '.join(shlex.quote(a) for a in
                   ['python'] + args[1:])
  print('$', shown, flush=True)
  t0 = time.time()
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, 'a') as f:   # A resumed run appends to its log.
    subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                   check=True, timeout=timeout,
                   env={**os.environ, 'PYTHONUNBUFFERED': '1'})
  return shown, time.time() - t0


@contextlib.contextmanager
def _locked_results(path):
  """Yields the rows of ``path`` and writes them back, under an exclusive
  lock: parallel lanes (bench/gpu_suite.sh) add rows to the same file."""
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    results = {}
    if os.path.exists(path):
      with open(path) as f:
        results = json.load(f)
    yield results
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(tmp, path)


def detect_device() -> str:
  """The first JAX device's kind (e.g. 'NVIDIA H100 80GB HBM3'), in a
  subprocess so this script stays free of JAX."""
  out = subprocess.run(
      [sys.executable, '-c', 'import jax; d = jax.devices()[0]; '
       'print(d.device_kind if d.platform != "cpu" else "cpu")'],
      cwd=ROOT, capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def _parser():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=None,
                      help='default: every model of the schedule')
  parser.add_argument('--seeds', nargs='+', type=int, default=[0])
  parser.add_argument('--pipelines', nargs='+',
                      default=list(PIPELINES) + ['adtn'])
  parser.add_argument('--targets', nargs='+', type=float, default=None,
                      help='FLOPs targets of direct and he2024 (default: '
                      "each model's target)")
  parser.add_argument('--ablation', action='store_true',
                      help='run the rank-selection ablation (EVBMF vs '
                      'uniform-ratio ranks at the same FLOPs) instead of '
                      'the pipelines')
  parser.add_argument('--finetune-epochs', type=int, default=None,
                      help='run longer fine-tuning rows (<pipeline>_ft<N>) '
                      'of direct and he2024 at --targets from the plain '
                      "rows' baseline / collapsed network instead of the "
                      'pipelines')
  parser.add_argument('--distill', type=float, default=None, metavar='W',
                      help='with --finetune-epochs: distilled from that '
                      'network at this weight (rows <pipeline>_ft<N>_kd<W>)')
  parser.add_argument('--refresh', action='store_true',
                      help='re-summarize the rows of the results file from '
                      'their workdirs (fills new fields); runs nothing')
  parser.add_argument('--schedule', choices=('cpu', 'full'), default='cpu',
                      help='cpu: SETTINGS (2-core budgets); full: '
                      "FULL_SETTINGS (the configs' own schedules)")
  parser.add_argument('--device', default='',
                      help="tag rows with this device ('auto': the first "
                      "JAX device's kind; '': untagged CPU rows)")
  parser.add_argument('--root', default=None,
                      help='workdirs (default runs/results, or '
                      'runs/results_<device>_<schedule> with a device)')
  parser.add_argument('--results', default=RESULTS_JSON)
  parser.add_argument('--skip-done', action='store_true',
                      help='skip rows already in the results file')
  parser.add_argument('--dry-run', action='store_true',
                      help='print the commands, run nothing')
  parser.add_argument('--deadline-s', type=float, default=None,
                      help='stop after this many seconds: the run in '
                      'progress is killed (it resumes on the next call) '
                      'and no further run starts')
  return parser


def _run_row(key, workdir, args_, meta, args, device, deadline):
  """Runs one planned row and records it; False if it did not finish."""
  timeout = None
  if deadline is not None:
    timeout = deadline - time.time()
    if timeout < 30:
      print(f'# {key}: not started, deadline reached', flush=True)
      return False
  try:
    shown, wall = run(args_, workdir + '.log', timeout)
  except subprocess.TimeoutExpired:
    print(f'# {key}: stopped at the deadline; the same command resumes '
          'it', flush=True)
    return False
  row = summarize(workdir)
  row.update(command=shown, run_s=wall, baseline_acc=dense_baseline_acc(
      workdir, meta['model'], meta['seed']), **meta)
  if device:
    row.update(device=device, schedule=args.schedule)
  print(json.dumps(row), flush=True)
  with _locked_results(args.results) as results:
    results[key] = row
  return True


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  if args.finetune_epochs is not None and args.finetune_epochs < 1:
    parser.error(f'--finetune-epochs {args.finetune_epochs}: must be >= 1')
  if args.distill is not None and (args.finetune_epochs is None or
                                   not 0 < args.distill <= 1):
    parser.error(f'--distill {args.distill}: a weight in (0, 1] for the '
                 '--finetune-epochs rows')
  if args.finetune_epochs is not None and args.ablation:
    parser.error('--finetune-epochs and --ablation run different rows; '
                 'give one of them')
  if args.refresh:
    with _locked_results(args.results) as results:
      read = refresh(results)
    print(f'refreshed {len(read)} of {len(results)} rows from their reports '
          f'({args.results})')
    return
  settings = FULL_SETTINGS if args.schedule == 'full' else SETTINGS
  models = args.models or [m for m in settings
                           if not settings[m].get('targets')]
  unknown = [m for m in models if m not in settings]
  if unknown:
    parser.error(f'models {unknown} have no {args.schedule} schedule; '
                 f'known: {sorted(settings)}')
  device = args.device
  if device == 'auto':
    device = 'DEVICE' if args.dry_run else detect_device()
  slug = re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')
  root = args.root or os.path.join(
      ROOT, 'runs', f'results_{slug}_{args.schedule}' if device else
      'results')
  done = {}
  if args.skip_done and os.path.exists(args.results):
    with open(args.results) as f:
      done = json.load(f)
  t_all = time.time()
  deadline = None if args.deadline_s is None else t_all + args.deadline_s
  if args.ablation:
    commands = ablation_commands(models, args.seeds, settings, root, device)
  elif args.finetune_epochs is not None:
    commands = long_finetune_commands(
        models, args.seeds, args.pipelines, args.targets,
        args.finetune_epochs, settings, root, device, args.distill or 0.0)
  else:
    rows = plan(models, args.seeds, args.pipelines, args.targets, settings)
    commands = planned_commands(rows, settings, root, device)
  for key, workdir, args_, meta, needs in commands:
    if key in done:
      print(f'# {key}: done, skipped', flush=True)
    elif args.dry_run:
      print(key, '$', ' '.join(shlex.quote(str(a))
                               for a in ['python'] + args_[1:]))
    elif not all(os.path.exists(p) for p in needs):
      print(f'# {key}: not started, needs '
            f'{[p for p in needs if not os.path.exists(p)]}', flush=True)
    else:
      _run_row(key, workdir, args_, meta, args, device, deadline)
  print(f'total {time.time() - t_all:.0f} s')


if __name__ == '__main__':
  main()
