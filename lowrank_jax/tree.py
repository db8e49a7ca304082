"""Parameter-tree paths, layer discovery and regex selection rules.

A *layer* is a dict node of the parameter tree whose leaves name one of the
registered forms (see :mod:`lowrank_jax.forms`): ``{'kernel', 'bias'}`` for a
dense layer, ``{'u_in', 'core', 'u_out', 'bias'}`` for a Tucker-2 layer, etc.
Layers are addressed by their '/'-joined path from the parameter root, e.g.
``'stage1_block0/conv1'``.

Transforms accept either a bare ``params`` tree or a full variables dict
``{'params': ..., 'batch_stats': ...}``; :func:`split_variables` and
:func:`merge_variables` handle both so callers need not care.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

from flax import nnx
import jax
import numpy as np

from lowrank_jax import forms

PyTree = Any
Rule = Union[str, tuple[str, bool]]
Select = Union[None, str, Sequence[Rule]]


def split_variables(tree) -> tuple[dict, Callable[[dict], Any]]:
  """Returns the ``params`` sub-tree and a function that puts a new one back.

  Args:
    tree: a Flax variables dict with a top-level ``'params'`` key, a bare
      params tree, or an ``nnx.Module``.

  Returns:
    ``(params, rebuild)`` where ``rebuild(new_params)`` returns a tree of the
    same kind as ``tree`` (other collections such as ``batch_stats`` kept);
    for an NNX module, a new module running the new params
    (:func:`lowrank_jax.nnx_surgery.rebuild`), the input left untouched.
  """
  if isinstance(tree, nnx.Module):
    from lowrank_jax import nnx_surgery  # pylint: disable=g-import-not-at-top
    params = nnx_surgery.params_of(tree)
    return params, lambda p: nnx_surgery.rebuild(tree, params, p)
  if not isinstance(tree, Mapping):
    raise TypeError(
        f'expected a Flax variables dict, a params tree or an nnx.Module, got '
        f'{type(tree).__name__}')
  tree = _unfreeze(tree)
  if 'params' in tree and isinstance(tree['params'], Mapping):
    rest = {k: v for k, v in tree.items() if k != 'params'}
    return tree['params'], lambda p: {**rest, 'params': p}
  return tree, lambda p: p


def _unfreeze(tree):
  if hasattr(tree, 'unfreeze'):
    return tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def layers(params: Mapping) -> dict[str, dict]:
  """All project layers of a params tree, in tree order.

  Args:
    params: a bare params tree (use :func:`split_variables` first).

  Returns:
    ``{path: {variable name: array}}`` for every dict node recognised as a
    registered form.
  """
  found = {}

  def walk(node, prefix):
    if not isinstance(node, Mapping):
      return
    if forms.identify(node.keys(), strict=False) is not None:
      found['/'.join(prefix)] = dict(node)
      return
    for key in node:
      walk(node[key], prefix + (str(key),))

  walk(params, ())
  return found


def kernel_shape(variables: Mapping) -> tuple[int, ...]:
  """Shape of the dense kernel a layer's variables stand for (any form)."""
  form = forms.of(variables)
  if hasattr(form, 'kernel_shape'):   # read from the variables' shapes
    return tuple(form.kernel_shape(variables))
  return tuple(jax.eval_shape(form.to_kernel, {
      k: v for k, v in variables.items() if k != 'bias'}).shape)


def kernel_kind(variables: Mapping) -> str:
  """``'kxk'``, ``'1x1'`` (2-D convs), ``'dense'`` (a matrix) or ``'other'``.

  ``'other'`` is a kernel the forms cannot split: a 1-D or 3-D conv's.
  """
  shape = kernel_shape(variables)
  if len(shape) == 2:
    return 'dense'
  if len(shape) == 4:
    return '1x1' if shape[0] * shape[1] == 1 else 'kxk'
  return 'other'


def find_layers(variables) -> dict[str, dict]:
  """Every conv / dense layer of a tree or module, by its path.

  Args:
    variables: a variables dict, a bare params tree or an ``nnx.Module``.

  Returns:
    ``{path: {variable name: array}}`` in tree order; the paths are relative
    to the params collection, so each works as a ``select`` rule.
  """
  params, _ = split_variables(variables)
  return layers(params)


