"""Runs the measured results table of docs/results.md.

Every row is one ``train.py`` command, run as a subprocess and recorded
verbatim, so each figure in the doc comes with the command that made it:

  python bench/results.py --models lenet5 --seeds 0 1
  python bench/results.py --models resnet20 vgg16 --seeds 0

For each model and seed: ``direct`` (baseline -> ranks -> Tucker-2/SVD ->
fine-tune), ``he2024`` (over-parameterized training with the orthogonality
penalty -> collapse -> ranks -> split -> fine-tune) at the *same* FLOPs
target (``rank_rule=flops_ratio``), and ``musco`` (weakened-VBMF stages from
the direct run's baseline). Results are collected from each run's
report.json into docs/results.md (rows are kept per model/seed, so models
can be run separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
}


def command(model, pipeline, seed, workdir, s, pretrained=None):
  args = [sys.executable, 'train.py', f'--config=configs/{model}.py',
          f'--workdir={workdir}', f'--config.pipeline={pipeline}',
          f'--config.seed={seed}', f'--config.num_epochs={s["num_epochs"]}',
          f'--config.validation_size={s["validation_size"]}',
          f'--config.finetune.num_epochs={s["finetune_epochs"]}',
          f'--config.musco.n_stages={s["musco_stages"]}',
          f'--config.musco.finetune_epochs={s["finetune_epochs"]}',
          '--config.progress=False', '--config.checkpoint_every_steps=0']
  if s['train_subset']:
    args.append(f'--config.train_subset={s["train_subset"]}')
  if s.get('test_subset'):
    args.append(f'--config.test_subset={s["test_subset"]}')
  if pipeline in ('direct', 'he2024'):
    args += ['--config.compress.rank_rule=flops_ratio',
             f'--config.compress.target_ratio={s["target"]}']
  if pretrained:
    args.append(f'--config.compress.pretrained={pretrained}')
  return args + s['extra']


def run(args, log):
  shown = ' '.join(shlex.quote(a) for a in
                   ['python'] + args[1:])
  print('$', shown, flush=True)
  t0 = time.time()
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, 'w') as f:
    subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                   check=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=list(SETTINGS))
  parser.add_argument('--seeds', nargs='+', type=int, default=[0])
  parser.add_argument('--pipelines', nargs='+',
                      default=['direct', 'he2024', 'musco'])
  parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'results'))
  args = parser.parse_args()
  results = {}
  if os.path.exists(RESULTS_JSON):
    with open(RESULTS_JSON) as f:
      results = json.load(f)
  t_all = time.time()
  for model in args.models:
    s = SETTINGS[model]
    for seed in args.seeds:
      for pipeline in args.pipelines:
        workdir = os.path.join(args.root, f'{model}_{pipeline}_s{seed}')
        pretrained = None
        if pipeline == 'musco':
          pretrained = os.path.join(args.root, f'{model}_direct_s{seed}',
                                    'stages', 'baseline')
        shown, wall = run(command(model, pipeline, seed, workdir, s,
                                  pretrained), workdir + '.log')
        row = summarize(workdir)
        row.update(command=shown, model=model, pipeline=pipeline, seed=seed,
                   run_s=wall)
        results[f'{model}/{pipeline}/{seed}'] = row
        print(json.dumps(row), flush=True)
        with open(RESULTS_JSON, 'w') as f:
          json.dump(results, f, indent=1)
  print(f'total {time.time() - t_all:.0f} s')


if __name__ == '__main__':
  main()
