"""ADTN rows of docs/results.md: encoded layers vs SVD at the same budget.

  python bench/results_adtn.py --models fc2 lenet5 lenet5_shared
  python bench/results_adtn.py --models vgg16   (after bench/results.py has
                                                 trained vgg16_direct_s0)

Per model: ``train.py`` with ``pipeline=adtn`` (baseline -> encode the
selected dense layers as ADTNs -> train end to end), then, from the same
baseline, the same layers split by SVD at the rank whose parameter count is
closest to (not below) the ADTN's, fine-tuned with the same settings. The
decode time per step is measured by ``lowrank_jax.decode_time``.

  python bench/results_adtn.py --fit-sweep 20:0.5 300:0.5 20:0.1

runs only the ADTN side of the fc2 row once per ``fit_steps:noise`` pair
(into runs/adtn/sweep, a finished run is read back, not redone) and records
the comparison under ``"_fit_sweep"`` in docs/results_adtn.json; FIT_STEPS
and FIT_NOISE below are the best of it.

  python bench/results_adtn.py --depth-sweep 8 16 32 [--models fc2]
                               [--train-epochs 8] [--train-lr 0.01]
                               [--normalize] [--distill 0.5]

runs the whole row (ADTN and SVD at its budget) once per depth M (into
runs/adtn/depth/<model>_M<M>[_e<epochs>][_lr<rate>][_norm][_kd<w>]_s<seed>,
both sides trained at that learning rate, and with ``--distill w``
distilled from the baseline at that weight, ``finetune.distill_weight``;
with ``--normalize`` the ADTN decode is normalized,
``adtn.normalize=True``; a finished ADTN run is read back,
its SVD side redone unless the sweep holds one with the same budget and
training, e.g. from the same row without ``--normalize``) and records the
rows under ``"_depth_sweep"`` in docs/results_adtn.json; the other rows are
left as they are. Without ``--models`` the sweep runs fc2 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS_JSON = os.path.join(ROOT, 'docs', 'results_adtn.json')

# Baselines of the fc2 and lenet5 rows, trained by the adtn pipeline's own
# baseline stage with the same fields as a run here (8 epochs, seed 0):
#   python train.py --config=configs/<model>.py --workdir=<dir>
#     --config.pipeline=adtn --config.num_epochs=8 --config.adtn.fit_steps=0
#     --config.finetune.num_epochs=1 --config.progress=False
#     --config.checkpoint_every_steps=0 --config.adtn.select=<select>
# and <dir>/stages/baseline copied to runs/adtn/baselines/<model> (the CPU
# budget of a shared 2-core machine did not allow training them again per
# row; bench/bench_adtn_fit.py fits the same kernels).
BASELINES = os.path.join('runs', 'adtn', 'baselines')

# The initial fit of every row: measured on fc2 with --fit-sweep (the
# "_fit_sweep" entry of docs/results_adtn.json, shown in docs/results.md).
FIT_STEPS = 20
FIT_NOISE = 0.02
# Peak learning rate of the end-to-end training (both sides) unless a row's
# SETTINGS or --train-lr say otherwise.
TRAIN_LR = 0.003
# Checkpoint period (steps) of the depth sweep's runs.
SWEEP_CHECKPOINT_STEPS = 1000

SETTINGS = {
    'fc2': dict(select='fc1', num_epochs=8, train_epochs=4, depth=4,
                pretrained=os.path.join(BASELINES, 'fc2')),
    'lenet5': dict(select='fc1|fc2', num_epochs=8, train_epochs=4, depth=4,
                   pretrained=os.path.join(BASELINES, 'lenet5')),
    # lenet5's fc1 + fc2 again, now with ONE network for both, from the
    # baseline of the 'lenet5' row.
    'lenet5_shared': dict(model='lenet5', select='fc1|fc2', num_epochs=8,
                          train_epochs=4, depth=4, share=True,
                          pretrained=os.path.join(BASELINES, 'lenet5')),
    # The paper's headline case: VGG-16's 512-512 classifier, ONE network
    # for both linear layers, from the baseline that bench/results.py
    # trained for the vgg16 rows (same subsets; training VGG-16 again would
    # not fit the CPU budget).
    'vgg16': dict(select='fc1|fc2', num_epochs=3, train_epochs=2, depth=4,
                  share=True, train_lr=0.001,
                  pretrained=os.path.join('runs', 'results', 'vgg16_direct_s0',
                                          'stages', 'baseline'),
                  # Adam with clipping for the end-to-end training (and
                  # the SVD side): with VGG's SGD + momentum the shared
                  # network's 2^19-entry decode diverged to NaN in epoch 1.
                  overrides={'train_subset': 2500, 'test_subset': 2000,
                             'validation_size': 500, 'eval_batch_size': 500,
                             'optimizer': 'adam', 'weight_decay': 0.0,
                             'grad_clip': 1.0}),
}


def apply_overrides(config, overrides):
  """Sets ``{'a.b': value}`` on an ml_collections config (types checked)."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value


