"""Conv and Dense layers that read their form from the variables they hold.

At ``init`` each layer creates a dense ``kernel`` (and ``bias``). At ``apply``
it looks at its variables and runs the matching form of
:mod:`lowrank_jax.forms`, so a parameter tree rewritten by a pure transform
(``tucker2_split``, ``overparameterize``, ...) runs through the *same* model
object: ``model.apply(new_variables, x)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes

from lowrank_jax import forms
from lowrank_jax.forms import base

default_kernel_init = nn.initializers.lecun_normal()


class _FormLayer(nn.Module):
  """Shared apply logic: dispatch on the variables held."""

  def _run(self, x, spec: base.LayerSpec, kernel_shape, use_bias, features,
           kernel_init, bias_init, dtype, param_dtype):
    if self.is_initializing():
      variables = {'kernel': self.param('kernel', kernel_init, kernel_shape,
                                        param_dtype)}
      if use_bias:
        variables['bias'] = self.param('bias', bias_init, (features,),
                                       param_dtype)
    else:
      names = tuple(self.variables.get('params', {}).keys())
      variables = {n: self.get_variable('params', n) for n in names}
    form = forms.identify(variables.keys(), strict=False)
    if form is None:
      raise ValueError(
          f'layer {"/".join(self.scope.path)!r} holds variables '
          f'{sorted(variables)} that match no registered form')
    module = forms.get(form)
    if spec.groups != 1 and not module.SUPPORTS_GROUPS:
      raise ValueError(
          f'layer {"/".join(self.scope.path)!r} is a grouped conv '
          f'(feature_group_count={spec.groups}) and cannot run form {form!r}; '
          'exclude it from the selection')
    names = sorted(variables)
    x, *values = dtypes.promote_dtype(x, *(variables[n] for n in names),
                                      dtype=dtype)
    variables = dict(zip(names, values))
    if getattr(module, 'SHARED', False):
      # Variables shared by several layers sit at the top of the tree this
      # model is applied with; reading them from the root scope makes every
      # member's gradient land on the one shared copy.
      root = self.scope.root
      groups = (root.get_variable('params', module.ROOT)
                if root.has_variable('params', module.ROOT) else {})
      variables[module.GROUP_KEY] = module.find_group(
          groups, variables, '/'.join(self.scope.path))
    y = module.forward(variables, x, spec)
    if 'bias' in variables:
      y = y + variables['bias']
    return y


class Conv(_FormLayer):
  """2-D convolution over NHWC inputs with an HWIO kernel, of any form.

  Attributes:
    features: output channels C_out.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((lo, hi), (lo, hi)).
    kernel_dilation: (dh, dw).
    feature_group_count: groups (only the dense form runs grouped convs).
    use_bias: whether to add a bias.
    dtype: computation dtype (None: from inputs and params).
    param_dtype: parameter dtype at init.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  kernel_dilation: Sequence[int] = (1, 1)
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    """Applies the conv: x (N, H, W, C_in) -> (N, H', W', C_out)."""
    spec = base.LayerSpec('conv', tuple(self.strides), self.padding,
                          tuple(self.kernel_dilation),
                          self.feature_group_count)
    shape = (*self.kernel_size, x.shape[-1] // self.feature_group_count,
             self.features)
    return self._run(x, spec, shape, self.use_bias, self.features,
                     self.kernel_init, self.bias_init, self.dtype,
                     self.param_dtype)


class Dense(_FormLayer):
  """Fully connected layer over the last axis, of any form.

  Attributes:
    features: output size C_out.
    use_bias: whether to add a bias.
    dtype: computation dtype (None: from inputs and params).
    param_dtype: parameter dtype at init.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    """Applies the layer: x (..., C_in) -> (..., C_out)."""
    return self._run(x, base.DENSE, (x.shape[-1], self.features),
                     self.use_bias, self.features, self.kernel_init,
                     self.bias_init, self.dtype, self.param_dtype)
