"""The over-parameterized form (He et al. 2024): W = op_in . op_core . op_out.

Variables (conv; for a dense layer drop the leading kh, kw of ``op_core``):
  op_in: (C_in, R_in), R_in >= C_in.
  op_core: (kh, kw, R_in, R_out).
  op_out: (R_out, C_out), R_out >= C_out.
  bias: the layer's bias.

The product is linear, so the layer is exactly one dense kernel at every step:
the forward pass merges the factors first (cheaper than running three convs
at widths >= C) and gradients reach every factor. :func:`from_kernel` builds
factors whose product is the given kernel exactly, with orthonormal narrow
sides (``op_in @ op_in.T = I``, ``op_out.T @ op_out = I``), so the network
computes the same function right after the transform and the orthogonality
penalty starts at zero.

References:
  He, Jiang, Wu, Convolutional Neural Network Compression Based on Low-Rank
  Decomposition, arXiv:2408.16289, 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrank_jax.forms import base
from lowrank_jax.lapack_threads import limits_threads

NAME = 'overparam'
KEYS = frozenset({'op_in', 'op_core', 'op_out'})
FACTORS = ('op_in', 'op_out')
SUPPORTS_GROUPS = False


def to_kernel(v):
  return jnp.einsum('ir,...rs,so->...io', v['op_in'], v['op_core'],
                    v['op_out'])


def forward(v, x, spec: base.LayerSpec):
  kernel = to_kernel(v)
  if spec.kind == 'conv':
    return base.conv(x, kernel, spec, groups=1)
  return base.channel_matmul(x, kernel)


def ranks(v):
  return (int(v['op_in'].shape[1]), int(v['op_out'].shape[0]))


def _orthonormal_rows(key, rows, cols, dtype):
  """A (rows, cols) matrix with orthonormal rows (rows <= cols)."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (cols, rows), jnp.float32))
  q = q * jnp.sign(jnp.diagonal(r))[None, :]
  return q.T.astype(dtype)


@limits_threads
def from_kernel(kernel, ranks, *, key=None):
  """Exact over-parameterized factors of a kernel.

  Args:
    kernel: (kh, kw, C_in, C_out) or (C_in, C_out).
    ranks: inner widths ``(R_in, R_out)``, ``R_in >= C_in``, ``R_out >= C_out``.
    key: PRNG key for the random orthonormal factors (required).

  Returns:
    ``{'op_in', 'op_core', 'op_out'}`` whose product equals ``kernel``.
  """
  kernel = jnp.asarray(kernel)
  c_in, c_out = kernel.shape[-2:]
  r_in, r_out = (int(r) for r in ranks)
  if key is None:
    raise TypeError('overparam.from_kernel needs key=jax.random.PRNGKey(seed)')
  k_in, k_out = jax.random.split(key)
  op_in = _orthonormal_rows(k_in, c_in, r_in, kernel.dtype)
  op_out = _orthonormal_rows(k_out, c_out, r_out, kernel.dtype).T
  core = jnp.einsum('ir,...io,so->...rs', op_in, kernel, op_out)
  return {'op_in': op_in, 'op_core': core, 'op_out': op_out}


def flops(v, spec, in_shape, out_shape):
  """Multiply-adds of the merged-kernel forward (the merge itself excluded)."""
  del in_shape
  c_in, c_out = v['op_in'].shape[0], v['op_out'].shape[1]
  window = v['op_core'].size // (v['op_core'].shape[-1] *
                                 v['op_core'].shape[-2])
  return base.spatial(out_shape) * c_out * c_in * window
