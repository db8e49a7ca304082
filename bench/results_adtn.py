"""ADTN rows of docs/results.md: encoded layers vs SVD at the same budget.

  python bench/results_adtn.py --models fc2 lenet5 lenet5_shared
  python bench/results_adtn.py --models vgg16   (after bench/results.py has
                                                 trained vgg16_direct_s0)

Per model: ``train.py`` with ``pipeline=adtn`` (baseline -> encode the
selected dense layers as ADTNs -> train end to end), then, from the same
baseline, the same layers split by SVD at the rank whose parameter count is
closest to (not below) the ADTN's, fine-tuned with the same settings. The
decode time per step is measured by ``lowrank_jax.decode_time``.
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=list(SETTINGS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'adtn'))
  args = parser.parse_args()

  import jax
  import lowrank_jax as lj
  from lowrank_jax import tree
  from lowrank_jax.train import checkpoint, jobs, loop, pipelines
  from configs import default  # noqa: F401  (configs importable)
  import importlib

  results = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      results = json.load(f)
  for key in args.models:
    s = SETTINGS[key]
    model_name = s.get('model', key)
    workdir = os.path.join(args.root, f'{key}_adtn_s{args.seed}')
    # One set of config fields for the run and for the SVD comparison.
    overrides = {'pipeline': 'adtn', 'seed': args.seed,
                 'num_epochs': s['num_epochs'], 'adtn.select': s['select'],
                 'adtn.depth': s['depth'],
                 'finetune.num_epochs': s['train_epochs'],
                 'finetune.learning_rate': s.get('train_lr', 0.003),
                 # The initial fit: enough steps to move off the
                 # initialisation (docs/benchmarks_adtn_fit.md), then
                 # rescaled to the kernel's norm: with the least-squares
                 # scale instead (match_norm=False; ||W_hat|| ~ 0.14 ||W||)
                 # fc2 ended at 18.40% after training, against 88.59%.
                 'adtn.fit_steps': s.get('fit_steps', 300),
                 'adtn.match_norm': True,
                 'progress': False, 'checkpoint_every_steps': 0,
                 **s.get('overrides', {})}
    if s.get('share'):
      overrides['adtn.share'] = True
    if s.get('pretrained'):
      if not os.path.isdir(os.path.join(ROOT, s['pretrained'])):
        raise SystemExit(f'{key}: no baseline at {s["pretrained"]}; train '
                         'it first (see the comment on SETTINGS)')
      overrides['compress.pretrained'] = s['pretrained']
    cmd = [sys.executable, 'train.py', f'--config=configs/{model_name}.py',
           f'--workdir={workdir}'] + [f'--config.{k}={v}'
                                      for k, v in overrides.items()]
    shown = ' '.join(shlex.quote(a) for a in ['python'] + cmd[1:])
    print('$', shown, flush=True)
    t0 = time.time()
    os.makedirs(args.root, exist_ok=True)
    with open(workdir + '.log', 'w') as log:
      subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                     check=True)
    with open(os.path.join(workdir, 'report.json')) as f:
      report = json.load(f)
    stages = {st['name']: st for st in report['stages']}
    encoded = {p: d['encode'] for p, d in report['layers'].items()
               if d.get('encode', {}).get('action') == 'split'}
    adtn_params = sum(d['params_after'] for d in encoded.values())
    dense_params = sum(d['params_before'] for d in encoded.values())

    # SVD at the same budget, same baseline, same fine-tuning.
    config = importlib.import_module(f'configs.{model_name}').get_config()
    apply_overrides(config, overrides)
    base = checkpoint.load_variables(os.path.join(workdir, 'stages',
                                                  'baseline'))
    layers = tree.layers(base['params'])
    ranks = {}
    if s.get('share'):
      # One budget for the group: the same rank r for every member, the
      # smallest with sum_l r (rows_l + cols_l) >= the ADTN's parameters.
      sides = sum(sum(layers[p]['kernel'].shape) for p in encoded)
      r = max(1, math.ceil(adtn_params / sides))
      ranks = {p: r for p in encoded}
    else:
      for p, d in encoded.items():
        rows, cols = layers[p]['kernel'].shape
        bias = layers[p]['bias'].size if 'bias' in layers[p] else 0
        ranks[p] = max(1, math.ceil((d['params_after'] - bias) /
                                    (rows + cols)))
    svd = lj.svd_split(base, ranks)
    svd_params = sum(lj.count_params(svd, report=True)[1][p] for p in ranks)
    dataset = loop.load_dataset(config)
    model = lj.get_model(model_name, num_classes=dataset.num_classes)
    svd_before = jobs.evaluate_variables(model, svd, dataset)['accuracy']
    state, _ = loop.train(pipelines.finetune_config(config),
                          workdir + '_svd', dataset=dataset,
                          variables=svd, stage_name='svd_finetune',
                          model=model)
    svd_after = jobs.evaluate_variables(model, state.variables,
                                        dataset)['accuracy']
    row = {
        'model': model_name, 'key': key, 'command': shown,
        'layers': sorted(encoded), 'depth': s['depth'],
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
        'svd_ranks': ranks, 'svd_params': svd_params,
        'svd_after_split_acc': svd_before, 'svd_final_acc': svd_after,
        'run_s': time.time() - t0,
    }
    results[key] = row
    print(json.dumps(row), flush=True)
    with open(RESULTS_JSON, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
