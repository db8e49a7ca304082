"""The ADTN form: a weight decoded from a deep brick-wall tensor network.

A kernel with ``N`` entries is the output of an automatically differentiable
tensor network (ADTN) on ``Q = max(2, ceil(log2 N))`` two-level indices
("qubits"), numbered ``0 .. Q-1`` with index 0 the most significant bit of the
row-major flattened kernel:

1. start from the product state ``v ⊗ v ⊗ ... ⊗ v`` with ``v = [1, 0]``, i.e.
   the basis vector ``e_0`` of length ``2^Q``;
2. apply ``M`` layers; layer ``m`` is the staircase (sequential sweep) of
   ``Q - 1`` two-index gates on the neighbouring pairs
   ``(0, 1), (1, 2), ..., (Q-2, Q-1)``, applied in that order (gate ``i`` of
   a layer sees the output of gate ``i - 1``);
3. between two layers (not before the first, not after the last) apply the
   elementwise nonlinearity (``'relu'`` default, ``'tanh'``, ``'identity'``);
4. keep the first ``N`` of the ``2^Q`` entries (padding: the ``2^Q - N``
   trailing entries are decoded but never used, so they are unconstrained —
   the fit ignores them), in a *normalized* decode divide them by their
   Euclidean norm, multiply by the learned scale and reshape row-major to the
   kernel shape (HWIO for convs, ``(C_in, C_out)`` for dense layers).

The normalized decode (``normalize=True`` in
:func:`lowrank_jax.forms.adtn_fit.fit`, off by default) makes the kernel's
direction the gates' job and its norm the scale's alone, as weight
normalization does for a dense kernel (Salimans and Kingma 2016).
Without it the kernel's norm is the scale times the norm of a product of
``M (Q-1)`` gates, which end-to-end training can shrink by orders of
magnitude within a hundred steps (LeNet-5 at M=16, or M=8 at learning rate
1e-2: the network fell to chance accuracy, docs/results.md); with it the
kernel's norm is ``|scale|`` whatever the gates do.

Gate ``G = gates[m, i]`` has shape ``(2, 2, 2, 2)`` indexed
``G[out_i, out_{i+1}, in_i, in_{i+1}]``; as a 4x4 matrix ``G.reshape(4, 4)``
it maps the pair's input ``2*in_i + in_{i+1}`` to its output. No layer is
ever built as a ``2^Q x 2^Q`` operator. The first layer acts on the product
state, where qubits ``i+1 .. Q-1`` are still ``|0>`` when gate ``i`` runs, so
it is contracted on the growing ``2^(i+1)`` prefix only (``O(2^Q)``). The
other layers go through the state in blocks of ``BLOCK`` consecutive gates:
the gates ``i .. i+k-1`` of a block act on qubits ``i .. i+k`` only, so
their product is a ``2^(k+1) x 2^(k+1)`` matrix (built from the gates, a few
thousand multiply-adds), applied as one matrix product on the state reshaped
to ``(2^i, 2^(k+1), 2^(Q-1-i-k))``. With ``k = 3`` that is 16 multiply-adds
per entry where three gates take 12, but one pass over the ``2^Q`` state
instead of three, which is what the time goes to: the gradient of an
M=8 decode on 18 qubits took 2.4x less time than gate by gate
(docs/benchmarks_adtn_decode.md). ``contract(..., block=1)`` goes gate by
gate. Decoding costs ``O(M * Q * 2^Q)`` either way (see :func:`decode_macs`).

Variables (the kernel shape and the nonlinearity must be readable from the
variables alone, because ``to_kernel(v)`` receives nothing else; both ride in
the *shapes* of zero-size arrays, which hold no parameters, are never changed
by a gradient step, and keep every variable a float array):

  adtn_gates: ``(M, Q-1, 2, 2, 2, 2)`` the gates, ``16 (Q-1) M`` parameters.
  adtn_scale: ``()`` a learned scalar (default) or ``(C_out,)`` per-output-
    channel scale multiplying the decoded tensor (1 or ``C_out`` parameters).
    With near-identity gates the network's output norm is ~1 whatever the
    kernel's norm; the scale absorbs the norm so the gates only shape it.
  adtn_shape: ``zeros((0, *kernel_shape))`` carries the kernel shape.
  adtn_nonlin: ``zeros((0, code))`` carries the nonlinearity,
    ``code = 1 + NONLINEARITIES.index(name)``, and ``zeros((0, code, 2))``
    the nonlinearity of a normalized decode (variables saved before the
    normalized decode existed have two axes and decode as before).
  bias: the layer's bias, unchanged.

Zero-size arrays pass through jit, grad, optax, Flax msgpack and pickle, but
orbax's ``StandardSave`` refuses them ("Cannot save arrays with zero size"):
a checkpoint writer must drop zero-size leaves and restore them from the
target tree (they carry no values).

The layer then runs as a dense layer/conv with the decoded kernel, so its
``flops`` are the dense MACs; the decode is reported separately by
:func:`decode_macs` (it does not depend on the batch).

Fitting gates to a kernel (what :func:`from_kernel` runs) is
:mod:`lowrank_jax.forms.adtn_fit`.

References:
  Qing, Li, Zhou, Ran, Compressing neural network by tensor network with
  exponentially fewer variational parameters, arXiv:2305.06058 (2023).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from lowrank_jax.forms import base

NAME = 'adtn'
KEYS = frozenset({'adtn_gates', 'adtn_scale', 'adtn_shape', 'adtn_nonlin'})
FACTORS = ()
SUPPORTS_GROUPS = True

NONLINEARITIES = {
    'relu': jax.nn.relu,
    'tanh': jnp.tanh,
    'identity': lambda x: x,
}
_NAMES = tuple(NONLINEARITIES)

# Consecutive gates of a layer applied as one operator (see the module doc).
BLOCK = 3


# ---------------------------------------------------------------------------
# Sizes and metadata.


def num_qubits(size: int) -> int:
  """``Q = max(2, ceil(log2 size))``: the smallest ``2^Q >= size`` (Q >= 2)."""
  if size < 1:
    raise ValueError(f'size must be >= 1, got {size}')
  return max(2, int(size - 1).bit_length())


def param_count(q: int, m: int, scale_size: int = 1) -> int:
  """Parameters of an ADTN: ``16 (Q-1) M`` gate entries plus the scale."""
  return 16 * (q - 1) * m + scale_size


def check_nonlinearity(name: str) -> str:
  """Returns ``name`` if it is a known nonlinearity, else raises ValueError."""
  if name not in NONLINEARITIES:
    raise ValueError(f'unknown nonlinearity {name!r}; known: '
                     f'{", ".join(_NAMES)}')
  return name


def kernel_shape(v) -> tuple[int, ...]:
  """The decoded kernel's shape, read from ``adtn_shape``."""
  return tuple(int(d) for d in v['adtn_shape'].shape[1:])


