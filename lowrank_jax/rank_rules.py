"""Choosing ranks: VBMF, weakened VBMF, or a network-wide compression target.

The ``params_ratio`` / ``flops_ratio`` rules hit a requested compression ratio
of the *whole network* (layers left dense included), not of each layer: every
selected layer keeps the same fraction ``f`` of each mode's size (clamped to
its minimum rank), and ``f`` is found by bisection so that the network's
parameter or multiply-add count is at most ``original / target``. A layer
whose split would not be smaller than its dense form stays dense.

Costs of hypothetical splits are computed from shapes alone (the forms'
``flops`` on ``jax.ShapeDtypeStruct`` variables), so no factor is built while
searching.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence


from lowrank_jax import counting
from lowrank_jax import forms
from lowrank_jax import tree

RULES = ('vbmf', 'weakened_vbmf', 'params_ratio', 'flops_ratio')
DEFAULT_MIN_RANK = {'kxk': 8, '1x1': 2, 'dense': 8}


class LayerGeometry(NamedTuple):
  """Shapes that decide a layer's costs.

  Attributes:
    path: '/'-joined layer path.
    kind: 'kxk' (k x k conv), '1x1' (1x1 conv) or 'dense'.
    kernel_shape: the dense kernel's shape, HWIO or (C_in, C_out).
    in_shape: the layer's input activation shape (batch 1).
    out_shape: its output activation shape.
    form: its current form.
    params: its current parameter count (bias included).
    macs: its current multiply-adds.
    bias: the size of its bias (0 without one).
  """
  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  form: str
  params: int
  macs: int
  bias: int


def layer_geometry(model, variables, input_shape: Sequence[int]
                   ) -> dict[str, LayerGeometry]:
  """Geometry of every project layer, from one shape-only trace.

  Args:
    model: the Flax model.
    variables: its variables (any forms; shapes suffice).
    input_shape: e.g. (1, 28, 28, 1).
  """
  params, _ = tree.split_variables(variables)
  flops = counting.count_flops(model, variables,
                               (1,) + tuple(input_shape[1:]), train=False)
  _, counts = counting.count_params(params, report=True)
  out = {}
  for path, v in tree.layers(params).items():
    if path not in flops.per_layer:
      continue  # A layer the forward pass never calls.
    record = flops.per_layer[path]
    kind = tree.kernel_kind(v)
    if kind == 'other':
      continue  # A 1-D / 3-D conv: no form splits it.
    bias = v.get('bias')
    out[path] = LayerGeometry(path, kind, tree.kernel_shape(v),
                              record.in_shape, record.out_shape, record.form,
                              counts[path], record.macs,
                              0 if bias is None else math.prod(bias.shape))
  return out


def mode_sizes(geom: LayerGeometry) -> tuple[int, ...]:
  """The full size of each mode a rank applies to."""
  if geom.kind == 'kxk':
    return geom.kernel_shape[-2:]
  return (min(math.prod(geom.kernel_shape[:-1]), geom.kernel_shape[-1]),)


def split_form(kind: str, conv_form: str = 'tucker2') -> str:
  """The form a layer of this kind is split into."""
  return conv_form if kind == 'kxk' else 'svd'


def split_cost(geom: LayerGeometry, ranks: Sequence[int], *,
               conv_form: str = 'tucker2') -> tuple[int, int]:
  """(params, multiply-adds) of the layer split at ``ranks`` (bias kept)."""
  form = split_form(geom.kind, conv_form)
  v = forms.stand_in(form, geom.kernel_shape,
                     ranks if form == 'tucker2' else ranks[:1])
  params = sum(x.size for x in v.values()) + geom.bias
  macs = forms.get(form).flops(v, None, geom.in_shape, geom.out_shape)
  return int(params), int(macs)


def min_ranks_for(geom: LayerGeometry, min_rank: Mapping[str, int]
                  ) -> tuple[int, ...]:
  """Minimum rank of each mode, never above the mode's size."""
  floor = int(min_rank.get(geom.kind, 1))
  return tuple(min(floor, size) for size in mode_sizes(geom))


def shrinks(geom: LayerGeometry, ranks: Sequence[int], *,
            conv_form: str = 'tucker2') -> bool:
  """Whether splitting at ``ranks`` makes the layer smaller than it is now."""
  return split_cost(geom, ranks, conv_form=conv_form)[0] < geom.params


def ranks_for_ratio(geometry: Mapping[str, LayerGeometry], *, metric: str,
                    target: float, paths: Sequence[str] | None = None,
                    min_rank: Mapping[str, int] = DEFAULT_MIN_RANK,
                    conv_form: str = 'tucker2', round_to: int = 1
                    ) -> dict[str, tuple[int, ...]]:
  """Ranks that compress the whole network by ``target`` in params or FLOPs.

  Args:
    geometry: from :func:`layer_geometry` (layers in dense form).
    metric: 'params' or 'flops'.
    target: the ratio original / compressed to reach, > 1.
    paths: the layers that may be split (default: all).
    min_rank: minimum rank per layer kind ('kxk', '1x1', 'dense').
    conv_form: 'tucker2' or 'cp' for k x k convs.
    round_to: round ranks up to a multiple of this (hardware-friendly).

  Returns:
    ``{path: ranks}`` for the layers worth splitting.

  Raises:
    ValueError: the target cannot be reached even at the minimum ranks
      (the message names ``compress.target_ratio`` and ``compress.min_rank``).
  """
  if metric not in ('params', 'flops'):
    raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}")
  if not target > 1:
    raise ValueError(f'compress.target_ratio must be > 1, got {target}')
  paths = list(geometry) if paths is None else list(paths)
  index = 0 if metric == 'params' else 1
  total = sum((g.params, g.macs)[index] for g in geometry.values())
  budget = total / target

  def plan(f):
    ranks, cost = {}, total
    for path in paths:
      g = geometry[path]
      lows = min_ranks_for(g, min_rank)
      r = tuple(max(lo, min(size, _round_up(math.ceil(f * size), round_to)))
                for size, lo in zip(mode_sizes(g), lows))
      if conv_form == 'cp' and g.kind == 'kxk':
        r = r[:1]
      new = split_cost(g, r, conv_form=conv_form)
      if new[0] < g.params:
        ranks[path] = r
        cost += new[index] - (g.params, g.macs)[index]
    return ranks, cost

  ranks, cost = plan(0.0)
  if cost > budget:
    raise ValueError(
        f'compress.target_ratio={target} ({metric}) cannot be reached: at the '
        f'minimum ranks (compress.min_rank={dict(min_rank)}) the network has '
        f'{cost:,} {metric} against a budget of {budget:,.0f}; the reachable '
        f'ratio is {total / cost:.2f}')
  lo, hi = 0.0, 1.0
  for _ in range(40):
    mid = (lo + hi) / 2
    if plan(mid)[1] <= budget:
      lo = mid
    else:
      hi = mid
  return plan(lo)[0]


def _round_up(r: int, multiple: int) -> int:
  return r if multiple <= 1 else multiple * math.ceil(r / multiple)


def network_cost(geometry: Mapping[str, LayerGeometry],
                 ranks: Mapping[str, Sequence[int]], *,
                 conv_form: str = 'tucker2') -> tuple[int, int]:
  """(params, multiply-adds) of the project layers after splitting at ranks."""
  params = macs = 0
  for path, g in geometry.items():
    if path in ranks:
      p, m = split_cost(g, ranks[path], conv_form=conv_form)
    else:
      p, m = g.params, g.macs
    params, macs = params + p, macs + m
  return params, macs
