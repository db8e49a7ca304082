"""NNX modules as parameter trees, and new modules built from new trees.

Every transform of :mod:`lowrank_jax` is a pure function of a params tree.
For an ``nnx.Module`` the tree is ``nnx.state(module, nnx.Param)`` as a pure
dict, with '/'-joined attribute paths (``'blocks/0/conv1'``); the result is
a **new** module (:func:`rebuild`): a clone of the input in which each layer
whose variables changed form is replaced by a :class:`FormLayer` holding the
new variables as ``nnx.Param`` s and the original layer's attributes. The
input module is left as it was.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from flax import nnx
import jax

from lowrank_jax import runner
from lowrank_jax import forms

# The attributes of nnx.Conv / nnx.Linear that decide how a layer computes.
_CONV_ATTRS = ('kernel_size', 'strides', 'padding', 'input_dilation',
               'kernel_dilation', 'feature_group_count')
_COMMON_ATTRS = ('in_features', 'out_features', 'use_bias', 'dtype',
                 'param_dtype', 'precision', 'promote_dtype')


class FormLayer(nnx.Module):
  """An NNX conv or dense layer whose variables are in any registered form.

  Built by the transforms from an ``nnx.Conv`` / ``nnx.Linear`` (or another
  FormLayer); keeps that layer's attributes, so it computes as the original
  would with its kernel given by the form's variables.

  Attributes:
    form_kind: ``'conv'`` or ``'dense'``.
    form_keys: names of the variables (each an ``nnx.Param`` attribute).
    path: the layer's '/'-joined path in the module it was built for.
  """

  def __init__(self, layer: nnx.Module, variables: Mapping[str, Any], *,
               path: str):
    self.form_kind = runner.layer_kind(layer)
    names = _CONV_ATTRS + _COMMON_ATTRS if self.form_kind == 'conv' else \
        _COMMON_ATTRS
    for name in names:
      setattr(self, name, getattr(layer, name, None))
    self.mask = None
    self.path = path
    self.form_keys = tuple(sorted(variables))
    for name in self.form_keys:
      setattr(self, name, nnx.Param(variables[name]))

  @property
  def form(self) -> str:
    """The registered form of the variables held."""
    return forms.identify(self.form_keys)

  def __call__(self, x):
    """The layer's output, as the original layer returns it."""
    v = {k: getattr(self, k)[...] for k in self.form_keys}
    return runner.run_layer(self, v, x, path=self.path)


def _children(node) -> Iterator[tuple[Any, Any]]:
  if isinstance(node, (nnx.List, list, tuple)):
    yield from enumerate(node)
  elif isinstance(node, (nnx.Dict, dict)):
    yield from node.items()
  elif isinstance(node, nnx.Module):
    for key, value in vars(node).items():
      if not str(key).startswith('_'):
        yield key, value


def _is_layer(node) -> bool:
  return (runner.layer_kind(node) is not None or
          isinstance(node, runner.UNSUPPORTED_TYPES))


def find_layers(module: nnx.Module):
  """Every conv / dense (or unsupported kernel) layer of a module.

  Returns:
    ``(layers, ties)``: ``{path: (parent, key, layer)}`` for the first path
    of each layer, and ``{path: [other paths]}`` for layers reachable by more
    than one path (shared or tied layers).
  """
  layers, seen, ties = {}, {}, {}

  def walk(node, prefix):
    for key, child in _children(node):
      path = prefix + (str(key),)
      if _is_layer(child):
        joined = '/'.join(path)
        if id(child) in seen:
          ties.setdefault(seen[id(child)], []).append(joined)
        else:
          seen[id(child)] = joined
          layers[joined] = (node, key, child)
      elif isinstance(child, (nnx.Module, list, tuple, dict)):
        walk(child, path)

  walk(module, ())
  return layers, ties


