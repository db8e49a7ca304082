"""The public pure transforms of parameter trees.

Each transform selects layers by '/'-joined path rules (first match wins; see
:func:`lowrank_jax.tree.select_paths`), calls the target form's builder per
layer and returns a new tree; the input is never modified. The same model
object runs the result with ``model.apply``.

Behaviour on mixed trees (documented, tested):

* ``tucker2_split`` of a Tucker-2 layer re-compresses its core and composes
  the outer factors (MUSCO); of any other form it first merges to the dense
  kernel.
* ``svd_split`` / ``cp_split`` of a non-dense layer merge it first.
* Layers a transform cannot take (a 1x1 conv for Tucker-2, a dense layer for
  CP, a k x k conv for SVD unless asked) are skipped with a reason in the
  report when matched by the selection.
* Ranks are validated per layer: errors name the layer, the mode and the
  bound.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import numpy as np

from lowrank_jax import forms
from lowrank_jax import tree

Ranks = Union[int, tuple[int, ...], Mapping[str, Any],
              Callable[[str, dict], Any]]


class LayerAction(NamedTuple):
  """What a transform did to one selected layer."""
  path: str
  action: str              # 'split', 'merged', 'folded', 'skipped'
  form_before: str
  form_after: str
  ranks: tuple[int, ...]   # ranks after (empty for dense)
  reason: str = ''


_kind = tree.kernel_kind


def _ranks_for(ranks: Ranks, path: str, variables) -> tuple[int, ...]:
  if callable(ranks) and not isinstance(ranks, Mapping):
    ranks = ranks(path, variables)
  elif isinstance(ranks, Mapping):
    ranks = ranks[path]
  if _is_int(ranks):
    ranks = (ranks,)
  if not isinstance(ranks, (tuple, list)) or not all(map(_is_int, ranks)):
    raise TypeError(f'layer {path!r}: ranks must be ints (or a tuple of '
                    f'ints), got {ranks!r}')
  return tuple(int(r) for r in ranks)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def _check_ranks(path, ranks, bounds, names):
  if len(ranks) == 1 and len(bounds) > 1:
    ranks = ranks * len(bounds)
  if len(ranks) != len(bounds):
    raise ValueError(f'layer {path!r}: expected {len(bounds)} ranks '
                     f'({", ".join(names)}), got {ranks}')
  for r, bound, name in zip(ranks, bounds, names):
    if r < 1:
      raise ValueError(f'layer {path!r}: rank {name}={r} must be >= 1')
    if bound is not None and r > bound:
      raise ValueError(f'layer {path!r}: rank {name}={r} exceeds its '
                       f'dimension {bound}')
  return ranks


def _apply(params, ranks, *, select, eligible, build, report, done=None):
  params, rebuild = tree.split_variables(params)
  all_layers = tree.layers(params)
  if isinstance(ranks, Mapping):
    missing = [p for p in ranks if p not in all_layers]
    if missing:
      raise KeyError(f'ranks name no layer at {missing}; close paths: '
                     f'{tree._close(missing[0], all_layers)}')
    if select is None:
      select = [tree.exact(p) for p in ranks]
  chosen = tree.select_paths(all_layers, select)
  new, actions = {}, []
  for path in chosen:
    variables = all_layers[path]
    before = forms.identify(variables)
    reason = eligible(path, variables)
    if reason and isinstance(ranks, Mapping) and path in ranks:
      raise ValueError(f'ranks given for layer {path!r}, which this '
                       f'transform cannot split: {reason} (lj.decompose '
                       'picks the transform by the rank tuple)')
    if reason:
      actions.append(LayerAction(path, 'skipped', before, before,
                                 forms.get(before).ranks(variables), reason))
      continue
    if isinstance(ranks, Mapping) and path not in ranks:
      actions.append(LayerAction(path, 'skipped', before, before,
                                 forms.get(before).ranks(variables),
                                 'no ranks given for this layer'))
      continue
    if ranks is not None:
      _ranks_for(ranks, path, variables)   # type errors before any work
    tree.check_finite(path, variables)
    out = build(path, variables)
    if 'bias' in variables:
      out['bias'] = variables['bias']
    after = forms.identify(out)
    new[path] = out
    actions.append(LayerAction(
        path, done or ('split' if after != 'dense' else 'merged'), before,
        after, forms.get(after).ranks(out)))
  result = rebuild(tree.replace_layers(params, new))
  return (result, actions) if report else result




def _factorize(form_name: str, kinds: tuple[str, ...], mode_names, bounds_of,
               options: Mapping[str, Any]):
  """Shared builder of split transforms: merge or refine, then decompose."""
  target = forms.get(form_name)

  def eligible(path, variables):
    kind = _kind(variables)
    if kind not in kinds:
      what = ('a 1-D or 3-D conv' if kind == 'other' else f'a {kind} layer')
      return f'{form_name} takes {" or ".join(kinds)} layers; this is {what}'

    return ''

  def build(path, variables, ranks):
    current = forms.identify(variables)
    if current == form_name and hasattr(target, 'refine'):
      bounds = target.ranks(variables)
      ranks = _check_ranks(path, ranks, bounds, mode_names)
      return target.refine(variables, ranks, **options)
    kernel = forms.to_kernel(variables)
    ranks = _check_ranks(path, ranks, bounds_of(kernel.shape), mode_names)
    return target.from_kernel(kernel, ranks, **options)

  return eligible, build


def tucker2_split(params, ranks: Ranks, *, select=None,
                  hooi_iters: int = 100, report: bool = False):
  """Splits k x k convs into 1x1 -> k x k -> 1x1 (Tucker-2).

  Args:
    params: variables dict or bare params tree (not modified).
    ranks: ``(R_in, R_out)`` for all, an int for both, ``{path: ranks}``
      (e.g. from :func:`lowrank_jax.vbmf_ranks`) or ``f(path, variables)``.
    select: layer selection rules (default: all k x k convs, or the paths of
      a ranks dict).
    hooi_iters: most HOOI sweeps from the HOSVD start; HOOI stops earlier
      when a sweep lowers the relative error by at most 1e-5 (at most
      TensorLy ``partial_tucker``'s error). 0: plain HOSVD. A layer already
      in Tucker-2 form has its core split the same way (MUSCO).
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree (and the report). Split convs hold ``u_in`` (C_in, R_in),
    ``core`` (kh, kw, R_in, R_out), ``u_out`` (R_out, C_out).
  """
  eligible, build = _factorize(
      'tucker2', ('kxk',), ('R_in', 'R_out'), lambda s: (s[2], s[3]),
      {'hooi_iters': hooi_iters})
  return _apply(params, ranks, select=select, eligible=eligible,
                build=lambda p, v: build(p, v, _ranks_for(ranks, p, v)),
                report=report)


def svd_split(params, ranks: Ranks, *, select=None, allow_kxk: bool = False,
              report: bool = False):
  """Splits dense layers and 1x1 convs into two factors (sqrt(S) each side).

  Args:
    params: variables dict or bare params tree (not modified).
    ranks: ``R`` for all, ``{path: R or (R,)}`` or ``f(path, variables)``.
    select: layer selection rules (default: all dense layers and 1x1 convs).
    allow_kxk: also split k x k convs through their C_out unfolding.
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree (and the report): ``u`` (C_in, R) or (kh, kw, C_in, R),
    ``v`` (R, C_out).
  """
  kinds = ('dense', '1x1', 'kxk') if allow_kxk else ('dense', '1x1')
  eligible, build = _factorize(
      'svd', kinds, ('R',), lambda s: (min(math.prod(s[:-1]), s[-1]),), {})
  return _apply(params, ranks, select=select, eligible=eligible,
                build=lambda p, v: build(p, v, _ranks_for(ranks, p, v)),
                report=report)


def cp_split(params, ranks: Ranks, *, select=None, als_iters: int = 50,
             report: bool = False):
  """Splits k x k convs into CP form (1x1, depthwise kh x 1, 1 x kw, 1x1).

  Args:
    params: variables dict or bare params tree (not modified).
    ranks: ``R`` for all, ``{path: R}`` or ``f(path, variables)``.
    select: layer selection rules (default: all k x k convs).
    als_iters: ALS sweeps.
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree (and the report).
  """
  eligible, build = _factorize('cp', ('kxk',), ('R',), lambda s: (None,),
                               {'als_iters': als_iters})
  return _apply(params, ranks, select=select, eligible=eligible,
                build=lambda p, v: build(p, v, _ranks_for(ranks, p, v)),
                report=report)


def overparameterize(params, *, select=None, expansion: float = 1.0,
                     key: jax.Array | None = None, report: bool = False):
  """Expresses convs as exact products of wider factors (He et al. 2024).

  Each selected dense-form layer with kernel W becomes ``op_in`` (C_in, R_in),
  ``op_core`` (kh, kw, R_in, R_out), ``op_out`` (R_out, C_out) with
  ``R = ceil(C * expansion)`` and product exactly W, so the network computes
  the same function at the moment of the transform.

  Args:
    params: variables dict or bare params tree (not modified).
    select: layer rules (default: every conv; dense layers when selected).
    expansion: inner width factor, >= 1.
    key: PRNG key for the random orthonormal factors (required).
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree (and the report).
  """
  if not expansion >= 1.0:
    raise ValueError(f'expansion must be >= 1, got {expansion}')
  if key is None:
    raise TypeError('overparameterize needs key=jax.random.PRNGKey(seed): '
                    'the random orthonormal factors are drawn from it')
  target = forms.get('overparam')
  index = {}

  def eligible(path, variables):
    if forms.identify(variables) != 'dense':
      return f'already in form {forms.identify(variables)!r}'
    if _kind(variables) == 'other':
      return 'a 1-D or 3-D conv: only 2-D convs and dense layers take factors'
    if select is None and _kind(variables) == 'dense':
      return 'dense layers are over-parameterized only when selected'
    return ''

  def build(path, variables):
    kernel = variables['kernel']
    ranks = tuple(math.ceil(c * expansion) for c in kernel.shape[-2:])
    index[path] = len(index)
    return target.from_kernel(kernel, ranks,
                              key=jax.random.fold_in(key, index[path]))

  return _apply(params, None, select=select, eligible=eligible, build=build,
                report=report)


def collapse(params, *, select=None, report: bool = False):
  """Merges factored layers back into dense kernels (exactly).

  Args:
    params: variables dict or bare params tree (not modified).
    select: layer rules (default: every layer not in dense form).
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree (and the report).
  """
  def eligible(path, variables):
    return 'already dense' if forms.identify(variables) == 'dense' else ''

  def build(path, variables):
    return {'kernel': forms.to_kernel(variables)}

  return _apply(params, None, select=select, eligible=eligible, build=build,
                report=report)


# XLA:CPU (jax 0.10.2) hands a 3x3 conv to its YNNPACK fusions when either
# side has more than this many channels: 17 -> 17 went in, 16 -> 16 did not
# (bench/bench_efficiency_where.py). A Tucker-2 core this small is left to
# XLA's own conv emitter and cuts the network's YNN fusion in pieces.
FOLD_MAX_CHANNELS = 16


def fold_cores(variables, *, max_channels: int = FOLD_MAX_CHANNELS,
               select=None, report: bool = False):
  """Folds small Tucker-2 cores into their input factor (exactly).

  A Tucker-2 layer whose core has at most ``max_channels`` channels on its
  wider side becomes the two-stage SVD form of a k x k conv: ``u = u_in .
  core`` (kh, kw, C_in, R_out), a k x k conv with the layer's strides,
  padding and dilation, then ``v = u_out`` (R_out, C_out), a 1x1. The
  network computes the same function with more parameters and multiply-adds
  (``count_params`` / ``count_flops`` show them), but on XLA:CPU the k x k
  conv joins YNNPACK's fusions: vgg16 with quarter-rank splits ran 1.29x
  faster, resnet18 7% slower (docs/benchmarks_efficiency.md), so whether it
  pays is a property of the network: :func:`lowrank_jax.fastest_network`
  measures it.

  Args:
    variables: variables dict, params tree or ``nnx.Module`` (not modified).
    max_channels: fold cores with ``max(R_in, R_out) <= max_channels``.
    select: layer rules (default: every layer; those that are not Tucker-2
      or whose core is wider are skipped, with the reason in the report).
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree or module (and the report).

  Raises:
    ValueError: ``max_channels`` < 1 (it would fold nothing, silently).
  """
  if max_channels < 1:
    raise ValueError(f'fold_cores: max_channels={max_channels} must be >= 1 '
                     '(a core has at least one channel)')
  tucker2 = forms.get('tucker2')

  def eligible(path, v):
    if forms.identify(v) != 'tucker2':
      return f'in form {forms.identify(v)!r}, not Tucker-2'
    if max(tucker2.ranks(v)) > max_channels:
      return (f'core {tucker2.ranks(v)} is wider than max_channels='
              f'{max_channels}')
    return ''

  def build(path, v):
    return {'u': tucker2.fold_in_kernel(v, jax.lax.Precision.HIGHEST),
            'v': v['u_out']}

  return _apply(variables, None, select=select, eligible=eligible,
                build=build, report=report, done='folded')


def decompose(variables, ranks: Mapping[str, Any], *,
              conv_form: str = 'tucker2', hooi_iters: int = 100,
              keep_larger: bool = False, report: bool = False):
  """Splits each layer named in ``ranks``, by the shape of its rank tuple.

  ``(R_in, R_out)`` splits a k x k conv by Tucker-2 (a layer already in
  Tucker-2 form is re-compressed by its core, as in MUSCO); ``(R,)`` splits a
  dense layer or 1x1 conv by SVD, and a k x k conv by CP when
  ``conv_form='cp'``. The output of :func:`lowrank_jax.vbmf_ranks` goes in
  as it is.

  Args:
    variables: variables dict, params tree or ``nnx.Module`` (not modified).
    ranks: ``{path: ranks tuple}``.
    conv_form: ``'tucker2'`` or ``'cp'``, for k x k convs.
    hooi_iters: most HOOI sweeps of the Tucker-2 splits (to a 1e-5
      tolerance, as in :func:`tucker2_split`); 0: plain HOSVD.
    keep_larger: also split a layer whose split would have at least as many
      parameters as it has now (by default it is kept as it is, and the
      report says why).
    report: also return a list of :class:`LayerAction`.

  Returns:
    The new tree or module (and the report).
  """
  if conv_form not in ('tucker2', 'cp'):
    raise ValueError(f"conv_form must be 'tucker2' or 'cp', got {conv_form!r}")
  params, _ = tree.split_variables(variables)
  layers = tree.layers(params)
  missing = [p for p in ranks if p not in layers]
  if missing:
    raise KeyError(f'ranks name no conv or dense layer at {missing}; close '
                   f'paths: {tree._close(missing[0], layers)}')  # pylint: disable=protected-access
  groups, kept = {'tucker2': {}, 'cp': {}, 'svd': {}}, []
  for path, r in ranks.items():
    r = _ranks_for(ranks, path, layers[path])
    form = _decompose_form(path, tree.kernel_kind(layers[path]), r, conv_form)
    if not keep_larger and not _smaller(layers[path], form, r):
      kept.append(LayerAction(path, 'skipped', forms.identify(layers[path]),
                              forms.identify(layers[path]), (),
                              'a split at these ranks would not be smaller'))
      continue
    groups[form][path] = r
  actions = list(kept)
  out = variables
  for form, split in (('tucker2', tucker2_split), ('cp', cp_split),
                      ('svd', svd_split)):
    if groups[form]:
      options = {'hooi_iters': hooi_iters} if form == 'tucker2' else {}
      if form == 'svd':
        options['allow_kxk'] = True
      out, acts = split(out, groups[form], report=True, **options)
      actions += acts
  if out is variables:   # nothing split: still a new tree / module
    out = tree.split_variables(variables)[1](params)
  return (out, actions) if report else out


def _decompose_form(path, kind, ranks, conv_form) -> str:
  if kind == 'kxk' and len(ranks) == 2:
    if conv_form == 'cp':
      raise ValueError(f'layer {path!r}: CP takes one rank, got {ranks}')
    return 'tucker2'
  if len(ranks) == 1:
    return 'cp' if kind == 'kxk' and conv_form == 'cp' else 'svd'
  what = 'a 1-D or 3-D conv' if kind == 'other' else f'a {kind} layer'
  raise ValueError(f'layer {path!r} is {what}; ranks {ranks} do not fit it '
                   '((R_in, R_out) for k x k convs, (R,) otherwise)')


def _smaller(variables, form: str, ranks) -> bool:
  current = sum(math.prod(a.shape) for k, a in variables.items()
                if k != 'bias')
  if forms.identify(variables) == form:   # re-compression
    return tuple(ranks) != tuple(forms.of(variables).ranks(variables))
  split = forms.stand_in(form, tree.kernel_shape(variables), ranks)
  return sum(math.prod(a.shape) for a in split.values()) < current


def layer_forms(params) -> dict[str, str]:
  """``{path: form name}`` for every layer of a tree."""
  params, _ = tree.split_variables(params)
  return {p: forms.identify(v) for p, v in tree.layers(params).items()}
