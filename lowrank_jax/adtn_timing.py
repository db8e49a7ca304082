"""Decode time of ADTN layers: the extra cost per step of an encoded tree.

An ADTN layer (:mod:`lowrank_jax.forms.adtn`) and a shared group
(:mod:`lowrank_jax.forms.adtn_shared`) rebuild their kernels from the gates
at every apply; :func:`decode_time` measures that rebuild, jitted, for all
of a tree's ADTN layers together (and per layer on request).

References:
  Qing, Li, Zhou, Ran, Compressing neural network by tensor network with
  exponentially fewer variational parameters, arXiv:2305.06058 (2023).
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import jax

from lowrank_jax import forms
from lowrank_jax import tree
from lowrank_jax.forms import adtn as adtn_form
from lowrank_jax.forms import adtn_shared as shared_form


class DecodeTime(NamedTuple):
  """Wall time of decoding every ADTN layer of a tree in one jitted call."""
  seconds: float                 # median over repeats, all layers together
  macs: dict[str, int]           # decode multiply-adds of each layer


def decode_time(params, *, repeats: int = 10, report: bool = False):
  """Measures the jitted decode time of all ADTN layers (compile excluded).

  This is the extra cost per training step (and per inference call, unless
  the tree is collapsed to dense kernels first with
  :func:`lowrank_jax.collapse`).

  Args:
    params: variables dict or bare params tree.
    repeats: timed calls after one warm-up call; the median is reported.
    report: also time each layer alone and return ``{path: seconds}``.

  Returns:
    A :class:`DecodeTime` (zero seconds and no MACs when there is no ADTN
    layer); with ``report``, ``(timing, per_layer_seconds)``. A shared group
    is timed and counted once, under ``'adtn_shared/g<k>'``.
  """
  params, _ = tree.split_variables(params)
  layers = {p: v for p, v in tree.layers(params).items()
            if forms.identify(v) == adtn_form.NAME}
  macs = {p: adtn_form.decode_macs(v) for p, v in layers.items()}
  for g, v in params.get(shared_form.ROOT, {}).items():
    path = f'{shared_form.ROOT}/{g}'
    layers[path] = v
    macs[path] = shared_form.decode_macs(v)
  timing = DecodeTime(_median_decode_seconds(layers, repeats) if layers
                      else 0.0, macs)
  if not report:
    return timing
  return timing, {p: _median_decode_seconds({p: v}, repeats)
                  for p, v in layers.items()}


def _median_decode_seconds(layers, repeats: int) -> float:
  """Median seconds of one jitted decode of ``{path: variables}``."""

  def decode_one(path, v):
    if path.startswith(shared_form.ROOT + '/'):
      return shared_form.decode_group(v)
    return adtn_form.to_kernel(v)

  fn = jax.jit(lambda t: {p: decode_one(p, v) for p, v in t.items()})
  jax.block_until_ready(fn(layers))
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(layers))
    times.append(time.perf_counter() - t0)
  return float(statistics.median(times))


__all__ = ['DecodeTime', 'decode_time']
