"""The compression jobs: direct, he2024 and musco (adtn in lowrank_jax.adtn).

Each job is a sequence of named stages; every stage's output variables are
saved (``workdir/stages/<name>``, atomically) and recorded in
``workdir/stages.json``, and every training stage checkpoints as it goes, so
re-running a killed job resumes at the stage and step it reached. The report
(``report.json``, ``report.md``, plots) is rewritten after every stage.

Stages are importable for notebooks: :func:`choose_ranks`, :func:`compress`,
:func:`evaluate_variables`, :func:`finetune_config`.

* ``direct``: train a baseline -> ranks -> split (Tucker-2 for k x k convs,
  SVD for dense / 1x1) -> fine-tune.
* ``he2024``: over-parameterize -> train with the orthogonality penalty ->
  collapse -> ranks -> split -> fine-tune (He, Jiang, Wu 2024).
* ``musco``: stages of weakened-VBMF compression of a group of layers ->
  fine-tune with early stopping, re-compressing split layers by their cores
  (Gusak et al. 2019); stops when no layer can shrink further.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lowrank_jax import counting
from lowrank_jax import data as data_lib
from lowrank_jax import forms
from lowrank_jax import adtn as adtn_lib
from lowrank_jax import models as models_lib
from lowrank_jax import penalties
from lowrank_jax import rank_rules
from lowrank_jax import report as report_lib
from lowrank_jax import training
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax import vbmf

ConfigError = training.ConfigError


# ----------------------------------------------------------------------------
# Stage functions (pure or nearly so; usable one by one in a notebook).


def selection_rules(config) -> list:
  """The layer rules of ``config.compress``: exclude first, then select."""
  rules = []
  if config.compress.get('exclude'):
    rules.append((config.compress.exclude, False))
  rules.append((config.compress.get('select') or '.*', True))
  return rules


def min_rank_of(config) -> dict[str, int]:
  """``{'kxk': ..., '1x1': ..., 'dense': ...}`` from ``config.compress``."""
  c = config.compress
  return {'kxk': c.min_rank_kxk, '1x1': c.min_rank_1x1,
          'dense': c.min_rank_dense}


def choose_ranks(variables, *, model, input_shape, rule: str = 'vbmf',
                 select=None, weaken: float = 1.0, target_ratio: float = 4.0,
                 min_rank: Mapping[str, int] = rank_rules.DEFAULT_MIN_RANK,
                 conv_form: str = 'tucker2', round_to: int = 1
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, dict]]:
  """Ranks for the selected layers, and per-layer details for the report.

  Args:
    variables: the model's variables (any forms).
    model: the Flax model (for layer geometry).
    input_shape: e.g. (1, 28, 28, 1).
    rule: 'vbmf', 'weakened_vbmf', 'params_ratio' or 'flops_ratio'.
    select: layer rules.
    weaken: MUSCO's weakening factor for 'weakened_vbmf' (1 = plain VBMF).
    target_ratio: network-wide ratio for the '*_ratio' rules.
    min_rank: minimum ranks per layer kind.
    conv_form: 'tucker2' or 'cp' for k x k convs.
    round_to: round target-rule ranks up to a multiple of this.

  Returns:
    ``(ranks, details)``: ranks only for layers whose split shrinks them;
    details for every selected layer (shape, VBMF and weakened ranks,
    singular values, threshold, chosen ranks, reason when kept).
  """
  if rule not in rank_rules.RULES:
    raise ValueError(f'compress.rank_rule={rule!r}; known: {rank_rules.RULES}')
  params, _ = tree.split_variables(variables)
  geometry = rank_rules.layer_geometry(model, variables, input_shape)
  paths = [p for p in tree.select_paths(tree.layers(params), select)
           if p in geometry]
  w = weaken if rule == 'weakened_vbmf' else 1.0
  per_path_min = {p: rank_rules.min_ranks_for(geometry[p], min_rank)
                  for p in paths}
  vb, vb_details = vbmf.vbmf_ranks(
      variables, select=[_exact(p) for p in paths] or ['(?!)'], weaken=w,
      min_rank={_exact(p): min(per_path_min[p]) for p in paths},
      report=True) if paths else ({}, {})
  if rule in ('params_ratio', 'flops_ratio'):
    chosen = rank_rules.ranks_for_ratio(
        geometry, metric=rule.split('_')[0], target=target_ratio, paths=paths,
        min_rank=min_rank, conv_form=conv_form, round_to=round_to)
  else:
    chosen = {}
    for p in paths:
      r = tuple(vb[p])
      if conv_form == 'cp' and geometry[p].kind == 'kxk':
        r = (max(r),)
      chosen[p] = r
  ranks, details = {}, {}
  for p in paths:
    g = geometry[p]
    d = dict(vb_details.get(p, {}))
    d.update(kind=g.kind, kernel_shape=list(g.kernel_shape), form=g.form,
             params_before=g.params, flops_before=g.macs)
    r = chosen.get(p)
    current = forms.get(g.form).ranks(tree.get_layer(params, p))
    if r is None:
      d['kept'] = 'the target rule left this layer dense'
    elif g.form == rank_rules.split_form(g.kind, conv_form) and tuple(
        r) == tuple(current):
      d['kept'] = 'already at these ranks'
    elif g.form == 'dense' and not rank_rules.shrinks(g, r,
                                                      conv_form=conv_form):
      d['kept'] = 'a split at these ranks would not be smaller'
    else:
      ranks[p] = tuple(int(x) for x in r)
    d['chosen'] = list(ranks.get(p, ()))
    details[p] = d
  return ranks, details


def _exact(path: str) -> str:
  import re
  return re.escape(path)


def compress(variables, ranks: Mapping[str, tuple[int, ...]], *,
             conv_form: str = 'tucker2', hooi_iters: int = 0):
  """Splits layers at the ranks the pipeline chose (already checked to
  shrink): :func:`lowrank_jax.transforms.decompose`."""
  return transforms.decompose(variables, ranks, conv_form=conv_form,
                              hooi_iters=hooi_iters, keep_larger=True)


def evaluate_variables(model, variables, dataset: data_lib.Dataset, *,
                       split: str = 'test', batch_size: int = 500) -> dict:
  """Loss and accuracy of a variables tree on a dataset split."""
  config = ml_collections.ConfigDict({'schedule': 'constant'})
  mesh = training.make_mesh()
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  state = training.create_train_state(
      config, model, variables, (1,) + dataset.train.images.shape[1:],
      jax.random.PRNGKey(0), tx=optax.identity(), mesh=mesh)
  return training.evaluate(state, model, getattr(dataset, split), dataset,
                           batch_size, mesh=mesh)


def finetune_config(config, *, num_epochs: Optional[int] = None):
  """The training config of a fine-tuning stage: ``config.finetune`` fields
  override the training fields."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in config.finetune.items():
      if key in out:
        out[key] = value
    if num_epochs is not None:
      out.num_epochs = num_epochs
  return out


