"""Training: train state, sharded jitted steps, the loop, checkpoints, resume.

Every piece is importable on its own so a notebook (or a pipeline) can run a
stage at a time::

  config = configs.smoke.get_config()
  dataset = data.load_dataset(config.dataset, train_subset=4096)
  model = models.get_model('lenet5')
  state, history = training.train(config, '/tmp/run', dataset=dataset)
  # ... transform state.params, e.g. tucker2_split, then fine-tune the new tree:
  state2, _ = training.train(config, '/tmp/run', variables=new_variables,
                             model=model, stage_name='finetune')

Data parallelism uses ``jax.sharding``: a 1-D :class:`~jax.sharding.Mesh` over
all devices with axis ``'data'``; batches are sharded along axis 0
(``P('data')``), the train state is replicated (``P()``), and the jitted steps
carry these shardings, so XLA inserts the gradient all-reduce (and computes
BatchNorm statistics over the *global* batch). The same code runs on one CPU,
on 8 forced host devices, and on several hosts (see
:func:`maybe_initialize_distributed`).

Resume: the data order of an epoch is a function of ``(config.seed, epoch)``,
the dropout key of step ``s`` is ``fold_in(state.rng, s)``, and a checkpoint
holds step, params, batch statistics, optimizer state and the rng. Re-running
the same command after a kill restores the latest checkpoint, skips the
batches already done in its epoch and continues with results identical to an
uninterrupted run.

Layouts: batches are NHWC float32 images and (B,) int32 labels; params trees
are the models' (conv kernels HWIO) or any transformed tree the same model
runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax import runner
from lowrank_jax import data as data_lib
from lowrank_jax import models as models_lib

PyTree = Any

OPTIMIZERS = ('sgd', 'momentum', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')
DATA_AXIS = 'data'
logger = logging.getLogger(__name__)
_CHECKPOINT_FORMAT = 1


class ConfigError(ValueError):
  """A config field is missing or has a bad value; the message names it."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored: unreadable, corrupt or incompatible.

  The message names the checkpoint directory and step and what differs.
  Nothing is deleted when this is raised.
  """


class TrainState(train_state.TrainState):
  """Flax train state plus BatchNorm statistics and a dropout key.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: the parameter tree (possibly transformed, e.g. Tucker-2 factors).
    opt_state: optax state for ``params``.
    batch_stats: BatchNorm running statistics; ``{}`` for models without.
    rng: uint32[2] base PRNG key; the dropout key of step ``s`` is
      ``jax.random.fold_in(rng, s)``, so it needs no update and resumes
      exactly.
    apply_fn, tx: static (not part of the pytree's leaves).
  """
  batch_stats: PyTree = None
  rng: jax.Array = None

  @property
  def variables(self) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` ready for ``model.apply``."""
    variables = {'params': self.params}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    return variables


# ----------------------------------------------------------------------------
# Config.

_BOOL_FIELDS = ('augment', 'nesterov', 'progress', 'distributed')


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

  def get(name):
    if name not in config:
      raise ConfigError(f'config.{name} is missing')
    return config[name]

  def choice(name, allowed):
    value = get(name)
    if value not in allowed:
      raise ConfigError(f'config.{name}={value!r} is not one of '
                        f'{sorted(allowed)}')

  def integer(name, low, optional=False):
    value = get(name)
    if value is None and optional:
      return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ConfigError(f'config.{name}={value!r} must be an integer')
    if value < low:
      raise ConfigError(f'config.{name}={value} must be >= {low}')

  def real(name, low, high=math.inf, optional=False, open_low=False):
    value = get(name)
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

  choice('dataset', data_lib.DATASETS)
  if ':' not in str(config.get('model', '')):
    choice('model', models_lib.MODELS)
  choice('optimizer', OPTIMIZERS)
  choice('schedule', SCHEDULES)
  integer('batch_size', 1)
  integer('eval_batch_size', 1)
  integer('num_epochs', 0)
  integer('validation_size', 0)
  integer('train_subset', 1, optional=True)
  integer('test_subset', 1, optional=True)
  integer('max_steps', 0, optional=True)
  integer('early_stopping_patience', 0, optional=True)
  integer('seed', 0)
  integer('pad_crop', 0)
  integer('log_every_steps', 1)
  integer('checkpoint_every_steps', 0)
  integer('keep_checkpoints', 1)
  real('learning_rate', 0.0, open_low=True)
  real('momentum', 0.0, 1.0)
  real('weight_decay', 0.0)
  real('grad_clip', 0.0, optional=True, open_low=True)
  real('warmup_epochs', 0.0)
  real('lr_end_factor', 0.0, 1.0)
  for name in _BOOL_FIELDS:
    if not isinstance(get(name), bool):
      raise ConfigError(f'config.{name}={get(name)!r} must be True or False')
  num_devices = jax.device_count() if num_devices is None else num_devices
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise ConfigError(
          f'config.{name}={config[name]} must be divisible by the number of '
          f'devices ({num_devices}): each device gets an equal shard')


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Calls ``jax.distributed.initialize()`` when ``config.distributed``.

  Must run before anything touches the devices. On Cloud TPU, SLURM, Open MPI
  and Kubernetes the cluster is detected automatically; elsewhere set on every
  host ``JAX_COORDINATOR_ADDRESS=host:port`` (process 0's address), and pass
  the process count and index through the cluster's variables (e.g. SLURM's
  ``SLURM_NTASKS``/``SLURM_PROCID``, Open MPI's ``OMPI_COMM_WORLD_SIZE``/
  ``OMPI_COMM_WORLD_RANK``); ``JAX_LOCAL_DEVICE_IDS`` restricts the local
  devices. Every process then runs the same command; each loads the data,
  iterates the same global batches and feeds its devices' shards.
  Idempotent: a second call is a no-op.
  """
  if not config.get('distributed', False):
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()


# ----------------------------------------------------------------------------
# Optimizer.


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


# ----------------------------------------------------------------------------
# Sharding.


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of the train state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: split along axis 0 over the ``'data'`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(arrays, mesh: Mesh):
  """Puts a global host batch on the mesh, split along axis 0.

  Every process holds the same global batch (all iterate the same order), so
  ``jax.make_array_from_process_local_data`` with ``global_shape`` equal to
  the local shape picks each local device's slice; single-process it is a
  plain sharded ``device_put``.

  Args:
    arrays: a pytree of numpy arrays with equal leading size B.
    mesh: the data mesh; B must be divisible by ``mesh.size``.

  Returns:
    The same pytree of global ``jax.Array``s sharded ``P('data')``.
  """
  sharding = batch_sharding(mesh)
  for x in jax.tree.leaves(arrays):
    if x.shape[0] % mesh.size:
      raise ValueError(f'batch of {x.shape[0]} examples does not divide over '
                       f'{mesh.size} devices')
  if jax.process_count() == 1:
    # Same result, half the host overhead (measured: 0.26 vs 0.5 ms/batch).
    return jax.device_put(arrays, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape),
      arrays)


# ----------------------------------------------------------------------------
# Train state and steps.


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       variables: Optional[Mapping], input_shape: Sequence[int],
                       rng: jax.Array, *,
                       steps_per_epoch: Optional[int] = None,
                       tx: Optional[optax.GradientTransformation] = None,
                       mesh: Optional[Mesh] = None) -> TrainState:
  """A fresh train state, replicated over the mesh.

  Args:
    config: the training config (optimizer fields).
    model: the Flax module.
    variables: ``{'params': ..., 'batch_stats': ...}`` to train, e.g. a tree
      rewritten by ``tucker2_split``; None to initialize the model. The
      optimizer state is created for whatever params tree is given. The
      input is copied, never donated or modified.
    input_shape: (B, H, W, C) of an example batch (B may be 1).
    rng: PRNG key; split into the init key and the dropout base key.
    steps_per_epoch: needed by the cosine schedules when ``tx`` is None.
    tx: an optax optimizer overriding the config's.
    mesh: device mesh (default: all devices).

  Returns:
    A :class:`TrainState` with step 0 (int32), on ``replicated(mesh)``.
  """
  mesh = make_mesh() if mesh is None else mesh
  sharding = replicated(mesh)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if tx is None:
    if steps_per_epoch is None and config.schedule != 'constant':
      raise ValueError(f'schedule {config.schedule!r} needs steps_per_epoch')
    tx, _ = make_optimizer(config, steps_per_epoch or 1)

  if variables is None:
    def init(rng):
      init_rng, dropout_rng = jax.random.split(rng)
      variables = model.init({'params': init_rng, 'dropout': init_rng},
                             jnp.zeros(tuple(input_shape), jnp.float32),
                             train=False)
      variables = _plain_dict(variables)
      return variables, dropout_rng, tx.init(variables['params'])

    variables, dropout_rng, opt_state = _run_once(init, sharding, rng)
  else:
    variables = _plain_dict(variables)
    if 'params' not in variables:
      raise ValueError('variables must hold a \'params\' collection, got '
                       f'keys {sorted(variables)}')
    # may_alias=False: the state is donated to the step; the caller's arrays
    # must survive.
    variables = jax.device_put(variables, sharding, may_alias=False)
    dropout_rng, opt_state = _run_once(
        lambda rng, params: (jax.random.split(rng)[1], tx.init(params)),
        sharding, rng, variables['params'])
  return TrainState(
      step=jax.device_put(np.zeros((), np.int32), sharding),
      apply_fn=runner.bind_apply(model), params=variables['params'], tx=tx,
      opt_state=opt_state, batch_stats=variables.get('batch_stats', {}),
      rng=dropout_rng)


def init_variables(model: nn.Module, input_shape: Sequence[int],
                   rng: jax.Array) -> dict:
  """The model's initial variables, compiled fast.

  ``model.init`` with key ``split(rng)[0]`` on zeros of ``input_shape``:
  the same values :func:`create_train_state` makes for the same ``rng``,
  but several times quicker to compile than an eager or plain-jitted
  ``model.init`` on CPU (see ``_RUN_ONCE_OPTIONS``).

  Returns:
    The variables dict (plain dicts), e.g. to transform before training.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)

  def init(rng):
    init_rng, _ = jax.random.split(rng)
    return _plain_dict(model.init({'params': init_rng, 'dropout': init_rng},
                                  jnp.zeros(tuple(input_shape), jnp.float32),
                                  train=False))

  return _run_once(init, None, rng)