def _training_fields(command):
  """The config fields of a recorded command that the SVD side depends on
  (not the ADTN's, nor how the run is watched or checkpointed)."""
  return sorted(a for a in shlex.split(command)
                if a.startswith('--config.') and not
                a.startswith(('--config.adtn.', '--config.progress',
                              '--config.checkpoint_every_steps')))


def _record(key, value):
  """Sets ``results[key]`` in RESULTS_JSON, re-read first (parallel runs)."""
  results = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      results = json.load(f)
  results[key] = value
  with open(RESULTS_JSON, 'w') as f:
    json.dump(results, f, indent=1)


def row_overrides(key, seed, *, depth=None, train_epochs=None,
                  train_lr=None, normalize=False, distill=0.0, **fit):
  """The train.py config fields of one row.

  ``depth``, ``train_epochs`` and ``train_lr`` (None: the row's SETTINGS),
  ``normalize`` (the normalized decode) and ``distill`` (the weight of the
  distillation from the baseline) are the depth sweep's; ``fit`` overrides
  FIT_*.
  """
  s = SETTINGS[key]
  overrides = {'pipeline': 'adtn', 'seed': seed,
               'num_epochs': s['num_epochs'], 'adtn.select': s['select'],
               'adtn.depth': s['depth'] if depth is None else depth,
               'finetune.num_epochs': (s['train_epochs'] if train_epochs is None
                                       else train_epochs),
               'finetune.learning_rate': (
                   default_train_lr(key) if train_lr is None else train_lr),
               # The initial fit (see FIT_STEPS), rescaled to the
               # kernel's norm: with the least-squares scale instead
               # (match_norm=False; ||W_hat|| ~ 0.14 ||W||) fc2 ended at
               # 18.40% after training, against 88.59%.
               'adtn.fit_steps': fit.get('fit_steps', FIT_STEPS),
               'adtn.noise': fit.get('noise', FIT_NOISE),
               'adtn.match_norm': True,
               'progress': False, 'checkpoint_every_steps': 0,
               **s.get('overrides', {})}
  if s.get('share'):
    overrides['adtn.share'] = True
  if normalize:
    overrides['adtn.normalize'] = True
  if distill:
    overrides['finetune.distill_weight'] = distill
  if s.get('pretrained'):
    if not os.path.isdir(os.path.join(ROOT, s['pretrained'])):
      raise SystemExit(f'{key}: no baseline at {s["pretrained"]}; train '
                       'it first (see the comment on SETTINGS)')
    overrides['compress.pretrained'] = s['pretrained']
  return overrides


def _finished(report_path):
  """Whether a train.py report exists and holds the last stage, 'train'.

  train.py rewrites report.json after each stage, so an interrupted (or
  still running) run has one without it.
  """
  if not os.path.exists(report_path):
    return False
  with open(report_path) as f:
    return any(st['name'] == 'train' for st in json.load(f)['stages'])


def run_train(model_name, workdir, overrides, *, reuse=False):
  """Runs train.py (log: ``<workdir>.log``); returns (command, report).

  With ``reuse``, a workdir whose report.json holds the finished 'train'
  stage is read back instead.
  """
  cmd = [sys.executable, 'train.py', f'--config=configs/{model_name}.py',
         f'--workdir={workdir}'] + [f'--config.{k}={v}'
                                    for k, v in overrides.items()]
  shown = ' '.join(shlex.quote(a) for a in ['python'] + cmd[1:])
  report_path = os.path.join(workdir, 'report.json')
  if not (reuse and _finished(report_path)):
    print('$', shown, flush=True)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    with open(workdir + '.log', 'w') as log:
      subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                     check=True)
  with open(report_path) as f:
    return shown, json.load(f)


