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
from lowrank_jax.lapack_threads import limits_threads

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
    kernel = fold_in_kernel(v)
    return base.channel_matmul(base.conv(x, kernel, spec, groups=1),
                               v['u_out'])
  if order == 'fold_out':
    kernel = jnp.einsum('hwrs,so->hwro', v['core'], v['u_out'])
    return base.conv(base.channel_matmul(x, v['u_in']), kernel, spec,
                     groups=1)
  if order == 'merged':
    return base.conv(x, to_kernel(v), spec, groups=1)
  raise ValueError(f'unknown order {order!r}; known: {ORDERS}')


def fold_in_kernel(v, precision=None):
  """``u_in`` folded into the core: the (kh, kw, C_in, R_out) kernel of the
  k x k stage of the ``fold_in`` order (then the 1x1 ``u_out``)."""
  return jnp.einsum('ir,hwrs->hwis', v['u_in'], v['core'],
                    precision=precision)


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


def _leading(gram, r):
  """The r leading eigenvectors of a symmetric PSD ``gram`` (largest first),
  and the sum of their eigenvalues.

  The eigenvectors of ``A @ A.T`` are the left singular vectors of ``A``; the
  eigenproblem is C x C whatever the unfolding's width. On XLA:CPU (2 loaded
  cores, 2026-11) the Gram matrix and syevd took 0.04 s where gesdd of the
  256 x 2304 unfolding of a 3x3x256x256 kernel took 1.2 s, and 8-26 ms where
  gesdd of a 256 x 288 HOOI unfolding took 16-108 ms.
  """
  v, w = jax.lax.linalg.eigh(gram, symmetrize_input=False)
  return v[:, ::-1][:, :r], jnp.sum(w[::-1][:r])


_HIGHEST = jax.lax.Precision.HIGHEST


def _gram_in(kernel, u_out=None):
  """(C_in, C_in) Gram matrix of the C_in unfolding of ``kernel`` (x u_out)."""
  if u_out is not None:
    kernel = jnp.einsum('hwio,os->hwis', kernel, u_out, precision=_HIGHEST)
  return jnp.einsum('hwis,hwjs->ij', kernel, kernel, precision=_HIGHEST)


def _gram_out(kernel, u_in=None):
  """(C_out, C_out) Gram matrix of the C_out unfolding of ``kernel`` (x u_in)."""
  if u_in is not None:
    kernel = jnp.einsum('hwio,ir->hwro', kernel, u_in, precision=_HIGHEST)
  return jnp.einsum('hwro,hwrp->op', kernel, kernel, precision=_HIGHEST)


def _factors(kernel, u_in, u_out):
  core = jnp.einsum('hwio,ir,os->hwrs', kernel, u_in, u_out,
                    precision=_HIGHEST)
  return {'u_in': u_in, 'core': core, 'u_out': u_out.T}


# XLA:CPU spends most of these programs' compile time in LLVM, while their run
# time is in LAPACK and matmul library calls. At optimization level 0 the HOOI
# program compiled in 0.9 s instead of 2.7 s (3x3x64x64 kernel, ranks 16) and
# 0.8 s instead of 1.2 s (3x3x256x256, ranks 32), and ran in 9 ms instead of
# 3 ms and 0.15 s instead of 0.13 s (2 loaded cores, one process): a split
# runs once per layer, so compile time dominates. Other backends keep their
# defaults. (CP's ALS program ran 4x slower at level 0: cp.py keeps them.)
_CPU_OPTIONS = {'xla_backend_optimization_level': 0}


def _jit_per_backend(fn, static_argnames):
  """``jax.jit(fn)``, compiled with ``_CPU_OPTIONS`` for kernels on CPU."""
  compiled = {
      'cpu': jax.jit(fn, static_argnames=static_argnames,
                     compiler_options=_CPU_OPTIONS),
      None: jax.jit(fn, static_argnames=static_argnames)}

  @functools.wraps(fn)
  def call(kernel, *args, **kwargs):
    if isinstance(kernel, jax.core.Tracer):
      platforms = {jax.default_backend()}
    else:
      platforms = {d.platform for d in kernel.devices()}
    return compiled['cpu' if platforms == {'cpu'} else None](
        kernel, *args, **kwargs)
  return call


def _hosvd_impl(kernel, r_in, r_out):
  u_in, _ = _leading(_gram_in(kernel), r_in)
  u_out, _ = _leading(_gram_out(kernel), r_out)
  return _factors(kernel, u_in, u_out)


