"""Checks of a training config, and the multi-host start-up it may ask for."""

from __future__ import annotations

import copy
import difflib
import math
import socket
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from lowrank_jax import models as models_lib
from lowrank_jax.train import data as data_lib
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.optim import OPTIMIZERS, SCHEDULES

_BOOL_FIELDS = ('augment', 'nesterov', 'progress', 'distributed')


def _get(config, name):
  """``config[name]``; a :class:`ConfigError` naming it when it is missing."""
  if name not in config:
    raise ConfigError(f'config.{name} is missing')
  return config[name]


def _choice(config, name, allowed):
  """Checks that ``config[name]`` is one of ``allowed``."""
  value = _get(config, name)
  if value not in allowed:
    raise ConfigError(f'config.{name}={value!r} is not one of '
                      f'{sorted(allowed)}')


def _integer(config, name, low, optional=False):
  """Checks that ``config[name]`` is an integer >= ``low`` (or None when
  ``optional``)."""
  value = _get(config, name)
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ConfigError(f'config.{name}={value!r} must be an integer')
  if value < low:
    raise ConfigError(f'config.{name}={value} must be >= {low}')


def _real(config, name, low, high=math.inf, optional=False, open_low=False):
  """Checks that ``config[name]`` is a finite number in ``[low, high]`` (or
  ``(low, high]`` when ``open_low``; or None when ``optional``)."""
  value = _get(config, name)
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f'config.{name}={value!r} must be a number')
  if not math.isfinite(value) or value < low or value > high or (
      open_low and value == low):
    bound = f'> {low}' if open_low else f'>= {low}'
    if high != math.inf:
      bound += f' and <= {high}'
    raise ConfigError(f'config.{name}={value} must be {bound}')