def nonlinearity(v) -> str:
  """The nonlinearity's name, read from ``adtn_nonlin``."""
  return _NAMES[int(v['adtn_nonlin'].shape[1]) - 1]


def depth(v) -> int:
  """Number of layers ``M``."""
  return int(v['adtn_gates'].shape[0])


def ranks(v):
  """``(M, Q)``: depth and number of qubits."""
  return (int(v['adtn_gates'].shape[0]), int(v['adtn_gates'].shape[1]) + 1)


def normalized(v) -> bool:
  """Whether the decode is normalized, read from ``adtn_nonlin``."""
  carrier = v['adtn_nonlin']
  return carrier.ndim == 3 and int(carrier.shape[2]) == 2


def metadata(shape: Sequence[int], nonlin: str, dtype=jnp.float32, *,
             normalize: bool = False) -> dict:
  """The zero-size carrier variables for a kernel shape, nonlinearity and
  decode (normalized or not)."""
  code = 1 + _NAMES.index(check_nonlinearity(nonlin))
  carrier = (0, code, 2) if normalize else (0, code)
  return {'adtn_shape': jnp.zeros((0, *shape), dtype),
          'adtn_nonlin': jnp.zeros(carrier, dtype)}


# ---------------------------------------------------------------------------
# Decoding.


