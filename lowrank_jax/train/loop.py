"""The training loop: :func:`train` (alias :func:`train_and_evaluate`).

A run is cut into named steps: :func:`_resume` restores the latest
checkpoint, :func:`_run_epochs` runs the epochs (:func:`_train_step` per
batch, :func:`_log_train_row` per log interval, :func:`_pause` for
evaluations and saves), and :func:`_finish` saves the final checkpoint and
evaluates the test split. What a call fixes up front is a frozen
:class:`_Run`; what changes as the steps run is one :class:`_Progress`,
passed along, so no function reads a variable another one rebinds.

Resume: the data order of an epoch is a function of ``(config.seed, epoch)``,
the dropout key of step ``s`` is ``fold_in(state.rng, s)``, and a checkpoint
holds step, params, batch statistics, optimizer state and the rng. Re-running
the same command after a kill restores the latest checkpoint, skips the
batches already done in its epoch and continues with results identical to an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from lowrank_jax import models as models_lib
from lowrank_jax.train import data as data_lib
from lowrank_jax.train.checkpoint import (_config_diff, _config_json,
                                          _read_meta, checkpoint_steps,
                                          open_checkpoint_manager,
                                          restore_checkpoint, save_checkpoint)
from lowrank_jax.train.config_check import (maybe_initialize_distributed,
                                            validate_config)
from lowrank_jax.train.errors import (CheckpointError, ConfigError,
                                     TrainingDiverged)
from lowrank_jax.train.metrics import _MetricsLog, _progress_bar
from lowrank_jax.train.optim import make_optimizer
from lowrank_jax.train.sharding import make_mesh, shard_batch
from lowrank_jax.train.state import PyTree, TrainState, create_train_state
from lowrank_jax.train.steps import evaluate, make_eval_step, make_train_step

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


@dataclasses.dataclass(frozen=True)
class _Run:
  """What one call of :func:`train` fixes before its first step.

  Config values read every step are plain fields: ConfigDict attribute
  access costs microseconds per step.
  """
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: nn.Module
  mesh: Mesh
  stage_name: str
  steps_per_epoch: int
  stop_at: int
  stop_after_steps: Optional[int]
  batch_size: int
  log_every: int
  save_every: int
  has_validation: bool
  patience: int
  manager: Any
  log: _MetricsLog
  train_step: Callable
  eval_step: Callable
  t_start: float
  pbar: Any


@dataclasses.dataclass
class _Progress:
  """What changes as the steps run.

  Attributes:
    step: the global step reached.
    pending: metrics since the last log row, still on device (no sync).
    val_accuracy: validation accuracies of the stage so far (early stopping).
    stopped_early: whether early stopping has ended the stage.
    killed: whether ``stop_after_steps`` has ended the run.
    first_step_s: compile + first step of this run (synced once).
    first_row: whether the next train row is this run's first.
    t_interval, interval_steps, paused: the current log interval's start,
      its timed steps and the time spent in evaluations and saves.
  """
  step: int
  pending: list
  val_accuracy: list
  stopped_early: bool
  killed: bool = False
  first_step_s: Optional[float] = None
  first_row: bool = True
  t_interval: float = 0.0
  interval_steps: int = 0
  paused: float = 0.0

  def new_interval(self) -> None:
    """Starts timing a log interval."""
    self.t_interval, self.interval_steps, self.paused = (
        time.perf_counter(), 0, 0.0)

  def done(self, stop_at: int) -> bool:
    """Whether the run ends here: killed, at ``stop_at`` or stopped early."""
    return self.killed or self.step >= stop_at or self.stopped_early


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
  progress = _Progress(step=start_step, pending=pending,
                       val_accuracy=val_accuracy,
                       stopped_early=_no_gain(val_accuracy, patience))
  train_step = make_train_step(model, penalty_fn=penalty_fn,
                               penalty_weight=penalty_weight,
                               learning_rate_fn=schedule, mesh=mesh)
  eval_step = make_eval_step(model, mesh=mesh)
  t_start = time.time()
  pbar = _progress_bar(config, stop_at, start_step, stage_name)
  run = _Run(
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
    state = _run_epochs(run, state, progress)
    _finish(run, state, progress)
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


def _run_epochs(run: _Run, state: TrainState,
                progress: _Progress) -> TrainState:
  """Runs epochs from ``progress.step`` until the run is done; an epoch
  started earlier skips the batches it already did."""
  config = run.config
  epoch = progress.step // run.steps_per_epoch
  while not progress.done(run.stop_at):
    batches = data_lib.iterate_batches(
        run.dataset.train, run.batch_size, mean=run.dataset.mean,
        std=run.dataset.std, seed=config.seed, epoch=epoch,
        augment=config.augment, pad_crop=config.pad_crop)
    done_in_epoch = progress.step - epoch * run.steps_per_epoch
    for images, labels in itertools.islice(batches, done_in_epoch, None):
      state = _train_step(run, state, progress, images, labels)
      if progress.done(run.stop_at):
        break
    epoch += 1
  return state


def _train_step(run: _Run, state: TrainState, progress: _Progress,
                images: np.ndarray, labels: np.ndarray) -> TrainState:
  """One optimizer step, then its log row, evaluation and save when due."""
  state, metrics = run.train_step(state, shard_batch((images, labels),
                                                     run.mesh))
  progress.step += 1
  step = progress.step
  progress.pending.append(metrics)
  run.pbar.update()
  if progress.first_step_s is None:
    jax.block_until_ready(metrics)
    now = time.perf_counter()
    progress.first_step_s, progress.t_interval = now - progress.t_interval, now
  else:
    progress.interval_steps += 1
  if step % run.log_every == 0 or step == run.stop_at:
    _log_train_row(run, progress)
  end_of_epoch = step % run.steps_per_epoch == 0
  do_eval = end_of_epoch and run.has_validation
  do_save = step == run.stop_at or (run.save_every and
                                    step % run.save_every == 0)
  if do_eval or do_save:
    jax.block_until_ready(metrics)  # Time eval/saves apart from steps.
    _pause(run, state, progress, do_eval, do_save)
  if run.stop_after_steps is not None and step >= run.stop_after_steps:
    progress.killed = True
  return state


def _log_train_row(run: _Run, progress: _Progress) -> None:
  """Writes the train row of the log interval ending at ``progress.step``
  (one host sync) and starts the next interval."""
  values = jax.device_get(progress.pending)
  elapsed = time.perf_counter() - progress.t_interval - progress.paused
  step = progress.step
  row = {'split': 'train', 'step': step,
         'epoch': step / run.steps_per_epoch, 'wall_time': time.time(),
         'elapsed_s': time.time() - run.t_start}
  # Means in float64 of exact float32 values: the same whether an
  # interval's first metrics came from a checkpoint (resume) or not.
  row.update({k: float(np.mean([float(v[k]) for v in values]))
              for k in values[0]})
  if progress.interval_steps and elapsed > 0:
    row['steps_per_s'] = progress.interval_steps / elapsed
    row['images_per_s'] = progress.interval_steps * run.batch_size / elapsed
  if progress.first_row:
    row['first_step_s'] = progress.first_step_s
    progress.first_row = False
  run.log.write(row)
  _check_finite(run, row['loss'], step, 'training loss')
  run.pbar.set_postfix(loss=f'{row["loss"]:.4f}',
                       acc=f'{row["accuracy"]:.3f}', refresh=False)
  progress.pending = []
  progress.new_interval()


def _pause(run: _Run, state: TrainState, progress: _Progress,
           do_eval: bool, do_save: bool) -> None:
  """The validation evaluation (and early-stopping check) and the save due
  at ``progress.step``, timed apart from the steps."""
  t_pause = time.perf_counter()
  if do_eval:
    result = _evaluate_split(run, state, 'validation', run.dataset.validation,
                             progress.step)
    progress.val_accuracy.append(result['accuracy'])
    progress.stopped_early = _no_gain(progress.val_accuracy, run.patience)
    run.pbar.set_postfix(val_acc=f'{result["accuracy"]:.3f}', refresh=False)
  if do_save:
    _save(run, state, progress.step, progress.pending)
  progress.paused += time.perf_counter() - t_pause


def _finish(run: _Run, state: TrainState, progress: _Progress) -> None:
  """Unless killed: the final checkpoint and the test evaluation. Then waits
  for the saves in flight."""
  if not progress.killed:
    if progress.step > 0:
      _save(run, state, progress.step, progress.pending)
    if len(run.dataset.test.labels):
      result = _evaluate_split(run, state, 'test', run.dataset.test,
                               progress.step)
      _check_finite(run, result['loss'], progress.step, 'test loss')
  run.manager.wait_until_finished()


def _evaluate_split(run: _Run, state: TrainState, name: str,
                    split: data_lib.Split, step: int) -> dict:
  """Evaluates ``split`` and logs it as split ``name`` at ``step``."""
  t0 = time.perf_counter()
  result = evaluate(state, run.model, split, run.dataset,
                    run.config.eval_batch_size, mesh=run.mesh,
                    eval_step=run.eval_step)
  run.log.write({'split': name, 'step': step,
                 'epoch': step / run.steps_per_epoch,
                 'wall_time': time.time(),
                 'elapsed_s': time.time() - run.t_start,
                 'eval_s': time.perf_counter() - t0, **result})
  return result


def _save(run: _Run, state: TrainState, step: int, pending: list) -> None:
  """Checkpoints ``state`` at ``step`` unless that step is saved already."""
  if step not in run.manager.all_steps():
    # The metrics of the current log interval go along, so a resumed run
    # logs the same rows as an uninterrupted one.
    pending = [{k: float(v) for k, v in m.items()}
               for m in jax.device_get(pending)]
    for m in pending:   # never save a diverged state
      _check_finite(run, m['loss'], step, 'training loss')
    save_checkpoint(run.manager, state, extra={
        'stage': run.stage_name, 'epoch': step / run.steps_per_epoch,
        'config': _config_json(run.config), 'pending_metrics': pending})


def _check_finite(run: _Run, loss: float, step: int, what: str) -> None:
  """Ends the run with :class:`TrainingDiverged` if ``loss`` is NaN / Inf."""
  if np.isfinite(loss):
    return
  config = run.config
  clip = config.get('grad_clip')
  raise TrainingDiverged(
      f'stage {run.stage_name!r} diverged: {what} is {loss} at step {step} '
      f'(config.learning_rate={config.learning_rate}, '
      f'config.optimizer={config.optimizer!r}, config.grad_clip={clip}). '
      'Likely cause: a learning rate too high for this model and optimizer '
      '(or a broken input pipeline). Lower config.learning_rate or set '
      'config.grad_clip, then run again; checkpoints before this step are '
      'kept and no non-finite state was saved.')


def _no_gain(accuracies: Sequence[float], patience: int) -> bool:
  """Whether the last ``patience`` evaluations all failed to beat the best
  one before them (never with patience 0)."""
  if patience <= 0 or len(accuracies) <= patience:
    return False
  return max(accuracies[-patience:]) <= max(accuracies[:-patience])