def _str_keys(tree):
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def params_of(module: nnx.Module) -> dict:
  """``nnx.state(module, nnx.Param)`` as a pure dict with string keys."""
  return _str_keys(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _set_child(parent, key, value) -> None:
  if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _same(a: Mapping, b: Mapping) -> bool:
  return set(a) == set(b) and all(a[k] is b[k] for k in a)


def _check_replaceable(path: str, layer, ties) -> None:
  if path in ties:
    raise ValueError(
        f'layer {path!r} of the NNX module is shared or tied (also reached '
        f'as {ties[path]}); a transform cannot give it a new form at one path '
        'only: exclude it from the selection or untie it')
  if runner.layer_kind(layer) is None:
    raise ValueError(
        f'layer {path!r} is a {type(layer).__name__}, which lowrank_jax '
        'cannot run in another form: only nnx.Conv / nnx.Linear (nn.Conv / '
        'nn.Dense in linen) layers can be split; exclude it from the '
        'selection')
  if getattr(layer, 'mask', None) is not None:
    raise ValueError(f'layer {path!r} is a conv with a mask, which no '
                     'factored form applies; exclude it from the selection')


def rebuild(module: nnx.Module, old: Mapping, new: Mapping) -> nnx.Module:
  """A new module running ``new`` params where they differ from ``old``.

  Args:
    module: the module ``old`` was read from (not modified).
    old: :func:`params_of` the module.
    new: a transformed copy of ``old`` (same layer paths).

  Returns:
    A clone of ``module``; each layer whose variables changed is a
    :class:`FormLayer` with them (a plain layer keeping a dense kernel of the
    same shape just takes the new values).
  """
  from lowrank_jax import tree  # pylint: disable=g-import-not-at-top
  extra = set(new) - set(old)
  if extra:
    raise ValueError(
        f'the transformed tree adds top-level variables {sorted(extra)}, '
        'which an NNX module cannot hold (a shared ADTN group?): use '
        'share=False for NNX modules')
  old_layers, new_layers = tree.layers(old), tree.layers(new)
  changed = {p: v for p, v in new_layers.items()
             if not _same(v, old_layers.get(p, {}))}
  if not changed:
    return nnx.clone(module)
  clone = nnx.clone(module)
  layers, ties = find_layers(clone)
  for path, variables in changed.items():
    if path not in layers:
      raise KeyError(f'no layer at path {path!r} in the NNX module')
    parent, key, layer = layers[path]
    _check_replaceable(path, layer, ties)
    if (not isinstance(layer, FormLayer) and set(variables) - {'bias'} ==
        {'kernel'} and layer.kernel.shape == variables['kernel'].shape):
      layer.kernel = nnx.Param(variables['kernel'])
      if 'bias' in variables:
        layer.bias = nnx.Param(variables['bias'])
      continue
    _set_child(parent, key, FormLayer(layer, variables, path=path))
  return clone


def with_form_layers(module: nnx.Module) -> nnx.Module:
  """A clone whose every conv / dense layer is a :class:`FormLayer`.

  The clone computes the same function; its layers report their calls to
  :func:`lowrank_jax.runner.record_calls` (counting, timing).
  """
  clone = nnx.clone(module)
  layers, _ = find_layers(clone)
  for path, (parent, key, layer) in layers.items():
    if runner.layer_kind(layer) is None:
      continue
    if isinstance(layer, FormLayer):
      layer.path = path
      continue
    variables = {k: getattr(layer, k)[...] for k in ('kernel', 'bias')
                 if getattr(layer, k, None) is not None}
    _set_child(parent, key, FormLayer(layer, variables, path=path))
  return clone


def trace_calls(module: nnx.Module, *args, **kwargs) -> dict:
  """``{path: LayerCall}`` of one call of the module (shapes only).

  Args:
    module: any NNX module.
    *args: its inputs; arrays or ``jax.ShapeDtypeStruct`` s.
    **kwargs: further arguments of its ``__call__``.
  """
  graphdef, state = nnx.split(with_form_layers(module))

  def run(state, *args):
    return nnx.merge(graphdef, state)(*args, **kwargs)

  with runner.record_calls() as calls:
    jax.eval_shape(run, state, *args)
  return dict(calls)


def _assign(module: nnx.Module, kind, tree: Mapping) -> None:
  """Sets every ``kind`` variable of ``module`` from a pure dict by path."""
  for path, node in nnx.iter_graph(module):
    if isinstance(node, kind):
      value = tree
      for key in path:
        value = value[str(key)]
      node.set_value(value)


class NNXModel:
  """An NNX module seen through linen's ``init`` / ``apply``.

  The training tool trains variables dicts (``{'params', 'batch_stats'}``)
  with ``lj.apply(model, variables, x, train=..., rngs=..., mutable=...)``;
  this adapter lets it train a user's NNX module: ``apply`` builds a module
  from the template with each layer in the form of the given params
  (:func:`rebuild`), sets the params and batch statistics, switches
  ``train()`` / ``eval()``, reseeds its RNG streams from ``rngs['dropout']``
  and calls it. Layer paths are the module's attribute paths.

  Attributes:
    template: the module the factory returned (never modified).
  """

  def __init__(self, template: nnx.Module):
    self.template = template
    self._params = params_of(template)

  def __repr__(self):
    return f'NNXModel({type(self.template).__name__})'

  def init(self, rngs, *args, **kwargs) -> dict:
    """The template's variables (its own initialization; ``rngs`` unused)."""
    del rngs, args, kwargs
    variables = {'params': self._params}
    stats = _str_keys(nnx.to_pure_dict(nnx.state(self.template,
                                                 nnx.BatchStat)))
    if stats:
      variables['batch_stats'] = stats
    return variables

  def module(self, variables: Mapping) -> nnx.Module:
    """A new module holding ``variables`` (any forms)."""
    module = rebuild(self.template, self._params, variables['params'])
    _assign(module, nnx.Param, variables['params'])
    if variables.get('batch_stats'):
      _assign(module, nnx.BatchStat, variables['batch_stats'])
    return module

  def apply(self, variables: Mapping, *args, train: bool = False,
            rngs: Mapping | None = None, mutable=False, **kwargs):
    """As linen's ``apply``: the output, and with ``mutable`` the updates."""
    module = self.module(variables)
    if runner.recording():   # counting: every layer reports its call
      module = with_form_layers(module)
    module.train() if train else module.eval()  # pylint: disable=expression-not-assigned
    if rngs and 'dropout' in rngs:
      tags = sorted({n.tag for _, n in nnx.iter_graph(module)
                     if isinstance(n, nnx.RngStream)})
      if tags:
        nnx.reseed(module, **{t: jax.random.fold_in(rngs['dropout'], i)
                              for i, t in enumerate(tags)})
    out = module(*args, **kwargs)
    if not mutable:
      return out
    stats = _str_keys(nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)))
    return out, ({'batch_stats': stats} if stats else {})
