"""The CP form of a k x k conv: 1x1, depthwise kh x 1, depthwise 1 x kw, 1x1.

Variables:
  cp_in: (C_in, R) input factor.
  cp_h: (kh, R) vertical filters (depthwise, the layer's vertical stride,
    padding and dilation).
  cp_w: (kw, R) horizontal filters (likewise horizontally).
  cp_out: (R, C_out) output factor; the layer's bias follows it.

The kernel is ``W[h,w,i,o] = sum_r cp_h[h,r] cp_w[w,r] cp_in[i,r] cp_out[r,o]``.
Factors are fitted by alternating least squares (ALS) in jnp from an SVD
initialization; CP is not exact at any rank in general, unlike Tucker-2.

References:
  Lebedev et al., Speeding-up Convolutional Neural Networks Using Fine-tuned
  CP-Decomposition, ICLR 2015.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrank_jax.forms import base
from lowrank_jax.lapack_threads import limits_threads

NAME = 'cp'
KEYS = frozenset({'cp_in', 'cp_h', 'cp_w', 'cp_out'})
FACTORS = ('cp_in', 'cp_out')
SUPPORTS_GROUPS = False


# Equivalent evaluation orders:
#   factored: 1x1 C_in->R, the two depthwise 1-D filters as shifted slices
#     (multiply-adds XLA fuses into one pass each), 1x1 R->C_out.
#   merged:   one k x k conv with the merged kernel.
ORDERS = ('factored', 'merged')


def forward(v, x, spec: base.LayerSpec):
  """The layer without bias, in the cheapest order (:func:`choose_order`)."""
  return forward_order(v, x, spec, choose_order(v, x.shape, spec))


def forward_order(v, x, spec: base.LayerSpec, order: str = 'factored'):
  """The layer without bias, evaluated in the given order (see ORDERS).

  The depthwise filters run as sums of shifted, strided slices rather than
  ``feature_group_count`` convs: XLA:CPU runs depthwise convs 3-4x slower
  than the fused slices (bench/bench_layers.py).
  """
  if order == 'merged':
    return base.conv(x, to_kernel(v), spec, groups=1)
  if order != 'factored':
    raise ValueError(f'unknown order {order!r}; known: {ORDERS}')
  kernel_shape = (v['cp_h'].shape[0], v['cp_w'].shape[0])
  pads = base.explicit_padding(x.shape, kernel_shape, spec)
  y = base.channel_matmul(x, v['cp_in'])
  y = _depthwise_1d(y, v['cp_h'], 1, spec.strides[0], spec.dilation[0],
                    pads[0])
  y = _depthwise_1d(y, v['cp_w'], 2, spec.strides[1], spec.dilation[1],
                    pads[1])
  return base.channel_matmul(y, v['cp_out'])


def _depthwise_1d(y, filters, axis, stride, dilation, pad):
  """Depthwise 1-D conv of NHWC ``y`` along ``axis`` with (k, C) filters."""
  k = filters.shape[0]
  lo, hi = pad
  length = y.shape[axis] + lo + hi
  out = max((length - (k - 1) * dilation - 1) // stride + 1, 0)
  if out == 0:
    shape = list(y.shape)
    shape[axis] = 0
    return jnp.zeros(shape, jnp.result_type(y, filters))
  config = [(0, 0, 0)] * y.ndim
  config[axis] = (lo, hi, 0)
  y = jax.lax.pad(y, jnp.zeros((), y.dtype), config)
  acc = None
  for i in range(k):
    tap = jax.lax.slice_in_dim(y, i * dilation,
                               i * dilation + (out - 1) * stride + 1, stride,
                               axis) * filters[i]
    acc = tap if acc is None else acc + tap
  return acc


def order_costs(v, in_shape, spec: base.LayerSpec) -> dict[str, int]:
  """Cost of each order (``base.order_cost``); reads shapes only."""
  kh, rank = v['cp_h'].shape
  kw = v['cp_w'].shape[0]
  c_in, c_out = v['cp_in'].shape[0], v['cp_out'].shape[1]
  n, h, w = in_shape[:3]
  h_out = base.out_size(h, kh, spec.strides[0], spec.dilation[0],
                        base.axis_padding(spec.padding, 0))
  w_out = base.out_size(w, kw, spec.strides[1], spec.dilation[1],
                        base.axis_padding(spec.padding, 1))
  p_in, p_mid, p_out = n * h * w, n * h_out * w, n * h_out * w_out
  return {
      'factored': base.order_cost(
          p_in * c_in * rank + p_mid * kh * rank + p_out * rank * (kw + c_out),
          p_in * (c_in + 2 * rank) + 2 * p_mid * rank + p_out * (rank + c_out)),
      'merged': base.order_cost(
          p_out * kh * kw * c_in * c_out, p_in * c_in + p_out * c_out,
          kh * kw * rank * (c_in + c_out) + kh * kw * c_in * rank * c_out),
  }


def choose_order(v, in_shape, spec: base.LayerSpec) -> str:
  """The cheapest order by :func:`order_costs` (static: shapes only)."""
  return base.cheapest(order_costs(v, base.static_shape(in_shape), spec))


def to_kernel(v):
  return jnp.einsum('hr,wr,ir,ro->hwio', v['cp_h'], v['cp_w'], v['cp_in'],
                    v['cp_out'])


def ranks(v):
  return (int(v['cp_in'].shape[1]),)


_SUBSCRIPTS = 'hwio'


def _init_factor(unfolding, rank, key):
  u, s, _ = jnp.linalg.svd(unfolding, full_matrices=False)
  u = u * s[None, :] / jnp.maximum(s[0], 1e-30)
  k = min(rank, u.shape[1])
  rest = jax.random.normal(key, (unfolding.shape[0], rank - k),
                           unfolding.dtype) * 0.1
  return jnp.concatenate([u[:, :k], rest], axis=1)


@functools.partial(jax.jit, static_argnames=('rank', 'iters'))
def _cp_als(kernel, key, rank, iters):
  keys = jax.random.split(key, 4)
  factors = [
      _init_factor(jnp.moveaxis(kernel, m, 0).reshape(kernel.shape[m], -1),
                   rank, keys[m]) for m in range(4)]

  def sweep(_, factors):
    factors = list(factors)
    for m in range(4):
      others = [n for n in range(4) if n != m]
      gram = functools.reduce(
          jnp.multiply, [factors[n].T @ factors[n] for n in others])
      spec = ','.join(_SUBSCRIPTS[n] + 'r' for n in others)
      mttkrp = jnp.einsum(f'hwio,{spec}->{_SUBSCRIPTS[m]}r', kernel,
                          *[factors[n] for n in others])
      eye = jnp.eye(rank, dtype=kernel.dtype)
      reg = 1e-7 * jnp.trace(gram) / rank
      factors[m] = jnp.linalg.solve(gram + reg * eye, mttkrp.T).T
    return tuple(factors)

  a, b, c, d = jax.lax.fori_loop(0, iters, sweep, tuple(factors))
  # Balance the scale across the four factors.
  norms = [jnp.linalg.norm(f, axis=0) + 1e-30 for f in (a, b, c, d)]
  scale = (norms[0] * norms[1] * norms[2] * norms[3]) ** 0.25
  a, b, c, d = (f / n * scale for f, n in zip((a, b, c, d), norms))
  return {'cp_in': c, 'cp_h': a, 'cp_w': b, 'cp_out': d.T}


@limits_threads
def from_kernel(kernel, ranks, *, als_iters: int = 50, seed: int = 0):
  """CP factors of an HWIO kernel by ALS.

  Args:
    kernel: (kh, kw, C_in, C_out).
    ranks: ``R`` or ``(R,)``, ``R >= 1``.
    als_iters: ALS sweeps over the four modes.
    seed: seed for the random columns used when R exceeds a mode's size.

  Returns:
    ``{'cp_in': (C_in, R), 'cp_h': (kh, R), 'cp_w': (kw, R),
    'cp_out': (R, C_out)}``.
  """
  rank = ranks[0] if isinstance(ranks, (tuple, list)) else ranks
  return _cp_als(jnp.asarray(kernel), jax.random.PRNGKey(seed), int(rank),
                 int(als_iters))


def flops(v, spec, in_shape, out_shape):
  kh, rank = v['cp_h'].shape
  kw = v['cp_w'].shape[0]
  c_in, c_out = v['cp_in'].shape[0], v['cp_out'].shape[1]
  n, _, w_in, _ = in_shape
  h_out = out_shape[1]
  return (base.spatial(in_shape) * c_in * rank + n * h_out * w_in * rank * kh
          + base.spatial(out_shape) * rank * (kw + c_out))
