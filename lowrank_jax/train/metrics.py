"""What a run reports: the metrics log, the progress bar, a summary.

Rows go to ``workdir/metrics.jsonl`` (JSON lines) and TensorBoard
(``workdir/tb/<stage>``), written by process 0 only.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

import jax

from lowrank_jax.train import atomic


class _MetricsLog:
  """JSON lines (``workdir/metrics.jsonl``) plus TensorBoard, process 0 only.

  On resume from step ``s`` the rows of this stage after ``s`` (written after
  the checkpoint by the killed run), its old test rows and a line cut by a
  kill leave ``metrics.jsonl``, so the file reads like the log of one
  uninterrupted run; they are appended to ``metrics_dropped.jsonl`` with the
  reason, never lost.
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
    rows, kept, dropped = [], [], []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:
            dropped.append({'reason': 'a line cut by a kill', 'text': line})
      for r in rows:
        if r.get('stage') != stage or (
            r.get('step', 0) <= resume_step and r.get('split') != 'test'):
          kept.append(r)
        else:
          dropped.append({'reason': f'{stage} resumed at step {resume_step}',
                          'row': r})
      if dropped:
        with open(os.path.join(workdir, 'metrics_dropped.jsonl'), 'a') as f:
          for d in dropped:
            f.write(json.dumps(d) + '\n')
      atomic.write_text(self.path,
                        ''.join(json.dumps(row) + '\n' for row in kept))
    self.history = [r for r in kept if r.get('stage') == stage]
    self._file = open(self.path, 'a')
    from tensorboardX import SummaryWriter  # Lazy: optional at import.
    self._tb = SummaryWriter(os.path.join(workdir, 'tb', stage))

  def write(self, row: dict) -> None:
    """Appends ``row`` (tagged with the stage) to the history and the log."""
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
    """Closes the JSON-lines file and the TensorBoard writer."""
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()


def _progress_bar(config, total, initial, stage):
  """A tqdm bar of the stage's steps; shown on a terminal, on process 0,
  unless ``config.progress`` is False."""
  from tqdm import auto as tqdm  # Lazy.
  enabled = (config.get('progress', True) and sys.stderr.isatty()
             and jax.process_index() == 0)
  return tqdm.tqdm(total=total, initial=initial, desc=stage,
                   disable=not enabled, dynamic_ncols=True, leave=True)


def summarize(history: Sequence[Mapping]) -> dict:
  """The last train, validation and test rows of a history, for printing."""
  out = {}
  for row in history:
    split = row.get('split')
    if split in ('train', 'validation', 'test'):
      out[split] = {k: v for k, v in row.items()
                    if k in ('step', 'epoch', 'loss', 'accuracy', 'penalty')}
  return out
