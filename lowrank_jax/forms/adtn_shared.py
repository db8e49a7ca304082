"""The shared-ADTN form: a layer whose kernel is a slice of one shared ADTN.

Several layers can share one ADTN (Qing et al. 2023 encode the two linear
layers of VGG-16 that way): their kernels, flattened row-major and
concatenated in tree order, are the first ``N = sum N_l`` entries of one
network's output (:mod:`lowrank_jax.forms.adtn`: same gates, same
contraction, same padding rule). The network's variables live once, at the
top of the params tree:

  ``params['adtn_shared'][group]``: ``adtn_gates`` (M, Q-1, 2, 2, 2, 2),
  ``adtn_scale`` (), ``adtn_size`` zeros((0, N)) (carries N) and
  ``adtn_nonlin`` zeros((0, code)) or, for a normalized decode (the N
  entries divided by their norm before the scale), zeros((0, code, 2)) (as
  in the ADTN form). These names match no
  form, so the group is not a layer of :func:`lowrank_jax.tree.layers`.

Each member layer holds:

  adtn_ref_scale: ``()`` a learned scalar multiplying its slice (members
    differ in norm; one parameter each).
  adtn_shape: ``zeros((0, *kernel_shape))`` carries the kernel shape.
  adtn_ref: ``zeros((0, g + 1, offset + 1))`` carries the group ``'g<g>'`` and
    the offset of the layer's first entry in the concatenation.
  bias: the layer's bias, unchanged.

The layer (:mod:`lowrank_jax.layers`) reads the group from the root of the
variables it is applied with (``SHARED = True``) and passes it here as
``v['adtn_group']``; XLA's common-subexpression elimination decodes a group
once per jitted step however many members it has, and gradients from every
member add up on the one set of gates. On its own a member has no kernel:
:func:`to_kernel` without ``adtn_group`` raises; use
:func:`lowrank_jax.adtn.adtn_unshare` to turn members back into dense layers
(for ``collapse``, VBMF or a split).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax.numpy as jnp

from lowrank_jax.forms import adtn
from lowrank_jax.forms import base

NAME = 'adtn_shared'
KEYS = frozenset({'adtn_ref_scale', 'adtn_shape', 'adtn_ref'})
FACTORS = ()
SUPPORTS_GROUPS = True
SHARED = True
ROOT = 'adtn_shared'          # top-level params entry holding the groups
GROUP_KEY = 'adtn_group'      # where the layer passes its group's variables
GROUP_KEYS = frozenset({'adtn_gates', 'adtn_scale', 'adtn_size',
                        'adtn_nonlin'})


def group_name(v) -> str:
  """The member's group, ``'g<index>'``, read from ``adtn_ref``."""
  return f'g{int(v["adtn_ref"].shape[1]) - 1}'


def offset(v) -> int:
  """The member's first entry in the group's concatenation."""
  return int(v['adtn_ref'].shape[2]) - 1


def kernel_shape(v) -> tuple[int, ...]:
  """The member's kernel shape, read from ``adtn_shape``."""
  return adtn.kernel_shape(v)


def member(shape: Sequence[int], group_index: int, start: int,
           dtype=jnp.float32) -> dict:
  """A member's variables (ref scale 1) for a kernel shape and slot."""
  return {'adtn_ref_scale': jnp.ones((), dtype),
          'adtn_shape': jnp.zeros((0, *shape), dtype),
          'adtn_ref': jnp.zeros((0, group_index + 1, start + 1), dtype)}


def group(gates, scale, size: int, nonlin: str, dtype=jnp.float32, *,
          normalize: bool = False) -> dict:
  """A group's variables: gates, scale and the carriers of N, the
  nonlinearity and the decode."""
  carrier = adtn.metadata((), nonlin, dtype, normalize=normalize)
  return {'adtn_gates': gates.astype(dtype), 'adtn_scale': scale.astype(dtype),
          'adtn_size': jnp.zeros((0, size), dtype),
          'adtn_nonlin': carrier['adtn_nonlin']}


def group_size(g) -> int:
  """N, the entries of all members together, read from ``adtn_size``."""
  return int(g['adtn_size'].shape[1])


def find_group(groups: Mapping, v, where: str = '') -> dict:
  """The group variables of member ``v`` among ``params[ROOT]``.

  Raises:
    ValueError: naming the layer and group when the tree lacks the group.
  """
  name = group_name(v)
  if name not in groups:
    raise ValueError(
        f'layer {where!r} is a member of shared ADTN group {name!r}, but the '
        f'params tree has no {ROOT}/{name} (groups present: '
        f'{sorted(groups) or "none"}); apply it with the whole tree')
  return dict(groups[name])


def decode_group(g) -> jnp.ndarray:
  """The group's first N decoded entries (flat, (N,)), times its scale
  (divided by their norm first in a normalized decode): the ADTN form's
  decode of an (N,) kernel."""
  return adtn.decode(g['adtn_gates'], g['adtn_scale'], (group_size(g),),
                     adtn.nonlinearity(g), normalize=adtn.normalized(g))


def decode_macs(g) -> int:
  """Multiply-adds of one decode of the group (see adtn.decode_cost)."""
  m, q = adtn.ranks(g)
  return adtn.decode_cost(m, q, group_size(g), normalize=adtn.normalized(g))


def slice_kernel(flat, v) -> jnp.ndarray:
  """The member's kernel from its group's decoded entries."""
  shape = kernel_shape(v)
  start = offset(v)
  w = flat[start:start + math.prod(shape)].reshape(shape)
  return w * v['adtn_ref_scale'].astype(w.dtype)


def to_kernel(v):
  """The member's kernel; ``v`` must carry its group under ``GROUP_KEY``."""
  if GROUP_KEY not in v:
    raise ValueError(
        f'a shared-ADTN member (group {group_name(v)!r}) has no kernel on its '
        'own: use lowrank_jax.adtn_unshare(params) to make members dense '
        'first')
  return slice_kernel(decode_group(v[GROUP_KEY]), v)


def forward(v, x, spec: base.LayerSpec):
  kernel = to_kernel(v).astype(x.dtype)
  if spec.kind == 'conv':
    return base.conv(x, kernel, spec)
  return base.channel_matmul(x, kernel)


def ranks(v):
  """``()``: a member's depth and qubits are its group's."""
  del v
  return ()


def flops(v, spec, in_shape, out_shape):
  """The dense layer's multiply-adds (the group's decode is counted apart)."""
  del spec, in_shape
  return base.spatial(out_shape) * math.prod(kernel_shape(v))


def from_kernel(kernel, ranks, **options):
  """Not available: members come from ``adtn_encode(..., share=True)``."""
  del kernel, ranks, options
  raise ValueError('shared-ADTN members are made by '
                   'lowrank_jax.adtn_encode(..., share=True), which fits one '
                   'network to several kernels; a single kernel cannot be '
                   'split into this form')
