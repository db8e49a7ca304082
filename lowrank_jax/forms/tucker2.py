"""The Tucker-2 form of a k x k conv: 1x1 (C_in->R_in), k x k, 1x1 (R_out->C_out).

Variables:
  u_in: (C_in, R_in) input factor (orthonormal columns after HOSVD).
  core: (kh, kw, R_in, R_out), run with the layer's strides, padding, dilation.
  u_out: (R_out, C_out) output factor (orthonormal rows after HOSVD).
  bias: the layer's bias, applied after ``u_out``.

The kernel is ``W[h,w,i,o] = sum_{r,s} u_in[i,r] core[h,w,r,s] u_out[s,o]``.

References:
  Kim et al., Compression of Deep Convolutional Neural Networks for Fast and
  Low Power Mobile Applications, ICLR 2016 (Tucker-2 of convs).
  Gusak et al., Automated Multi-Stage Compression of Neural Networks (MUSCO),
  ICCVW 2019 (re-compression of the core).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrank_jax.forms import base

NAME = 'tucker2'
KEYS = frozenset({'u_in', 'core', 'u_out'})
FACTORS = ('u_in', 'u_out')
SUPPORTS_GROUPS = False


# Equivalent evaluation orders (same function, different cost):
#   factored: 1x1 C_in->R_in, k x k R_in->R_out, 1x1 R_out->C_out.
#   fold_in:  k x k C_in->R_out with kernel u_in.core, then 1x1 (u_out).
#   fold_out: 1x1 (u_in), then k x k R_in->C_out with kernel core.u_out.
#   merged:   one k x k C_in->C_out conv with the merged kernel.
ORDERS = ('factored', 'fold_in', 'fold_out', 'merged')


def forward(v, x, spec: base.LayerSpec):
  """The layer without bias, in the cheapest order (:func:`choose_order`)."""
  return forward_order(v, x, spec, choose_order(v, x.shape, spec))


def forward_order(v, x, spec: base.LayerSpec, order: str = 'factored'):
  """The layer without bias, evaluated in the given order (see ORDERS)."""
  if order == 'factored':
    y = base.channel_matmul(x, v['u_in'])
    y = base.conv(y, v['core'], spec, groups=1)
    return base.channel_matmul(y, v['u_out'])
  if order == 'fold_in':
    kernel = jnp.einsum('ir,hwrs->hwis', v['u_in'], v['core'])
    return base.channel_matmul(base.conv(x, kernel, spec, groups=1),
                               v['u_out'])
  if order == 'fold_out':
    kernel = jnp.einsum('hwrs,so->hwro', v['core'], v['u_out'])
    return base.conv(base.channel_matmul(x, v['u_in']), kernel, spec,
                     groups=1)
  if order == 'merged':
    return base.conv(x, to_kernel(v), spec, groups=1)
  raise ValueError(f'unknown order {order!r}; known: {ORDERS}')


def order_costs(v, in_shape, spec: base.LayerSpec) -> dict[str, int]:
  """Cost of each order (``base.order_cost``) for an input of ``in_shape``.

  Only shapes are read, so ``v`` may hold ShapeDtypeStructs.
  """
  kh, kw, r_in, r_out = v['core'].shape
  c_in, c_out = v['u_in'].shape[0], v['u_out'].shape[1]
  k = kh * kw
  n, h, w = in_shape[:3]
  h_out = base.out_size(h, kh, spec.strides[0], spec.dilation[0],
                        base.axis_padding(spec.padding, 0))
  w_out = base.out_size(w, kw, spec.strides[1], spec.dilation[1],
                        base.axis_padding(spec.padding, 1))
  p_in, p_out = n * h * w, n * h_out * w_out
  merge = min(k * r_out * (c_in * r_in + c_in * c_out),
              k * r_in * (r_out * c_out + c_in * c_out))
  return {
      'factored': base.order_cost(
          p_in * c_in * r_in + p_out * (k * r_in * r_out + r_out * c_out),
          p_in * (c_in + 2 * r_in) + p_out * (2 * r_out + c_out)),
      'fold_in': base.order_cost(
          p_out * (k * c_in * r_out + r_out * c_out),
          p_in * c_in + p_out * (2 * r_out + c_out), k * c_in * r_in * r_out),
      'fold_out': base.order_cost(
          p_in * c_in * r_in + p_out * k * r_in * c_out,
          p_in * (c_in + 2 * r_in) + p_out * c_out, k * r_in * r_out * c_out),
      'merged': base.order_cost(p_out * k * c_in * c_out,
                                p_in * c_in + p_out * c_out, merge),
  }


def choose_order(v, in_shape, spec: base.LayerSpec) -> str:
  """The cheapest order by :func:`order_costs` (static: shapes only)."""
  return base.cheapest(order_costs(v, base.static_shape(in_shape), spec))


def to_kernel(v):
  return jnp.einsum('ir,hwrs,so->hwio', v['u_in'], v['core'], v['u_out'])


def ranks(v):
  return (int(v['u_in'].shape[1]), int(v['u_out'].shape[0]))


def _leading(mat, r):
  """The r leading left singular vectors of ``mat`` (rows, cols).

  When ``cols < r`` (a mode whose rank is bounded by the other, truncated
  mode) the full ``U`` is used: its extra columns complete an orthonormal basis
  and meet zero slices of the core.
  """
  u, _, _ = jnp.linalg.svd(mat, full_matrices=mat.shape[1] < r)
  return u[:, :r]


@functools.partial(jax.jit, static_argnames=('r_in', 'r_out', 'hooi_iters'))
def _tucker2(kernel, r_in, r_out, hooi_iters):
  kh, kw, c_in, c_out = kernel.shape
  unfold_in = jnp.moveaxis(kernel, 2, 0).reshape(c_in, -1)
  unfold_out = jnp.moveaxis(kernel, 3, 0).reshape(c_out, -1)
  u_in = _leading(unfold_in, r_in)
  u_out = _leading(unfold_out, r_out)

  def body(_, factors):
    u_in, u_out = factors
    t = jnp.einsum('hwio,os->hwis', kernel, u_out)
    u_in = _leading(jnp.moveaxis(t, 2, 0).reshape(c_in, -1), r_in)
    t = jnp.einsum('hwio,ir->hwro', kernel, u_in)
    u_out = _leading(jnp.moveaxis(t, 3, 0).reshape(c_out, -1), r_out)
    return u_in, u_out

  u_in, u_out = jax.lax.fori_loop(0, hooi_iters, body, (u_in, u_out))
  core = jnp.einsum('hwio,ir,os->hwrs', kernel, u_in, u_out)
  return {'u_in': u_in, 'core': core, 'u_out': u_out.T}


def from_kernel(kernel, ranks, *, hooi_iters: int = 0):
  """Tucker-2 factors of an HWIO kernel by HOSVD (+ optional HOOI sweeps).

  Args:
    kernel: (kh, kw, C_in, C_out).
    ranks: ``(R_in, R_out)`` with ``1 <= R_in <= C_in``, ``1 <= R_out <= C_out``.
    hooi_iters: higher-order orthogonal iteration sweeps after HOSVD.

  Returns:
    ``{'u_in': (C_in, R_in), 'core': (kh, kw, R_in, R_out),
    'u_out': (R_out, C_out)}``.
  """
  r_in, r_out = ranks
  return _tucker2(jnp.asarray(kernel), int(r_in), int(r_out), int(hooi_iters))


def refine(v, ranks, *, hooi_iters: int = 0):
  """Re-compresses a Tucker-2 layer by decomposing only its core (MUSCO).

  The new outer factors are composed into the old ones, so the layer stays
  three convs: ``u_in <- u_in @ a``, ``u_out <- b @ u_out``.
  """
  inner = from_kernel(v['core'], ranks, hooi_iters=hooi_iters)
  return {'u_in': v['u_in'] @ inner['u_in'], 'core': inner['core'],
          'u_out': inner['u_out'] @ v['u_out']}


def flops(v, spec, in_shape, out_shape):
  kh, kw, r_in, r_out = v['core'].shape
  c_in, c_out = v['u_in'].shape[0], v['u_out'].shape[1]
  return (base.spatial(in_shape) * c_in * r_in +
          base.spatial(out_shape) * (kh * kw * r_in * r_out + r_out * c_out))