def unit(x: jax.Array) -> jax.Array:
  """``x / ||x||`` (Euclidean norm over all entries); 0 stays 0.

  ``x`` is divided by its largest magnitude first, so the squares neither
  underflow (entries ~1e-20 in float32) nor overflow.
  """
  peak = jnp.max(jnp.abs(x))
  y = x / jnp.where(peak > 0, peak, 1)
  return y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y), 1))


def block_operator(gates: jax.Array) -> jax.Array:
  """The ``2^(k+1) x 2^(k+1)`` product of ``k`` consecutive staircase gates.

  Args:
    gates: ``(k, 4, 4)``, gate ``i`` acting on qubits ``(i, i+1)`` of the
      block's ``k + 1`` qubits, applied in order.

  Returns:
    ``G_{k-1} ... G_1 G_0`` on the ``k + 1`` qubits (row: output index,
    column: input index, qubit 0 the most significant bit).
  """
  k = gates.shape[0]
  n = 2 ** (k + 1)
  op = jnp.eye(n, dtype=gates.dtype)
  for i in range(k):
    cols = op.reshape(2 ** i, 4, 2 ** (k - 1 - i), n)
    op = jnp.einsum('ij,ajbn->aibn', gates[i], cols).reshape(n, n)
  return op


@functools.partial(jax.jit, static_argnames=('nonlin', 'normalize', 'block'))
def contract(gates: jax.Array, nonlin: str = 'relu', *,
             normalize: bool = False, block: int = BLOCK) -> jax.Array:
  """The network's output state: a flat ``(2^Q,)`` vector.

  Args:
    gates: ``(M, Q-1, 2, 2, 2, 2)``, ``gates[m, i][o_i, o_{i+1}, i_i,
      i_{i+1}]``.
    nonlin: the nonlinearity applied between layers.
    normalize: divide the state by its norm after every layer (the
      normalized decode's), so a product of ``M (Q-1)`` gates that grow or
      shrink never over- or underflows; with 'relu' or 'identity' (positively
      homogeneous) the state's direction is the same as without.
    block: gates per pass over the state in layers 1..M-1 (``BLOCK`` by
      default; 1: gate by gate). The same state up to round-off.

  Returns:
    ``(2^Q,)`` in the gates' dtype (at least float32), qubit 0 the most
    significant bit of the index.
  """
  act = NONLINEARITIES[check_nonlinearity(nonlin)]
  if block < 1:
    raise ValueError(f'block must be >= 1, got {block}')
  m_layers, q = gates.shape[0], gates.shape[1] + 1
  dtype = jnp.promote_types(gates.dtype, jnp.float32)
  gates = gates.astype(dtype)
  g = gates.reshape(m_layers, q - 1, 4, 4)
  # Layer 0 acts on the product state: when gate i runs, qubits i+1.. are
  # still |0>, so only the 2^(i+1) amplitudes of qubits 0..i are tracked.
  state = jnp.array([1.0, 0.0], dtype)                 # qubit 0
  for i in range(q - 1):
    # new[a, o_i, o_{i+1}] = sum_j G[o_i, o_{i+1}, j, 0] state[a, j]
    state = jnp.einsum('xyj,aj->axy', gates[0, i, :, :, :, 0],
                       state.reshape(-1, 2)).reshape(-1)
  for m in range(1, m_layers):
    state = act(unit(state) if normalize else state)
    for i, k in _blocks(q - 1, block):
      op = block_operator(g[m, i:i + k])
      s = state.reshape(2 ** i, 2 ** (k + 1), 2 ** (q - 1 - i - k))
      state = jnp.einsum('ij,ajb->aib', op, s).reshape(-1)
  return state