def _hooi_impl(kernel, r_in, r_out, max_sweeps, tol):
  """HOOI from the HOSVD ``u_out``, as TensorLy's ``partial_tucker`` does.

  A sweep updates ``u_out`` (from the Gram matrix of the kernel times the
  last ``u_in``; the kernel's own at the start, i.e. HOSVD), then ``u_in``.
  The relative error after it is ``sqrt(1 - |core|^2 / |kernel|^2)``, where
  ``|core|^2`` is the sum of the eigenvalues kept by the ``u_in`` update.
  Each update solves its subproblem exactly, so the error never increases.
  """
  norm2 = jnp.sum(jnp.square(kernel))
  c_in, c_out = kernel.shape[2:]

  def sweep(state):
    n, g_out, _, _, _, err = state
    u_out, _ = _leading(g_out, r_out)
    u_in, kept = _leading(_gram_in(kernel, u_out), r_in)
    new_err = jnp.sqrt(jnp.maximum(1 - kept / jnp.maximum(norm2, 1e-30), 0))
    return n + 1, _gram_out(kernel, u_in), u_in, u_out, err, new_err

  def going(state):
    n, _, _, _, prev, err = state
    return (n < max_sweeps) & ((n == 0) | (prev - err > tol))

  inf = jnp.asarray(jnp.inf, kernel.dtype)
  state = (0, _gram_out(kernel), jnp.zeros((c_in, r_in), kernel.dtype),
           jnp.zeros((c_out, r_out), kernel.dtype), inf, inf)
  _, _, u_in, u_out, _, _ = jax.lax.while_loop(going, sweep, state)
  return _factors(kernel, u_in, u_out)


_hosvd = _jit_per_backend(_hosvd_impl, ('r_in', 'r_out'))
_hooi = _jit_per_backend(_hooi_impl, ('r_in', 'r_out'))


@limits_threads
def from_kernel(kernel, ranks, *, hooi_iters: int = 100,
                hooi_tol: float = 1e-5):
  """Tucker-2 factors of an HWIO kernel by HOOI from HOSVD, to a tolerance.

  By default HOOI (alternating exact updates of ``u_out`` and ``u_in``) runs
  until a sweep lowers the relative error ``|W - W_r| / |W|`` by at most
  ``hooi_tol``, or for ``hooi_iters`` sweeps. TensorLy's ``partial_tucker``
  takes the same steps and stops at 1e-4, so this default's error is at most
  its error at equal ranks (bench/bench_peers.py).

  Args:
    kernel: (kh, kw, C_in, C_out).
    ranks: ``(R_in, R_out)`` with ``1 <= R_in <= C_in``, ``1 <= R_out <= C_out``.
    hooi_iters: most HOOI sweeps; 0 gives the plain HOSVD (truncated SVDs of
      the two unfoldings).
    hooi_tol: stop when a sweep lowers the relative error by at most this;
      0 runs all ``hooi_iters`` sweeps unless the error stops falling.

  Returns:
    ``{'u_in': (C_in, R_in), 'core': (kh, kw, R_in, R_out),
    'u_out': (R_out, C_out)}``, with orthonormal columns of ``u_in`` and rows
    of ``u_out``.

  References:
    De Lathauwer, De Moor, Vandewalle, On the Best Rank-1 and Rank-(R1, R2,
    ..., RN) Approximation of Higher-Order Tensors, SIAM J. Matrix Anal.
    Appl. 2000 (HOSVD, HOOI).
  """
  r_in, r_out = int(ranks[0]), int(ranks[1])
  kernel = jnp.asarray(kernel)
  if int(hooi_iters) <= 0:
    return _hosvd(kernel, r_in, r_out)
  return _hooi(kernel, r_in, r_out, int(hooi_iters), float(hooi_tol))


@limits_threads
def refine(v, ranks, *, hooi_iters: int = 100, hooi_tol: float = 1e-5):
  """Re-compresses a Tucker-2 layer by decomposing only its core (MUSCO).

  The core is split by :func:`from_kernel` (same options and defaults), and
  the new outer factors are composed into the old ones, so the layer stays
  three convs: ``u_in <- u_in @ a``, ``u_out <- b @ u_out``.
  """
  inner = from_kernel(v['core'], ranks, hooi_iters=hooi_iters,
                      hooi_tol=hooi_tol)
  return {'u_in': v['u_in'] @ inner['u_in'], 'core': inner['core'],
          'u_out': inner['u_out'] @ v['u_out']}


def flops(v, spec, in_shape, out_shape):
  kh, kw, r_in, r_out = v['core'].shape
  c_in, c_out = v['u_in'].shape[0], v['u_out'].shape[1]
  return (base.spatial(in_shape) * c_in * r_in +
          base.spatial(out_shape) * (kh * kw * r_in * r_out + r_out * c_out))
