"""The optax optimizer and learning-rate schedule a config describes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lowrank_jax.train.errors import ConfigError

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


def make_schedule(config: ml_collections.ConfigDict,
                  steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule: constant, cosine or warmup_cosine.

  Cosine schedules decay from ``config.learning_rate`` to
  ``learning_rate * lr_end_factor`` over ``num_epochs * steps_per_epoch``
  steps; ``warmup_cosine`` first rises linearly from 0 over
  ``warmup_epochs``.
  """
  lr = float(config.learning_rate)
  total = max(int(config.num_epochs * steps_per_epoch), 1)
  end_factor = float(config.get('lr_end_factor', 0.0))
  if config.schedule == 'constant':
    return optax.constant_schedule(lr)
  if config.schedule == 'cosine':
    return optax.cosine_decay_schedule(lr, total, alpha=end_factor)
  if config.schedule == 'warmup_cosine':
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, total, end_value=lr * end_factor)
  raise ConfigError(f'config.schedule={config.schedule!r} is not one of '
                    f'{sorted(SCHEDULES)}')


def _decay_mask(params):
  """Weight decay applies to matrices and kernels (ndim > 1), not to biases
  or BatchNorm scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax optimizer described by the config, and its schedule.

  ``sgd``, ``momentum`` (``config.momentum``, ``config.nesterov``), ``adam``
  and ``adamw``. ``config.weight_decay`` is applied with
  ``optax.add_decayed_weights`` (masked to ndim > 1 parameters) before the
  optimizer, i.e. PyTorch's ``weight_decay`` semantics for SGD; for ``adamw``
  it is AdamW's decoupled decay with the same mask. ``config.grad_clip``
  (optional) clips the global gradient norm first.

  Args:
    config: the training config.
    steps_per_epoch: optimizer steps per epoch (for the schedule).

  Returns:
    ``(tx, schedule)``.
  """
  schedule = make_schedule(config, steps_per_epoch)
  parts = []
  if config.get('grad_clip') is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  weight_decay = float(config.weight_decay)
  if config.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=weight_decay,
                             mask=_decay_mask))
  else:
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, _decay_mask))
    if config.optimizer == 'sgd':
      parts.append(optax.sgd(schedule))
    elif config.optimizer == 'momentum':
      parts.append(optax.sgd(schedule, momentum=config.momentum,
                             nesterov=config.nesterov))
    elif config.optimizer == 'adam':
      parts.append(optax.adam(schedule))
    else:
      raise ConfigError(f'config.optimizer={config.optimizer!r} is not one '
                        f'of {sorted(OPTIMIZERS)}')
  return optax.chain(*parts), schedule
