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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
            target=None, trained=None):
  """The train.py command of one row; ``target`` overrides s['target'];
  ``trained`` (he2024) is an earlier he2024 run's collapsed network."""
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
  if pipeline in ('direct', 'he2024'):
    args += ['--config.compress.rank_rule=flops_ratio',
             f'--config.compress.target_ratio={target or s["target"]}']
  if pretrained:
    args.append(f'--config.compress.pretrained={pretrained}')
  if trained:
    args.append(f'--config.he2024.trained={trained}')
  return args + s['extra']


def row_name(model, pipeline, seed, s, target=None, device=''):
  """``(key in results.json, workdir name)`` of one row.

  The model's first target keeps the plain names (``vgg7/direct/0``,
  ``vgg7_direct_s0``); other targets add ``@<t>x``; a device prefixes the
  key (``H100:vgg16/direct/0``).
  """
  tag = ''
  if pipeline in ('direct', 'he2024') and target and target != s['target']:
    tag = f'@{target:g}x'
  key = f'{model}/{pipeline}{tag}/{seed}'
  name = f'{model}_{pipeline}{tag.replace("@", "_")}_s{seed}'
  return (f'{device}:{key}' if device else key), name


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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=None,
                      help='default: every model of the schedule')
  parser.add_argument('--seeds', nargs='+', type=int, default=[0])
  parser.add_argument('--pipelines', nargs='+',
                      default=list(PIPELINES) + ['adtn'])
  parser.add_argument('--targets', nargs='+', type=float, default=None,
                      help='FLOPs targets of direct and he2024 (default: '
                      "each model's target)")
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
  args = parser.parse_args(argv)
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
  rows = plan(models, args.seeds, args.pipelines, args.targets, settings)
  for model, pipeline, seed, target in rows:
    s = settings[model]
    key, name = row_name(model, pipeline, seed, s, target, device)
    workdir = os.path.join(root, name)
    first_direct = os.path.join(
        root, row_name(s.get('pretrained_from', model), 'direct', seed,
                       settings[s.get('pretrained_from', model)])[1],
        'stages', 'baseline')
    source = s.get('pretrained_from', model)
    baseline_planned = (source, 'direct', seed,
                        settings[source].get('target')) in rows
    pretrained = None
    if pipeline in ('musco', 'adtn') or (
        pipeline == 'direct' and target != s['target'] and (
            baseline_planned or os.path.isdir(first_direct))):
      pretrained = first_direct
    # he2024 trains its over-parameterized network once per seed, at the
    # model's own target; the other targets split that run's collapse.
    first_he = os.path.join(root, row_name(model, 'he2024', seed, s)[1],
                            'stages', 'collapse')
    trained = None
    if pipeline == 'he2024' and target and target != s['target'] and (
        (model, 'he2024', seed, s['target']) in rows or
        os.path.isdir(first_he)):
      trained = first_he
    args_ = command(model, pipeline, seed, workdir, s, pretrained, target,
                    trained)
    if key in done:
      print(f'# {key}: done, skipped', flush=True)
      continue
    if args.dry_run:
      print(key, '$', ' '.join(shlex.quote(a) for a in ['python'] + args_[1:]))
      continue
    timeout = None
    if args.deadline_s is not None:
      timeout = t_all + args.deadline_s - time.time()
      if timeout < 30:
        print(f'# {key}: not started, deadline reached', flush=True)
        continue
    try:
      shown, wall = run(args_, workdir + '.log', timeout)
    except subprocess.TimeoutExpired:
      print(f'# {key}: stopped at the deadline; the same command resumes '
            'it', flush=True)
      continue
    row = summarize(workdir)
    row.update(command=shown, model=model, pipeline=pipeline, seed=seed,
               run_s=wall)
    if pipeline in ('direct', 'he2024'):
      row['target'] = target or s['target']
    if device:
      row.update(device=device, schedule=args.schedule)
    print(json.dumps(row), flush=True)
    with _locked_results(args.results) as results:
      results[key] = row
  print(f'total {time.time() - t_all:.0f} s')


if __name__ == '__main__':
  main()
