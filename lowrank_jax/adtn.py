"""ADTN encoding of pretrained layers: fit deep tensor-network gates to kernels.

:func:`adtn_encode` is a pure transform of a parameter tree, like the other
transforms of :mod:`lowrank_jax.transforms`: every selected layer's kernel is
replaced by the variables of the ADTN form (:mod:`lowrank_jax.forms.adtn`),
whose gates are fitted to the kernel by Adam on the reconstruction error. The
same ``model.apply`` runs the result (the layer decodes its kernel at apply
time), and training the tree trains the gates end to end through the decode.

With ``share=True`` the selected layers share ONE network, as the paper does
for VGG-16's two linear layers: their kernels, flattened and concatenated in
tree order, are fitted together; the network sits once at the top of the
tree (``params['adtn_shared']['g<k>']``) and each layer keeps a scalar and
its slot (:mod:`lowrank_jax.forms.adtn_shared`). The same ``model.apply``
runs it: a member layer reads its group from the root of the variables it is
applied with. :func:`adtn_unshare` turns members back into dense layers.

References:
  Qing, Li, Zhou, Ran, Compressing neural network by tensor network with
  exponentially fewer variational parameters, arXiv:2305.06058 (2023).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp

from lowrank_jax import forms
from lowrank_jax import transforms
from lowrank_jax import tree
# decode_time lives in its own module; importable from here as before.
from lowrank_jax.adtn_timing import DecodeTime, decode_time  # noqa: F401
from lowrank_jax.forms import adtn as adtn_form
from lowrank_jax.forms import adtn_fit
from lowrank_jax.forms import adtn_shared as shared_form

Depth = Union[int, Mapping[str, int], Callable[[str, dict], int]]


class ADTNLayerAction(NamedTuple):
  """What :func:`adtn_encode` did to one selected layer.

  The first six fields are those of :class:`transforms.LayerAction`.
  """
  path: str
  action: str              # 'split' (encoded) or 'skipped'
  form_before: str
  form_after: str
  ranks: tuple[int, ...]   # (M, Q) after encoding; the old ranks if skipped
  reason: str = ''
  rel_error: float = float('nan')   # ||W - W_hat|| / ||W|| after the fit
  params_before: int = 0   # the kernel's entries (bias excluded)
  params_after: int = 0    # gates + scale (bias excluded); with share=True
                           # the group's parameters count at its first member
  group: str = ''          # the shared group ('g0', ...) with share=True
  fit_error: float = float('nan')   # the same at the least-squares scale,
                           # sqrt(1 - cos^2(W, W_hat)) <= 1: the fit's
                           # quality whatever scale match_norm chose


def adtn_param_count(q: int, m: int, *, scale_size: int = 1) -> int:
  """Parameters of an ADTN on Q qubits with M layers: ``16 (Q-1) M + scale``.

  Args:
    q: qubits, ``2^Q >= `` the kernel's size.
    m: layers (depth).
    scale_size: 1 for the scalar scale, ``C_out`` for a per-channel scale.
  """
  return adtn_form.param_count(q, m, scale_size)


def _depth_for(depth: Depth, path: str, variables) -> int:
  if callable(depth) and not isinstance(depth, Mapping):
    depth = depth(path, variables)
  elif isinstance(depth, Mapping):
    depth = depth[path]
  return _check_depth(depth, path)


def _fit_error(w_hat, kernel) -> float:
  """``||s W_hat - W|| / ||W||`` at the least-squares ``s`` (<= 1)."""
  s = adtn_fit.ls_scale(w_hat, kernel)
  return float(jnp.linalg.norm(s * w_hat - kernel) /
               jnp.maximum(jnp.linalg.norm(kernel), 1e-30))


def _too_small(n: int, min_size: int) -> str:
  """The skip reason of a kernel below ``min_size`` entries ('' if not)."""
  return f'kernel has {n} entries < min_size={min_size}' if n < min_size else ''


def _check_depth(depth, path: str = '') -> int:
  where = f'layer {path!r}: ' if path else ''
  if isinstance(depth, bool) or not hasattr(depth, '__index__'):
    raise TypeError(f'{where}depth must be an int, got {depth!r}')
  depth = int(depth)
  if depth < 1:
    raise ValueError(f'{where}depth must be >= 1 (number of ADTN layers), '
                     f'got {depth}')
  return depth


def adtn_encode(params, *, select=None, depth: Depth,
                nonlinearity: str = 'relu', steps: int = 500,
                learning_rate: float = 1e-2, key: jax.Array | None = None,
                min_size: int = 4096, noise: float = 0.1, clip: float = 1.0,
                channel_scale: bool = False, match_norm: bool = False,
                normalize: bool = False, share: bool = False,
                report: bool = False):
  """Encodes selected layers' kernels as deep ADTNs fitted by gradient descent.

  Each selected layer's kernel ``W`` (of any form: non-dense layers are
  merged first; an ADTN layer is decoded and re-fitted) gets
  ``Q = max(2, ceil(log2 W.size))`` qubits (the ``2^Q - W.size`` extra
  entries are padding, decoded and dropped) and ``depth`` brick-wall layers of
  ``Q - 1`` gates. The gates start at identity plus ``noise`` Gaussian noise,
  the scale at its least-squares value, and Adam (cosine-decayed learning
  rate, global-norm clipping) minimises ``||W - W_hat||^2 / ||W||^2`` for
  ``steps`` steps in one jitted ``lax.scan``; the best iterate is kept and
  its scale made least-squares, so (without ``match_norm``) the reported
  error is at most 1, the zero kernel's
  (:func:`lowrank_jax.forms.adtn_fit.fit`).
  How far below 1 depends on the kernel: trained dense kernels are close to
  full rank and a network of ~1,000 parameters captures a few percent of
  their energy, about what an SVD of the same size does
  (``docs/benchmarks_adtn_fit.md``).

  Layers are skipped (with the reason in the report) when
  ``W.size < min_size`` or when the ADTN would have at least as many
  parameters as the kernel.

  Args:
    params: variables dict or bare params tree (not modified).
    select: layer selection rules (see :func:`lowrank_jax.tree.select_paths`;
      default: every layer, or the paths of a depth dict).
    depth: ADTN layers ``M >= 1``: an int, ``{path: M}`` or
      ``f(path, variables) -> M``.
    nonlinearity: between ADTN layers: 'relu', 'tanh' or 'identity'.
    steps: Adam steps per layer (0 keeps the initialisation). A step costs
      a decode and its gradient: ~25 ms for Q = 18, M = 4 on two CPU cores
      (docs/benchmarks_adtn_decode.md).
    learning_rate: peak Adam learning rate.
    key: PRNG key of the init noise (required), folded with
      the layer's index.
    min_size: smallest kernel size (entries) that is encoded.
    noise: std of the noise added to identity gates at init.
    clip: global-norm gradient clipping (0 disables).
    channel_scale: learn a per-output-channel scale ``(C_out,)`` instead of
      a scalar.
    match_norm: rescale each fitted layer so ``||W_hat|| = ||W||`` (for
      kernels the ADTN cannot represent, such as randomly initialised ones,
      whose least-squares fit shrinks towards 0; see
      :func:`lowrank_jax.forms.adtn_fit.fit`). The reported error is then that
      of the rescaled kernel.
    normalize: decode normalized: the kept entries divided by their norm
      before the scale, so in end-to-end training the kernel's norm is the
      learned scale's alone and cannot collapse with the gates' product
      (:mod:`lowrank_jax.forms.adtn`). Off by default (the decode of
      variables saved without it).
    share: encode all selected (eligible) layers with ONE network fitted to
      their concatenated kernels (``depth`` must then be an int;
      ``channel_scale`` is not available; ``min_size`` applies per layer and
      the parameter check to the whole group). Each member also learns a
      scalar of its own (its ``adtn_ref_scale``: after the fit, the
      least-squares scale of its slice; 1 with ``match_norm``).
    report: also return a list of :class:`ADTNLayerAction`.

  Returns:
    The new tree (and the report). With ``share``, members hold
    ``adtn_ref_scale`` (), the carriers ``adtn_shape`` and ``adtn_ref``, and
    their bias, and the tree gains ``adtn_shared/g<k>``. Otherwise encoded
    layers hold ``adtn_gates``
    (M, Q-1, 2, 2, 2, 2), ``adtn_scale`` () or (C_out,), and the zero-size
    carriers ``adtn_shape`` (0, *kernel_shape), ``adtn_nonlin`` (0, code)
    ((0, code, 2) with ``normalize``), plus their bias.

  Raises:
    ValueError: depth < 1, unknown nonlinearity, a selection rule matching
      no layer.

  References:
    Qing, Li, Zhou, Ran, arXiv:2305.06058 (2023).
  """
  adtn_form.check_nonlinearity(nonlinearity)
  if isinstance(depth, Mapping):
    for p, d in depth.items():
      _check_depth(d, p)
  elif not callable(depth):
    _check_depth(depth)
  if key is None:
    raise TypeError('adtn_encode needs key=jax.random.PRNGKey(seed): the '
                    'gates\' initial noise is drawn from it')
  if share:
    return _encode_shared(
        params, select=select, depth=depth, nonlinearity=nonlinearity,
        steps=steps, learning_rate=learning_rate, key=key, min_size=min_size,
        noise=noise, clip=clip, channel_scale=channel_scale,
        match_norm=match_norm, normalize=normalize, report=report)
  fit_options = dict(nonlinearity=nonlinearity, steps=steps,
                     learning_rate=learning_rate, noise=noise, clip=clip,
                     channel_scale=channel_scale, match_norm=match_norm,
                     normalize=normalize)
  new, actions, results = _encode_per_layer(
      params, select=select, depth=depth, key=key, min_size=min_size,
      fit_options=fit_options)
  if not report:
    return new
  return new, _per_layer_actions(params, actions, results)


def _encode_per_layer(params, *, select, depth, key, min_size, fit_options):
  """``(new tree, transform actions, {path: (err, n, after, fit_err)})``:
  one network per eligible selected layer (adtn_encode without share)."""
  results = {}
  index = {}
  channel_scale = fit_options['channel_scale']

  def plan(path, variables):
    shape = tree.kernel_shape(variables)
    n = math.prod(shape)
    m = _depth_for(depth, path, variables)
    q = adtn_form.num_qubits(n)
    after = adtn_param_count(q, m, scale_size=shape[-1] if channel_scale
                             else 1)
    return n, m, q, after

  def eligible(path, variables):
    if isinstance(depth, Mapping) and path not in depth:
      return 'no depth given for this layer'
    n, m, q, after = plan(path, variables)
    small = _too_small(n, min_size)
    if small:
      return small
    if after >= n:
      return (f'an ADTN with Q={q}, M={m} has {after} parameters >= the '
              f'kernel\'s {n}')
    return ''

  def build(path, variables):
    n, m, _, after = plan(path, variables)
    kernel = forms.to_kernel(variables)
    index[path] = len(index)
    out, err, _ = adtn_fit.fit(kernel, m, **fit_options,
                               key=jax.random.fold_in(key, index[path]))
    results[path] = (err, n, after,
                     _fit_error(adtn_form.to_kernel(out), kernel))
    return out

  if select is None and isinstance(depth, Mapping):
    select = [tree.exact(p) for p in depth]
  new, actions = transforms._apply(  # pylint: disable=protected-access
      params, None, select=select, eligible=eligible, build=build,
      report=True)
  return new, actions, results


def _per_layer_actions(params, actions, results) -> list[ADTNLayerAction]:
  """The transform's actions with each layer's errors and parameters."""
  old_layers = tree.layers(tree.split_variables(params)[0])
  out = []
  for a in actions:
    err, n, after, fit_err = results.get(a.path, (float('nan'), 0, 0,
                                                  float('nan')))
    if a.action == 'skipped':
      n = after = math.prod(tree.kernel_shape(old_layers[a.path]))
    out.append(ADTNLayerAction(*a, rel_error=err, params_before=n,
                               params_after=after, fit_error=fit_err))
  return out


def _encode_shared(params, *, select, depth, nonlinearity, steps,
                   learning_rate, key, min_size, noise, clip, channel_scale,
                   match_norm, normalize, report):
  """adtn_encode(..., share=True): one network for all selected layers."""
  m = _check_shared_options(depth, channel_scale)
  bare, rebuild = tree.split_variables(params)
  groups = dict(bare.get(shared_form.ROOT, {}))
  index = _free_group_index(groups)
  all_layers = tree.layers(bare)
  chosen = tree.select_paths(all_layers, select)
  sizes = {p: math.prod(tree.kernel_shape(all_layers[p])) for p in chosen}
  members, skipped = _shared_members(all_layers, chosen, sizes, min_size)
  kernels = {}
  for path in members:
    tree.check_finite(path, all_layers[path])
    kernels[path] = forms.to_kernel(all_layers[path])
  total = sum(k.size for k in kernels.values())
  q = adtn_form.num_qubits(max(total, 1))
  group_params = adtn_param_count(q, m)
  if members and group_params + len(members) >= total:
    reason = (f'a shared ADTN with Q={q}, M={m} has {group_params} '
              f'parameters >= the {total} entries of {members}')
    skipped.update({p: reason for p in members})
    members = []
  new, errors = {}, {}
  if members:
    groups[f'g{index}'], new, errors = _fit_shared(
        {p: kernels[p] for p in members}, all_layers, index, m,
        key=key, nonlinearity=nonlinearity, steps=steps,
        learning_rate=learning_rate, noise=noise, clip=clip,
        match_norm=match_norm, normalize=normalize)
  result = tree.replace_layers(bare, new)
  if members:
    result = {**result, shared_form.ROOT: groups}
  result = rebuild(result)
  if not report:
    return result
  return result, _shared_report(all_layers, chosen, sizes, members, skipped,
                                errors, (m, q), group_params, f'g{index}')


def _check_shared_options(depth, channel_scale) -> int:
  """The group's depth; raises on options share=True does not take."""
  if not isinstance(depth, int) or isinstance(depth, bool):
    raise TypeError(f'share=True takes one int depth for the whole group, '
                    f'got {depth!r}')
  if channel_scale:
    raise ValueError('share=True has no per-channel scale (members of '
                     'different widths share one network); use '
                     'channel_scale=False')
  return _check_depth(depth)


