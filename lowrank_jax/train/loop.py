"""The training loop: :func:`train` (alias :func:`train_and_evaluate`).

A run is cut into named steps: :func:`_resume` restores the latest
checkpoint, :func:`lowrank_jax.train.epochs.run_epochs` runs the epochs and
:func:`lowrank_jax.train.epochs.finish` saves the final checkpoint and
evaluates the test split. What a call fixes up front is a frozen
:class:`~lowrank_jax.train.progress.Run`; what changes as the steps run is one
:class:`~lowrank_jax.train.progress.Progress`, passed along, so no function
reads a variable another one rebinds.

Resume: the data order of an epoch is a function of ``(config.seed, epoch)``,
the dropout key of step ``s`` is ``fold_in(state.rng, s)``, and a checkpoint
holds step, params, batch statistics, optimizer state and the rng. Re-running
the same command after a kill restores the latest checkpoint, skips the
batches already done in its epoch and continues with results identical to an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Mapping, Optional

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from lowrank_jax import models as models_lib
from lowrank_jax.train import data as data_lib
from lowrank_jax.train import epochs
from lowrank_jax.train import progress as progress_lib
from lowrank_jax.train.checkpoint import (_config_diff, _config_json,
                                          _read_meta, checkpoint_steps,
                                          open_checkpoint_manager,
                                          restore_checkpoint)
from lowrank_jax.train.config_check import (maybe_initialize_distributed,
                                            validate_config)
from lowrank_jax.train.errors import CheckpointError, ConfigError
from lowrank_jax.train.metrics import _MetricsLog, _progress_bar
from lowrank_jax.train.optim import make_optimizer
from lowrank_jax.train.sharding import make_mesh
from lowrank_jax.train.state import PyTree, TrainState, create_train_state
from lowrank_jax.train.steps import (Distillation, make_eval_step,
                                     make_train_step)

# The logger of the module this code came from, so logging filters that name
# it keep working.
logger = logging.getLogger('lowrank_jax.training')


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset named by the config's data fields."""
  return data_lib.load_dataset(
      config.dataset, validation_size=config.validation_size,
      train_subset=config.get('train_subset'),
      test_subset=config.get('test_subset'), seed=config.seed,
      data_dir=config.get('data_dir'))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          dataset: Optional[data_lib.Dataset] = None,
          variables: Optional[Mapping] = None,
          penalty_fn: Optional[Callable[[PyTree], jax.Array]] = None,
          penalty_weight: float = 1.0,
          distill: Optional[Distillation] = None,
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
  ``restore_checkpoint(dir)``'s ``params``/``batch_stats``). A checkpoint
  that cannot be restored (corrupt files, or a structure that differs from
  this run's state) raises :class:`CheckpointError`; nothing is deleted.

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
    distill: a teacher network to distill from (its loss is logged as
      'distill'); e.g. the dense network a split was made from.
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
  steps_per_epoch, stop_at = _step_counts(config, dataset)
  tx, schedule = make_optimizer(config, steps_per_epoch)
  input_shape = (1,) + dataset.train.images.shape[1:]
  state = create_train_state(config, model, variables, input_shape,
                             jax.random.PRNGKey(config.seed), tx=tx,
                             mesh=mesh)
  checkpoint_dir = os.path.abspath(
      checkpoint_dir or os.path.join(workdir, 'checkpoints', stage_name))
  manager = open_checkpoint_manager(checkpoint_dir,
                                    max_to_keep=config.keep_checkpoints)
  state, start_step, pending = _resume(config, state, manager, checkpoint_dir,
                                       stage_name, mesh)
  log = _MetricsLog(workdir, stage_name, start_step)
  # Early stopping on validation accuracy; the counts come from the stage's
  # logged rows, so a resumed run stops where an uninterrupted one would.
  patience = int(config.get('early_stopping_patience') or 0)
  val_accuracy = [r['accuracy'] for r in log.history
                  if r.get('split') == 'validation']
  progress = progress_lib.Progress(
      step=start_step, pending=pending, val_accuracy=val_accuracy,
      stopped_early=progress_lib.no_gain(val_accuracy, patience))
  train_step = make_train_step(model, penalty_fn=penalty_fn,
                               penalty_weight=penalty_weight,
                               distill=distill,
                               learning_rate_fn=schedule, mesh=mesh)
  eval_step = make_eval_step(model, mesh=mesh)
  t_start = time.time()
  pbar = _progress_bar(config, stop_at, start_step, stage_name)
  run = progress_lib.Run(
      config=config, dataset=dataset, model=model, mesh=mesh,
      stage_name=stage_name, steps_per_epoch=steps_per_epoch,
      stop_at=stop_at, stop_after_steps=stop_after_steps,
      batch_size=config.batch_size, log_every=config.log_every_steps,
      save_every=config.checkpoint_every_steps,
      has_validation=len(dataset.validation.labels) > 0, patience=patience,
      manager=manager, log=log, train_step=train_step, eval_step=eval_step,
      t_start=t_start, pbar=pbar)
  progress.new_interval()
  try:
    state = epochs.run_epochs(run, state, progress)
    epochs.finish(run, state, progress)
  finally:
    pbar.close()
    manager.close()
    log.close()
  return state, log.history


# The name of the Flax examples' entry point: the same function.
train_and_evaluate = train


def _step_counts(config: ml_collections.ConfigDict,
                 dataset: data_lib.Dataset) -> tuple[int, int]:
  """``(steps_per_epoch, stop_at)``: the global step the run ends at is
  ``num_epochs * steps_per_epoch``, or ``config.max_steps`` if sooner.

  Raises:
    ConfigError: when the batch is larger than the training split.
  """
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
  return steps_per_epoch, stop_at


def _resume(config: ml_collections.ConfigDict, state: TrainState, manager,
            checkpoint_dir: str, stage_name: str, mesh: Mesh
            ) -> tuple[TrainState, int, list]:
  """Restores the stage's latest checkpoint, if there is one.

  Returns:
    ``(state, start_step, pending)``: ``state`` as given, 0 and ``[]``
    without a checkpoint; else the restored state, its step and the metrics
    of the log interval the checkpoint interrupted.

  Raises:
    CheckpointError: the latest checkpoint cannot be restored (``manager``
      is closed first); the message names the earlier steps to fall back to.
  """
  steps = checkpoint_steps(checkpoint_dir)
  if not steps:
    return state, 0, []
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
  pending = list(meta.get('pending_metrics', []))
  saved = meta.get('config')
  changed = _config_diff(saved, _config_json(config))
  if saved is not None and changed:
    logger.warning('%s: resuming from step %d of %s with a config that '
                   'differs in %s', stage_name, start_step, checkpoint_dir,
                   ', '.join(changed))
  return state, start_step, pending


