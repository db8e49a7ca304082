"""The compression jobs: direct, he2024, musco and adtn.

Each job is a sequence of named stages run through the bookkeeping of
:mod:`lowrank_jax.train.jobs` (saved stage outputs, ``stages.json``, resume
at the stage and step a killed job reached, the report rewritten after every
stage); :data:`PIPELINES` maps ``config.pipeline`` to its runner.

Stages are importable for notebooks: :func:`choose_ranks`, :func:`compress`,
:func:`finetune_config`, :func:`distillation` (and
:func:`lowrank_jax.train.jobs.evaluate_variables`).

Every fine-tuning stage (and ADTN's end-to-end training) can distill from
the network before compression (the baseline; he2024's collapsed network):
``finetune.distill_weight`` > 0 mixes its softened outputs into the loss
(:class:`lowrank_jax.train.steps.Distillation`).

* ``direct``: train a baseline -> ranks -> split (Tucker-2 for k x k convs,
  SVD for dense / 1x1) -> fine-tune.
* ``he2024``: over-parameterize -> train with the orthogonality penalty ->
  collapse -> ranks -> split -> fine-tune (He, Jiang, Wu 2024).
* ``musco``: stages of weakened-VBMF compression of a group of layers ->
  fine-tune with early stopping, re-compressing split layers by their cores
  (Gusak et al. 2019); stops when no layer can shrink further.
* ``adtn``: baseline -> encode the selected layers as ADTNs -> train end to
  end (Qing et al. 2023; the encoding is :mod:`lowrank_jax.adtn`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from typing import Any, Callable, Mapping, Optional

import jax

from lowrank_jax import adtn as adtn_lib
from lowrank_jax import batch_stats
from lowrank_jax import forms
from lowrank_jax import penalties
from lowrank_jax import rank_rules
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax import vbmf
from lowrank_jax.train import checkpoint
from lowrank_jax.train import compress_config
from lowrank_jax.train import epochs
from lowrank_jax.train import jobs
from lowrank_jax.train import state as state_lib
from lowrank_jax.train import steps

# The training loop's logger (lowrank_jax.train.loop), so one filter covers
# both.
logger = logging.getLogger('lowrank_jax.training')


# ----------------------------------------------------------------------------
# Stage functions (pure or nearly so; usable one by one in a notebook).


def choose_ranks(variables, *, model, input_shape, rule: str = 'vbmf',
                 select=None, weaken: float = 1.0, target_ratio: float = 4.0,
                 min_rank: vbmf.MinRank = None, conv_form: str = 'tucker2',
                 round_to: int = 1, geometry=None
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
    min_rank: None (the defaults by layer kind), an int or ``{path regex:
      int}``, as in :func:`lowrank_jax.vbmf_ranks`.
    conv_form: 'tucker2' or 'cp' for k x k convs.
    round_to: round target-rule ranks up to a multiple of this.
    geometry: :func:`lowrank_jax.rank_rules.layer_geometry` of ``variables``
      when the caller has it (traced here otherwise).

  Returns:
    ``(ranks, details)``: ranks only for layers whose split shrinks them;
    details for every selected layer (shape, VBMF and weakened ranks,
    singular values, threshold, chosen ranks, reason when kept).
  """
  if rule not in rank_rules.RULES:
    raise ValueError(f'compress.rank_rule={rule!r}; known: {rank_rules.RULES}')
  params, _ = tree.split_variables(variables)
  if geometry is None:
    geometry = rank_rules.layer_geometry(model, variables, input_shape)
  paths = [p for p in tree.select_paths(tree.layers(params), select)
           if p in geometry]
  w = weaken if rule == 'weakened_vbmf' else 1.0
  floors = rank_rules.min_rank_floors(geometry, min_rank)
  per_path_min = {p: rank_rules.min_ranks_for(geometry[p], floors[p])
                  for p in paths}
  vb, vb_details = vbmf.vbmf_ranks(
      variables, select=[tree.exact(p) for p in paths] or ['(?!)'], weaken=w,
      min_rank={tree.exact(p): min(per_path_min[p]) for p in paths},
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


def compress(variables, ranks: Mapping[str, tuple[int, ...]], *,
             conv_form: str = 'tucker2', hooi_iters: int = 0):
  """Splits layers at the ranks the pipeline chose (already checked to
  shrink): :func:`lowrank_jax.transforms.decompose`."""
  return transforms.decompose(variables, ranks, conv_form=conv_form,
                              hooi_iters=hooi_iters, keep_larger=True)


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


def distillation(config, teacher) -> Optional[steps.Distillation]:
  """The fine-tuning stage's distillation from ``teacher`` (the network
  before compression), or None when ``finetune.distill_weight`` is 0."""
  f = config.finetune
  if not f.get('distill_weight'):
    return None
  return steps.Distillation(teacher, f.distill_weight,
                            f.distill_temperature)


def _finetune(job: jobs.Job, name: str, config, variables, teacher):
  """Stage ``name``: ``config`` (a :func:`finetune_config`) trains
  ``variables``, distilled from ``teacher`` when the config asks."""
  return job.stage(name, lambda: job.train(
      name, config, variables, distill=distillation(job.config, teacher)))


# ----------------------------------------------------------------------------
# The compression stage of a job.


def _config_ranks(job: jobs.Job, variables, *, rule=None, weaken=None,
                  select=None):
  """:func:`choose_ranks` with the job's ``config.compress`` fields for
  every argument not given."""
  c = job.config.compress
  geometry = rank_rules.layer_geometry(job.model, variables, job.input_shape)
  return choose_ranks(
      variables, model=job.model, input_shape=job.input_shape,
      rule=rule or c.rank_rule,
      select=select or compress_config.selection_rules(job.config),
      weaken=c.weaken if weaken is None else weaken,
      target_ratio=c.target_ratio,
      min_rank=compress_config.min_rank_of(job.config, geometry),
      conv_form=c.conv_form, round_to=c.round_to, geometry=geometry)


def _compress_stage(job: jobs.Job, name: str, variables, chosen=None):
  """Stage ``name``: splits ``variables`` at ``chosen`` (``(ranks,
  details)`` of :func:`choose_ranks`; by default :func:`_config_ranks`,
  computed only when the stage runs) and records each layer's details."""
  c = job.config.compress

  def run():
    ranks, details = (_config_ranks(job, variables) if chosen is None
                      else chosen)
    out = compress(variables, ranks, conv_form=c.conv_form,
                   hooi_iters=c.hooi_iters)
    if ranks and c.get('recalibrate_batches'):
      out = recalibrate(job, out, c.recalibrate_batches)
    after = rank_rules.layer_geometry(job.model, out, job.input_shape)
    for p, d in details.items():
      d.update(params_after=after[p].params, flops_after=after[p].macs,
               form_after=after[p].form)
      job.report['layers'].setdefault(p, {})[name] = d
    return out, {'ranks': {p: list(r) for p, r in ranks.items()},
                 'compressed_layers': len(ranks)}
  return job.stage(name, run)


def recalibrate(job: jobs.Job, variables, num_batches: int):
  """BatchNorm statistics of a split network re-estimated on the first
  ``num_batches`` training batches of epoch 0, as the training loop draws
  them (:func:`lowrank_jax.recalibrate_batch_stats`); unchanged without
  BatchNorm."""
  if 'batch_stats' not in variables:
    return variables
  batches = epochs.epoch_batches(job.config, job.dataset, 0)
  return batch_stats.recalibrate_batch_stats(
      job.model, variables, itertools.islice(batches, num_batches))


# ----------------------------------------------------------------------------
# The jobs.


def run_direct(config, workdir: str) -> dict:
  """Baseline -> ranks -> split -> fine-tune."""
  job = jobs.Job(config, workdir, 'direct')
  baseline = job.baseline()
  variables = _compress_stage(job, 'compress', baseline)
  _finetune(job, 'finetune', finetune_config(config), variables, baseline)
  return job.finish()


def run_he2024(config, workdir: str) -> dict:
  """Over-parameterize -> orthogonal training -> collapse -> ranks -> split
  -> fine-tune. Starts from compress.pretrained when given (the
  over-parameterized training then continues from it), else from scratch;
  with he2024.trained (an earlier run's stages/collapse) it only splits
  and fine-tunes that network."""
  job = jobs.Job(config, workdir, 'he2024')
  h = config.he2024

  def overparam():
    if config.compress.get('pretrained'):
      start = checkpoint.load_variables(config.compress.pretrained)
    else:
      start = state_lib.init_variables(job.model, job.input_shape,
                                       jax.random.PRNGKey(config.seed))
    out = transforms.overparameterize(
        start, select=h.get('select') or None, expansion=h.expansion,
        key=jax.random.PRNGKey(config.seed + 1))
    return out, {'expansion': h.expansion}

  if h.get('trained'):
    variables = job.stage('collapse', lambda: (
        checkpoint.load_variables(h.trained), {'source': h.trained}))
  else:
    variables = job.stage('overparameterize', overparam)
    train_config = copy.deepcopy(config)
    if h.get('num_epochs'):
      with train_config.unlocked():
        train_config.num_epochs = h.num_epochs
    variables = job.stage('orthogonal_train', lambda: job.train(
        'orthogonal_train', train_config, variables,
        penalty_fn=penalties.orthogonal_penalty,
        penalty_weight=h.penalty_weight))
    variables = job.stage('collapse', lambda: (
        transforms.collapse(variables), {}))
  dense = variables
  variables = _compress_stage(job, 'compress', dense)
  _finetune(job, 'finetune', finetune_config(config), variables, dense)
  return job.finish()


def run_musco(config, workdir: str) -> dict:
  """Multi-stage: weakened-VBMF compress a group of layers -> fine-tune."""
  job = jobs.Job(config, workdir, 'musco')
  m = config.musco
  variables = baseline = job.baseline()
  params, _ = tree.split_variables(variables)
  candidates = list(tree.select_paths(
      tree.layers(params), compress_config.selection_rules(config)))
  group_size = m.layers_per_stage or len(candidates)
  cursor, idle_groups = 0, 0
  for stage in range(m.n_stages):
    name = f'stage{stage + 1}'
    if job.index.get(f'{name}_finetune', {}).get('done'):
      variables = checkpoint.load_variables(
          os.path.join(workdir, 'stages', f'{name}_finetune'))
      cursor = (cursor + group_size) % len(candidates)
      continue
    group = [candidates[(cursor + i) % len(candidates)]
             for i in range(min(group_size, len(candidates)))]
    cursor = (cursor + group_size) % len(candidates)
    # Chosen once: the check below and the compress stage share them.
    ranks, details = _config_ranks(
        job, variables, rule='weakened_vbmf', weaken=m.weaken,
        select=[tree.exact(p) for p in group])
    if not ranks:
      idle_groups += 1
      if idle_groups * group_size >= len(candidates):
        job.report['stopped'] = (f'after {stage} stages: no layer can shrink '
                                 'further at these minimum ranks')
        break
      continue
    idle_groups = 0
    variables = _compress_stage(job, f'{name}_compress', variables,
                                (ranks, details))
    ft = finetune_config(config, num_epochs=m.finetune_epochs)
    with ft.unlocked():
      ft.early_stopping_patience = m.patience
    variables = _finetune(job, f'{name}_finetune', ft, variables, baseline)
  return job.finish()


def run_adtn(config, workdir: str) -> dict:
  """Baseline -> encode the selected layers as ADTNs -> train end to end.

  The gates are first fitted to the pretrained kernels (``adtn.fit_steps``
  of Adam on the reconstruction, relative errors in the report), then the
  whole network trains through the decode (Qing et al. 2023)."""
  job = jobs.Job(config, workdir, 'adtn')
  a = config.adtn
  variables = baseline = job.baseline()

  def encode():
    out, actions = adtn_lib.adtn_encode(
        variables, select=a.select, depth=a.depth,
        nonlinearity=a.nonlinearity, steps=a.fit_steps,
        learning_rate=a.fit_learning_rate, noise=a.noise,
        match_norm=a.match_norm, normalize=a.get('normalize', False),
        min_size=a.min_size,
        share=a.get('share', False), key=jax.random.PRNGKey(config.seed),
        report=True)
    for act in actions:
      job.report['layers'].setdefault(act.path, {})['encode'] = {
          'form': act.form_before, 'form_after': act.form_after,
          'action': act.action, 'kept': act.reason,
          'chosen': list(act.ranks), 'rel_error': act.rel_error,
          'fit_error': act.fit_error,
          'params_before': act.params_before,
          'params_after': act.params_after, 'group': act.group}
    timing = adtn_lib.decode_time(out)
    return out, {'decode_s_per_step': timing.seconds,
                 'decode_macs': timing.macs,
                 'encoded_layers': [x.path for x in actions
                                    if x.action == 'split']}

  variables = job.stage('encode', encode)

  def train():
    out, info = job.train('adtn_train', finetune_config(config), variables,
                          distill=distillation(config, baseline))
    return out, dict(info, **adtn_collapse(variables, out))

  job.stage('train', train)
  return job.finish()


def adtn_kernel_norms(variables) -> dict[str, float]:
  """``{path: ||decoded kernel||}`` of the ADTN layers of a tree (shared
  members too)."""
  dense = adtn_lib.adtn_unshare(variables)
  layers = tree.layers(tree.split_variables(dense)[0])
  adtn_forms = ('adtn', 'adtn_shared')
  return {p: float(jax.numpy.linalg.norm(forms.to_kernel(layers[p])))
          for p, form in transforms.layer_forms(variables).items()
          if form in adtn_forms}


# A decoded ADTN kernel whose norm falls more than this many times in
# training counts as collapsed (adtn_collapse; the results tables).
COLLAPSE_FACTOR = 100.0


def collapsed_layers(kernel_norms: dict, factor: float = COLLAPSE_FACTOR
                     ) -> list[str]:
  """The paths of ``{path: [norm before, norm after]}`` whose norm fell
  more than ``factor``-fold."""
  return [p for p, (a, b) in kernel_norms.items() if b * factor < a]


def adtn_collapse(encoded, trained, *,
                  factor: float = COLLAPSE_FACTOR) -> dict:
  """The ADTN layers' kernel norms before and after end-to-end training,
  and the layers whose norm fell by more than ``factor`` (a warning each).

  In a plain decode the kernel's norm is the scale times a product of
  ``M (Q-1)`` gates, which training can shrink by orders of magnitude: the
  layer then passes almost nothing and the network can fall to chance
  accuracy while the run ends normally. ``adtn.normalize=True`` rules it
  out.
  """
  before, after = adtn_kernel_norms(encoded), adtn_kernel_norms(trained)
  norms = {p: [before[p], after[p]] for p in before}
  collapsed = collapsed_layers(norms, factor)
  for p in collapsed:
    logger.warning(
        'ADTN layer %r: the decoded kernel\'s norm fell from %.4g to %.4g '
        'in training (more than %gx): the layer passes almost nothing; '
        'adtn.normalize=True keeps it at the learned scale', p, before[p],
        after[p], factor)
  return {'kernel_norms': norms, 'collapsed_layers': collapsed}


PIPELINES: dict[str, Callable[[Any, str], dict]] = {
    'adtn': run_adtn,
    'direct': run_direct,
    'he2024': run_he2024,
    'musco': run_musco,
}