def _free_group_index(groups) -> int:
  """The smallest k with no group 'g<k>' yet."""
  index = 0
  while f'g{index}' in groups:
    index += 1
  return index


def _shared_members(all_layers, chosen, sizes, min_size):
  """``(members, {skipped path: reason})`` of a shared encoding."""
  members, skipped = [], {}
  for path in chosen:
    v = all_layers[path]
    if forms.identify(v) == shared_form.NAME:
      reason = (f'already a member of shared group '
                f'{shared_form.group_name(v)!r}')
    else:
      reason = _too_small(sizes[path], min_size)
    if reason:
      skipped[path] = reason
    else:
      members.append(path)
  return members, skipped


def _fit_shared(kernels, all_layers, index, m, *, key, **fit_options):
  """Fits one network to the concatenated ``kernels`` (in their order).

  Returns:
    ``(group variables, {path: member variables}, {path: (rel. error,
    error at the least-squares scale)})``.
    Each member's ``adtn_ref_scale`` is the least-squares scale of its own
    slice, so no member's error exceeds 1 (the zero kernel's), whatever the
    group's common scale favours.
  """
  flat = jnp.concatenate([k.reshape(-1) for k in kernels.values()])
  fitted, _, _ = adtn_fit.fit(flat, m, key=key, **fit_options)
  g = shared_form.group(fitted['adtn_gates'], fitted['adtn_scale'],
                        flat.size, fit_options['nonlinearity'], flat.dtype,
                        normalize=fit_options['normalize'])
  decoded = shared_form.decode_group(g)
  new, errors, start = {}, {}, 0
  for path, k in kernels.items():
    out = shared_form.member(k.shape, index, start, k.dtype)
    w = shared_form.slice_kernel(decoded, out)
    ref = 1.0 if fit_options['match_norm'] else adtn_fit.ls_scale(w, k)
    out['adtn_ref_scale'] = jnp.asarray(ref, k.dtype)
    if 'bias' in all_layers[path]:
      out['bias'] = all_layers[path]['bias']
    w_hat = shared_form.slice_kernel(decoded, out)
    errors[path] = (float(jnp.linalg.norm(w_hat - k) /
                          jnp.maximum(jnp.linalg.norm(k), 1e-30)),
                    _fit_error(w_hat, k))
    new[path] = out
    start += k.size
  return g, new, errors


