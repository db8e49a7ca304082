"""Jitted, sharded train and evaluation steps, and a full-split evaluation.

Batches are NHWC float32 images and (B,) int32 labels, sharded ``P('data')``
(see :func:`lowrank_jax.train.sharding.shard_batch`); the state is
replicated. The loss is softmax cross-entropy, optionally mixed with the
distillation loss of a teacher network, plus an optional penalty.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lowrank_jax import runner
from lowrank_jax.train import data as data_lib
from lowrank_jax.train.sharding import (batch_sharding, make_mesh, replicated,
                                        shard_batch)
from lowrank_jax.train.state import PyTree, TrainState


class Distillation(NamedTuple):
  """Knowledge distillation from a teacher (Hinton et al. 2015).

  ``teacher`` is a variables dict the student's own model runs (any forms:
  e.g. the dense network a split was made from), evaluated with
  ``train=False``; the loss becomes ``(1 - weight) * CE + weight *
  distillation_loss(student, teacher, temperature)``.
  """
  teacher: PyTree
  weight: float
  temperature: float = 4.0


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """Mean ``T^2 KL(softmax(teacher / T) || softmax(logits / T))``.

  The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et
  al. 2015), so one weight serves every temperature.
  """
  t = temperature
  targets = jax.nn.softmax(teacher_logits.astype(jnp.float32) / t)
  kl = optax.losses.kl_divergence(
      jax.nn.log_softmax(logits.astype(jnp.float32) / t), targets)
  return t * t * kl.mean()


def make_train_step(model: nn.Module, *,
                    penalty_fn: Optional[Callable[[PyTree], jax.Array]] = None,
                    penalty_weight: float = 0.0,
                    distill: Optional[Distillation] = None,
                    learning_rate_fn: Optional[optax.Schedule] = None,
                    mesh: Optional[Mesh] = None,
                    donate: bool = True):
  """A jitted, sharded SGD step.

  The loss is the mean softmax cross-entropy (mixed with the distillation
  loss when ``distill`` is given) plus ``penalty_weight * penalty_fn(params)``
  when ``penalty_fn`` is given (e.g. :func:`lowrank_jax.orthogonal_penalty`
  for the He et al. pipeline).
  BatchNorm models (state with non-empty ``batch_stats``) run with
  ``mutable=['batch_stats']``; the 'dropout' PRNG is
  ``fold_in(state.rng, state.step)`` (a pure function of the step, so
  resuming reproduces it).

  Args:
    model: the Flax module (the state's params may be any tree it runs).
    penalty_fn: ``params -> scalar``, jittable.
    penalty_weight: multiplies the penalty in the loss.
    distill: a teacher and the weight and temperature of its loss.
    learning_rate_fn: if given, its value at the step is logged.
    mesh: device mesh (default: all devices).
    donate: donate the input state's buffers (the caller must not reuse it).

  Returns:
    ``train_step(state, (images, labels)) -> (state, metrics)``; metrics are
    replicated scalars 'loss', 'ce', 'accuracy' and, when given, 'penalty'
    (unweighted), 'distill' (unweighted) and 'learning_rate'. Batches must
    be sharded ``P('data')`` (see :func:`shard_batch`).
  """
  mesh = make_mesh() if mesh is None else mesh

  def loss_fn(params, state, images, labels, teacher):
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
    loss, extra = ce, {}
    if distill is not None:
      teacher_logits = jax.lax.stop_gradient(
          runner.apply(model, teacher, images, train=False))
      extra['distill'] = distillation_loss(logits, teacher_logits,
                                           distill.temperature)
      loss = (1 - distill.weight) * ce + distill.weight * extra['distill']
    if penalty_fn is not None:
      extra['penalty'] = jnp.asarray(penalty_fn(params), jnp.float32)
      loss = loss + penalty_weight * extra['penalty']
    return loss, (ce, extra, logits, batch_stats)

  def step(state, batch, teacher=None):
    images, labels = batch
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (ce, extra, logits, batch_stats)), grads = grad_fn(
        state.params, state, images, labels, teacher)
    metrics = {
        'loss': loss, 'ce': ce,
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
        **extra,
    }
    if learning_rate_fn is not None:
      metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step),
                                             jnp.float32)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return new_state, metrics

  jit = functools.partial(
      jax.jit, out_shardings=(replicated(mesh), replicated(mesh)),
      donate_argnums=(0,) if donate else ())
  shardings = (replicated(mesh), batch_sharding(mesh))
  if distill is None:
    return jit(step, in_shardings=shardings)
  # The teacher is an argument, not a constant folded into the program.
  jitted = jit(step, in_shardings=shardings + (replicated(mesh),))
  teacher = jax.device_put(distill.teacher, replicated(mesh))
  return lambda state, batch: jitted(state, batch, teacher)


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
  """:func:`make_eval_step` kept per ``(model, mesh)``: evaluate's default."""
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