# Run-once functions (init) gain nothing from XLA's optimizations, which cost
# seconds of compile time on CPU (8 s vs 1.4 s for LeNet-5's init).
_RUN_ONCE_OPTIONS = {'xla_backend_optimization_level': 0,
                     'xla_llvm_disable_expensive_passes': True}


def _run_once(fn, out_sharding, *args):
  """``jax.jit(fn)(*args)`` compiled without expensive optimizations."""
  kwargs = {} if out_sharding is None else {'out_shardings': out_sharding}
  lowered = jax.jit(fn, **kwargs).lower(*args)
  try:
    compiled = lowered.compile(compiler_options=_RUN_ONCE_OPTIONS)
  except Exception:  # Options unknown to this backend: compile normally.
    compiled = lowered.compile()
  return compiled(*args)


def _plain_dict(tree):
  if hasattr(tree, 'unfreeze'):
    tree = tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: _plain_dict(v) for k, v in tree.items()}
  return tree


def make_train_step(model: nn.Module, *,
                    penalty_fn: Optional[Callable[[PyTree], jax.Array]] = None,
                    penalty_weight: float = 0.0,
                    learning_rate_fn: Optional[optax.Schedule] = None,
                    mesh: Optional[Mesh] = None,
                    donate: bool = True):
  """A jitted, sharded SGD step.

  The loss is the mean softmax cross-entropy plus ``penalty_weight *
  penalty_fn(params)`` when ``penalty_fn`` is given (e.g.
  :func:`lowrank_jax.orthogonal_penalty` for the He et al. pipeline).
  BatchNorm models (state with non-empty ``batch_stats``) run with
  ``mutable=['batch_stats']``; the 'dropout' PRNG is
  ``fold_in(state.rng, state.step)`` (a pure function of the step, so
  resuming reproduces it).

  Args:
    model: the Flax module (the state's params may be any tree it runs).
    penalty_fn: ``params -> scalar``, jittable.
    penalty_weight: multiplies the penalty in the loss.
    learning_rate_fn: if given, its value at the step is logged.
    mesh: device mesh (default: all devices).
    donate: donate the input state's buffers (the caller must not reuse it).

  Returns:
    ``train_step(state, (images, labels)) -> (state, metrics)``; metrics are
    replicated scalars 'loss', 'ce', 'accuracy' and, when given, 'penalty'
    (unweighted) and 'learning_rate'. Batches must be sharded ``P('data')``
    (see :func:`shard_batch`).
  """
  mesh = make_mesh() if mesh is None else mesh

  def loss_fn(params, state, images, labels):
    variables = {'params': params}
    # Always offered (unused by models without dropout), so custom models
    # with dropout work too.
    rngs = {'dropout': jax.random.fold_in(state.rng, state.step)}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      logits, updates = runner.apply(model, variables, images, train=True,
                                        rngs=rngs, mutable=['batch_stats'])
      batch_stats = updates['batch_stats']
    else:
      logits = runner.apply(model, variables, images, train=True, rngs=rngs)
      batch_stats = state.batch_stats
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, penalty = ce, None
    if penalty_fn is not None:
      penalty = jnp.asarray(penalty_fn(params), jnp.float32)
      loss = ce + penalty_weight * penalty
    return loss, (ce, penalty, logits, batch_stats)

  def step(state, batch):
    images, labels = batch
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (ce, penalty, logits, batch_stats)), grads = grad_fn(
        state.params, state, images, labels)
    metrics = {
        'loss': loss, 'ce': ce,
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
    }
    if penalty is not None:
      metrics['penalty'] = penalty
    if learning_rate_fn is not None:
      metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step),
                                             jnp.float32)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, metrics

  return jax.jit(step,
                 in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(model: nn.Module, *, mesh: Optional[Mesh] = None):
  """A jitted, sharded evaluation step over a padded batch.

  Returns:
    ``eval_step(state, (images, labels, mask)) -> {'loss', 'correct',
    'count'}``: sums over the examples with ``mask == 1`` (float32), so a
    zero-padded last batch counts each real example exactly once.
  """
  mesh = make_mesh() if mesh is None else mesh

  def step(state, batch):
    images, labels, mask = batch
    logits = runner.apply(model, state.variables, images, train=False)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {'loss': jnp.sum(ce * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}

  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


@functools.lru_cache(maxsize=16)
def _cached_eval_step(model, mesh):
  return make_eval_step(model, mesh=mesh)


def evaluate(state: TrainState, model: nn.Module, split: data_lib.Split,
             dataset: data_lib.Dataset, batch_size: int, *,
             mesh: Optional[Mesh] = None, eval_step=None) -> dict:
  """Mean loss and accuracy over every example of ``split``.

  The last partial batch is zero-padded to ``batch_size`` and masked, so all
  examples count exactly once and only one shape is compiled.

  Args:
    state: train state (params and batch statistics are used).
    model: the Flax module.
    split: images/labels to evaluate.
    dataset: provides the normalization ``mean``/``std``.
    batch_size: examples per step; divisible by the device count.
    mesh: device mesh (default: all devices).
    eval_step: from :func:`make_eval_step` (default: a cached one).

  Returns:
    ``{'loss': float, 'accuracy': float, 'count': int}`` (NaN for an empty
    split).
  """
  mesh = make_mesh() if mesh is None else mesh
  if batch_size % mesh.size:
    raise ValueError(f'eval batch_size={batch_size} must be divisible by the '
                     f'number of devices ({mesh.size})')
  if eval_step is None:
    eval_step = _cached_eval_step(model, mesh)
  n = len(split.labels)
  if n == 0:
    return {'loss': math.nan, 'accuracy': math.nan, 'count': 0}
  totals = None
  for images, labels in data_lib.iterate_batches(
      split, batch_size, mean=dataset.mean, std=dataset.std, seed=None,
      drop_remainder=False):
    k = len(labels)
    mask = np.ones(batch_size, np.float32)
    if k < batch_size:
      pad = batch_size - k
      images = np.concatenate(
          [images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask[k:] = 0
    out = eval_step(state, shard_batch((images, labels, mask), mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count,
          'accuracy': float(totals['correct']) / count,
          'count': int(round(count))}


# ----------------------------------------------------------------------------
# Checkpoints.


def _state_tree(state: TrainState) -> dict:
  """The arrays of a train state that a checkpoint holds."""
  return {'step': state.step, 'params': state.params,
          'batch_stats': state.batch_stats, 'opt_state': state.opt_state,
          'rng': state.rng}


def _path_name(path) -> str:
  """'/'-joined key names of a key path; the same for a namedtuple field, a
  dict key or a list index, so a tree restored without a target (namedtuples
  become dicts, tuples lists) has the same names as the live tree."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return '/'.join(names)


def _describe(tree) -> list[list]:
  """``[[path, shape, dtype], ...]`` of every leaf, in flatten order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [[_path_name(path), list(np.shape(x)), str(np.asarray(x).dtype)
           if not hasattr(x, 'dtype') else str(x.dtype)]
          for path, x in leaves]


def _checksums(tree) -> dict[str, int]:
  """``{path: CRC-32 of the leaf's bytes}`` (computed on the host)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  values = jax.device_get([x for _, x in leaves])
  return {_path_name(path): zlib.crc32(np.ascontiguousarray(x).tobytes())
          for (path, _), x in zip(leaves, values)}


def _is_empty(x) -> bool:
  return any(d == 0 for d in np.shape(x))


def _pack_empty(tree):
  """Zero-size leaves -> one-element placeholders (orbax refuses to save
  empty arrays; ADTN layers hold zero-size shape carriers). The saved
  structure in the metadata keeps the true shapes for :func:`_unpack_empty`."""
  def pack(x):
    if not _is_empty(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((1,), x.dtype, sharding=x.sharding)
    return np.zeros((1,), x.dtype)
  return jax.tree.map(pack, tree)


def _unpack_empty(tree, structure: list):
  """Restores the zero-size leaves recorded in a ``_describe`` structure."""
  shapes = {p: tuple(shape) for p, shape, _ in structure}

  def unpack(path, x):
    shape = shapes.get(_path_name(path))
    if shape is not None and any(d == 0 for d in shape):
      return jnp.zeros(shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(unpack, tree)


def _structure_diff(saved: list, expected: list, limit: int = 6) -> str:
  """Human-readable difference between two ``_describe`` lists ('' if equal)."""
  saved_map = {p: (tuple(s), d) for p, s, d in saved}
  expected_map = {p: (tuple(s), d) for p, s, d in expected}
  problems = []
  # Params first: they say most about what differs.
  first = lambda p: (0 if p.startswith('params/') else
                     1 if p.startswith('batch_stats/') else 2)
  missing = sorted((p for p in expected_map if p not in saved_map), key=first)
  extra = sorted((p for p in saved_map if p not in expected_map), key=first)
  changed = sorted((p for p in expected_map if p in saved_map and
                    saved_map[p] != expected_map[p]), key=first)

  def some(paths):
    more = f' (+{len(paths) - limit} more)' if len(paths) > limit else ''
    return ', '.join(paths[:limit]) + more

  if missing:
    problems.append(f'{len(missing)} arrays of this run are not in the '
                    f'checkpoint: {some(missing)}')
  if extra:
    problems.append(f'{len(extra)} arrays in the checkpoint are not in this '
                    f'run: {some(extra)}')
  if changed:
    details = [f'{p} saved {saved_map[p][0]} {saved_map[p][1]} vs expected '
               f'{expected_map[p][0]} {expected_map[p][1]}'
               for p in changed]
    problems.append(f'{len(changed)} arrays differ in shape/dtype: '
                    f'{some(details)}')
  return '; '.join(problems)


def _ocp():
  import orbax.checkpoint as ocp  # Lazy: slow import.
  return ocp


def open_checkpoint_manager(directory: str, *, max_to_keep: int = 3):
  """An orbax ``CheckpointManager`` saving items 'state' and 'meta'.

  Orbax writes each step into a temporary directory and renames it when
  complete, so a killed save never leaves a half-written step behind;
  incomplete temporary directories are removed when the manager opens.
  Completed steps are only ever deleted by ``max_to_keep`` (oldest first,
  after a newer step has been saved).
  """
  ocp = _ocp()
  directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         cleanup_tmp_directories=True)
  try:
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=('state', 'meta'))
  except Exception as e:  # Orbax raises many types; name the directory.
    raise CheckpointError(f'cannot open checkpoints in {directory}: '
                          f'{type(e).__name__}: {e}') from e


def save_checkpoint(manager, state: TrainState, *,
                    extra: Optional[Mapping] = None) -> None:
  """Saves ``state`` at its step (asynchronously; call ``wait_until_finished``).

  Besides the arrays, a small JSON item 'meta' records every leaf's path,
  shape, dtype and CRC-32, which restoring checks, plus ``extra``.
  """
  ocp = _ocp()
  tree = _state_tree(state)
  step = int(jax.device_get(state.step))
  meta = {'format': _CHECKPOINT_FORMAT, 'step': step,
          'structure': _describe(tree), 'checksums': _checksums(tree),
          **dict(extra or {})}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_pack_empty(tree)),
      meta=ocp.args.JsonSave(meta)))


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """The completed checkpoint steps in a directory, ascending."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir)
                if name.isdigit() and
                os.path.isdir(os.path.join(checkpoint_dir, name)))


def _restore_item(where: str, step, what: str, **items):
  """Restores composite items of one checkpoint directory."""
  ocp = _ocp()
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(where, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax/tensorstore raise many types.
    raise CheckpointError(f'checkpoint {where} (step {step}): cannot read '
                          f'its {what} (truncated or corrupt files?): '
                          f'{type(e).__name__}: {e}') from e


def _read_meta(where: str, step) -> dict:
  meta = _restore_item(where, step, 'metadata',
                       meta=_ocp().args.JsonRestore()).meta
  if not isinstance(meta, Mapping) or meta.get('format') != _CHECKPOINT_FORMAT:
    raise CheckpointError(f'checkpoint {where} (step {step}): metadata is '
                          'missing or of an unknown format')
  return meta


def _verify(where, step, tree, meta):
  """Checks a restored tree against the saved shapes and checksums."""
  diff = _structure_diff(meta['structure'], _describe(tree))
  if diff:
    raise CheckpointError(f'checkpoint {where} (step {step}) is corrupt: '
                          f'restored arrays do not match its metadata: {diff}')
  sums, saved = _checksums(tree), meta['checksums']
  bad = [p for p in saved if sums.get(p) != saved[p]]
  if bad:
    raise CheckpointError(
        f'checkpoint {where} (step {step}) is corrupt: checksum mismatch in '
        f'{len(bad)} arrays: {", ".join(bad[:6])}')


def restore_checkpoint(checkpoint_dir: str,
                       state: Optional[TrainState] = None, *,
                       step: Optional[int] = None,
                       mesh: Optional[Mesh] = None):
  """Restores a checkpoint, checking structure, shapes and checksums.

  Args:
    checkpoint_dir: the directory holding the step directories.
    state: the run's state (defines the expected structure and the static
      apply_fn/tx); None to return the saved arrays as a plain tree
      ``{'step', 'params', 'batch_stats', 'opt_state', 'rng'}`` in their
      saved structure (any transformed tree; ``{'params': tree['params'],
      'batch_stats': tree['batch_stats']}`` runs in ``lj.apply(model, ...)``).
    step: which step (default: the latest).
    mesh: where to place the restored arrays (default: all devices).

  Returns:
    The restored :class:`TrainState` (or plain tree when ``state`` is None).

  Raises:
    CheckpointError: no checkpoint, unreadable or truncated files, checksum
      mismatch, or a structure/shape that differs from ``state``'s; the
      message names the directory, the step and what differs. Nothing is
      deleted.
  """
  ocp = _ocp()
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  steps = checkpoint_steps(checkpoint_dir)
  if step is None:
    if not steps:
      raise CheckpointError(f'no checkpoint in {checkpoint_dir}')
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'no checkpoint for step {step} in '
                          f'{checkpoint_dir}; available steps: {steps}')
  where = os.path.join(checkpoint_dir, str(step))
  meta = _read_meta(where, step)
  mesh = make_mesh() if mesh is None else mesh
  sharding = replicated(mesh)
  if state is not None:
    expected = _describe(_state_tree(state))
    diff = _structure_diff(meta['structure'], expected)
    if diff:
      raise CheckpointError(
          f'checkpoint {where} (step {step}) does not match this run\'s train '
          f'state (different model, transform or optimizer?): {diff}')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        _state_tree(state))
    restore = ocp.args.StandardRestore(_pack_empty(target))
  else:
    restore = ocp.args.StandardRestore()
  tree = _restore_item(where, step, 'arrays', state=restore).state
  tree = _unpack_empty(tree, meta['structure'])
  _verify(where, step, tree, meta)
  if state is None:
    return jax.device_put(tree, sharding)
  return state.replace(**tree)


def save_variables(path: str, variables: Mapping) -> None:
  """Saves a variables dict (e.g. a compressed model) as a final checkpoint.

  Atomic: the new checkpoint is fully written next to ``path`` and only then
  swapped in, so a failed save never replaces a good one. Records shapes and
  CRC-32s that :func:`load_variables` checks.

  Args:
    path: a directory to create or replace.
    variables: ``{'params': ..., 'batch_stats': ...}`` (any tree of arrays).
  """
  ocp = _ocp()
  path = os.path.abspath(path)
  variables = _plain_dict(variables)
  meta = {'format': _CHECKPOINT_FORMAT, 'structure': _describe(variables),
          'checksums': _checksums(variables)}
  staging = f'{path}.saving'
  primary = jax.process_index() == 0
  if primary and os.path.exists(staging):
    shutil.rmtree(staging)
  _sync('lowrank_jax_save_variables_start')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(staging, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(_pack_empty(variables)),
        meta=ocp.args.JsonSave(meta)))
  _sync('lowrank_jax_save_variables_written')
  if primary:
    old = f'{path}.old'
    if os.path.exists(old):
      shutil.rmtree(old)
    if os.path.exists(path):
      os.replace(path, old)
    os.replace(staging, path)
    if os.path.exists(old):
      shutil.rmtree(old)
  _sync('lowrank_jax_save_variables_done')


def load_variables(path: str) -> dict:
  """Loads variables saved by :func:`save_variables`, in their saved structure.

  Returns:
    The variables dict; ``lj.apply(model, variables, x, train=False)`` runs it.
    If ``path`` is missing but ``path.old`` exists (a save killed between
    its renames), that previous version is loaded.

  Raises:
    CheckpointError: missing, unreadable, truncated or checksum-mismatched.
  """
  ocp = _ocp()
  path = os.path.abspath(path)
  if not os.path.isdir(path) and os.path.isdir(f'{path}.old'):
    # A save_variables killed between its two renames left the previous
    # version here.
    logger.warning('%s is missing; loading the previous version %s.old',
                   path, path)
    path = f'{path}.old'
  if not os.path.isdir(path):
    raise CheckpointError(f'no saved variables at {path}')
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(path, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(),
          meta=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax/tensorstore raise many types.
    raise CheckpointError(f'saved variables at {path} cannot be read '
                          f'(truncated or corrupt files?): '
                          f'{type(e).__name__}: {e}') from e
  meta = restored.meta
  if not isinstance(meta, Mapping) or meta.get('format') != _CHECKPOINT_FORMAT:
    raise CheckpointError(f'saved variables at {path}: metadata is missing or '
                          'of an unknown format')
  variables = _unpack_empty(_plain_dict(restored.variables),
                            meta['structure'])
  _verify(path, 'final', variables, meta)
  return variables


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    _ocp().multihost.sync_global_processes(name)


# ----------------------------------------------------------------------------
# Metrics log.


class _MetricsLog:
  """JSON lines (``workdir/metrics.jsonl``) plus TensorBoard, process 0 only.

  On resume from step ``s`` the rows of this stage after ``s`` (written after
  the checkpoint by the killed run) and its old test rows are dropped, so the
  file reads like the log of one uninterrupted run.
  """

  def __init__(self, workdir: str, stage: str, resume_step: int):
    self.stage = stage
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.history = []
    self._file = self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    rows, kept = [], []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:
            pass  # A line cut by a kill.
      kept = [r for r in rows if r.get('stage') != stage or (
          r.get('step', 0) <= resume_step and r.get('split') != 'test')]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        for row in kept:
          f.write(json.dumps(row) + '\n')
      os.replace(tmp, self.path)
    self.history = [r for r in kept if r.get('stage') == stage]
    self._file = open(self.path, 'a')
    from tensorboardX import SummaryWriter  # Lazy: optional at import.
    self._tb = SummaryWriter(os.path.join(workdir, 'tb', stage))

  def write(self, row: dict) -> None:
    row = {'stage': self.stage, **row}
    self.history.append(row)
    if not self.enabled:
      return
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    split = row.get('split', 'train')
    for key, value in row.items():
      if key not in ('step', 'epoch', 'wall_time', 'stage', 'split') and (
          isinstance(value, (int, float)) and not isinstance(value, bool)):
        self._tb.add_scalar(f'{split}/{key}', value, row['step'])

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()


# ----------------------------------------------------------------------------
# The loop.


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset named by the config's data fields."""
  return data_lib.load_dataset(
      config.dataset, validation_size=config.validation_size,
      train_subset=config.get('train_subset'),
      test_subset=config.get('test_subset'), seed=config.seed,
      data_dir=config.get('data_dir'))


def _progress_bar(config, total, initial, stage):
  from tqdm import auto as tqdm  # Lazy.
  enabled = (config.get('progress', True) and sys.stderr.isatty()
             and jax.process_index() == 0)
  return tqdm.tqdm(total=total, initial=initial, desc=stage,
                   disable=not enabled, dynamic_ncols=True, leave=True)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          dataset: Optional[data_lib.Dataset] = None,
          variables: Optional[Mapping] = None,
          penalty_fn: Optional[Callable[[PyTree], jax.Array]] = None,
          penalty_weight: float = 1.0,
          stage_name: str = 'train',
          model: Optional[nn.Module] = None,
          checkpoint_dir: Optional[str] = None,
          stop_after_steps: Optional[int] = None,
          mesh: Optional[Mesh] = None) -> tuple[TrainState, list[dict]]:
  """Trains (or fine-tunes) a model, resuming from the latest checkpoint.

  Each epoch iterates the train split in an order drawn from
  ``(config.seed, epoch)`` (augmented when ``config.augment``); the
  validation split is evaluated after every epoch and the test split at the
  end. Rows go to ``workdir/metrics.jsonl`` (one per ``log_every_steps`` and
  per evaluation, with stage, split, step, epoch, wall time and, for train
  rows, throughput) and TensorBoard (``workdir/tb/<stage_name>``).
  Checkpoints are saved every ``config.checkpoint_every_steps`` (0: only at
  the end) and at the end, keeping ``config.keep_checkpoints``.

  Re-running after a kill restores the latest checkpoint and continues with
  identical results (``variables``, if given, then only define the expected
  structure; to resume without recomputing a transformed tree, pass
  ``restore_checkpoint(dir)``'s ``params``/``batch_stats``). A checkpoint that cannot be restored (corrupt files, or
  a structure that differs from this run's state) raises
  :class:`CheckpointError`; nothing is deleted.

  Args:
    config: training config (see ``configs/default.py``).
    workdir: directory for metrics, TensorBoard logs and (by default)
      checkpoints.
    dataset: a loaded dataset (default: from the config's data fields).
    variables: a variables dict to train instead of a fresh init, e.g. a
      transformed tree; the same ``model`` must run it.
    penalty_fn: ``params -> scalar`` added to the loss (times
      ``penalty_weight``) and logged as 'penalty'.
    penalty_weight: weight of ``penalty_fn``.
    stage_name: names the stage in rows, the progress bar and TensorBoard.
    model: the Flax module (default: ``get_model(config.model)``).
    checkpoint_dir: where checkpoints go (default
      ``workdir/checkpoints/<stage_name>``).
    stop_after_steps: stop right after this global step as if killed (no
      final checkpoint or test evaluation); for tests of resuming.
    mesh: device mesh (default: all devices).

  Returns:
    ``(state, history)``: the final state and this stage's metric rows
    (including rows of earlier, resumed runs).
  """
  maybe_initialize_distributed(config)
  mesh = make_mesh() if mesh is None else mesh
  validate_config(config, num_devices=mesh.size)
  if dataset is None:
    dataset = load_dataset(config)
  if model is None:
    model = models_lib.get_model(config.model,
                                 num_classes=dataset.num_classes)
  batch_size = config.batch_size
  steps_per_epoch = data_lib.num_batches(len(dataset.train.labels),
                                         batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size={batch_size} exceeds the '
                      f'{len(dataset.train.labels)} training examples')
  total_steps = config.num_epochs * steps_per_epoch
  stop_at = total_steps
  if config.get('max_steps') is not None:
    stop_at = min(stop_at, config.max_steps)

  tx, schedule = make_optimizer(config, steps_per_epoch)
  input_shape = (1,) + dataset.train.images.shape[1:]
  state = create_train_state(config, model, variables, input_shape,
                             jax.random.PRNGKey(config.seed), tx=tx,
                             mesh=mesh)
  checkpoint_dir = os.path.abspath(
      checkpoint_dir or os.path.join(workdir, 'checkpoints', stage_name))
  manager = open_checkpoint_manager(checkpoint_dir,
                                    max_to_keep=config.keep_checkpoints)
  start_step = 0
  resumed_pending = []  # Metrics of the interrupted log interval.
  steps = checkpoint_steps(checkpoint_dir)
  if steps:
    try:
      state = restore_checkpoint(checkpoint_dir, state, mesh=mesh)
    except CheckpointError as e:
      manager.close()
      hint = ''
      if len(steps) > 1:
        hint = (f' Earlier checkpoints: steps {steps[:-1]}; move '
                f'{os.path.join(checkpoint_dir, str(steps[-1]))} away to '
                f'resume from step {steps[-2]}.')
      raise CheckpointError(f'{e}.{hint}') from e
    start_step = int(jax.device_get(state.step))
    meta = _read_meta(os.path.join(checkpoint_dir, str(steps[-1])), steps[-1])
    resumed_pending = list(meta.get('pending_metrics', []))
    saved = meta.get('config')
    changed = _config_diff(saved, _config_json(config))
    if saved is not None and changed:
      logger.warning('%s: resuming from step %d of %s with a config that '
                     'differs in %s', stage_name, start_step, checkpoint_dir,
                     ', '.join(changed))

  log = _MetricsLog(workdir, stage_name, start_step)
  # Early stopping on validation accuracy; the counts come from the stage's
  # logged rows, so a resumed run stops where an uninterrupted one would.
  patience = int(config.get('early_stopping_patience') or 0)
  val_accuracy = [r['accuracy'] for r in log.history
                  if r.get('split') == 'validation']
  stopped_early = _no_gain(val_accuracy, patience)
  train_step = make_train_step(model, penalty_fn=penalty_fn,
                               penalty_weight=penalty_weight,
                               learning_rate_fn=schedule, mesh=mesh)
  eval_step = make_eval_step(model, mesh=mesh)
  t_start = time.time()

  def evaluate_split(name, split, step):
    t0 = time.perf_counter()
    result = evaluate(state, model, split, dataset, config.eval_batch_size,
                      mesh=mesh, eval_step=eval_step)
    log.write({'split': name, 'step': step, 'epoch': step / steps_per_epoch,
               'wall_time': time.time(), 'elapsed_s': time.time() - t_start,
               'eval_s': time.perf_counter() - t0, **result})
    return result

  def save(step, pending):
    if step not in manager.all_steps():
      # The metrics of the current log interval go along, so a resumed run
      # logs the same rows as an uninterrupted one.
      pending = [{k: float(v) for k, v in m.items()}
                 for m in jax.device_get(pending)]
      save_checkpoint(manager, state, extra={
          'stage': stage_name, 'epoch': step / steps_per_epoch,
          'config': _config_json(config), 'pending_metrics': pending})

  pbar = _progress_bar(config, stop_at, start_step, stage_name)
  # Plain locals: ConfigDict attribute access costs microseconds per step.
  log_every, save_every = config.log_every_steps, config.checkpoint_every_steps
  has_validation = len(dataset.validation.labels) > 0
  step = start_step
  killed = False
  pending = resumed_pending  # Metrics since the last log row: no sync.
  first_step_s = None   # Compile + first step of this run (synced once).
  first_row = True
  t_interval, interval_steps, paused = time.perf_counter(), 0, 0.0
  epoch = step // steps_per_epoch
  try:
    while step < stop_at and not killed and not stopped_early:
      batches = data_lib.iterate_batches(
          dataset.train, batch_size, mean=dataset.mean, std=dataset.std,
          seed=config.seed, epoch=epoch, augment=config.augment,
          pad_crop=config.pad_crop)
      done_in_epoch = step - epoch * steps_per_epoch
      for images, labels in itertools.islice(batches, done_in_epoch, None):
        state, metrics = train_step(state, shard_batch((images, labels),
                                                       mesh))
        step += 1
        pending.append(metrics)
        pbar.update()
        if first_step_s is None:
          jax.block_until_ready(metrics)
          now = time.perf_counter()
          first_step_s, t_interval = now - t_interval, now
        else:
          interval_steps += 1
        if step % log_every == 0 or step == stop_at:
          values = jax.device_get(pending)
          elapsed = time.perf_counter() - t_interval - paused
          row = {'split': 'train', 'step': step,
                 'epoch': step / steps_per_epoch, 'wall_time': time.time(),
                 'elapsed_s': time.time() - t_start}
          # Means in float64 of exact float32 values: the same whether an
          # interval's first metrics came from a checkpoint (resume) or not.
          row.update({k: float(np.mean([float(v[k]) for v in values]))
                      for k in values[0]})
          if interval_steps and elapsed > 0:
            row['steps_per_s'] = interval_steps / elapsed
            row['images_per_s'] = interval_steps * batch_size / elapsed
          if first_row:
            row['first_step_s'] = first_step_s
            first_row = False
          log.write(row)
          pbar.set_postfix(loss=f'{row["loss"]:.4f}',
                           acc=f'{row["accuracy"]:.3f}', refresh=False)
          pending = []
          t_interval, interval_steps, paused = time.perf_counter(), 0, 0.0
        end_of_epoch = step % steps_per_epoch == 0
        do_eval = end_of_epoch and has_validation
        do_save = step == stop_at or (save_every and
                                      step % save_every == 0)
        if do_eval or do_save:
          jax.block_until_ready(metrics)  # Time eval/saves apart from steps.
          t_pause = time.perf_counter()
          if do_eval:
            result = evaluate_split('validation', dataset.validation, step)
            val_accuracy.append(result['accuracy'])
            stopped_early = _no_gain(val_accuracy, patience)
            pbar.set_postfix(val_acc=f'{result["accuracy"]:.3f}',
                             refresh=False)
          if do_save:
            save(step, pending)
          paused += time.perf_counter() - t_pause
        if stop_after_steps is not None and step >= stop_after_steps:
          killed = True
        if killed or step >= stop_at or stopped_early:
          break
      epoch += 1
    if not killed:
      if step > 0:
        save(step, pending)
      if len(dataset.test.labels):
        evaluate_split('test', dataset.test, step)
    manager.wait_until_finished()
  finally:
    pbar.close()
    manager.close()
    log.close()
  return state, log.history


def _no_gain(accuracies: Sequence[float], patience: int) -> bool:
  """Whether the last ``patience`` evaluations all failed to beat the best
  one before them (never with patience 0)."""
  if patience <= 0 or len(accuracies) <= patience:
    return False
  return max(accuracies[-patience:]) <= max(accuracies[:-patience])


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _config_diff(old: Optional[Mapping], new: Mapping, prefix='') -> list[str]:
  """Dotted names of the fields that differ between two config dicts."""
  if old is None:
    return []
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _config_diff(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key} ({a!r} -> {b!r})')
  return out


def summarize(history: Sequence[Mapping]) -> dict:
  """The last train, validation and test rows of a history, for printing."""
  out = {}
  for row in history:
    split = row.get('split')
    if split in ('train', 'validation', 'test'):
      out[split] = {k: v for k, v in row.items()
                    if k in ('step', 'epoch', 'loss', 'accuracy', 'penalty')}
  return out
