"""Command-line entry point: a config file and overrides -> one pipeline.

  python train.py --config configs/smoke.py --workdir /tmp/smoke
  python train.py --config configs/resnet20.py --workdir runs/r20 \\
      --config.num_epochs=10 --config.learning_rate=0.05

The config is locked: overriding a field that does not exist is an error.
Re-running the same command resumes from the latest checkpoint in --workdir.
``config.pipeline`` picks the pipeline: 'train' here, the compression
pipelines from ``lowrank_jax.train.pipelines.PIPELINES``.
"""

import json
import os
import sys
import time
from typing import Callable

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import default as default_config
from lowrank_jax import models
from lowrank_jax.train import atomic
from lowrank_jax.train import compress_config
from lowrank_jax.train import config_check
from lowrank_jax.train import jobs
from lowrank_jax.train import loop
from lowrank_jax.train import metrics
from lowrank_jax.train import pipelines as pipelines_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file with get_config().',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for metrics, TensorBoard logs, checkpoints.')
flags.mark_flags_as_required(['config', 'workdir'])


def _train(config, workdir) -> dict:
  _, history = loop.train(config, workdir)
  return metrics.summarize(history)


def get_pipelines() -> dict[str, Callable]:
  """``{name: fn(config, workdir) -> summary dict}`` of every pipeline."""
  return {'train': _train, **pipelines_lib.PIPELINES}


def _write_config(config, workdir: str) -> None:
  """Writes ``config.json`` atomically; a different earlier one is kept,
  appended to ``config_history.jsonl`` with the time it was replaced."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2) + '\n'
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    with open(os.path.join(workdir, 'config_history.jsonl'), 'a') as f:
      f.write(json.dumps({'replaced_at': time.time(),
                          'config': json.loads(old or 'null')}) + '\n')
  atomic.write_text(path, text)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config, workdir = _CONFIG.value, _WORKDIR.value
  # config.model='package.module:factory' imports from where the command
  # runs, as `python -m` would.
  if os.getcwd() not in sys.path:
    sys.path.insert(1, os.getcwd())
  config_check.maybe_initialize_distributed(config)
  pipelines = get_pipelines()
  if config.pipeline not in pipelines:
    raise app.UsageError(f'config.pipeline={config.pipeline!r} is unknown; '
                         f'known pipelines: {sorted(pipelines)}')
  # Nothing is written before the config is known to be valid.
  config_check.check_known_fields(config, default_config.get_config())
  config_check.validate_config(config)
  if config.pipeline != 'train':
    # Selection rules and FLOP targets resolve against the model's layers.
    dataset = loop.load_dataset(config)
    compress_config.validate(config, model=models.get_model(
        config.model, num_classes=dataset.num_classes),
                  input_shape=(1,) + dataset.train.images.shape[1:])
    jobs.check_workdir(config, workdir)   # refuses a changed config
  if jax.process_index() == 0:
    _write_config(config, workdir)
  summary = pipelines[config.pipeline](config, workdir)
  print(json.dumps({'pipeline': config.pipeline, 'workdir': workdir,
                    **(summary or {})}, indent=2))


if __name__ == '__main__':
  app.run(main)
