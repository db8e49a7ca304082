"""Registry of layer forms: every decomposition plugs in here as one module.

A form module defines:

* ``NAME``: its registry name.
* ``KEYS``: the variable names (besides ``bias``) that identify it.
* ``FACTORS``: the variables that are factor matrices (for the orthogonality
  penalty; leading axes are flattened, the last kept).
* ``SUPPORTS_GROUPS``: whether it can run a grouped conv.
* ``forward(v, x, spec)``: the layer's output without bias.
* ``to_kernel(v)``: the equivalent dense kernel (HWIO, or (C_in, C_out)).
* optionally ``kernel_shape(v)``: that kernel's shape, read from the
  variables' shapes (else ``jax.eval_shape`` of ``to_kernel``).
* ``from_kernel(kernel, ranks, **options)``: variables of this form.
* ``ranks(v)``: its ranks as a tuple of ints, read from shapes.
* ``flops(v, spec, in_shape, out_shape)``: multiply-adds for one call.
* optionally ``refine(v, ranks, **options)``: re-compress a layer already in
  this form without going through the dense kernel (Tucker-2 by its core).
* optionally ``SHARED = True`` with ``ROOT``, ``find_group(params[ROOT], v,
  path)`` and
  ``GROUP_KEY``: the layer also reads variables shared by several layers
  from the top of the params tree (:mod:`lowrank_jax.forms.adtn_shared`).

Adding a decomposition is adding a module and one ``register`` call.
"""

from __future__ import annotations

import types
from typing import Iterable

import jax
import jax.numpy as jnp

from lowrank_jax.forms import adtn
from lowrank_jax.forms import adtn_fit
from lowrank_jax.forms import adtn_shared
from lowrank_jax.forms import base
from lowrank_jax.forms import cp
from lowrank_jax.forms import dense
from lowrank_jax.forms import overparam
from lowrank_jax.forms import svd
from lowrank_jax.forms import tucker2
from lowrank_jax.forms.base import LayerSpec

FORMS: dict[str, types.ModuleType] = {}
_BY_KEYS: dict[frozenset, str] = {}


def register(module: types.ModuleType) -> types.ModuleType:
  """Adds a form module to the registry (its KEYS must be new)."""
  keys = frozenset(module.KEYS)
  if keys in _BY_KEYS and _BY_KEYS[keys] != module.NAME:
    raise ValueError(f'form {module.NAME!r} has the same variables as '
                     f'{_BY_KEYS[keys]!r}: {sorted(keys)}')
  FORMS[module.NAME] = module
  _BY_KEYS[keys] = module.NAME
  return module


for _m in (dense, tucker2, svd, cp, overparam, adtn, adtn_shared):
  register(_m)


def identify(names: Iterable[str], *, strict: bool = True) -> str | None:
  """The form whose variables are exactly ``names`` (``bias`` aside).

  Args:
    names: variable names held by a layer.
    strict: raise ValueError instead of returning None when nothing matches.
  """
  keys = frozenset(names) - {'bias'}
  name = _BY_KEYS.get(keys)
  if name is None and strict:
    raise ValueError(
        f'variables {sorted(names)} match no registered form; known forms: '
        + ', '.join(f'{n} {sorted(m.KEYS)}' for n, m in FORMS.items()))
  return name


def get(name: str) -> types.ModuleType:
  """The form module registered as ``name``."""
  if name not in FORMS:
    raise ValueError(f'unknown form {name!r}; known: {sorted(FORMS)}')
  return FORMS[name]


def of(variables) -> types.ModuleType:
  """The form module of a layer's variables."""
  return FORMS[identify(variables.keys())]


def to_kernel(variables):
  """The dense kernel equivalent to a layer's variables, whatever its form."""
  return of(variables).to_kernel(variables)


def stand_in(name: str, kernel_shape, ranks=()) -> dict:
  """Zero-cost ``jax.ShapeDtypeStruct`` variables of a layer in form ``name``.

  For counting parameters and multiply-adds of a split before making it.

  Args:
    name: ``'dense'``, ``'tucker2'``, ``'svd'`` or ``'cp'``.
    kernel_shape: the dense kernel's shape, HWIO or (C_in, C_out).
    ranks: the form's ranks (``(R_in, R_out)`` or ``(R,)``).
  """
  s = lambda *shape: jax.ShapeDtypeStruct(tuple(int(d) for d in shape),
                                          jnp.float32)
  kernel_shape = tuple(kernel_shape)
  if name == 'dense':
    return {'kernel': s(*kernel_shape)}
  if name == 'tucker2':
    kh, kw, c_in, c_out = kernel_shape
    r_in, r_out = ranks
    return {'u_in': s(c_in, r_in), 'core': s(kh, kw, r_in, r_out),
            'u_out': s(r_out, c_out)}
  if name == 'svd':
    (r,) = ranks
    return {'u': s(*kernel_shape[:-1], r), 'v': s(r, kernel_shape[-1])}
  if name == 'cp':
    kh, kw, c_in, c_out = kernel_shape
    (r,) = ranks
    return {'cp_in': s(c_in, r), 'cp_h': s(kh, r), 'cp_w': s(kw, r),
            'cp_out': s(r, c_out)}
  raise ValueError(f'no stand-in for form {name!r}')


__all__ = ['FORMS', 'LayerSpec', 'base', 'get', 'identify', 'of', 'register',
           'stand_in', 'to_kernel']
