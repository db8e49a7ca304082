"""The bookkeeping of a compression job: stages, resume, measurements, report.

A job (see :mod:`lowrank_jax.train.pipelines` for the four of them) is a
sequence of named stages. :class:`Job` runs a stage unless it is done, saves
its output variables (``workdir/stages/<name>``, atomically), measures them
(params, FLOPs, test and validation accuracy), records the stage in
``workdir/stages.json`` and rewrites the report (``report.json``,
``report.md``, plots); every training stage checkpoints as it goes, so
re-running a killed job resumes at the stage and step it reached.

:func:`validate` checks the compression fields of a config before any
training time is spent; :func:`evaluate_variables` measures a variables tree
on a dataset split (usable on its own in a notebook).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
import numpy as np
import optax

from lowrank_jax import counting
from lowrank_jax import deploy
from lowrank_jax import models as models_lib
from lowrank_jax import nnx_surgery
from lowrank_jax import rank_rules
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax.forms import adtn as adtn_form
from lowrank_jax.train import checkpoint
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
# The compression fields of a config.


def selection_rules(config) -> list:
  """The layer rules of ``config.compress``: exclude first, then select."""
  rules = []
  if config.compress.get('exclude'):
    rules.append((config.compress.exclude, False))
  rules.append((config.compress.get('select') or '.*', True))
  return rules


def min_rank_of(config, geometry) -> dict[str, int]:
  """``config.compress.min_rank_{kxk,1x1,dense}`` in the library's
  ``min_rank`` convention: ``{exact path rule: minimum rank}`` for every
  layer of ``geometry`` (:func:`lowrank_jax.rank_rules.layer_geometry`), by
  its kind. The one place the tool's fields become ranks."""
  c = config.compress
  by_kind = {'kxk': c.min_rank_kxk, '1x1': c.min_rank_1x1,
             'dense': c.min_rank_dense}
  return {tree.exact(p): by_kind[g.kind] for p, g in geometry.items()}


def _adtn_errors(a) -> list[str]:
  """What is wrong with the ``adtn.*`` fields (checked before training)."""
  errors = []
  if a.nonlinearity not in adtn_form.NONLINEARITIES:
    errors.append(f'adtn.nonlinearity={a.nonlinearity!r} is not one of '
                  f'{sorted(adtn_form.NONLINEARITIES)}')
  for field, low in (('depth', 1), ('fit_steps', 0), ('min_size', 1)):
    value = a[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      errors.append(f'adtn.{field}={value!r} must be an int >= {low}')
  for field in ('fit_learning_rate', 'noise'):
    if not a[field] >= 0 or (field == 'fit_learning_rate' and a[field] == 0):
      errors.append(f'adtn.{field}={a[field]!r} must be > 0' if field ==
                    'fit_learning_rate' else f'adtn.{field}={a[field]!r} '
                    'must be >= 0')
  try:
    re.compile(a.select)
  except re.error as e:
    errors.append(f'adtn.select={a.select!r} is not a valid regex: {e}')
  return errors


def _no_saved_variables(field, path, expected):
  """``[error]`` naming ``field`` when ``path`` is set but is not a
  directory of saved variables (``expected`` says what it should be)."""
  if path and not os.path.isdir(path):
    return [f'{field}={path!r}: no saved variables there ({expected})']
  return []


def validate(config, *, model=None, input_shape=None) -> None:
  """Checks the compression fields before any training time is spent.

  The fields first (every error found, in one ConfigError); then, given the
  model and its input shape, the selection rules and the FLOP / parameter
  target resolved against the model's layers.
  """
  errors = (_rule_errors(config.compress) + _pipeline_errors(config)
            + _saved_variables_errors(config)
            + _regex_errors(config.compress))
  if errors:
    raise ConfigError('; '.join(errors))
  if model is None:
    tree.normalize_rules(selection_rules(config))
    return
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False))
  _check_selection(config, shapes)
  if config.compress.rank_rule.endswith('_ratio'):
    _check_target(config, model, shapes, input_shape)
  else:
    tree.normalize_rules(selection_rules(config))