# ----------------------------------------------------------------------------
# Start-up validation.


def validate(config, *, model=None, input_shape=None) -> None:
  """Checks the compression fields before any training time is spent."""
  c = config.compress
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
  if c.get('pretrained') and not os.path.isdir(c.pretrained):
    errors.append(f'compress.pretrained={c.pretrained!r}: no saved variables '
                  'there (a directory written by training.save_variables or '
                  'a previous run\'s workdir/stages/baseline)')
  if errors:
    raise ConfigError('; '.join(errors))
  if model is not None and c.rank_rule.endswith('_ratio'):
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False))
    geometry = rank_rules.layer_geometry(model, shapes, input_shape)
    paths = [p for p in tree.select_paths(
        tree.layers(shapes['params']), selection_rules(config))
             if p in geometry]
    try:
      rank_rules.ranks_for_ratio(
          geometry, metric=c.rank_rule.split('_')[0], target=c.target_ratio,
          paths=paths, min_rank=min_rank_of(config), conv_form=c.conv_form)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  else:
    tree.normalize_rules(selection_rules(config))


# ----------------------------------------------------------------------------
# Jobs.


class _Job:
  """Stage bookkeeping, resume, and the report of one pipeline run."""

  def __init__(self, config, workdir: str, pipeline: str):
    self.config, self.workdir, self.pipeline = config, workdir, pipeline
    os.makedirs(workdir, exist_ok=True)
    self.dataset = training.load_dataset(config)
    self.model = models_lib.get_model(config.model,
                                      num_classes=self.dataset.num_classes)
    self.input_shape = (1,) + self.dataset.train.images.shape[1:]
    validate(config, model=self.model, input_shape=self.input_shape)
    self.index_path = os.path.join(workdir, 'stages.json')
    self.index = {}
    if os.path.exists(self.index_path):
      with open(self.index_path) as f:
        self.index = json.load(f)
    self.report = self.index.get('_report') or {
        'pipeline': pipeline, 'model': config.model,
        'dataset': self.dataset.name, 'stages': [], 'layers': {},
        'config': json.loads(config.to_json_best_effort())}

  def stage(self, name: str, fn: Callable[[], tuple[Any, dict]]):
    """Runs ``fn`` unless stage ``name`` is done; returns its variables."""
    path = os.path.join(self.workdir, 'stages', name)
    if self.index.get(name, {}).get('done'):
      return training.load_variables(path)
    t0 = time.time()
    variables, info = fn()
    training.save_variables(path, variables)
    info = dict(info, name=name, wall_s=time.time() - t0)
    info.update(self.measure(variables))
    self.report['stages'].append(info)
    self.index[name] = {'done': True}
    self.index['_report'] = self.report
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
    state, history = training.train(
        config, self.workdir, dataset=self.dataset, variables=variables,
        stage_name=name, model=self.model, **kwargs)
    return state.variables, {'history_tail': training.summarize(history),
                             'epochs': config.num_epochs}

  def baseline(self):
    """Trained baseline variables: from compress.pretrained, or trained."""
    if self.config.compress.get('pretrained'):
      return self.stage('baseline', lambda: (training.load_variables(
          self.config.compress.pretrained), {'source': 'pretrained'}))
    return self.stage('baseline', lambda: self.train('baseline', self.config,
                                                     None))

  def compress_stage(self, name, variables, *, rule=None, weaken=None,
                     select=None):
    c = self.config.compress

    def run():
      ranks, details = choose_ranks(
          variables, model=self.model, input_shape=self.input_shape,
          rule=rule or c.rank_rule, select=select or selection_rules(
              self.config), weaken=c.weaken if weaken is None else weaken,
          target_ratio=c.target_ratio, min_rank=min_rank_of(self.config),
          conv_form=c.conv_form, round_to=c.round_to)
      out = compress(variables, ranks, conv_form=c.conv_form,
                     hooi_iters=c.hooi_iters)
      after = rank_rules.layer_geometry(self.model, out, self.input_shape)
      for p, d in details.items():
        d.update(params_after=after[p].params, flops_after=after[p].macs,
                 form_after=after[p].form)
        self.report['layers'].setdefault(p, {})[name] = d
      return out, {'ranks': {p: list(r) for p, r in ranks.items()},
                   'compressed_layers': len(ranks)}
    return self.stage(name, run)

  def finish(self) -> dict:
    report_lib.write_report(self.workdir, self.report)
    stages = self.report['stages']
    first, last = report_lib.reference_stage(stages), stages[-1]
    return {'stages': [{k: s[k] for k in ('name', 'params', 'flops')} |
                       {'test_accuracy': s['test']['accuracy']}
                       for s in stages],
            'params_ratio': first['params'] / last['params'],
            'flops_ratio': first['flops'] / last['flops'],
            'report': os.path.join(self.workdir, 'report.md')}


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