def _blocks(gates: int, block: int) -> list[tuple[int, int]]:
  """``(first gate, gates)`` of each block of a layer of ``gates`` gates."""
  return [(i, min(block, gates - i)) for i in range(0, gates, block)]


def decode(gates, scale, shape: Sequence[int], nonlin: str = 'relu', *,
           normalize: bool = False):
  """The kernel of shape ``shape`` encoded by ``gates`` and ``scale``.

  The first ``prod(shape)`` entries of the state (the rest is padding),
  divided by their norm if ``normalize`` (the state is also normalized
  after every layer then, see :func:`contract`), reshaped row-major, times
  ``scale`` (a scalar, or ``(C_out,)`` broadcast over the last axis).
  """
  n = math.prod(shape)
  state = contract(gates, nonlin, normalize=normalize, block=BLOCK)[:n]
  if normalize:
    state = unit(state)
  kernel = state.reshape(tuple(shape))
  return kernel * scale.astype(kernel.dtype)


def to_kernel(v):
  return decode(v['adtn_gates'], v['adtn_scale'], kernel_shape(v),
                nonlinearity(v), normalize=normalized(v))


def forward(v, x, spec: base.LayerSpec):
  kernel = to_kernel(v).astype(x.dtype)
  if spec.kind == 'conv':
    return base.conv(x, kernel, spec)
  return base.channel_matmul(x, kernel)


def flops(v, spec, in_shape, out_shape):
  """The dense layer's multiply-adds (decode cost: :func:`decode_macs`)."""
  del spec, in_shape
  shape = kernel_shape(v)
  return base.spatial(out_shape) * math.prod(shape)


def decode_macs(v) -> int:
  """Multiply-adds of one decode (gates, first layer's prefix, scale).

  Layer 0: ``sum_i 2^(i+1) * 4 = 8 (2^(Q-1) - 1)``; layers 1..M-1, per
  block of ``k`` gates (``BLOCK`` at most): ``2^(k+1) * 2^Q`` to apply it
  and ``4 k 4^(k+1)`` to build it (:func:`block_operator`); scale: ``N``; a
  normalized decode's norms: ``2^(Q+1)`` per layer after the first
  (squares, then the division) and ``N`` at the end (squares; the division
  folds into the scale).
  """
  m, q = ranks(v)
  return decode_cost(m, q, math.prod(kernel_shape(v)),
                     normalize=normalized(v))


def decode_cost(m: int, q: int, n: int, *, normalize: bool = False,
                block: int | None = None) -> int:
  """Decode multiply-adds of M layers on Q qubits keeping N entries, in
  blocks of ``block`` gates (default ``BLOCK``, as :func:`decode` runs)."""
  block = BLOCK if block is None else block
  norms = (m - 1) * 2 ** (q + 1) + n if normalize else 0
  per_layer = sum(2 ** (k + 1) * 2 ** q + 4 * k * 4 ** (k + 1)
                  for _, k in _blocks(q - 1, block))
  return 8 * (2 ** (q - 1) - 1) + (m - 1) * per_layer + n + norms


def from_kernel(kernel, ranks, **options):
  """ADTN variables fitted to ``kernel`` (options: :func:`adtn_fit.fit`).

  Args:
    kernel: the dense kernel.
    ranks: the depth ``M`` (an int or a 1-tuple).
    **options: passed to :func:`lowrank_jax.forms.adtn_fit.fit`.

  Returns:
    ``{'adtn_gates', 'adtn_scale', 'adtn_shape', 'adtn_nonlin'}``.
  """
  # The fit decodes with this module, so it imports it: not at the top.
  from lowrank_jax.forms import adtn_fit  # pylint: disable=g-import-not-at-top
  m = ranks[0] if isinstance(ranks, (tuple, list)) else ranks
  variables, _, _ = adtn_fit.fit(kernel, int(m), **options)
  return variables
