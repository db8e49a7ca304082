"""Checkpoints: the train state by step (Orbax), and final variables.

Every save records each leaf's path, shape, dtype and CRC-32 in a JSON item
'meta'; every restore checks the arrays against it, so truncated or corrupt
files and structures that differ from the run's raise
:class:`~lowrank_jax.train.errors.CheckpointError` naming the directory, the
step and what differs. Zero-size leaves (which Orbax refuses to save) are
packed into one-element placeholders and restored from the metadata. A
step's metadata also records the run's config, which a resumed run diffs
against its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lowrank_jax.train.errors import CheckpointError
from lowrank_jax.train.sharding import make_mesh, replicated
from lowrank_jax.train.state import TrainState, _plain_dict

# The logger of the module this code came from, so logging filters that name
# it keep working.
logger = logging.getLogger('lowrank_jax.training')
_CHECKPOINT_FORMAT = 1


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


def _config_json(config) -> dict:
  """The config as plain JSON values (as checkpoints record it)."""
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


def _restore_item(where: str, unreadable: str, **items):
  """Restores composite items of one checkpoint directory.

  Args:
    where: the directory (a step of a checkpoint manager, or saved variables).
    unreadable: how the :class:`CheckpointError` raised when the files cannot
      be read begins, e.g. ``'checkpoint DIR (step S): cannot read its
      arrays'``.
    **items: orbax restore arguments by item name.

  Returns:
    Orbax's composite result (the items as attributes).
  """
  ocp = _ocp()
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(where, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax/tensorstore raise many types.
    raise CheckpointError(f'{unreadable} (truncated or corrupt files?): '
                          f'{type(e).__name__}: {e}') from e


def _saved_target(where: str, item: str, sharding):
  """The tree saved as ``item`` at ``where``, as ``ShapeDtypeStruct`` s placed
  on ``sharding``: Orbax then restores onto this run's devices, whatever the
  device count it was saved with (without a target it refuses a different
  topology). None if the metadata cannot be read (the restore reports it)."""
  ocp = _ocp()
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)   # "no _CHECKPOINT_METADATA": expected
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(os.path.join(where, item)).item_metadata
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    absl_logger.setLevel(level)
  tree = getattr(meta, 'tree', meta)
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      tree)


def _checked_meta(meta, subject: str) -> dict:
  """``meta`` if it is metadata of this format, else a
  :class:`CheckpointError` that begins with ``subject``."""
  if not isinstance(meta, Mapping) or meta.get('format') != _CHECKPOINT_FORMAT:
    raise CheckpointError(f'{subject}: metadata is missing or of an unknown '
                          'format')
  return meta


def _step_subject(where: str, step) -> str:
  """How errors name one step of a checkpoint directory."""
  return f'checkpoint {where} (step {step})'


def _read_meta(where: str, step) -> dict:
  """The checked metadata of the checkpoint of ``step`` in ``where``."""
  subject = _step_subject(where, step)
  meta = _restore_item(where, f'{subject}: cannot read its metadata',
                       meta=_ocp().args.JsonRestore()).meta
  return _checked_meta(meta, subject)


def _verify(where, step, tree, meta):
  """Checks a restored tree against the saved shapes and checksums."""
  diff = _structure_diff(meta['structure'], _describe(tree))
  if diff:
    raise CheckpointError(f'{_step_subject(where, step)} is corrupt: '
                          f'restored arrays do not match its metadata: {diff}')
  sums, saved = _checksums(tree), meta['checksums']
  bad = [p for p in saved if sums.get(p) != saved[p]]
  if bad:
    raise CheckpointError(
        f'{_step_subject(where, step)} is corrupt: checksum mismatch in '
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
          f'{_step_subject(where, step)} does not match this run\'s train '
          f'state (different model, transform or optimizer?): {diff}')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        _state_tree(state))
    restore = ocp.args.StandardRestore(_pack_empty(target))
  else:
    restore = ocp.args.StandardRestore(_saved_target(where, 'state',
                                                     sharding))
  tree = _restore_item(
      where, f'{_step_subject(where, step)}: cannot read its arrays',
      state=restore).state
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
  # One read of both items, as saved together.
  subject = f'saved variables at {path}'
  target = _saved_target(path, 'variables', replicated(make_mesh()))
  restored = _restore_item(path, f'{subject} cannot be read',
                           variables=ocp.args.StandardRestore(target),
                           meta=ocp.args.JsonRestore())
  meta = _checked_meta(restored.meta, subject)
  variables = _unpack_empty(_plain_dict(restored.variables),
                            meta['structure'])
  _verify(path, 'final', variables, meta)
  return variables


def _sync(name: str) -> None:
  """Waits for every process at barrier ``name`` (multi-host only)."""
  if jax.process_count() > 1:
    _ocp().multihost.sync_global_processes(name)
