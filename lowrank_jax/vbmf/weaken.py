"""MUSCO's weakened ranks and minimum ranks.

:func:`weakened_rank` moves a mode's rank only part of the way from its
current size R to its EVBMF rank; :func:`min_rank_floors` gives each layer of
a network its floor (the MUSCO defaults, one int, or rules by path).

References:
  Gusak et al., Automated Multi-Stage Compression of Neural Networks (MUSCO),
  ICCV Workshops 2019 (weakened ranks, minimum ranks).
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
  from lowrank_jax.vbmf.network import _Layer

MinRank = Union[None, int, Mapping[str, int]]

# Default minimum ranks (MUSCO) by tree.kernel_kind: k x k convs and dense
# layers 8, 1x1 convs 2. The one table: rank_rules and the tool read it too.
DEFAULT_MIN_RANK = {'kxk': 8, '1x1': 2, 'dense': 8}
DEFAULT_MIN_RANK_KXK = DEFAULT_MIN_RANK['kxk']
DEFAULT_MIN_RANK_1X1 = DEFAULT_MIN_RANK['1x1']


def _check_weaken(weaken) -> float:
  """``weaken`` as a float in [0, 1]; ValueError otherwise."""
  try:
    w = float(weaken)
  except (TypeError, ValueError):
    raise ValueError(f'weaken must be a number in [0, 1], got {weaken!r}'
                     ) from None
  if not 0.0 <= w <= 1.0:
    raise ValueError(f'weaken must be in [0, 1] (1 = plain EVBMF, 0 = keep '
                     f'the current rank), got {weaken!r}')
  return w


def _check_min_rank(value, where='min_rank') -> int:
  """``value`` as a positive int (not a bool); ValueError naming ``where``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{where} must be a positive int, got {value!r}')
  if value <= 0:
    raise ValueError(f'{where} must be a positive int, got {value!r}')
  return int(value)


def weakened_rank(rank: int, vbmf_rank: int, *, weaken: float,
                  min_rank: int) -> int:
  """MUSCO's weakened VBMF rank of one mode.

  ``max(floor(R - w * (R - R_vbmf)), min_rank)``, clamped to at most R. An
  EVBMF rank of 0 (EVBMF found no signal) keeps R. The floor is taken with a
  1e-9 slack so that products like ``0.8 * 5`` that should be integers do not
  drop by one through rounding.

  Args:
    rank: R, the current size of the mode (>= 1).
    vbmf_rank: R_vbmf, the EVBMF rank of the mode (>= 0).
    weaken: w in [0, 1]: 1 gives the EVBMF rank, 0 keeps R.
    min_rank: the smallest rank allowed (>= 1; clamped to R).

  Returns:
    The new rank, an int in [min(min_rank, R), R].

  Raises:
    ValueError: weaken outside [0, 1], min_rank <= 0, rank < 1 or
      vbmf_rank < 0.

  References:
    Gusak et al., Automated Multi-Stage Compression of Neural Networks,
    ICCV Workshops 2019.
  """
  w = _check_weaken(weaken)
  min_rank = _check_min_rank(min_rank)
  rank, vbmf_rank = int(rank), int(vbmf_rank)
  if rank < 1:
    raise ValueError(f'rank must be >= 1, got {rank}')
  if vbmf_rank < 0:
    raise ValueError(f'vbmf_rank must be >= 0, got {vbmf_rank}')
  if vbmf_rank == 0:
    return rank
  new = math.floor(rank - w * (rank - vbmf_rank) + 1e-9)
  return min(max(new, min_rank), rank)


def min_rank_floors(kinds: Mapping[str, str], min_rank: MinRank, *,
                    all_paths: Sequence[str] | None = None) -> dict[str, int]:
  """Each layer's minimum rank under the one ``min_rank`` convention.

  Args:
    kinds: ``{path: kind}`` of the layers to resolve; kind is ``'kxk'``,
      ``'1x1'`` or ``'dense'`` (the key of :data:`DEFAULT_MIN_RANK`; any other
      kind gets the k x k default).
    min_rank: None (:data:`DEFAULT_MIN_RANK` by kind), one positive int for
      every layer, or ``{path regex: int}`` rules (first full match wins;
      unmatched layers get the default of their kind).
    all_paths: the paths every rule must match at least one of (default:
      those of ``kinds``).

  Returns:
    ``{path: minimum rank}`` (before clamping to a mode's size).

  Raises:
    ValueError: a value that is not a positive int, or a rule that matches
      no path.
  """
  def default(kind):
    return DEFAULT_MIN_RANK.get(kind, DEFAULT_MIN_RANK['kxk'])

  if min_rank is None:
    return {p: default(k) for p, k in kinds.items()}
  if isinstance(min_rank, Mapping):
    all_paths = list(kinds) if all_paths is None else list(all_paths)
    rules = [(str(k), _check_min_rank(v, f'min_rank[{k!r}]'))
             for k, v in min_rank.items()]
    for pattern, _ in rules:
      if not any(re.fullmatch(pattern, p) for p in all_paths):
        raise ValueError(f'min_rank rule {pattern!r} matches no layer path; '
                         f'paths: {all_paths[:8]}')
    return {p: next((v for pattern, v in rules if re.fullmatch(pattern, p)),
                    default(k)) for p, k in kinds.items()}
  value = _check_min_rank(min_rank)
  return {p: value for p in kinds}


def _min_ranks(chosen: Sequence[_Layer], all_paths: Sequence[str],
               min_rank: MinRank) -> dict[str, int]:
  """The minimum rank of each chosen layer (before clamping to R).

  ``layer.kind`` is the layer's :func:`lowrank_jax.tree.kernel_kind`, except
  for an SVD layer, whose plan is its R x R core: a matrix (default 8),
  whatever kernel the layer stands for.
  """
  return min_rank_floors({l.path: l.kind for l in chosen}, min_rank,
                         all_paths=all_paths)
