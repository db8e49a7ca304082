"""Parameter and FLOP (multiply-add) counts, per layer and in total."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import forms
from lowrank_jax import tree
from lowrank_jax.layers import _FormLayer


def count_params(params, *, per_layer: bool = False):
  """Number of parameters (the ``params`` collection only).

  Args:
    params: variables dict or bare params tree.
    per_layer: return ``{layer path: count}`` (project layers only) instead.

  Returns:
    An int, or a dict of ints.
  """
  params, _ = tree.split_variables(params)
  if per_layer:
    return {p: int(sum(np.size(x) for x in v.values()))
            for p, v in tree.layers(params).items()}
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


class LayerFlops(NamedTuple):
  """One layer's call: form, activation shapes and multiply-adds."""
  form: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  macs: int


class FlopsReport(NamedTuple):
  """Multiply-adds of every project conv and dense layer, and their total."""
  total: int
  per_layer: dict[str, LayerFlops]


class LayerCall(NamedTuple):
  """One project layer's call: its spec and activation shapes."""
  spec: forms.LayerSpec
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]


def layer_calls(model: nn.Module, variables, input_shape: Sequence[int], *,
                dtype=jnp.float32) -> dict[str, LayerCall]:
  """The spec and activation shapes of every project layer's call.

  Traced with ``jax.eval_shape`` (nothing is computed); ``variables`` may hold
  arrays or ``jax.ShapeDtypeStruct`` leaves.

  Args:
    model: the Flax model.
    variables: its variables (any forms).
    input_shape: e.g. ``(1, 32, 32, 3)``.
    dtype: input dtype.

  Returns:
    ``{layer path: LayerCall}`` in call order.
  """
  calls = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, _FormLayer) and context.method_name == '__call__':
      calls['/'.join(module.scope.path)] = LayerCall(
          _spec(module), tuple(args[0].shape), tuple(out.shape))
    return out

  def run(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False)

  # Variables go in as arguments, so arrays and ShapeDtypeStructs both work.
  jax.eval_shape(run, variables, jax.ShapeDtypeStruct(tuple(input_shape),
                                                      dtype))
  return calls


def count_flops(model: nn.Module, variables, input_shape: Sequence[int], *,
                dtype=jnp.float32) -> FlopsReport:
  """Multiply-adds of the conv and dense layers for one forward pass.

  Shapes are traced with :func:`layer_calls` (nothing is computed); each
  layer's count comes from its form (``forms.<form>.flops``), so a split
  tree is counted as it runs. Batch norm, activations and pooling are not
  counted.

  Args:
    model: the Flax model.
    variables: its variables (any forms).
    input_shape: e.g. ``(1, 32, 32, 3)`` (the batch size multiplies counts).
    dtype: input dtype.

  Returns:
    A :class:`FlopsReport`.
  """
  params, _ = tree.split_variables(variables)
  all_layers = tree.layers(params)
  records = {}
  for path, call in layer_calls(model, variables, input_shape,
                                dtype=dtype).items():
    v = {k: x for k, x in all_layers[path].items()}
    form = forms.identify(v)
    macs = forms.get(form).flops(v, call.spec, call.in_shape, call.out_shape)
    records[path] = LayerFlops(form, call.in_shape, call.out_shape, int(macs))
  return FlopsReport(sum(r.macs for r in records.values()), records)


def _spec(module) -> forms.LayerSpec:
  if hasattr(module, 'kernel_size'):
    return forms.LayerSpec('conv', tuple(module.strides), module.padding,
                           tuple(module.kernel_dilation),
                           module.feature_group_count)
  return forms.base.DENSE
