"""Choosing ranks: VBMF, weakened VBMF, or a network-wide compression target.

The ``params_ratio`` / ``flops_ratio`` rules hit a requested compression ratio
of the *whole network* (layers left dense included), not of each layer: every
selected layer keeps the same fraction ``f`` of each mode's size (clamped to
its minimum rank), and ``f`` is found by bisection so that the network's
parameter or multiply-add count is at most ``original / target``. A layer
whose split would not be smaller than its dense form stays dense.

The same solver answers the one-layer question, "the largest ranks whose
multiply-adds are at most dense / ratio" (:func:`rank_for_flop_ratio`, used by
the layer benchmarks): a network of one layer. Ranks come from the fraction
``f`` in one way only: ``ceil(f * size)`` per mode, clamped to the minimum
rank and the mode's size, optionally rounded up to a multiple.

Minimum ranks follow the library's one convention (as
:func:`lowrank_jax.vbmf_ranks`): None for the MUSCO defaults by layer kind
(``vbmf.weaken.DEFAULT_MIN_RANK``), one int, or ``{path regex: int}``.

Costs of hypothetical splits are computed from shapes alone (the forms'
``flops`` on ``jax.ShapeDtypeStruct`` variables), so no factor is built while
searching.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import jax

from lowrank_jax import counting
from lowrank_jax import forms
from lowrank_jax import tree
from lowrank_jax.forms import base
from lowrank_jax.vbmf import weaken

RULES = ('vbmf', 'weakened_vbmf', 'params_ratio', 'flops_ratio')


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


def mode_sizes(geom: LayerGeometry, form: str | None = None
               ) -> tuple[int, ...]:
  """The full size of each mode a rank of ``form`` applies to.

  ``form`` defaults to the one a layer of this kind is split into (Tucker-2
  for a k x k conv). Tucker-2: (C_in, C_out); SVD: min(rows, C_out) of the
  kernel as a matrix; CP: max(C_in, C_out) * kh * kw (its rank may pass the
  channel counts).
  """
  form = split_form(geom.kind) if form is None else form
  k = geom.kernel_shape
  if form == 'tucker2':
    return tuple(k[-2:])
  if form == 'cp':
    return (max(k[-2], k[-1]) * k[0] * k[1],)
  return (min(math.prod(k[:-1]), k[-1]),)


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


def min_rank_floors(geometry: Mapping[str, LayerGeometry],
                    min_rank: weaken.MinRank = None) -> dict[str, int]:
  """Each layer's minimum rank: :func:`lowrank_jax.vbmf.weaken.min_rank_floors`
  with the layers' kinds (rules must match a path of ``geometry``)."""
  return weaken.min_rank_floors({p: g.kind for p, g in geometry.items()},
                                min_rank)


def min_ranks_for(geom: LayerGeometry, floor: int, form: str | None = None
                  ) -> tuple[int, ...]:
  """Minimum rank of each mode of ``form``, never above the mode's size."""
  return tuple(min(int(floor), size) for size in mode_sizes(geom, form))


def shrinks(geom: LayerGeometry, ranks: Sequence[int], *,
            conv_form: str = 'tucker2') -> bool:
  """Whether splitting at ``ranks`` makes the layer smaller than it is now."""
  return split_cost(geom, ranks, conv_form=conv_form)[0] < geom.params


class _Solution(NamedTuple):
  """What :func:`_solve` found."""
  ranks: dict    # {path: ranks} of the layers worth splitting
  cost: int      # the network's params or multiply-adds at those ranks
  total: int     # ... before splitting
  budget: float  # total / target
  reached: bool  # cost <= budget (False: even the minimum ranks miss it)


def _solve(geometry, paths, *, metric, target, floors, conv_form,
           round_to) -> _Solution:
  """The largest common fraction ``f`` whose ranks meet the budget."""
  index = 0 if metric == 'params' else 1
  total = sum((g.params, g.macs)[index] for g in geometry.values())
  budget = total / target

  def plan(f):
    ranks, cost = {}, total
    for path in paths:
      g = geometry[path]
      form = split_form(g.kind, conv_form)
      lows = min_ranks_for(g, floors[path], form)
      r = tuple(max(lo, min(size, _round_up(math.ceil(f * size), round_to)))
                for size, lo in zip(mode_sizes(g, form), lows))
      new = split_cost(g, r, conv_form=conv_form)
      if new[0] < g.params:
        ranks[path] = r
        cost += new[index] - (g.params, g.macs)[index]
    return ranks, cost

  ranks, cost = plan(0.0)
  if cost > budget:
    return _Solution(ranks, cost, total, budget, False)
  lo, hi = 0.0, 1.0
  for _ in range(40):
    mid = (lo + hi) / 2
    if plan(mid)[1] <= budget:
      lo = mid
    else:
      hi = mid
  ranks, cost = plan(lo)
  return _Solution(ranks, cost, total, budget, True)