def fit_sweep(pairs, *, seed, root):
  """ADTN side of the fc2 row per ``fit_steps:noise``; into results."""
  rows = []
  for pair in pairs:
    steps, noise = pair.split(':')
    fit = {'fit_steps': int(steps), 'noise': float(noise)}
    workdir = os.path.join(root, 'sweep', f'fc2_fs{steps}_n{noise}')
    shown, report = run_train('fc2', workdir, row_overrides('fc2', seed,
                                                            **fit),
                              reuse=True)
    stages = {st['name']: st for st in report['stages']}
    enc = report['layers']['fc1']['encode']
    rows.append({**fit, 'command': shown,
                 'rel_error': enc['rel_error'],
                 'fit_error': enc.get('fit_error'),
                 'baseline_acc': stages['baseline']['test']['accuracy'],
                 'adtn_after_encode_acc': stages['encode']['test']['accuracy'],
                 'adtn_final_acc': stages['train']['test']['accuracy']})
    print(json.dumps(rows[-1]), flush=True)
  _record('_fit_sweep', {'model': 'fc2', 'runs': rows})


def svd_budget_ranks(encoded, layers, *, share=False):
  """SVD ranks whose factors are not below the ADTN's parameters.

  Args:
    encoded: ``{path: encode action}`` of the row's report (``params_after``:
      the ADTN's gates + scale, bias excluded; with ``share`` the group's
      network counts at its first member).
    layers: ``{path: variables}`` of the baseline (dense kernels ``(in, out)``).
    share: one rank for the whole group (one shared ADTN).

  Returns:
    ``{path: rank}``: per layer the smallest ``r`` with ``r (rows + cols) >=
    params_after``; with ``share`` the smallest common ``r`` with ``r *
    sum_l (rows_l + cols_l) >=`` the network's parameters.
  """
  if share:
    adtn_params = sum(d['params_after'] for d in encoded.values())
    sides = sum(sum(layers[p]['kernel'].shape) for p in encoded)
    r = max(1, math.ceil(adtn_params / sides))
    return {p: r for p in encoded}
  # Both sides without the bias, which neither form changes. (Rows recorded
  # before this function subtracted the bias from params_after, which does
  # not hold it: fc2's rank 1 had 1,040 factor entries against 1,089.)
  return {p: max(1, math.ceil(d['params_after'] /
                              sum(layers[p]['kernel'].shape)))
          for p, d in encoded.items()}


