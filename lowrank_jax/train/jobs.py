"""The bookkeeping of a compression job: stages, resume, measurements, report.

A job (see :mod:`lowrank_jax.train.pipelines` for the four of them) is a
sequence of named stages. :class:`Job` runs a stage unless it is done, saves
its output variables (``workdir/stages/<name>``, atomically), measures them
(params, FLOPs, test and validation accuracy), records the stage in
``workdir/stages.json`` and rewrites the report (``report.json``,
``report.md``, plots); every training stage checkpoints as it goes, so
re-running a killed job resumes at the stage and step it reached.

:func:`evaluate_variables` measures a variables tree on a dataset split
(usable on its own in a notebook); the compression fields of a config are
checked by :mod:`lowrank_jax.train.compress_config`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx
import numpy as np
import optax

from lowrank_jax import counting
from lowrank_jax import deploy
from lowrank_jax import models as models_lib
from lowrank_jax import nnx_surgery
from lowrank_jax import transforms
from lowrank_jax.train import atomic
from lowrank_jax.train import checkpoint
from lowrank_jax.train import compress_config
from lowrank_jax.train import data as data_lib
from lowrank_jax.train.errors import CheckpointError
from lowrank_jax.train import loop
from lowrank_jax.train import metrics
from lowrank_jax.train import report as report_lib
from lowrank_jax.train import sharding
from lowrank_jax.train import state as state_lib
from lowrank_jax.train import steps
from lowrank_jax.train.errors import ConfigError


# ----------------------------------------------------------------------------
# Measuring a stage.


def evaluate_variables(model, variables, dataset: data_lib.Dataset, *,
                       split: str = 'test', batch_size: int = 500) -> dict:
  """Loss and accuracy of a variables tree on a dataset split."""
  config = ml_collections.ConfigDict({'schedule': 'constant'})
  mesh = sharding.make_mesh()
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  state = state_lib.create_train_state(
      config, model, variables, (1,) + dataset.train.images.shape[1:],
      jax.random.PRNGKey(0), tx=optax.identity(), mesh=mesh)
  return steps.evaluate(state, model, getattr(dataset, split), dataset,
                        batch_size, mesh=mesh)


# ----------------------------------------------------------------------------
# Jobs.


# Fields that change how a run is watched, not what it computes.
_BOOKKEEPING = ('progress', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints', 'redo_from', 'distributed',
                'coordinator_address', 'num_processes', 'process_id',
                'local_device_ids', 'distributed_timeout_s', 'eval_batch_size')
# The stage a changed config group first affects (other fields: the first).
_FIRST_AFFECTED = {'compress': 'compress', 'finetune': 'finetune',
                   'he2024': 'overparameterize', 'adtn': 'encode',
                   'musco': 'stage1_compress'}


def _read_index(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(
        f'{path} is not valid JSON ({e}); it records which stages are done: '
        'restore it, or delete it to redo every stage (their saved variables '
        'are then overwritten)') from e


def check_workdir(config, workdir: str) -> dict:
  """The workdir's stage index, checked against ``config``.

  A workdir describes its results: if stages are done under another config
  (fields other than bookkeeping ones differ), the run is refused with the
  changed fields and the first stage they affect, unless
  ``config.redo_from`` names a done stage; then that stage and the ones
  after it are dropped from the index (their saved variables are replaced
  when they run again), and the rest is kept.

  Returns:
    The index to continue from.
  """
  path = os.path.join(workdir, 'stages.json')
  index = _read_index(path)
  report = index.get('_report') or {}
  done = [s['name'] for s in report.get('stages', [])]
  new = json.loads(config.to_json_best_effort())
  changed = [f for f in checkpoint._config_diff(report.get('config'), new)  # pylint: disable=protected-access
             if f.split('.')[0].split(' ')[0] not in _BOOKKEEPING]
  if not changed or not done:
    return index
  redo = config.get('redo_from') or ''
  if not redo:
    group = changed[0].split('.')[0].split(' ')[0]
    first = _FIRST_AFFECTED.get(group, done[0])
    first = first if first in done else done[0]
    raise ConfigError(
        f'{workdir} holds stages {done} of another config; changed: '
        f'{"; ".join(changed[:8])}. The first stage this affects is '
        f'{first!r}: re-run with --config.redo_from={first} to redo it and '
        'the stages after it (the earlier ones are kept), or use a new '
        '--workdir')
  if redo not in done:
    raise ConfigError(f'config.redo_from={redo!r} is not a done stage of '
                      f'{workdir}; done stages: {done}')
  drop = done[done.index(redo):]
  stamp = time.strftime('%Y%m%d-%H%M%S')
  for name in drop:
    index.pop(name, None)
    # Their training checkpoints belong to the old config: moved aside
    # (never deleted), so the redone stages train from their new inputs.
    for ckpt in {name, 'adtn_train' if name == 'train' else name}:
      old = os.path.join(workdir, 'checkpoints', ckpt)
      if os.path.isdir(old):
        os.replace(old, f'{old}.replaced-{stamp}')
  report['stages'] = [s for s in report['stages'] if s['name'] not in drop]
  report['config'] = new
  return index


class Job:
  """Stage bookkeeping, resume, and the report of one pipeline run."""

  def __init__(self, config, workdir: str, pipeline: str):
    self.config, self.workdir, self.pipeline = config, workdir, pipeline
    self.dataset = loop.load_dataset(config)
    self.model = models_lib.get_model(config.model,
                                      num_classes=self.dataset.num_classes)
    self.input_shape = (1,) + self.dataset.train.images.shape[1:]
    compress_config.validate(config, model=self.model,
                             input_shape=self.input_shape)
    os.makedirs(workdir, exist_ok=True)   # only once the config is valid
    self.index_path = os.path.join(workdir, 'stages.json')
    self.index = check_workdir(config, workdir)
    self.report = self.index.get('_report') or {
        'pipeline': pipeline, 'model': config.model,
        'dataset': self.dataset.name, 'stages': [], 'layers': {},
        'config': json.loads(config.to_json_best_effort())}

  def stage(self, name: str, fn: Callable[[], tuple[Any, dict]]):
    """Runs ``fn`` unless stage ``name`` is done; returns its variables."""
    path = os.path.join(self.workdir, 'stages', name)
    if self.index.get(name, {}).get('done'):
      if not os.path.isdir(path) and not os.path.isdir(f'{path}.old'):
        raise CheckpointError(
            f'stage {name!r} is marked done in {self.index_path} but its '
            f'variables at {path} are gone. To redo it, delete the entry '
            f'"{name}" (and those of the stages after it) from that file and '
            'run the same command again; or use a new --workdir')
      self.last = checkpoint.load_variables(path)
      return self.last
    t0 = time.time()
    variables, info = fn()
    checkpoint.save_variables(path, variables)
    info = dict(info, name=name, wall_s=time.time() - t0)
    info.update(self.measure(variables))
    # A stage run again (its entry removed from stages.json) replaces its
    # earlier row: each stage is reported once.
    self.report['stages'] = [s for s in self.report['stages']
                             if s.get('name') != name]
    self.report['stages'].append(info)
    self.last = variables
    self.index[name] = {'done': True}
    self.index['_report'] = self.report
    if jax.process_index() == 0:   # one writer of the workdir's files
      self._write_index()
      report_lib.write_report(self.workdir, self.report)
    return variables

  def measure(self, variables) -> dict:
    flops = counting.count_flops(self.model, variables, self.input_shape,
                                 train=False)
    return {'params': counting.count_params(variables),
            'flops': flops.total,
            'test': evaluate_variables(self.model, variables, self.dataset),
            'validation': evaluate_variables(self.model, variables,
                                             self.dataset,
                                             split='validation')}

  def _write_index(self):
    atomic.write_text(self.index_path, json.dumps(
        self.index, indent=1, default=_json_default))

  def train(self, name, config, variables, **kwargs):
    # Through the module attribute, so a test can replace loop.train.
    state, history = loop.train(
        config, self.workdir, dataset=self.dataset, variables=variables,
        stage_name=name, model=self.model, **kwargs)
    return state.variables, {'history_tail': metrics.summarize(history),
                             'epochs': config.num_epochs}

  def baseline(self):
    """Trained baseline variables: from compress.pretrained, or trained."""
    if self.config.compress.get('pretrained'):
      return self.stage('baseline', lambda: (checkpoint.load_variables(
          self.config.compress.pretrained), {'source': 'pretrained'}))
    return self.stage('baseline', lambda: self.train('baseline', self.config,
                                                     None))

  def finish(self) -> dict:
    stages = self.report['stages']
    # Every process reads (Orbax restores are collective on several
    # hosts); process 0 alone writes.
    reference = report_lib.reference_stage(stages)['name']
    baseline = checkpoint.load_variables(
        os.path.join(self.workdir, 'stages', reference))
    if jax.process_index() == 0:
      report_lib.write_report(self.workdir, self.report)
      self.export(self.last, baseline, stages[-1], reference)
    first, last = report_lib.reference_stage(stages), stages[-1]
    return {'stages': [{k: s[k] for k in ('name', 'params', 'flops')} |
                       {'test_accuracy': s['test']['accuracy']}
                       for s in stages],
            'params_ratio': first['params'] / last['params'],
            'flops_ratio': first['flops'] / last['flops'],
            'report': os.path.join(self.workdir, 'report.md')}

  def export(self, variables, baseline, stage: dict, reference: str) -> str:
    """Writes ``DIR/export/``: the serialized StableHLO of the inference
    function (weights embedded, batch symbolic), its input spec and a JSON
    summary. Replaced whole, never half-written."""
    example = jax.ShapeDtypeStruct(self.input_shape, np.float32)
    out = os.path.join(self.workdir, 'export')
    tmp = out + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # The compressed network, and the dense one it is compared with beside
    # it (bench/bench_export.py measures the pair's latency).
    for name, v in (('model', variables), ('baseline', baseline)):
      model, args = _export_module(self.model, v)
      kwargs = {} if isinstance(model, nnx.Module) else {'train': False}
      exported = deploy.export(model, *args, example, **kwargs)
      with open(os.path.join(tmp, f'{name}.stablehlo'), 'wb') as f:
        f.write(exported.serialize())
    spec = {'shape': ['batch', *self.input_shape[1:]], 'dtype': 'float32',
            'layout': 'NHWC',
            'normalize': {'mean': np.asarray(self.dataset.mean).tolist(),
                          'std': np.asarray(self.dataset.std).tolist()},
            'how': 'x = (images / 255 - mean) / std; logits = '
                   'jax.export.deserialize(data).call(x)'}
    summary = {'model': self.config.model, 'pipeline': self.pipeline,
               'stage': stage['name'], 'params': stage['params'],
               'flops': stage['flops'],
               'test_accuracy': stage['test']['accuracy'],
               'forms': transforms.layer_forms(variables),
               'baseline_stage': reference,
               'platforms': list(exported.platforms),
               'jax': jax.__version__}
    for name, value in (('input_spec.json', spec), ('export.json', summary)):
      with open(os.path.join(tmp, name), 'w') as f:
        json.dump(value, f, indent=1, default=_json_default)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _export_module(model, variables):
  """``(model, args)`` for :func:`lowrank_jax.export` of these variables."""
  if isinstance(model, nnx_surgery.NNXModel):
    return model.module(variables), ()
  return model, (variables,)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if hasattr(x, 'tolist'):
    return np.asarray(x).tolist()
  raise TypeError(f'not JSON serializable: {type(x).__name__}')