def _shared_report(all_layers, chosen, sizes, members, skipped, errors,
                   ranks, group_params, name):
  """The :class:`ADTNLayerAction` list of a shared encoding (the group's
  parameters count at its first member, plus one ref scale per member)."""
  actions = []
  for path in chosen:
    v = all_layers[path]
    before = forms.identify(v)
    n = sizes[path]
    if path in errors:
      first = path == members[0]
      actions.append(ADTNLayerAction(
          path, 'split', before, shared_form.NAME, ranks, '',
          errors[path][0], n, 1 + (group_params if first else 0), name,
          errors[path][1]))
    else:
      actions.append(ADTNLayerAction(
          path, 'skipped', before, before, forms.get(before).ranks(v),
          skipped[path], float('nan'), n, n))
  return actions


def adtn_unshare(params, *, report: bool = False):
  """Turns every shared-ADTN member into a dense layer and drops the groups.

  Args:
    params: variables dict or bare params tree (not modified).
    report: also return a list of :class:`transforms.LayerAction`.

  Returns:
    The new tree (members hold ``kernel`` (+ ``bias``), the decoded slice
    times their scale), and the report.
  """
  bare, rebuild = tree.split_variables(params)
  decoded = {}
  new, actions = {}, []
  for path, v in tree.layers(bare).items():
    if forms.identify(v) != shared_form.NAME:
      continue
    g = shared_form.group_name(v)
    if g not in decoded:
      decoded[g] = shared_form.decode_group(shared_form.find_group(
          bare.get(shared_form.ROOT, {}), v, path))
    new[path] = {'kernel': shared_form.slice_kernel(decoded[g], v)}
    if 'bias' in v:
      new[path]['bias'] = v['bias']
    actions.append(transforms.LayerAction(path, 'merged', shared_form.NAME,
                                          'dense', ()))
  result = dict(tree.replace_layers(bare, new))
  result.pop(shared_form.ROOT, None)
  result = rebuild(result)
  return (result, actions) if report else result


__all__ = ['ADTNLayerAction', 'adtn_encode', 'adtn_param_count',
           'adtn_unshare']
