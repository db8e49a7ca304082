"""The train state, and the variables a run starts from.

A :class:`TrainState` holds step, params, optimizer state, BatchNorm
statistics and the dropout key; params trees are the models' (conv kernels
HWIO) or any transformed tree the same model runs.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh

from lowrank_jax import runner
from lowrank_jax.train.errors import CheckpointError, ConfigError
from lowrank_jax.train.optim import make_optimizer
from lowrank_jax.train.sharding import _run_once, make_mesh, replicated

__all__ = ['CheckpointError', 'ConfigError', 'PyTree', 'TrainState',
           'create_train_state', 'init_variables']

PyTree = Any


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
  ``model.init`` on CPU (see ``sharding._RUN_ONCE_OPTIONS``).

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


def _plain_dict(tree):
  """A tree with every (possibly frozen) mapping turned into a plain dict."""
  if hasattr(tree, 'unfreeze'):
    tree = tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: _plain_dict(v) for k, v in tree.items()}
  return tree