def run_direct(config, workdir: str) -> dict:
  """Baseline -> ranks -> split -> fine-tune."""
  job = _Job(config, workdir, 'direct')
  variables = job.baseline()
  variables = job.compress_stage('compress', variables)
  job.stage('finetune', lambda: job.train('finetune', finetune_config(config),
                                          variables))
  return job.finish()


def run_he2024(config, workdir: str) -> dict:
  """Over-parameterize -> orthogonal training -> collapse -> ranks -> split
  -> fine-tune. Starts from compress.pretrained when given (the
  over-parameterized training then continues from it), else from scratch."""
  job = _Job(config, workdir, 'he2024')
  h = config.he2024

  def overparam():
    if config.compress.get('pretrained'):
      start = training.load_variables(config.compress.pretrained)
    else:
      start = training.init_variables(job.model, job.input_shape,
                                      jax.random.PRNGKey(config.seed))
    out = transforms.overparameterize(
        start, select=h.get('select') or None, expansion=h.expansion,
        key=jax.random.PRNGKey(config.seed + 1))
    return out, {'expansion': h.expansion}

  variables = job.stage('overparameterize', overparam)
  train_config = copy.deepcopy(config)
  if h.get('num_epochs'):
    with train_config.unlocked():
      train_config.num_epochs = h.num_epochs
  variables = job.stage('orthogonal_train', lambda: job.train(
      'orthogonal_train', train_config, variables,
      penalty_fn=penalties.orthogonal_penalty,
      penalty_weight=h.penalty_weight))
  variables = job.stage('collapse', lambda: (transforms.collapse(variables),
                                             {}))
  variables = job.compress_stage('compress', variables)
  job.stage('finetune', lambda: job.train('finetune', finetune_config(config),
                                          variables))
  return job.finish()