def run_row(key, seed, workdir, overrides, *, reuse=False, old=None):
  """One row: the ADTN run (train.py) and SVD at its budget; returns it.

  Args:
    key: a SETTINGS key.
    seed: the run's seed (already in ``overrides``).
    workdir: the ADTN run's workdir; the SVD side trains in ``workdir_svd``.
    overrides: ``row_overrides(...)``.
    reuse: read back a finished ADTN run; keep the SVD side of ``old`` when
      its baseline, ranks and training match.
    old: the previously recorded row (for ``reuse``).
  """
  import lowrank_jax as lj
  from lowrank_jax import tree
  from lowrank_jax.train import checkpoint, jobs, loop, pipelines
  import importlib

  s = SETTINGS[key]
  model_name = s.get('model', key)
  shown, report = run_train(model_name, workdir, overrides, reuse=reuse)
  stages = {st['name']: st for st in report['stages']}
  encoded = {p: d['encode'] for p, d in report['layers'].items()
             if d.get('encode', {}).get('action') == 'split'}
  # With share the group's network counts at its first member.
  adtn_params = sum(d['params_after'] for d in encoded.values())
  dense_params = sum(d['params_before'] for d in encoded.values())

  # SVD at the same budget, same baseline, same fine-tuning.
  config = importlib.import_module(f'configs.{model_name}').get_config()
  apply_overrides(config, overrides)
  base = checkpoint.load_variables(os.path.join(workdir, 'stages',
                                                'baseline'))
  layers = tree.layers(base['params'])
  ranks = svd_budget_ranks(encoded, layers, share=bool(s.get('share')))
  svd = lj.svd_split(base, ranks)
  counts = lj.count_params(svd, report=True)[1]
  svd_params = sum(counts[p] for p in ranks)
  bias = sum(layers[p]['bias'].size for p in ranks if 'bias' in layers[p])
  dataset = loop.load_dataset(config)
  model = lj.get_model(model_name, num_classes=dataset.num_classes)
  t0 = time.time()
  old = old or {}
  # The SVD side depends on the baseline, the ranks and the training, not
  # on the ADTN fit: with reuse it is kept from the previous row when
  # those match.
  svd_reused = (reuse and old.get('svd_ranks') == ranks and
                old.get('baseline_acc') ==
                stages['baseline']['test']['accuracy'] and
                _training_fields(old.get('command', '')) ==
                _training_fields(shown))
  if svd_reused:
    svd_before = old['svd_after_split_acc']
    svd_after = old['svd_final_acc']
  else:
    svd_before = jobs.evaluate_variables(model, svd, dataset)['accuracy']
    state, _ = loop.train(pipelines.finetune_config(config),
                          workdir + '_svd', dataset=dataset,
                          variables=svd, stage_name='svd_finetune',
                          model=model,
                          distill=pipelines.distillation(config, base))
    svd_after = jobs.evaluate_variables(model, state.variables,
                                        dataset)['accuracy']
  return {
      'model': model_name, 'key': key, 'seed': seed, 'command': shown,
      'layers': sorted(encoded), 'depth': overrides['adtn.depth'],
      'train_epochs': overrides['finetune.num_epochs'],
      'train_lr': overrides['finetune.learning_rate'],
      'normalize': bool(overrides.get('adtn.normalize', False)),
      'distill_weight': overrides.get('finetune.distill_weight', 0.0),
      'shared': bool(s.get('share')),
      'dense_params': dense_params, 'adtn_params': adtn_params,
      'rel_error': {p: d['rel_error'] for p, d in encoded.items()},
      'fit_error': {p: d.get('fit_error') for p, d in encoded.items()},
      'baseline_acc': stages['baseline']['test']['accuracy'],
      'adtn_after_encode_acc': stages['encode']['test']['accuracy'],
      'adtn_final_acc': stages['train']['test']['accuracy'],
      'decode_s_per_step': stages['encode'].get('decode_s_per_step'),
      'model_params_before': stages['baseline']['params'],
      'model_params_after': stages['train']['params'],
      # svd_params: the SVD layers with their biases (as count_params
      # reports them); svd_factor_params: without, like adtn_params.
      'svd_ranks': ranks, 'svd_params': svd_params,
      'svd_factor_params': svd_params - bias,
      'svd_after_split_acc': svd_before, 'svd_final_acc': svd_after,
      'svd_reused': bool(svd_reused),
      # {layer: [norm at encoding, after training]} of the decoded kernels
      # (train.py records them; runs from before that: from their stages).
      'kernel_norms': (stages['train'].get('kernel_norms')
                       or kernel_norms(workdir)),
      # train.py's stages (read back with reuse) + the SVD side here.
      'adtn_train_s': stages['train'].get('wall_s'),
      'run_s': (sum(st.get('wall_s', 0) for st in report['stages'])
                + time.time() - t0),
  }


def kernel_norms(workdir):
  """``{layer: [||W|| after encoding, after training]}`` of an ADTN run's
  decoded kernels, from its saved stages (pipelines.adtn_collapse)."""
  from lowrank_jax.train import checkpoint, pipelines
  encoded, trained = (checkpoint.load_variables(
      os.path.join(workdir, 'stages', name)) for name in ('encode', 'train'))
  return pipelines.adtn_collapse(encoded, trained)['kernel_norms']


def depth_workdir(root, key, depth, seed, train_epochs=None, train_lr=None,
                  normalize=False, distill=0.0):
  """``<root>/depth/<key>_M<depth>[_e<epochs>][_lr<rate>][_norm][_kd<w>]
  _s<seed>``."""
  epochs = '' if train_epochs is None else f'_e{train_epochs}'
  rate = '' if train_lr is None else f'_lr{train_lr:g}'
  norm = '_norm' if normalize else ''
  kd = f'_kd{distill:g}' if distill else ''
  return os.path.join(root, 'depth',
                      f'{key}_M{depth}{epochs}{rate}{norm}{kd}_s{seed}')


def default_train_lr(key):
  """The end-to-end learning rate of a SETTINGS row."""
  return SETTINGS[key].get('train_lr', TRAIN_LR)


def train_lr_of(row):
  """A recorded row's end-to-end learning rate (rows from before
  --train-lr: their SETTINGS' rate)."""
  return row.get('train_lr', default_train_lr(row['key']))


def _sweep_ident(x, *, decode=True):
  """What tells sweep rows apart (``decode``: the normalized decode too;
  without it, the rows whose SVD sides are the same)."""
  ident = (x['key'], x['depth'], x.get('train_epochs'), train_lr_of(x),
           x.get('distill_weight', 0.0), x['seed'])
  return ident + (bool(x.get('normalize')),) if decode else ident


def merge_sweep_row(runs, row):
  """``runs`` with ``row`` replacing the one of its key, depth, epochs,
  rate, seed and decode."""
  return [x for x in runs if _sweep_ident(x) != _sweep_ident(row)] + [row]


