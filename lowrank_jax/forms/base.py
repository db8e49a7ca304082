"""Shared pieces of every form: the layer spec and the primitive ops.

Array layouts: activations are NHWC; conv kernels are HWIO
``(kh, kw, C_in, C_out)``; dense kernels are ``(C_in, C_out)``.
"""

from __future__ import annotations

import contextvars
import math
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

Padding = Union[str, Sequence[tuple[int, int]]]


class LayerSpec(NamedTuple):
  """What a layer is, apart from its variables.

  Attributes:
    kind: ``'conv'`` (NHWC input, HWIO kernel) or ``'dense'`` (``(..., C)``).
    strides: conv window strides ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'`` or ``((lo, hi), (lo, hi))``.
    dilation: conv kernel dilation ``(dh, dw)``.
    groups: ``feature_group_count`` of the conv (1 = ordinary conv).
  """
  kind: str = 'dense'
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  dilation: tuple[int, int] = (1, 1)
  groups: int = 1


DENSE = LayerSpec()


def conv(x: jax.Array, kernel: jax.Array, spec: LayerSpec, *,
         groups: int | None = None) -> jax.Array:
  """``lax.conv_general_dilated`` with NHWC input and HWIO kernel.

  A conv whose (dilated) window is larger than its input on some axis (a
  3x3 SAME conv on 2x2 or 1x1 maps, as at the end of VGG-16 on 32x32
  inputs) runs as one matmul over the patches instead: XLA:CPU rewrites such
  convs into a generic loop that is ~100x slower than its conv library
  (6.2 s vs 55 ms for 512->512 at batch 128). Same result, any backend.
  """
  groups = spec.groups if groups is None else groups
  if groups == 1 and window_exceeds_input(x.shape, kernel.shape, spec):
    return conv_as_matmul(x, kernel, spec)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=tuple(spec.strides),
      padding=_lax_padding(spec.padding), rhs_dilation=tuple(spec.dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)


def _lax_padding(padding):
  if isinstance(padding, str):
    return padding
  return tuple(tuple(int(q) for q in p) for p in padding)


def window_exceeds_input(x_shape, kernel_shape, spec: LayerSpec) -> bool:
  for axis in (0, 1):
    extent = (kernel_shape[axis] - 1) * spec.dilation[axis] + 1
    if x_shape[1 + axis] < extent:
      return True
  return False


def explicit_padding(x_shape, kernel_shape, spec: LayerSpec):
  """``((lo, hi), (lo, hi))`` of the spatial axes, as the conv pads them."""
  if not isinstance(spec.padding, str):
    return _lax_padding(spec.padding)
  window = [(kernel_shape[a] - 1) * spec.dilation[a] + 1 for a in (0, 1)]
  return tuple(jax.lax.padtype_to_pads(tuple(x_shape[1:3]), window,
                                       tuple(spec.strides), spec.padding))


