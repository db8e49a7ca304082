"""The orthogonality penalty on factor matrices (He et al. 2024)."""

from __future__ import annotations

from typing import Callable, Union

import jax.numpy as jnp

from lowrank_jax import forms
from lowrank_jax import tree


def factor_orthogonality(f) -> jnp.ndarray:
  """``||G - I||_F^2 / k`` for the narrow-side Gram matrix G of a factor.

  Args:
    f: a factor, (..., n); leading axes are flattened to m rows.

  Returns:
    A scalar: 0 iff the narrow side is orthonormal (rows if m <= n, columns
    otherwise); divided by k = min(m, n) so its size does not grow with width.
  """
  mat = forms.base.as_matrix(f).astype(jnp.float32)
  m, n = mat.shape
  gram = mat @ mat.T if m <= n else mat.T @ mat
  k = min(m, n)
  return jnp.sum((gram - jnp.eye(k, dtype=gram.dtype)) ** 2) / k


def orthogonal_penalty(variables, *,
                       select: Union[None, str, list,
                                     Callable[[str], bool]] = None):
  """Sum over factor matrices of ``||F^T F - I||_F^2``, narrow side, per width.

  Every form declares its factor matrices (``FACTORS``): ``op_in``/``op_out``
  of over-parameterized layers, ``u_in``/``u_out`` of Tucker-2 layers, ``u``/
  ``v`` of SVD layers, ``cp_in``/``cp_out`` of CP layers. Dense layers add 0.
  Jittable and differentiable; the train step adds ``weight * penalty``.

  Args:
    variables: variables dict, bare params tree or ``nnx.Module``.
    select: which layers count: None (all), selection rules (regexes, see
      :func:`lowrank_jax.tree.select_paths`), or ``f(path) -> bool``.

  Returns:
    A float32 scalar.

  References:
    He, Jiang, Wu, arXiv:2408.16289 (2024); Bansal et al., Can We Gain More
    from Orthogonality Regularizations in Training Deep CNNs?, NeurIPS 2018.
  """
  params, _ = tree.split_variables(variables)
  layers = tree.layers(params)
  if select is None:
    paths = list(layers)
  elif callable(select):
    paths = [p for p in layers if select(p)]
  else:
    paths = tree.select_paths(layers, select)
  total = jnp.zeros((), jnp.float32)
  for path in paths:
    variables = layers[path]
    for name in forms.of(variables).FACTORS:
      total = total + factor_orthogonality(variables[name])
  return total