def svd_twin(runs, key, depth, seed, overrides):
  """A recorded sweep row with the same SVD side as the row about to run
  (same key, depth, epochs, rate, distillation and seed; either decode), or
  None."""
  want = (key, depth, overrides['finetune.num_epochs'],
          overrides['finetune.learning_rate'],
          overrides.get('finetune.distill_weight', 0.0), seed)
  return next((x for x in runs if _sweep_ident(x, decode=False) == want),
              None)


def _sweep_runs():
  """The rows recorded under ``"_depth_sweep"`` so far."""
  results = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      results = json.load(f)
  return results.get('_depth_sweep', {}).get('runs', [])


def depth_sweep(keys, depths, *, seed, root, train_epochs=None,
                train_lr=None, normalize=False, distill=0.0):
  """Whole rows (ADTN + SVD) per depth; into ``"_depth_sweep"``."""
  for key in keys:
    for depth in depths:
      workdir = depth_workdir(root, key, depth, seed, train_epochs, train_lr,
                              normalize, distill)
      overrides = row_overrides(key, seed, depth=depth,
                                train_epochs=train_epochs, train_lr=train_lr,
                                normalize=normalize, distill=distill)
      # Long sweep runs checkpoint as they go, so a killed one resumes
      # (bookkeeping: the results do not depend on it).
      overrides['checkpoint_every_steps'] = SWEEP_CHECKPOINT_STEPS
      twin = svd_twin(_sweep_runs(), key, depth, seed, overrides)
      row = run_row(key, seed, workdir, overrides, reuse=True, old=twin)
      print(json.dumps(row), flush=True)
      _record('_depth_sweep', {'runs': merge_sweep_row(_sweep_runs(), row)})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', choices=list(SETTINGS),
                      help='rows to run (default: all; fc2 for '
                           '--depth-sweep)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'adtn'))
  parser.add_argument('--reuse', action='store_true',
                      help='read back a finished ADTN run in the workdir; '
                           'keep the SVD side of the previous row when its '
                           'baseline, ranks and training match')
  parser.add_argument('--fit-sweep', nargs='+', metavar='STEPS:NOISE',
                      help='only compare initial fits on fc2 (see above)')
  parser.add_argument('--depth-sweep', nargs='+', type=int, metavar='M',
                      help='whole rows at these ADTN depths (see above)')
  parser.add_argument('--train-epochs', type=int,
                      help='end-to-end epochs of the depth sweep (default: '
                           "the row's)")
  parser.add_argument('--train-lr', type=float,
                      help='peak end-to-end learning rate of the depth sweep '
                           "(both sides; default: the row's)")
  parser.add_argument('--normalize', action='store_true', default=None,
                      help='depth sweep with the normalized ADTN decode '
                           '(adtn.normalize=True)')
  parser.add_argument('--distill', type=float, metavar='W',
                      help='depth sweep distilled from the baseline at '
                           'this weight (finetune.distill_weight; both '
                           'sides)')
  args = parser.parse_args()
  for flag in ('train_epochs', 'train_lr', 'normalize', 'distill'):
    if getattr(args, flag) is not None and not args.depth_sweep:
      parser.error(f'--{flag.replace("_", "-")} is an option of '
                   '--depth-sweep')
  if args.train_lr is not None and not args.train_lr > 0:
    parser.error(f'--train-lr {args.train_lr}: must be > 0')
  if args.distill is not None and not 0 < args.distill <= 1:
    parser.error(f'--distill {args.distill}: must be in (0, 1]')

  from configs import default  # noqa: F401  (configs importable)

  if args.fit_sweep:
    fit_sweep(args.fit_sweep, seed=args.seed, root=args.root)
    return
  if args.depth_sweep:
    depth_sweep(args.models or ['fc2'], args.depth_sweep, seed=args.seed,
                root=args.root, train_epochs=args.train_epochs,
                train_lr=args.train_lr, normalize=bool(args.normalize),
                distill=args.distill or 0.0)
    return
  results = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      results = json.load(f)
  for key in args.models or list(SETTINGS):
    workdir = os.path.join(args.root, f'{key}_adtn_s{args.seed}')
    # One set of config fields for the run and for the SVD comparison.
    overrides = row_overrides(key, args.seed)
    row = run_row(key, args.seed, workdir, overrides, reuse=args.reuse,
                  old=results.get(key))
    print(json.dumps(row), flush=True)
    _record(key, row)


if __name__ == '__main__':
  main()
