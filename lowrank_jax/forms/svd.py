"""The SVD form: a truncated SVD with sqrt(S) split between two factors.

For dense layers and 1x1 convs (and, less usefully, k x k convs through the
C_out x (kh*kw*C_in) unfolding).

Variables:
  u: (C_in, R) for dense layers, (kh, kw, C_in, R) for convs; carries the
    layer's strides, padding and dilation.
  v: (R, C_out).
  bias: the layer's bias, applied after ``v``.

References:
  Denton et al., Exploiting Linear Structure Within Convolutional Networks for
  Efficient Evaluation, NIPS 2014.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrank_jax.forms import base
from lowrank_jax.lapack_threads import limits_threads

NAME = 'svd'
KEYS = frozenset({'u', 'v'})
FACTORS = ('u', 'v')
SUPPORTS_GROUPS = False


# Equivalent evaluation orders:
#   factored: the u conv / matmul to R channels, then the 1x1 ``v``.
#   merged:   one conv / matmul with the merged kernel.
ORDERS = ('factored', 'merged')


def forward(v, x, spec: base.LayerSpec):
  """The layer without bias, in the cheapest order (:func:`choose_order`)."""
  return forward_order(v, x, spec, choose_order(v, x.shape, spec))


def forward_order(v, x, spec: base.LayerSpec, order: str = 'factored'):
  """The layer without bias, evaluated in the given order (see ORDERS)."""
  if order == 'factored':
    y = _first(v['u'], x, spec)
    return base.channel_matmul(y, v['v'])
  if order == 'merged':
    return _first(to_kernel(v), x, spec)
  raise ValueError(f'unknown order {order!r}; known: {ORDERS}')


def _first(u, x, spec):
  if u.ndim == 2:
    return base.channel_matmul(x, u)
  if u.shape[:2] == (1, 1):
    return base.pointwise_conv(x, u[0, 0], spec)
  return base.conv(x, u, spec, groups=1)


def order_costs(v, in_shape, spec: base.LayerSpec) -> dict[str, int]:
  """Cost of each order (``base.order_cost``); reads shapes only."""
  u_shape = v['u'].shape
  rank, c_out = v['v'].shape
  window = 1
  for d in u_shape[:-2]:
    window *= d
  c_in = u_shape[-2]
  p_in = 1
  for d in in_shape[:-1]:
    p_in *= d
  if len(u_shape) == 4:
    n, h, w = in_shape[:3]
    p_out = n * base.out_size(h, u_shape[0], spec.strides[0],
                              spec.dilation[0],
                              base.axis_padding(spec.padding, 0)) * \
        base.out_size(w, u_shape[1], spec.strides[1], spec.dilation[1],
                      base.axis_padding(spec.padding, 1))
  else:
    p_out = p_in
  return {
      'factored': base.order_cost(
          p_out * rank * (window * c_in + c_out),
          p_in * c_in + p_out * (2 * rank + c_out)),
      'merged': base.order_cost(p_out * window * c_in * c_out,
                                p_in * c_in + p_out * c_out,
                                window * c_in * rank * c_out),
  }


def choose_order(v, in_shape, spec: base.LayerSpec) -> str:
  """The cheapest order by :func:`order_costs` (static: shapes only)."""
  return base.cheapest(order_costs(v, base.static_shape(in_shape), spec))


def to_kernel(v):
  return jnp.einsum('...r,ro->...o', v['u'], v['v'])


def ranks(v):
  return (int(v['v'].shape[0]),)


@functools.partial(jax.jit, static_argnames=('rank',))
def _svd(kernel, rank):
  mat = kernel.reshape(-1, kernel.shape[-1])
  u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
  root = jnp.sqrt(s[:rank])
  u = (u[:, :rank] * root).reshape(kernel.shape[:-1] + (rank,))
  return {'u': u, 'v': root[:, None] * vt[:rank]}


@limits_threads
def from_kernel(kernel, ranks):
  """Truncated SVD of a kernel's (everything but C_out) x C_out matricization.

  Args:
    kernel: (C_in, C_out) or (kh, kw, C_in, C_out).
    ranks: ``R`` or ``(R,)`` with ``1 <= R <= min(rows, C_out)``.

  Returns:
    ``{'u': kernel.shape[:-1] + (R,), 'v': (R, C_out)}``.
  """
  rank = ranks[0] if isinstance(ranks, (tuple, list)) else ranks
  return _svd(jnp.asarray(kernel), int(rank))


def flops(v, spec, in_shape, out_shape):
  del in_shape
  u = v['u']
  rank = u.shape[-1]
  return base.spatial(out_shape) * (u.size + rank * v['v'].shape[1])
