"""The compressed network as a deployable artifact: ``jax.export``.

:func:`export` traces the inference function of a linen model (through
:func:`lowrank_jax.apply`, so the tree may hold any forms) or of an NNX
module, with the weights embedded as constants and the batch size symbolic,
and returns a ``jax.export.Exported``. Its ``serialize()`` bytes run in a
process that has only JAX (``jax.export.deserialize(data).call(x)``), not
this package.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import numpy as np

from lowrank_jax import runner
from lowrank_jax import tree
from lowrank_jax.forms import base


def export(model, *args, platforms=None, **apply_kwargs) -> Any:
  """Exports the inference function with its weights, batch size symbolic.

  Args:
    model: a linen model, then ``variables, example_input``; or an NNX
      module, then ``example_input`` (the module is cloned and set to
      ``eval()``; the input module is left as it is).
    *args: as above. ``example_input`` is an array or ``ShapeDtypeStruct``
      whose first axis is the batch.
    platforms: lowering platforms (default: the current backend), e.g.
      ``('cpu', 'cuda')``.
    **apply_kwargs: passed to the model's call (e.g. ``train=False``).

  Returns:
    A ``jax.export.Exported`` of ``x -> logits`` for inputs of shape
    ``(batch, *example_input.shape[1:])``.

  Raises:
    ValueError: a layer cannot run (e.g. a shared-ADTN member whose group is
      missing from the tree), naming the layer.
  """
  if isinstance(model, nnx.Module):
    (example,) = args
    module = nnx.clone(model)
    module.eval()
    graphdef, state = nnx.split(module)

    def fn(x):
      return nnx.merge(graphdef, state)(x, **apply_kwargs)
  else:
    variables, example = args
    params, rebuild = tree.split_variables(variables)
    variables = rebuild(jax.tree_util.tree_map(np.asarray, params))

    def fn(x):
      return runner.apply(model, variables, x, **apply_kwargs)
  (batch,) = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, *example.shape[1:]), example.dtype)
  # Factored layers choose their evaluation order from shapes: for the
  # symbolic batch, as for the example's.
  token = base.SYMBOLIC_DIM.set(int(example.shape[0]))
  try:
    return jax.export.export(jax.jit(fn), platforms=platforms)(spec)
  finally:
    base.SYMBOLIC_DIM.reset(token)
