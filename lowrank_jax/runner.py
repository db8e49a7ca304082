"""Running any Flax model with its conv and dense layers in any form.

A user's layers are plain ``nn.Conv`` / ``nn.Dense`` (linen) or
``nnx.Conv`` / ``nnx.Linear`` (NNX). A transform rewrites a layer's
variables into another form (``u_in, core, u_out`` for Tucker-2, ...); this
module runs such a layer with the form's forward (:mod:`lowrank_jax.forms`)
and the layer's *own* attributes: kernel size, strides, every padding mode
(``CIRCULAR``, ``REFLECT`` and ``CAUSAL`` pad the input as Flax does),
dilation, groups, batch dimensions, ``dtype`` / ``promote_dtype`` and
``precision``.

* linen: :func:`apply` is ``model.apply`` inside ``nn.intercept_methods``;
  the interceptor runs every conv / dense layer whose variables are not a
  plain dense kernel in its form, and leaves everything else to Flax.
* NNX: :mod:`lowrank_jax.nnx_surgery` swaps the layer for a
  :class:`~lowrank_jax.nnx_surgery.FormLayer` that calls :func:`run_layer`.

The same interception records each layer's call (:func:`record_calls`),
which is how counting and timing see every layer of any model.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
from flax import nnx
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp

from lowrank_jax import forms
from lowrank_jax.forms import base

# Layer types whose variables the forms understand (HWIO / (C_in, C_out)).
CONV_TYPES = (nn.Conv, nnx.Conv)
DENSE_TYPES = (nn.Dense, nnx.Linear)
# Layer types with a kernel that no form can run: selecting them is an error.
UNSUPPORTED_TYPES = (nn.ConvTranspose, nn.ConvLocal, nn.DenseGeneral,
                     nn.Einsum, nnx.ConvTranspose, nnx.LinearGeneral,
                     nnx.Einsum)


class LayerCall(NamedTuple):
  """One conv / dense layer's call as its form sees it."""
  spec: base.LayerSpec
  in_shape: tuple[int, ...]   # after batch flattening and input padding
  out_shape: tuple[int, ...]


def layer_kind(module) -> str | None:
  """``'conv'``, ``'dense'`` or None for a linen or NNX module."""
  if isinstance(module, nnx.Module):
    kind = getattr(module, 'form_kind', None)   # nnx_surgery.FormLayer
    if kind is not None:
      return kind
  if isinstance(module, nn.ConvLocal):
    return None
  if isinstance(module, CONV_TYPES):
    return 'conv'
  if isinstance(module, DENSE_TYPES):
    return 'dense'
  return None


class _Prepared(NamedTuple):
  x: jax.Array                 # the input the form's forward sees
  spec: base.LayerSpec
  batch_shape: tuple | None    # original batch dims to restore (None: keep)


def _broadcast(value, n: int) -> tuple[int, ...]:
  value = 1 if value is None else value
  return (int(value),) * n if isinstance(value, int) else tuple(value)


def _prepare_conv(module, x, form: str, path: str) -> _Prepared:
  """Flattens batch dims and pads the input exactly as Flax's conv does."""
  kernel_size = _broadcast(module.kernel_size, 1)
  n = len(kernel_size)
  if form != 'dense':
    if n != 2:
      raise ValueError(
          f'layer {path!r} is a {n}-D conv; form {form!r} runs 2-D convs '
          'only (exclude the layer from the selection)')
    if getattr(module, 'mask', None) is not None:
      raise ValueError(
          f'layer {path!r} is a conv with a mask, which form {form!r} cannot '
          'apply; exclude the layer from the selection')
    if _broadcast(module.input_dilation, n) != (1,) * n:
      raise ValueError(
          f'layer {path!r} has input_dilation={module.input_dilation}, which '
          f'form {form!r} does not run; exclude the layer from the selection')
  batch_dims = x.ndim - (n + 1)
  batch_shape = None
  if batch_dims != 1:
    batch_shape = x.shape[:batch_dims]
    x = jnp.reshape(x, (-1,) + x.shape[batch_dims:])
  dilation = _broadcast(module.kernel_dilation, n)
  padding = canonicalize_padding(module.padding, n)
  if padding in ('CIRCULAR', 'REFLECT'):
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pads = [(0, 0)] + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)]
    x = jnp.pad(x, pads, mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[
        padding])
    padding = 'VALID'
  elif padding == 'CAUSAL':
    if n != 1:
      raise ValueError(f'layer {path!r}: CAUSAL padding is only for 1-D '
                       'convs (as in Flax)')
    x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = 'VALID'
  elif isinstance(padding, str) and padding not in ('SAME', 'VALID'):
    window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    padding = jax.lax.padtype_to_pads(
        x.shape[1:-1], window, _broadcast(module.strides, n), padding)
  if not isinstance(padding, str):
    padding = tuple(tuple(int(q) for q in p) for p in padding)
  spec = base.LayerSpec('conv', _broadcast(module.strides, n), padding,
                        dilation, module.feature_group_count)
  return _Prepared(x, spec, batch_shape)