def run_musco(config, workdir: str) -> dict:
  """Multi-stage: weakened-VBMF compress a group of layers -> fine-tune."""
  job = _Job(config, workdir, 'musco')
  m = config.musco
  variables = job.baseline()
  params, _ = tree.split_variables(variables)
  candidates = [p for p in tree.select_paths(tree.layers(params),
                                             selection_rules(config))]
  group_size = m.layers_per_stage or len(candidates)
  cursor, idle_groups = 0, 0
  for stage in range(m.n_stages):
    name = f'stage{stage + 1}'
    if job.index.get(f'{name}_finetune', {}).get('done'):
      variables = training.load_variables(
          os.path.join(workdir, 'stages', f'{name}_finetune'))
      cursor = (cursor + group_size) % len(candidates)
      continue
    group = [candidates[(cursor + i) % len(candidates)]
             for i in range(min(group_size, len(candidates)))]
    cursor = (cursor + group_size) % len(candidates)
    ranks, _ = choose_ranks(
        variables, model=job.model, input_shape=job.input_shape,
        rule='weakened_vbmf', select=[_exact(p) for p in group],
        weaken=m.weaken, min_rank=min_rank_of(config),
        conv_form=config.compress.conv_form)
    if not ranks:
      idle_groups += 1
      if idle_groups * group_size >= len(candidates):
        job.report['stopped'] = (f'after {stage} stages: no layer can shrink '
                                 'further at these minimum ranks')
        break
      continue
    idle_groups = 0
    variables = job.compress_stage(
        f'{name}_compress', variables, rule='weakened_vbmf', weaken=m.weaken,
        select=[_exact(p) for p in group])
    ft = finetune_config(config, num_epochs=m.finetune_epochs)
    with ft.unlocked():
      ft.early_stopping_patience = m.patience
    variables = job.stage(f'{name}_finetune', lambda v=variables, n=name:
                          job.train(f'{n}_finetune', ft, v))
  return job.finish()


def run_adtn(config, workdir: str) -> dict:
  """Baseline -> encode the selected layers as ADTNs -> train end to end.

  The gates are first fitted to the pretrained kernels (``adtn.fit_steps``
  of Adam on the reconstruction, relative errors in the report), then the
  whole network trains through the decode (Qing et al. 2023)."""
  job = _Job(config, workdir, 'adtn')
  a = config.adtn
  variables = job.baseline()

  def encode():
    out, actions = adtn_lib.adtn_encode(
        variables, select=a.select, depth=a.depth,
        nonlinearity=a.nonlinearity, steps=a.fit_steps,
        learning_rate=a.fit_learning_rate, noise=a.noise,
        match_norm=a.match_norm, min_size=a.min_size,
        share=a.get('share', False), key=jax.random.PRNGKey(config.seed),
        report=True)
    for act in actions:
      job.report['layers'].setdefault(act.path, {})['encode'] = {
          'form': act.form_before, 'form_after': act.form_after,
          'action': act.action, 'kept': act.reason,
          'chosen': list(act.ranks), 'rel_error': act.rel_error,
          'params_before': act.params_before,
          'params_after': act.params_after, 'group': act.group}
    timing = adtn_lib.decode_time(out)
    return out, {'decode_s_per_step': timing.seconds,
                 'decode_macs': timing.macs,
                 'encoded_layers': [x.path for x in actions
                                    if x.action == 'split']}

  variables = job.stage('encode', encode)
  job.stage('train', lambda: job.train('adtn_train', finetune_config(config),
                                       variables))
  return job.finish()


PIPELINES: dict[str, Callable[[Any, str], dict]] = {
    'adtn': run_adtn,
    'direct': run_direct,
    'he2024': run_he2024,
    'musco': run_musco,
}
