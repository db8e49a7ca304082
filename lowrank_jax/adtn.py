"""ADTN encoding of pretrained layers: fit deep tensor-network gates to kernels.

:func:`adtn_encode` is a pure transform of a parameter tree, like the other
transforms of :mod:`lowrank_jax.transforms`: every selected layer's kernel is
replaced by the variables of the ADTN form (:mod:`lowrank_jax.forms.adtn`),
whose gates are fitted to the kernel by Adam on the reconstruction error. The
same ``model.apply`` runs the result (the layer decodes its kernel at apply
time), and training the tree trains the gates end to end through the decode.

Not done: sharing one ADTN between several layers (the paper concatenates the
weights of, e.g., VGG-16's two linear layers and encodes them with one
network). A layer here computes with the variables it holds and nothing else;
a Flax layer cannot read a sibling's variables at apply time, so a shared
network would need either the model to pass the gates down (a different
model) or duplicated gates whose gradients are tied outside ``model.apply``
(a different training step). Both break "a pure transform of the tree, run by
the same model", so every layer gets its own ADTN.

References:
  Qing, Li, Zhou, Ran, Compressing neural network by tensor network with
  exponentially fewer variational parameters, arXiv:2305.06058 (2023).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping, NamedTuple, Union

import jax

from lowrank_jax import forms
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax.forms import adtn as adtn_form

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
  params_after: int = 0    # gates + scale (bias excluded)


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
                nonlinearity: str = 'relu', steps: int = 2000,
                learning_rate: float = 1e-2, key: jax.Array | None = None,
                min_size: int = 4096, noise: float = 0.1, clip: float = 1.0,
                channel_scale: bool = False, match_norm: bool = False,
                report: bool = False):
  """Encodes selected layers' kernels as deep ADTNs fitted by gradient descent.

  Each selected layer's kernel ``W`` (of any form: non-dense layers are
  merged first; an ADTN layer is decoded and re-fitted) gets
  ``Q = max(2, ceil(log2 W.size))`` qubits (the ``2^Q - W.size`` extra
  entries are padding, decoded and dropped) and ``depth`` brick-wall layers of
  ``Q - 1`` gates. The gates start at identity plus ``noise`` Gaussian noise,
  the scale at ``||W|| / ||W_hat||``, and Adam (cosine-decayed learning
  rate, global-norm clipping) minimises ``||W - W_hat||^2 / ||W||^2`` for
  ``steps`` steps in one jitted ``lax.scan``; the best iterate is kept.

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
      about three decodes: ~0.1-0.2 s for Q = 18, M = 4 on two CPU cores.
    learning_rate: peak Adam learning rate.
    key: PRNG key of the init noise (default ``PRNGKey(0)``), folded with
      the layer's index.
    min_size: smallest kernel size (entries) that is encoded.
    noise: std of the noise added to identity gates at init.
    clip: global-norm gradient clipping (0 disables).
    channel_scale: learn a per-output-channel scale ``(C_out,)`` instead of
      a scalar.
    match_norm: rescale each fitted layer so ``||W_hat|| = ||W||`` (for
      kernels the ADTN cannot represent, such as randomly initialised ones,
      whose least-squares fit shrinks towards 0; see
      :func:`lowrank_jax.forms.adtn.fit`). The reported error is then that
      of the rescaled kernel.
    report: also return a list of :class:`ADTNLayerAction`.

  Returns:
    The new tree (and the report). Encoded layers hold ``adtn_gates``
    (M, Q-1, 2, 2, 2, 2), ``adtn_scale`` () or (C_out,), and the zero-size
    carriers ``adtn_shape`` (0, *kernel_shape), ``adtn_nonlin`` (0, code),
    plus their bias.

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
  key = jax.random.PRNGKey(0) if key is None else key
  results = {}
  index = {}

  def plan(path, variables):
    shape = transforms._kernel_shape(variables)  # pylint: disable=protected-access
    n = math.prod(shape)
    m = _depth_for(depth, path, variables)
    q = adtn_form.num_qubits(n)
    after = adtn_param_count(q, m, scale_size=shape[-1] if channel_scale
                             else 1)
    return shape, n, m, q, after

  def eligible(path, variables):
    if isinstance(depth, Mapping) and path not in depth:
      return 'no depth given for this layer'
    _, n, m, q, after = plan(path, variables)
    if n < min_size:
      return f'kernel has {n} entries < min_size={min_size}'
    if after >= n:
      return (f'an ADTN with Q={q}, M={m} has {after} parameters >= the '
              f'kernel\'s {n}')
    return ''

  def build(path, variables):
    _, n, m, _, after = plan(path, variables)
    kernel = forms.to_kernel(variables)
    index[path] = len(index)
    out, err, _ = adtn_form.fit(
        kernel, m, nonlinearity=nonlinearity, steps=steps,
        learning_rate=learning_rate, noise=noise, clip=clip,
        channel_scale=channel_scale, match_norm=match_norm,
        key=jax.random.fold_in(key, index[path]))
    results[path] = (err, n, after)
    return out

  select_arg = select
  if select is None and isinstance(depth, Mapping):
    select_arg = [transforms._escape(p) for p in depth]  # pylint: disable=protected-access
  new, actions = transforms._apply(  # pylint: disable=protected-access
      params, None, select=select_arg, eligible=eligible, build=build,
      report=True)
  if not report:
    return new
  old_layers = tree.layers(tree.split_variables(params)[0])
  out = []
  for a in actions:
    err, n, after = results.get(a.path, (float('nan'), 0, 0))
    if a.action == 'skipped':
      n = after = math.prod(transforms._kernel_shape(old_layers[a.path]))  # pylint: disable=protected-access
    out.append(ADTNLayerAction(*a, rel_error=err, params_before=n,
                               params_after=after))
  return new, out


class DecodeTime(NamedTuple):
  """Wall time of decoding every ADTN layer of a tree in one jitted call."""
  seconds: float                 # median over repeats, all layers together
  per_layer: dict[str, float]    # median seconds of each layer alone
  macs: dict[str, int]           # decode multiply-adds of each layer


def decode_time(params, *, repeats: int = 10,
                per_layer: bool = True) -> DecodeTime:
  """Measures the jitted decode time of all ADTN layers (compile excluded).

  This is the extra cost per training step (and per inference call, unless
  the tree is collapsed to dense kernels first with
  :func:`lowrank_jax.collapse`).

  Args:
    params: variables dict or bare params tree.
    repeats: timed calls after one warm-up call; the median is reported.
    per_layer: also time each layer alone.

  Returns:
    A :class:`DecodeTime` (zeros and empty dicts when there is no ADTN
    layer).
  """
  params, _ = tree.split_variables(params)
  layers = {p: v for p, v in tree.layers(params).items()
            if forms.identify(v) == adtn_form.NAME}
  macs = {p: adtn_form.decode_macs(v) for p, v in layers.items()}

  def timed(subset):
    fn = jax.jit(lambda t: {p: adtn_form.to_kernel(v) for p, v in t.items()})
    jax.block_until_ready(fn(subset))
    times = []
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(subset))
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  if not layers:
    return DecodeTime(0.0, {}, {})
  total = timed(layers)
  each = ({p: timed({p: v}) for p, v in layers.items()} if per_layer else {})
  return DecodeTime(float(total), each, macs)


__all__ = ['ADTNLayerAction', 'DecodeTime', 'adtn_encode', 'adtn_param_count',
           'decode_time']
