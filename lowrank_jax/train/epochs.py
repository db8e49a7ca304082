"""The epoch and step loop of a training run, with its evaluations and saves.

:func:`run_epochs` runs the epochs (:func:`_train_step` per batch,
:func:`_log_train_row` per log interval, :func:`_pause` for evaluations and
saves); :func:`finish` saves the final checkpoint and evaluates the test
split. They read a frozen :class:`~lowrank_jax.train.progress.Run` and update
one :class:`~lowrank_jax.train.progress.Progress`.

Resume: the data order of an epoch is a function of ``(config.seed, epoch)``
(:func:`lowrank_jax.train.data.iterate_batches`), so an epoch started before
a kill skips the batches it already did and sees the rest in the same order.
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np

from lowrank_jax.train import data as data_lib
from lowrank_jax.train.checkpoint import _config_json, save_checkpoint
from lowrank_jax.train.progress import check_finite, no_gain, Progress, Run
from lowrank_jax.train.sharding import shard_batch
from lowrank_jax.train.state import TrainState
from lowrank_jax.train.steps import evaluate


def epoch_batches(config, dataset: data_lib.Dataset, epoch: int):
  """The ``(images, labels)`` training batches of ``epoch``, in the order
  and with the augmentation the training loop draws them."""
  return data_lib.iterate_batches(
      dataset.train, config.batch_size, mean=dataset.mean, std=dataset.std,
      seed=config.seed, epoch=epoch, augment=config.augment,
      pad_crop=config.pad_crop)


def run_epochs(run: Run, state: TrainState,
               progress: Progress) -> TrainState:
  """Runs epochs from ``progress.step`` until the run is done; an epoch
  started earlier skips the batches it already did."""
  config = run.config
  epoch = progress.step // run.steps_per_epoch
  while not progress.done(run.stop_at):
    batches = epoch_batches(config, run.dataset, epoch)
    done_in_epoch = progress.step - epoch * run.steps_per_epoch
    for images, labels in itertools.islice(batches, done_in_epoch, None):
      state = _train_step(run, state, progress, images, labels)
      if progress.done(run.stop_at):
        break
    epoch += 1
  return state


def _train_step(run: Run, state: TrainState, progress: Progress,
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


def _log_train_row(run: Run, progress: Progress) -> None:
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
  check_finite(run, row['loss'], step, 'training loss')
  run.pbar.set_postfix(loss=f'{row["loss"]:.4f}',
                       acc=f'{row["accuracy"]:.3f}', refresh=False)
  progress.pending = []
  progress.new_interval()


def _pause(run: Run, state: TrainState, progress: Progress,
           do_eval: bool, do_save: bool) -> None:
  """The validation evaluation (and early-stopping check) and the save due
  at ``progress.step``, timed apart from the steps."""
  t_pause = time.perf_counter()
  if do_eval:
    result = _evaluate_split(run, state, 'validation', run.dataset.validation,
                             progress.step)
    progress.val_accuracy.append(result['accuracy'])
    progress.stopped_early = no_gain(progress.val_accuracy, run.patience)
    run.pbar.set_postfix(val_acc=f'{result["accuracy"]:.3f}', refresh=False)
  if do_save:
    _save(run, state, progress.step, progress.pending)
  progress.paused += time.perf_counter() - t_pause


def finish(run: Run, state: TrainState, progress: Progress) -> None:
  """Unless killed: the final checkpoint and the test evaluation. Then waits
  for the saves in flight."""
  if not progress.killed:
    if progress.step > 0:
      _save(run, state, progress.step, progress.pending)
    if len(run.dataset.test.labels):
      result = _evaluate_split(run, state, 'test', run.dataset.test,
                               progress.step)
      check_finite(run, result['loss'], progress.step, 'test loss')
  run.manager.wait_until_finished()


def _evaluate_split(run: Run, state: TrainState, name: str,
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


def _save(run: Run, state: TrainState, step: int, pending: list) -> None:
  """Checkpoints ``state`` at ``step`` unless that step is saved already."""
  if step not in run.manager.all_steps():
    # The metrics of the current log interval go along, so a resumed run
    # logs the same rows as an uninterrupted one.
    pending = [{k: float(v) for k, v in m.items()}
               for m in jax.device_get(pending)]
    for m in pending:   # never save a diverged state
      check_finite(run, m['loss'], step, 'training loss')
    save_checkpoint(run.manager, state, extra={
        'stage': run.stage_name, 'epoch': step / run.steps_per_epoch,
        'config': _config_json(run.config), 'pending_metrics': pending})
