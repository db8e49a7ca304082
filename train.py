"""Command-line entry point: a config file and overrides -> one pipeline.

  python train.py --config configs/smoke.py --workdir /tmp/smoke
  python train.py --config configs/resnet20.py --workdir runs/r20 \\
      --config.num_epochs=10 --config.learning_rate=0.05

The config is locked: overriding a field that does not exist is an error.
Re-running the same command resumes from the latest checkpoint in --workdir.
``config.pipeline`` picks the pipeline: 'train' here, the compression
pipelines from ``lowrank_jax.train.pipelines.PIPELINES``.

On Linux with glibc >= 2.35 and transparent huge pages in ``madvise`` mode
the command first restarts itself once with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (:func:`hugepages_environ`);
``LOWRANK_JAX_HUGEPAGES=0`` runs it without.
"""

import json
import os
import sys
import time
from typing import Callable, Mapping, Optional

# Before jax and the rest are imported: a restart (below) then costs only
# the interpreter's start.
HUGEPAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
HUGEPAGES_OFF = 'LOWRANK_JAX_HUGEPAGES'  # =0 runs without the restart.
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def hugepages_environ(environ: Mapping[str, str], libc: Optional[str],
                      thp_mode: Optional[str]) -> Optional[dict]:
  """The environment to restart with so that malloc asks for huge pages.

  XLA:CPU's buffers come from glibc's malloc, and the large ones are
  fresh mappings at every step, faulted in 4 KiB page by page: the main
  job in miniature took 14 million page faults in 2 minutes and a fifth
  of its CPU time in the kernel. glibc >= 2.35 with
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` advises its mappings as
  transparent huge pages (2 MiB), which the kernel then uses where its
  mode is ``madvise``: 32x fewer faults, 1.13-1.24x the images/s
  (docs/benchmarks_hugepages.md). glibc reads the tunable when the
  process starts, hence the restart.

  Args:
    environ: the current environment.
    libc: ``os.confstr('CS_GNU_LIBC_VERSION')``, e.g. ``'glibc 2.36'``.
    thp_mode: the selected transparent-huge-page mode, e.g. ``'madvise'``.

  Returns:
    The environment with the tunable added, or None to go on as is: not
    glibc >= 2.35, a mode other than ``madvise`` (``always`` needs no
    advice, ``never`` takes none), the tunable already set, or
    ``LOWRANK_JAX_HUGEPAGES=0``.

  Raises:
    ValueError: ``LOWRANK_JAX_HUGEPAGES`` set to anything but 0, 1 or ''.
  """
  if environ.get(HUGEPAGES_OFF, '') not in ('', '0', '1'):
    raise ValueError(f'{HUGEPAGES_OFF}={environ[HUGEPAGES_OFF]!r}: must be '
                     '0 (no huge pages) or 1 (the default)')
  tunables = environ.get('GLIBC_TUNABLES', '')
  if (environ.get(HUGEPAGES_OFF) == '0' or thp_mode != 'madvise'
      or HUGEPAGES_TUNABLE.split('=')[0] in tunables):
    return None
  name, _, version = (libc or '').partition(' ')
  parts = version.split('.')
  if name != 'glibc' or not all(p.isdigit() for p in parts[:2]):
    return None
  if tuple(int(p) for p in parts[:2]) < (2, 35):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(
      t for t in (tunables, HUGEPAGES_TUNABLE) if t)}


def thp_mode() -> Optional[str]:
  """The bracketed word of ``always [madvise] never``, or None."""
  try:
    with open(_THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def libc_version() -> Optional[str]:
  """``'glibc 2.36'`` and the like, or None where the C library is not
  glibc (musl, macOS)."""
  try:
    return os.confstr('CS_GNU_LIBC_VERSION')
  except (AttributeError, ValueError, OSError):
    return None


def restart_environ(environ: Mapping[str, str]) -> Optional[dict]:
  """:func:`hugepages_environ` on this machine's C library and THP mode."""
  return hugepages_environ(environ, libc_version(), thp_mode())


def _restart_with_hugepages() -> None:
  """Replaces this process by itself with the tunable set, where it helps."""
  try:
    env = restart_environ(os.environ)
  except ValueError as e:
    sys.exit(f'train.py: {e}')
  if env is not None:
    print(f'train.py: restarting with GLIBC_TUNABLES={env["GLIBC_TUNABLES"]}'
          f' (huge pages for XLA:CPU buffers; {HUGEPAGES_OFF}=0 runs '
          'without)', file=sys.stderr, flush=True)
    os.execve(sys.executable, sys.orig_argv, env)


if __name__ == '__main__':
  _restart_with_hugepages()

# The rest is imported after the restart on purpose (flake8 E402).
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
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
from lowrank_jax.train.errors import CheckpointError, ConfigError

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


def _check(config, workdir: str) -> None:
  """Every check of the config and workdir: nothing is written before the
  config is known to be valid."""
  config_check.check_known_fields(config, default_config.get_config())
  config_check.validate_config(config)
  if config.pipeline != 'train':
    # Selection rules and FLOP targets resolve against the model's layers.
    dataset = loop.load_dataset(config)
    compress_config.validate(config, model=models.get_model(
        config.model, num_classes=dataset.num_classes),
                  input_shape=(1,) + dataset.train.images.shape[1:])
    jobs.check_workdir(config, workdir)   # refuses a changed config


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
  try:
    _check(config, workdir)
  except (ConfigError, CheckpointError) as e:
    # The message names the field or file: no traceback around it.
    sys.exit(f'train.py: {type(e).__name__}: {e}')
  if jax.process_index() == 0:
    _write_config(config, workdir)
  summary = pipelines[config.pipeline](config, workdir)
  print(json.dumps({'pipeline': config.pipeline, 'workdir': workdir,
                    **(summary or {})}, indent=2))


def _parse_flags(argv):
  """absl's flag parsing; an unknown ``--config.<field>`` (ml_collections
  raises AttributeError, with its closest valid name) exits with the
  message alone, like the other config errors. Any other error (a bug in
  the config file, say) keeps its traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except AttributeError as e:
    cause = e.args[0] if e.args else None
    if not (isinstance(cause, KeyError) and cause.args):
      raise
    text = str(cause.args[0])
    key = text.split('\n')[0].strip('\'"')
    fields = {name for arg in argv if arg.startswith('--config.')
              for name in arg.split('=')[0].split('.')[1:]}
    if key not in fields:
      raise
    sys.exit('train.py: a --config override names no config field: '
             + ' '.join(text.split()))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