def _rule_errors(c) -> list[str]:
  """Errors of the rank rule, conv form, minimum ranks and weakening."""
  errors = []
  if c.rank_rule not in rank_rules.RULES:
    errors.append(f'compress.rank_rule={c.rank_rule!r} is not one of '
                  f'{rank_rules.RULES}')
  if c.conv_form not in ('tucker2', 'cp'):
    errors.append(f"compress.conv_form={c.conv_form!r}: use 'tucker2' or "
                  "'cp'")
  for key in ('min_rank_kxk', 'min_rank_1x1', 'min_rank_dense'):
    if c[key] < 1:
      errors.append(f'compress.{key}={c[key]} must be >= 1')
  if not 0 < c.weaken <= 1 and c.rank_rule == 'weakened_vbmf':
    errors.append(f'compress.weaken={c.weaken} must be in (0, 1] for the '
                  'weakened_vbmf rule (0 would compress nothing)')
  return errors


def _pipeline_errors(config) -> list[str]:
  """Errors of the running pipeline's own fields (musco, he2024, adtn)."""
  errors = []
  if config.pipeline == 'musco':
    m = config.musco
    if not 0 < m.weaken <= 1:
      errors.append(f'musco.weaken={m.weaken} must be in (0, 1]: MUSCO with '
                    'weaken 0 never compresses')
    if m.n_stages < 1:
      errors.append(f'musco.n_stages={m.n_stages} must be >= 1')
    if m.layers_per_stage < 0:
      errors.append(f'musco.layers_per_stage={m.layers_per_stage} must be '
                    '>= 0 (0: all layers each stage)')
  if config.pipeline == 'he2024' and config.he2024.expansion < 1:
    errors.append(f'he2024.expansion={config.he2024.expansion} must be >= 1')
  if config.pipeline == 'he2024' and config.he2024.penalty_weight < 0:
    errors.append(f'he2024.penalty_weight={config.he2024.penalty_weight} '
                  'must be >= 0')
  if config.pipeline == 'adtn':
    errors += _adtn_errors(config.adtn)
  return errors


def _saved_variables_errors(config) -> list[str]:
  """Errors of the directories a run starts from (he2024.trained,
  compress.pretrained)."""
  errors = []
  if config.pipeline == 'he2024':
    errors += _no_saved_variables(
        'he2024.trained', config.get('he2024', {}).get('trained'),
        "a previous he2024 run's workdir/stages/collapse")
  return errors + _no_saved_variables(
      'compress.pretrained', config.compress.get('pretrained'),
      'a directory written by checkpoint.save_variables or a previous '
      "run's workdir/stages/baseline")


def _regex_errors(c) -> list[str]:
  """Errors of compress.select / compress.exclude that are not regexes."""
  errors = []
  for field in ('select', 'exclude'):
    if c.get(field):
      try:
        re.compile(c[field])
      except re.error as e:
        errors.append(f'compress.{field}={c[field]!r} is not a valid regex: '
                      f'{e}')
  return errors


def _check_selection(config, shapes) -> None:
  """The selection rules (and adtn.select) resolve against the layers."""
  try:   # the rules resolve against the model's layers, before training
    tree.select_paths(tree.find_layers(shapes), selection_rules(config))
  except ValueError as e:
    raise ConfigError(f'compress.select / compress.exclude: {e}') from e
  if config.pipeline == 'adtn':
    try:
      tree.select_paths(tree.find_layers(shapes), config.adtn.select)
    except ValueError as e:
      raise ConfigError(f'adtn.select: {e}') from e


def _check_target(config, model, shapes, input_shape) -> None:
  """compress.target_ratio is reachable with the minimum ranks."""
  c = config.compress
  geometry = rank_rules.layer_geometry(model, shapes, input_shape)
  paths = [p for p in tree.select_paths(
      tree.layers(shapes['params']), selection_rules(config))
           if p in geometry]
  try:
    rank_rules.ranks_for_ratio(
        geometry, metric=c.rank_rule.split('_')[0], target=c.target_ratio,
        paths=paths, min_rank=min_rank_of(config, geometry),
        conv_form=c.conv_form)
  except ValueError as e:
    fields = ', '.join(f'compress.min_rank_{k}={c[f"min_rank_{k}"]}'
                       for k in ('kxk', '1x1', 'dense'))
    raise ConfigError(f'compress.target_ratio={c.target_ratio}: {e} '
                      f'(minimum ranks from {fields})') from e


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
    validate(config, model=self.model, input_shape=self.input_shape)
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
    tmp = self.index_path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.index, f, indent=1, default=_json_default)
    os.replace(tmp, self.index_path)

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