def validate_config(config: ml_collections.ConfigDict, *,
                    num_devices: Optional[int] = None) -> None:
  """Checks the training fields of a config before any time is spent.

  Args:
    config: a ConfigDict as made by ``configs/*.py``.
    num_devices: devices the batch is split over (default
      ``jax.device_count()``); batch sizes must divide by it.

  Raises:
    ConfigError: naming the first missing or bad field and the allowed values.
  """
  _choice(config, 'dataset', data_lib.DATASETS)
  if ':' not in str(config.get('model', '')):
    _choice(config, 'model', models_lib.MODELS)
  _choice(config, 'optimizer', OPTIMIZERS)
  _choice(config, 'schedule', SCHEDULES)
  _integer(config, 'batch_size', 1)
  _integer(config, 'eval_batch_size', 1)
  _integer(config, 'num_epochs', 0)
  _integer(config, 'validation_size', 0)
  _integer(config, 'train_subset', 1, optional=True)
  _integer(config, 'test_subset', 1, optional=True)
  _integer(config, 'max_steps', 0, optional=True)
  _integer(config, 'early_stopping_patience', 0, optional=True)
  _integer(config, 'seed', 0)
  _integer(config, 'pad_crop', 0)
  _integer(config, 'log_every_steps', 1)
  _integer(config, 'checkpoint_every_steps', 0)
  _integer(config, 'keep_checkpoints', 1)
  _real(config, 'learning_rate', 0.0, open_low=True)
  _real(config, 'momentum', 0.0, 1.0)
  _real(config, 'weight_decay', 0.0)
  _real(config, 'grad_clip', 0.0, optional=True, open_low=True)
  _real(config, 'warmup_epochs', 0.0)
  _real(config, 'lr_end_factor', 0.0, 1.0)
  for name in _BOOL_FIELDS:
    if not isinstance(_get(config, name), bool):
      raise ConfigError(
          f'config.{name}={_get(config, name)!r} must be True or False')
  num_devices = jax.device_count() if num_devices is None else num_devices
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ConfigError(
          f'config.{name}={config[name]} must be divisible by the number of '
          f'devices ({num_devices}): each device gets an equal shard')


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Calls ``jax.distributed.initialize`` when ``config.distributed``.

  Must run before anything touches the devices. On Cloud TPU, SLURM, Open MPI
  and Kubernetes the cluster is detected automatically; on plain hosts set
  ``config.coordinator_address`` (process 0's ``host:port``),
  ``config.num_processes`` and ``config.process_id`` on each (and optionally
  ``config.local_device_ids``); empty fields keep auto-detection. CPU runs use
  gloo collectives. An unreachable coordinator is a ConfigError after
  ``config.distributed_timeout_s`` seconds. Every process then runs the
  same command; each loads the data, iterates the same global batches and
  feeds its devices' shards.
  Idempotent: a second call is a no-op.
  """
  if not config.get('distributed', False):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = _distributed_args(config)
  if kwargs.get('coordinator_address') and kwargs.get('process_id', 0) != 0:
    # JAX's client aborts the whole process when it cannot reach the
    # coordinator; check first, so the error names the field instead.
    _wait_for_coordinator(kwargs['coordinator_address'],
                          kwargs['initialization_timeout'])
  # CPU processes exchange gradients through gloo (XLA:CPU has no default
  # cross-process collectives); other backends ignore this option.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = kwargs.get('coordinator_address') or 'auto-detected'
    raise ConfigError(
        f'jax.distributed.initialize failed (config.coordinator_address='
        f'{where!r}, config.num_processes={kwargs.get("num_processes")}, '
        f'config.process_id={kwargs.get("process_id")}, waited up to '
        f'config.distributed_timeout_s={kwargs["initialization_timeout"]} '
        f's): {type(e).__name__}: {e}') from e


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once ``host:port`` accepts a TCP connection; ConfigError after
  ``timeout_s`` seconds."""
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(
            f'config.coordinator_address={address!r} is unreachable after '
            f'config.distributed_timeout_s={timeout_s} s ({e}); start '
            'process 0 there, or fix the address') from e
      time.sleep(0.5)


def _distributed_args(config) -> dict:
  """``jax.distributed.initialize`` arguments from the config (checked)."""
  kwargs = {'initialization_timeout':
            int(config.get('distributed_timeout_s', 300))}
  address = config.get('coordinator_address') or ''
  if address:
    if ':' not in address:
      raise ConfigError(f'config.coordinator_address={address!r} must be '
                        'host:port')
    kwargs['coordinator_address'] = address
  n, i = config.get('num_processes'), config.get('process_id')
  if n is not None:
    if n < 1:
      raise ConfigError(f'config.num_processes={n} must be >= 1')
    kwargs['num_processes'] = int(n)
  if i is not None:
    if i < 0 or (n is not None and i >= n):
      raise ConfigError(f'config.process_id={i} must be in [0, '
                        f'config.num_processes={n})')
    kwargs['process_id'] = int(i)
  ids = config.get('local_device_ids') or ''
  if ids:
    kwargs['local_device_ids'] = [int(d) for d in str(ids).split(',')]
  return kwargs


def check_known_fields(config: ml_collections.ConfigDict,
                       reference: ml_collections.ConfigDict,
                       prefix: str = 'config') -> None:
  """Raises ConfigError for every field ``reference`` does not have.

  ``ml_collections`` adds a field on assignment, so ``config.learnin_rate =
  5.0`` in a config file is silently a new field; this names each such field
  with the closest valid name, before anything runs or is written.

  ``config.finetune`` may also hold any top-level training field
  (``optimizer``, ``grad_clip``, ...): a fine-tuning stage's fields override
  the training ones (``pipelines.finetune_config``).

  Args:
    config: the config to check.
    reference: a config with every valid field (``configs/default.py``).
    prefix: the name of ``config`` in messages.
  """
  errors = []
  if 'finetune' in reference:
    reference = copy.deepcopy(reference)
    with reference.unlocked():
      for name, value in reference.items():
        if (not isinstance(value, ml_collections.ConfigDict) and
            name not in reference.finetune):
          reference.finetune[name] = value
  _unknown_fields(config, reference, prefix, errors)
  if errors:
    raise ConfigError('; '.join(errors))


def _unknown_fields(config, reference, prefix, errors) -> None:
  for name in config.keys():
    path = f'{prefix}.{name}'
    if name not in reference:
      close = difflib.get_close_matches(name, list(reference.keys()), n=1)
      hint = f'; did you mean {prefix}.{close[0]}?' if close else ''
      errors.append(f'{path} is not a known field{hint}')
      continue
    value, ref = config[name], reference[name]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(
        ref, ml_collections.ConfigDict):
      _unknown_fields(value, ref, path, errors)
