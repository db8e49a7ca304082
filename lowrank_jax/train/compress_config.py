"""The compression fields of a training config: the layers they select and
their checks.

:func:`validate` checks ``config.compress``, the running pipeline's own
fields (``he2024``, ``musco``, ``adtn``) and the fine-tuning's distillation
before any training time is spent, every error in one
:class:`~lowrank_jax.train.errors.ConfigError`, and, given the model,
resolves the selection rules and the FLOP / parameter target against its
layers. :func:`selection_rules` and :func:`min_rank_of` turn the
fields into the library's ``select`` and ``min_rank`` arguments. (The generic
fields of a config are checked by :mod:`lowrank_jax.train.config_check`.)
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp

from lowrank_jax import rank_rules
from lowrank_jax import tree
from lowrank_jax.forms import adtn as adtn_form
from lowrank_jax.train.errors import ConfigError


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
            + _distill_errors(config.get('finetune', {}))
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
  batches = c.get('recalibrate_batches', 0)
  if (isinstance(batches, bool) or not isinstance(batches, int)
      or batches < 0):
    errors.append(f'compress.recalibrate_batches={batches!r} must be an '
                  'integer >= 0 (training batches; 0 keeps the statistics)')
  if not 0 < c.weaken <= 1 and c.rank_rule == 'weakened_vbmf':
    errors.append(f'compress.weaken={c.weaken} must be in (0, 1] for the '
                  'weakened_vbmf rule (0 would compress nothing)')
  return errors


def _distill_errors(f) -> list[str]:
  """Errors of finetune.distill_weight and finetune.distill_temperature."""
  errors = []
  weight = f.get('distill_weight', 0.0)
  temperature = f.get('distill_temperature', 1.0)
  if not _number(weight) or not 0 <= weight <= 1:
    errors.append(f'finetune.distill_weight={weight!r} must be a number in '
                  '[0, 1] (0: no distillation; 1: the teacher alone)')
  if not _number(temperature) or not 0 < temperature < math.inf:
    errors.append(f'finetune.distill_temperature={temperature!r} must be a '
                  'finite number > 0')
  return errors


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


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