def _prepare(module, x, form: str, path: str) -> _Prepared:
  if layer_kind(module) == 'conv':
    return _prepare_conv(module, x, form, path)
  return _Prepared(x, base.DENSE, None)


def _promote(module, arrays, dtype):
  if isinstance(module, nnx.Module):
    return list(module.promote_dtype(tuple(arrays), dtype=dtype))
  return list(module.promote_dtype(*arrays, dtype=dtype))


def _precision_scope(precision):
  """``precision`` of the layer as JAX's default for the ops it traces."""
  if precision is None:
    return contextlib.nullcontext()
  if isinstance(precision, (tuple, list)):
    precision = max(precision, key=lambda p: jax.lax.Precision(p).value)
  if isinstance(precision, jax.lax.Precision):
    precision = precision.name.lower()
  return jax.default_matmul_precision(str(precision).lower())


def run_layer(module, variables: Mapping[str, jax.Array], x, *, path: str,
              shared_groups: Mapping | None = None) -> jax.Array:
  """One conv / dense layer's output, computed in the form of ``variables``.

  Args:
    module: the layer (``nn.Conv``, ``nn.Dense``, ``nnx.Conv``, ``nnx.Linear``
      or a :class:`~lowrank_jax.nnx_surgery.FormLayer`): its attributes give
      strides, padding, dilation, groups, dtype and precision.
    variables: the layer's variables in any registered form (+ ``bias``).
    x: the layer's input, as the layer itself takes it.
    path: the layer's '/'-joined path, for errors.
    shared_groups: ``params[forms.adtn_shared.ROOT]`` of the whole model,
      for layers in the shared-ADTN form.

  Returns:
    The layer's output, shaped as the layer itself returns it.
  """
  form = forms.identify(variables.keys(), strict=False)
  if form is None:
    raise ValueError(f'layer {path!r} holds variables {sorted(variables)} '
                     'that match no registered form')
  module_form = forms.get(form)
  prepared = _prepare(module, x, form, path)
  spec = prepared.spec
  if spec.groups != 1 and not module_form.SUPPORTS_GROUPS:
    raise ValueError(
        f'layer {path!r} is a grouped conv (feature_group_count='
        f'{spec.groups}) and cannot run form {form!r}; exclude it from the '
        'selection')
  names = sorted(variables)
  x, *values = _promote(module, [prepared.x, *(variables[k] for k in names)],
                        module.dtype)
  v = dict(zip(names, values))
  if getattr(module_form, 'SHARED', False):
    v[module_form.GROUP_KEY] = module_form.find_group(shared_groups or {}, v,
                                                      path)
  with _precision_scope(getattr(module, 'precision', None)):
    y = module_form.forward(v, x, spec)
  if 'bias' in v:
    y = y + v['bias']
  _record(path, LayerCall(spec, tuple(x.shape), tuple(y.shape)))
  if prepared.batch_shape is not None:
    y = jnp.reshape(y, prepared.batch_shape + y.shape[1:])
  return y


# ------------------------------------------------------------ recording ---

_RECORDER: contextvars.ContextVar = contextvars.ContextVar(
    'lowrank_jax_layer_calls', default=None)


@contextlib.contextmanager
def record_calls():
  """Collects ``{path: LayerCall}`` of every layer run inside the block.

  Works for linen models run through :func:`apply` and for NNX modules whose
  layers are :class:`~lowrank_jax.nnx_surgery.FormLayer` s.
  """
  calls: dict[str, LayerCall] = {}
  token = _RECORDER.set(calls)
  try:
    yield calls
  finally:
    _RECORDER.reset(token)


def recording() -> bool:
  """Whether a :func:`record_calls` block is active."""
  return _RECORDER.get() is not None


def _record(path: str, call: LayerCall) -> None:
  calls = _RECORDER.get()
  if calls is not None:
    calls[path] = call


# ---------------------------------------------------------------- linen ---


def _linen_params(module) -> dict:
  scope = module.scope
  names = tuple(scope.variables().get('params', {}).keys())
  return {n: scope.get_variable('params', n) for n in names}