def get_layer(params: Mapping, path: str) -> dict:
  """The variables of the layer at ``path``; KeyError names close paths."""
  all_layers = layers(params)
  if path not in all_layers:
    raise KeyError(f'no layer at path {path!r}; close paths: '
                   f'{_close(path, all_layers)}')
  return all_layers[path]


def replace_layers(params: Mapping, new: Mapping[str, Mapping]) -> dict:
  """A copy of ``params`` with the layers at the given paths replaced.

  The input tree is not modified; untouched sub-trees are shared.

  Args:
    params: bare params tree.
    new: ``{path: new variables dict}``.

  Returns:
    The new params tree.
  """
  params = _unfreeze(params)
  out = dict(params)
  for path, variables in new.items():
    if path == '':   # the tree is a single layer (e.g. one nn.Conv)
      out = {**{k: v for k, v in out.items()
                if forms.identify(out.keys(), strict=False) is None},
             **dict(variables)}
      continue
    keys = path.split('/')
    node = out
    for key in keys[:-1]:
      if key not in node:
        raise KeyError(f'no layer at path {path!r}')
      node[key] = dict(node[key])
      node = node[key]
    if keys[-1] not in node:
      raise KeyError(f'no layer at path {path!r}')
    node[keys[-1]] = dict(variables)
  return out


def normalize_rules(select: Select) -> list[tuple[str, bool]]:
  """Turns a ``select`` argument into a list of ``(regex, include)`` rules."""
  if select is None:
    return [('.*', True)]
  if isinstance(select, str):
    return [(select, True)]
  rules = []
  for rule in select:
    if isinstance(rule, str):
      rules.append((rule, True))
    elif (isinstance(rule, (tuple, list)) and len(rule) == 2 and
          isinstance(rule[0], str)):
      rules.append((rule[0], bool(rule[1])))
    else:
      raise TypeError(f'bad selection rule {rule!r}: expected a regex string '
                      'or a (regex, include) pair')
  return rules


def exact(path: str) -> str:
  """A selection rule that matches exactly ``path`` (regex-escaped)."""
  return re.escape(path)


def select_paths(paths: Iterable[str], select: Select) -> list[str]:
  """Paths chosen by regex rules, first match wins.

  Each rule is a regex (``re.fullmatch`` against the '/'-joined path) or a
  ``(regex, include)`` pair. A path matched by no rule is not selected. A rule
  that matches no path at all raises, naming the rule and the closest paths,
  so a typo never silently selects nothing (``select=None`` selects all).

  Args:
    paths: candidate layer paths.
    select: None (all), a regex, or a sequence of rules.

  Returns:
    The selected paths, in the order given.
  """
  paths = list(paths)
  rules = normalize_rules(select)
  used = [False] * len(rules)
  chosen = []
  for path in paths:
    for i, (pattern, include) in enumerate(rules):
      if re.fullmatch(pattern, path):
        used[i] = True
        if include:
          chosen.append(path)
        break
  if select is not None:
    for (pattern, _), was_used in zip(rules, used):
      if not was_used and not any(re.fullmatch(pattern, p) for p in paths):
        raise ValueError(
            f'selection rule {pattern!r} matches no layer; close paths: '
            f'{_close(pattern, paths)}')
  return chosen


def _close(name: str, paths: Iterable[str]) -> list[str]:
  paths = list(paths)
  close = difflib.get_close_matches(name, paths, n=5, cutoff=0.3)
  return close or paths[:8]


def check_finite(path: str, variables: Mapping) -> None:
  """Raises ValueError naming the layer and variable if any entry is NaN/Inf.

  Only concrete arrays are checked: under ``jax.jit`` (tracers) or
  ``jax.eval_shape`` (``ShapeDtypeStruct``) there are no values to read.
  """
  for name, value in variables.items():
    if isinstance(value, (jax.core.Tracer, jax.ShapeDtypeStruct)):
      continue
    arr = np.asarray(jax.device_get(value))
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.isfinite(arr).sum())
      raise ValueError(f'layer {path!r}: variable {name!r} has {bad} '
                       'non-finite (NaN or Inf) entries')
