"""Parameter and FLOP (multiply-add) counts, per layer and in total."""

from __future__ import annotations

from typing import Mapping, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import runner
from lowrank_jax import forms
from lowrank_jax import nnx_surgery
from lowrank_jax import tree
from lowrank_jax.forms import base


def count_params(variables, *, report: bool = False):
  """Number of parameters (the ``params`` collection only).

  Args:
    variables: variables dict, bare params tree or ``nnx.Module``.
    report: also return ``{layer path: count}`` of the conv / dense layers.

  Returns:
    An int; with ``report``, ``(total, per_layer)``.
  """
  params, _ = tree.split_variables(variables)
  total = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  if not report:
    return total
  return total, {p: int(sum(np.size(x) for x in v.values()))
                 for p, v in tree.layers(params).items()}


class LayerFlops(NamedTuple):
  """One layer's call: form, activation shapes and multiply-adds."""
  form: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  macs: int


class FlopsReport(NamedTuple):
  """Multiply-adds of every conv and dense layer, and their total."""
  total: int
  per_layer: dict[str, LayerFlops]


LayerCall = runner.LayerCall


class CalledLayer(NamedTuple):
  """A layer's variables and its call: what is needed to run it alone."""
  variables: dict             # the layer's variables, in its current form
  spec: base.LayerSpec
  in_shape: tuple[int, ...]   # as :class:`LayerCall`
  out_shape: tuple[int, ...]


def _model_args(model, args):
  """``(variables, input_shape)`` from a count or timing call's arguments.

  Linen: ``(model, variables, input_shape)``; NNX: ``(module, input_shape)``.
  """
  if isinstance(model, nnx.Module):
    if len(args) != 1:
      raise TypeError('for an NNX module pass (module, input_shape): the '
                      'module holds its own variables')
    return None, tuple(args[0])
  if len(args) != 2:
    raise TypeError('for a linen model pass (model, variables, input_shape)')
  return args[0], tuple(args[1])


def layer_calls(model, *args, dtype=jnp.float32,
                **apply_kwargs) -> dict[str, LayerCall]:
  """The spec and activation shapes of every conv and dense layer's call.

  Traced with ``jax.eval_shape`` (nothing is computed). Every ``nn.Conv`` /
  ``nn.Dense`` / ``nnx.Conv`` / ``nnx.Linear`` is seen, in whatever form its
  variables are. ``variables`` may hold arrays or ``jax.ShapeDtypeStruct``
  leaves.

  Args:
    model: a linen model, then ``variables, input_shape``; or an NNX
      module, then ``input_shape``.
    *args: as above.
    dtype: input dtype.
    **apply_kwargs: passed to the call (e.g. ``train=False``).

  Returns:
    ``{layer path: LayerCall}`` in call order.

  Raises:
    ValueError: the model has no conv or dense layer that can be counted.
  """
  variables, input_shape = _model_args(model, args)
  x = jax.ShapeDtypeStruct(input_shape, dtype)
  if isinstance(model, nnx.Module):
    calls = nnx_surgery.trace_calls(model, x, **apply_kwargs)
  else:
    if not isinstance(variables, Mapping) or 'params' not in variables:
      variables = {'params': variables}

    def run(variables, x):
      return runner.apply(model, variables, x, **apply_kwargs)

    with runner.record_calls() as calls:
      jax.eval_shape(run, variables, x)
    calls = dict(calls)
  if not calls:
    raise ValueError(
        f'{type(model).__name__} has no nn.Conv / nn.Dense (nnx.Conv / '
        'nnx.Linear) layer that was called: nothing to count')
  return calls


def called_layers(model, *args, dtype=jnp.float32,
                  **apply_kwargs) -> dict[str, CalledLayer]:
  """:func:`layer_calls` with each layer's variables beside its call.

  Same arguments as :func:`layer_calls`; the variables are those of the tree
  (or module) passed in, so they may be arrays or shape stand-ins.

  Returns:
    ``{layer path: CalledLayer}`` in call order.
  """
  variables = model if isinstance(model, nnx.Module) else args[0]
  params, _ = tree.split_variables(variables)
  all_layers = tree.layers(params)
  return {p: CalledLayer(all_layers[p], *c)
          for p, c in layer_calls(model, *args, dtype=dtype,
                                  **apply_kwargs).items()
          if p in all_layers}


def count_flops(model, *args, dtype=jnp.float32,
                **apply_kwargs) -> FlopsReport:
  """Multiply-adds of the conv and dense layers for one forward pass.

  Shapes are traced with :func:`called_layers` (nothing is computed); each
  layer's count comes from its form (``forms.<form>.flops``), so a split
  tree is counted as it runs. Batch norm, activations and pooling are not
  counted.

  Args:
    model: a linen model, then ``variables, input_shape``
      (``count_flops(model, variables, (1, 32, 32, 3))``); or an NNX module,
      then ``input_shape`` (``count_flops(module, (1, 32, 32, 3))``).
    *args: as above; variables may be a variables dict or a params tree.
    dtype: input dtype.
    **apply_kwargs: passed to the model's call (e.g. ``train=False``).

  Returns:
    A :class:`FlopsReport` (the batch size multiplies counts).
  """
  records = {}
  for path, call in called_layers(model, *args, dtype=dtype,
                                  **apply_kwargs).items():
    form = forms.identify(call.variables)
    macs = forms.get(form).flops(call.variables, call.spec, call.in_shape,
                                 call.out_shape)
    records[path] = LayerFlops(form, call.in_shape, call.out_shape, int(macs))
  return FlopsReport(sum(r.macs for r in records.values()), records)