def conv_as_matmul(x: jax.Array, kernel: jax.Array,
                   spec: LayerSpec) -> jax.Array:
  """A conv (groups=1) as one matmul over explicitly gathered patches.

  Taps that read only padding for every output position are dropped, so a
  3x3 SAME conv on a 1x1 map is a single matmul with the centre tap.

  Args:
    x: (N, H, W, C_in).
    kernel: (kh, kw, C_in, C_out).
    spec: strides, padding, dilation.

  Returns:
    (N, H', W', C_out), equal to ``lax.conv_general_dilated``.
  """
  n, h, w, c_in = x.shape
  pads = explicit_padding(x.shape, kernel.shape, spec)
  sizes, taps = [], []
  for axis, length in ((0, h), (1, w)):
    k, s, d = kernel.shape[axis], spec.strides[axis], spec.dilation[axis]
    lo, hi = pads[axis]
    out = max((length + lo + hi - (k - 1) * d - 1) // s + 1, 0)
    sizes.append(out)
    taps.append([i for i in range(k) if any(
        0 <= o * s + i * d - lo < length for o in range(out))])
  (ho, wo), (taps_h, taps_w) = sizes, taps
  if not taps_h or not taps_w:
    return jnp.zeros((n, ho, wo, kernel.shape[-1]),
                     jnp.result_type(x, kernel))
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                   ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  (sh, sw), (dh, dw) = spec.strides, spec.dilation
  cols = [jax.lax.slice(xp, (0, i * dh, j * dw, 0),
                        (n, i * dh + (ho - 1) * sh + 1,
                         j * dw + (wo - 1) * sw + 1, c_in),
                        (1, sh, sw, 1))
          for i in taps_h for j in taps_w]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  k = jnp.concatenate([kernel[i, j] for i in taps_h for j in taps_w], axis=0)
  return channel_matmul(patches, k)


# The widest 1x1 stage (max of C_in, C_out) on NHWC activations that runs as
# a 1x1 ``conv_general_dilated`` (what ``nn.Conv`` runs) instead of a
# ``dot_general``. Inside a network XLA:CPU fuses the stages of a factored
# layer with their neighbours, and a ``dot_general`` enters that fusion
# through (N*H*W, C) reshapes. With this rule a split network runs the same
# ops as its factors hand-written with ``nn.Conv`` (a dot_general for every
# stage measured 1.21-1.26x slower than that on the small VGG of
# docs/benchmarks_own_model.md), and on whole networks at batch 128 it was
# the fastest choice or within noise of it (docs/benchmarks_pointwise.md).
# Timed alone, outside a network, a stage's dot_general is the faster op.
POINTWISE_CONV_MAX_CHANNELS = 64


def channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """A 1x1 conv (stride 1) on the trailing channel axis.

  A ``dot_general``, except on NHWC activations with at most
  ``POINTWISE_CONV_MAX_CHANNELS`` channels in and out, which run as a 1x1
  ``conv_general_dilated`` (same result; see the constant).

  Args:
    x: ``(..., C_in)``.
    w: ``(C_in, C_out)``.

  Returns:
    ``(..., C_out)``.
  """
  if x.ndim == 4 and max(w.shape) <= POINTWISE_CONV_MAX_CHANNELS:
    return jax.lax.conv_general_dilated(
        x, w[None, None], window_strides=(1, 1), padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def pointwise_conv(x: jax.Array, w: jax.Array, spec: LayerSpec) -> jax.Array:
  """A 1x1 conv with the spec's strides and padding, via a matmul.

  For a 1x1 window, SAME and VALID padding both select every s-th pixel, so
  the strided conv is a subsample followed by a channel matmul.
  """
  if spec.kind == 'conv' and tuple(spec.strides) != (1, 1):
    if isinstance(spec.padding, str):
      sh, sw = spec.strides
      x = x[:, ::sh, ::sw, :]
    else:
      return conv(x, w[None, None], spec, groups=1)
  return channel_matmul(x, w)


def out_size(n: int, k: int, s: int, d: int, pad) -> int:
  """Output length of one spatial axis of a conv."""
  eff = (k - 1) * d + 1
  if pad == 'SAME':
    return -(-n // s)
  if pad == 'VALID':
    return max(-(-(n - eff + 1) // s), 0)
  lo, hi = pad
  return (n + lo + hi - eff) // s + 1


def axis_padding(padding: Padding, axis: int):
  """The padding of one spatial axis (a string stays a string)."""
  return padding if isinstance(padding, str) else tuple(padding[axis])


def spatial(shape: Sequence[int]) -> int:
  """Number of output positions per channel: product of all but the last."""
  return math.prod(shape[:-1])


def as_matrix(f: jax.Array) -> jax.Array:
  """A factor as a matrix: all leading axes flattened, last axis kept."""
  return f.reshape(-1, f.shape[-1])


# Choosing between equivalent evaluation orders of a factored layer.
#
# A factored layer can run as its chain of small ops or with some factors
# folded into their neighbours (down to one dense conv). Multiply-adds alone
# pick the wrong order when channels are few: each extra op writes and reads
# back a whole activation. The cost model is multiply-adds plus
# ELEMENT_COST per activation element written or read, plus the
# multiply-adds of folding the weights (paid on every call, and what
# dominates at batch 1). Calibrated on XLA:CPU (see
# docs/benchmarks_layers.md); it only changes the choice where orders are
# close in multiply-adds, e.g. a Tucker-2 input factor of 3 channels.
ELEMENT_COST = 16


# The size assumed for a symbolic dimension (jax.export's batch) when an
# evaluation order is chosen from shapes; lowrank_jax.export sets it to the
# example input's batch size.
SYMBOLIC_DIM: contextvars.ContextVar = contextvars.ContextVar(
    'lowrank_jax_symbolic_dim', default=1)


def static_shape(shape) -> tuple[int, ...]:
  """``shape`` with every symbolic dimension replaced by ``SYMBOLIC_DIM``."""
  return tuple(d if isinstance(d, int) else SYMBOLIC_DIM.get() for d in shape)


def order_cost(macs: int, moved: int, weight_macs: int = 0) -> int:
  """Cost of one evaluation order (see ``ELEMENT_COST``)."""
  return int(macs + ELEMENT_COST * moved + weight_macs)


def cheapest(costs: dict) -> str:
  """The key of the lowest cost; ties go to the first key."""
  return min(costs, key=lambda k: (costs[k], list(costs).index(k)))
