"""What a training run fixes up front, what changes as it goes, and its
guards (early stopping, divergence).

:class:`Run` is frozen before the first step; :class:`Progress` is the one
object the steps update, passed along, so no function reads a variable
another one rebinds (:mod:`lowrank_jax.train.epochs` runs the steps,
:func:`lowrank_jax.train.loop.train` builds both).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import Mesh

from lowrank_jax.train import data as data_lib
from lowrank_jax.train.errors import TrainingDiverged
from lowrank_jax.train.metrics import _MetricsLog


@dataclasses.dataclass(frozen=True)
class Run:
  """What one call of :func:`lowrank_jax.train.loop.train` fixes before its
  first step.

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
class Progress:
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


def check_finite(run: Run, loss: float, step: int, what: str) -> None:
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


def no_gain(accuracies: Sequence[float], patience: int) -> bool:
  """Whether the last ``patience`` evaluations all failed to beat the best
  one before them (never with patience 0)."""
  if patience <= 0 or len(accuracies) <= patience:
    return False
  return max(accuracies[-patience:]) <= max(accuracies[:-patience])