def ranks_for_ratio(geometry: Mapping[str, LayerGeometry], *, metric: str,
                    target: float, paths: Sequence[str] | None = None,
                    min_rank: weaken.MinRank = None,
                    conv_form: str = 'tucker2', round_to: int = 1
                    ) -> dict[str, tuple[int, ...]]:
  """Ranks that compress the whole network by ``target`` in params or FLOPs.

  Args:
    geometry: from :func:`layer_geometry` (layers in dense form).
    metric: 'params' or 'flops'.
    target: the ratio original / compressed to reach, > 1.
    paths: the layers that may be split (default: all).
    min_rank: None (defaults by layer kind), an int, or ``{path regex:
      int}`` (see :func:`lowrank_jax.vbmf.weaken.min_rank_floors`).
    conv_form: 'tucker2' or 'cp' for k x k convs ('svd' also works).
    round_to: round ranks up to a multiple of this (hardware-friendly).

  Returns:
    ``{path: ranks}`` for the layers worth splitting.

  Raises:
    ValueError: the target cannot be reached even at the minimum ranks
      (the message names the target, the minimum ranks by layer kind and the
      reachable ratio).
  """
  if metric not in ('params', 'flops'):
    raise ValueError(f"metric must be 'params' or 'flops', got {metric!r}")
  if not target > 1:
    raise ValueError(f'the target ratio must be > 1, got {target}')
  paths = list(geometry) if paths is None else list(paths)
  floors = min_rank_floors(geometry, min_rank)
  out = _solve(geometry, paths, metric=metric, target=target, floors=floors,
               conv_form=conv_form, round_to=round_to)
  if not out.reached:
    by_kind = {}
    for p in paths:
      kind = geometry[p].kind
      by_kind[kind] = min(by_kind.get(kind, floors[p]), floors[p])
    raise ValueError(
        f'target ratio {target} ({metric}) cannot be reached: at the '
        f'minimum ranks (by layer kind: {by_kind}) the network has '
        f'{out.cost:,} {metric} against a budget of {out.budget:,.0f}; the '
        f'reachable ratio is {out.total / out.cost:.2f}')
  return out.ranks


def rank_for_flop_ratio(form: str, kernel_shape: Sequence[int], ratio: float,
                        in_shape: Sequence[int], out_shape: Sequence[int],
                        spec: base.LayerSpec | None = None,
                        ) -> tuple[int, ...] | None:
  """The largest ranks of one layer whose multiply-adds are at most dense /
  ``ratio``: :func:`ranks_for_ratio`'s solver on a network of this layer
  alone, minimum rank 1.

  Tucker-2 ranks take the same fraction of C_in and C_out (each rounded up);
  SVD and CP have one rank.

  Args:
    form: 'tucker2', 'cp' (k x k convs) or 'svd' (any kernel).
    kernel_shape: the dense kernel, HWIO or (C_in, C_out).
    ratio: dense multiply-adds / split multiply-adds to reach at least.
    in_shape: the layer's input activation shape (any batch).
    out_shape: its output activation shape.
    spec: unused by these forms' counts (kept for callers that pass it).

  Returns:
    The ranks, or None if even rank 1 does not reach the ratio (or the
    split at the ranks that do would not have fewer parameters).
  """
  del spec  # The counts of tucker2 / cp / svd depend on shapes only.
  kernel_shape = tuple(kernel_shape)
  kind = tree.kernel_kind({'kernel': jax.ShapeDtypeStruct(kernel_shape,
                                                          'float32')})
  if split_form(kind, form) != form:
    raise ValueError(f'a {kind} kernel {kernel_shape} splits into '
                     f'{split_form(kind, form)!r}, not {form!r}')
  dense = {'kernel': jax.ShapeDtypeStruct(kernel_shape, 'float32')}
  geom = LayerGeometry('layer', kind, kernel_shape, tuple(in_shape),
                       tuple(out_shape), 'dense', math.prod(kernel_shape),
                       int(forms.get('dense').flops(dense, None, in_shape,
                                                    out_shape)), 0)
  out = _solve({'layer': geom}, ['layer'], metric='flops', target=ratio,
               floors={'layer': 1}, conv_form=form, round_to=1)
  return out.ranks.get('layer') if out.reached else None


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