def _shared_groups(module) -> Mapping:
  root = module.scope.root
  key = forms.adtn_shared.ROOT
  return root.get_variable('params', key) if root.has_variable(
      'params', key) else {}


def _dense_via_flax(module, variables, x) -> bool:
  """Whether Flax's own layer should run these variables as they are.

  A plain kernel runs through Flax's code, bit for bit, except a plain 2-D
  conv whose window exceeds its input: XLA:CPU runs that ~100x slower than
  the equivalent matmul (:func:`lowrank_jax.forms.base.conv`).
  """
  if set(variables) - {'kernel', 'bias'}:
    return False
  if layer_kind(module) != 'conv':
    return True
  kernel = variables['kernel']
  plain = (kernel.ndim == 4 and x.ndim == 4 and
           module.feature_group_count == 1 and
           getattr(module, 'mask', None) is None and
           _broadcast(module.input_dilation, 2) == (1, 1) and
           module.padding in ('SAME', 'VALID'))
  if not plain:
    return True
  spec = base.LayerSpec('conv', _broadcast(module.strides, 2), module.padding,
                        _broadcast(module.kernel_dilation, 2), 1)
  return not base.window_exceeds_input(x.shape, kernel.shape, spec)


def _run_via_flax(next_fun, args, kwargs, module, x, path):
  y = next_fun(*args, **kwargs)
  if _RECORDER.get() is not None:
    prepared = _prepare(module, x, 'dense', path)
    batch_dims = x.ndim - prepared.x.ndim + 1
    _record(path, LayerCall(
        prepared.spec, tuple(prepared.x.shape),
        (prepared.x.shape[0],) + tuple(y.shape[batch_dims:])))
  return y


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != '__call__' or module.scope is None:
    return next_fun(*args, **kwargs)
  kind = layer_kind(module)
  if kind is None:
    if isinstance(module, UNSUPPORTED_TYPES) and not module.is_initializing():
      variables = _linen_params(module)
      form = forms.identify(variables.keys(), strict=False)
      if form not in (None, 'dense'):
        raise ValueError(
            f'layer {"/".join(module.scope.path)!r} is a '
            f'{type(module).__name__}, which lowrank_jax cannot run in form '
            f'{form!r}: only nn.Conv / nn.Dense (nnx.Conv / nnx.Linear) '
            'layers can be split')
    return next_fun(*args, **kwargs)
  if module.is_initializing():
    return next_fun(*args, **kwargs)
  variables = _linen_params(module)
  x = args[0] if args else kwargs['inputs']
  path = '/'.join(module.scope.path)
  if _dense_via_flax(module, variables, x):
    return _run_via_flax(next_fun, args, kwargs, module, x, path)
  return run_layer(module, variables, x, path=path,
                   shared_groups=_shared_groups(module))


@contextlib.contextmanager
def intercept():
  """Inside this block, linen conv / dense layers run in any form."""
  with nn.intercept_methods(_interceptor):
    yield


def apply(model: nn.Module, variables, *args, **kwargs) -> Any:
  """``model.apply`` for a model whose layers may hold any form.

  Same signature and result as ``model.apply`` (``mutable=``, ``rngs=``,
  ``method=`` pass through); works under ``jax.jit`` and ``jax.grad``. Every
  ``nn.Conv`` / ``nn.Dense`` of the model runs in the form its variables are
  in (Tucker-2, SVD, CP, ...), with the layer's own strides, padding,
  dilation, dtype and precision; dense layers run through Flax's own code.

  Args:
    model: any ``flax.linen`` module.
    variables: its variables (a dict with ``'params'``), any layers split.
    *args: inputs, as for ``model.apply``.
    **kwargs: keyword arguments, as for ``model.apply``.

  Returns:
    What ``model.apply`` returns.
  """
  if isinstance(model, nnx.Module):
    raise TypeError('lj.apply takes a linen model; an NNX module returned by '
                    'a transform runs as it is: module(x)')
  if not isinstance(variables, Mapping) or 'params' not in variables:
    variables = {'params': variables}
  with intercept():
    return model.apply(variables, *args, **kwargs)


class bind_apply:  # pylint: disable=invalid-name
  """``lambda variables, *a, **k: apply(model, variables, *a, **k)``.

  Usable as a ``TrainState.apply_fn``: equal for equal models, so a jitted
  step whose state holds it does not retrace when the state is rebuilt.
  """

  def __init__(self, model: nn.Module):
    self.model = model

  def __call__(self, variables, *args, **kwargs):
    return apply(self.model, variables, *args, **kwargs)

  def __eq__(self, other):
    return isinstance(other, bind_apply) and other.model == self.model

  def __hash__(self):
    return hash(self.model)
