"""Wall-clock speed of factored layers, and the never-slower rule.

FLOP counts do not predict speed: a factored layer runs as several smaller
ops, each paying its own memory traffic and dispatch, so a layer with 4x fewer
multiply-adds can run no faster than its dense kernel (or slower, at batch 1).
This module measures instead of assuming:

* :func:`time_layers` times every split layer of a network against its merged
  dense kernel (``forms.to_kernel``), each under ``jit`` on the current
  backend, with the activation shape the layer sees in the network.
* :func:`never_slower` re-merges (``transforms.collapse``) the layers that are
  slower than their dense form, so a compressed network is never slower than
  the original, and says which layers it merged and why.
* :func:`fastest_network` times whole networks (:func:`time_networks`)
  and keeps the fastest candidate, e.g. a split tree and the same with its
  small cores folded (:func:`lowrank_jax.fold_cores`): what XLA fuses across
  layers decides that, and no per-layer timing sees it.
* :func:`round_rank` / :func:`round_ranks` round ranks to hardware-friendly
  multiples; :func:`rank_for_flop_ratio` (from :mod:`lowrank_jax.rank_rules`,
  whose solver it is) solves for the ranks that give a FLOP reduction.

Timings are medians over repeats, dense and split interleaved call by call so
that load from other processes hits both alike; compile time is excluded and
reported separately.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import counting
from lowrank_jax import forms
from lowrank_jax import rank_rules
from lowrank_jax import runner
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax.forms import base

# The one ratio -> rank solver (rank_rules), under the name the benches use.
rank_for_flop_ratio = rank_rules.rank_for_flop_ratio


class Measured(NamedTuple):
  """Timing of one jitted function."""
  median_s: float     # median seconds per call, compile excluded
  compile_s: float    # seconds of the first call (trace + compile + run)
  times_s: tuple      # every timed call, seconds (wall)
  cpu_s: float = float('nan')  # median process CPU seconds per call


class LayerTiming(NamedTuple):
  """A split layer against its dense form, same input, same backend."""
  dense_s: float      # median seconds per call of the merged dense kernel
  split_s: float      # median seconds per call of the split form
  speedup: float      # dense_s / split_s (> 1: the split is faster)
  flop_ratio: float   # dense multiply-adds / split multiply-adds


class NetworkTiming(NamedTuple):
  """Medians of interleaved calls of one jitted function."""
  wall_s: float       # wall seconds per call
  cpu_s: float        # process CPU seconds per call (all threads)


class NetworkChoice(NamedTuple):
  """What :func:`fastest_network` measured and chose."""
  chosen: str         # the name of the candidate returned
  clock: str          # 'wall' or 'cpu': the time compared
  timings: dict       # {candidate name: NetworkTiming}


class NeverSlowerReport(NamedTuple):
  """What :func:`never_slower` did."""
  merged: dict        # {path: reason} layers put back in dense form
  kept: dict          # {path: reason} split layers left as they were
  timings: dict       # {path: LayerTiming} as measured (or injected)


def time_calls(fns: Sequence[Callable], args: Sequence[tuple], *,
               repeats: int = 10, warmup: int = 1,
               min_time_s: float = 0.0,
               shuffle: int | None = None) -> list[Measured]:
  """Medians of jitted calls, interleaved so load noise hits all alike.

  Each function is compiled and run ``warmup`` times first (the first call's
  time is reported as ``compile_s``); then the functions are called in turn,
  ``repeats`` rounds, each call waited for with ``jax.block_until_ready``
  and timed in wall and process CPU time (CPU time is disturbed less than
  wall time by load from other processes).

  Args:
    fns: jitted functions (or anything callable on the matching ``args``).
    args: one tuple of arguments per function.
    repeats: timed rounds (at least one).
    warmup: untimed calls per function before the first round (at least 1).
    min_time_s: keep adding rounds until every function has this much timed
      time in total (for fast calls whose single times are noisy), at most
      ``100 * repeats`` rounds.
    shuffle: None calls the functions in the given order every round; an
      int seeds a new random order per round (a fixed order biased the
      times of a call's neighbours in bench/bench_own_model.py).

  Returns:
    One :class:`Measured` per function.
  """
  compile_s = []
  for fn, a in zip(fns, args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*a))
    compile_s.append(time.perf_counter() - start)
    for _ in range(max(warmup, 1) - 1):
      jax.block_until_ready(fn(*a))
  rng = None if shuffle is None else np.random.default_rng(shuffle)
  wall, cpu = [[] for _ in fns], [[] for _ in fns]
  rounds = 0
  while True:
    for i in (range(len(fns)) if rng is None else rng.permutation(len(fns))):
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[i](*args[i]))
      wall[i].append(time.perf_counter() - w0)
      cpu[i].append(time.process_time() - c0)
    rounds += 1
    if rounds >= max(repeats, 1) and (
        min(sum(t) for t in wall) >= min_time_s or
        rounds >= 100 * max(repeats, 1)):
      break
  return [Measured(float(np.median(w)), c, tuple(w), float(np.median(u)))
          for w, u, c in zip(wall, cpu, compile_s)]


def time_interleaved(fns: Mapping[str, Callable], args: Mapping[str, tuple],
                     rounds: int = 5, *, seed: int = 0
                     ) -> dict[str, NetworkTiming]:
  """:func:`time_calls` by label, in a new random order each round (seeded
  by ``seed``): ``{label: NetworkTiming(wall, cpu)}``, medians of
  ``rounds`` calls per function after one untimed call each.

  Args:
    fns: ``{label: callable}``.
    args: ``{label: tuple of arguments}``, same labels.
    rounds: timed calls per function.
    seed: seed of the call orders.
  """
  labels = list(fns)
  measured = time_calls([fns[k] for k in labels], [args[k] for k in labels],
                        repeats=rounds, shuffle=seed)
  return {k: NetworkTiming(m.median_s, m.cpu_s)
          for k, m in zip(labels, measured)}


# ----------------------------------------------------------------- ranks ---


def round_rank(rank: int, multiple: int, *, bound: int,
               mode: str = 'up') -> int:
  """A rank rounded to a multiple of ``multiple``, kept within [1, bound].

  Args:
    rank: the rank to round (>= 1).
    multiple: e.g. 8, 16 or 32 (1 returns the rank unchanged).
    bound: the largest allowed rank (the layer's dimension on that mode).
    mode: ``'up'`` (never lower: costs FLOPs, never accuracy), ``'down'``
      (never higher; a rank below ``multiple`` is left as it is) or
      ``'nearest'`` (ties go up; never below ``multiple``).

  Returns:
    A multiple of ``multiple``, or ``bound`` when rounding up would pass it,
    or ``rank`` itself when ``'down'`` would reach 0.
  """
  rank, multiple, bound = int(rank), int(multiple), int(bound)
  if rank < 1 or bound < 1 or multiple < 1:
    raise ValueError(f'need rank, multiple, bound >= 1; got {rank}, '
                     f'{multiple}, {bound}')
  rank = min(rank, bound)
  if mode == 'up':
    out = -(-rank // multiple) * multiple
  elif mode == 'down':
    out = rank // multiple * multiple or rank
  elif mode == 'nearest':
    out = max((rank + multiple // 2) // multiple, 1) * multiple
  else:
    raise ValueError(f"mode must be 'up', 'down' or 'nearest', got {mode!r}")
  return min(out, bound)


def round_ranks(variables, ranks: Mapping[str, Any], multiple: int, *,
                mode: str = 'up') -> dict[str, tuple[int, ...]]:
  """Rounds a ``{path: ranks}`` mapping (e.g. from VBMF) layer by layer.

  The bound of each rank is read from the layer's kernel: (C_in, C_out) for
  two ranks (Tucker-2), the SVD bound min(rows, C_out) for one rank of a
  2-D or 1x1 kernel, C_out-side bound for one rank of a k x k kernel.

  Args:
    variables: the tree or module whose layers the paths name (any forms).
    ranks: ``{path: int or tuple}``.
    multiple: rounding multiple (8, 16, 32 ...).
    mode: see :func:`round_rank`.

  Returns:
    ``{path: tuple of rounded ranks}``.
  """
  params, _ = tree.split_variables(variables)
  out = {}
  for path, r in ranks.items():
    shape = tree.kernel_shape(tree.get_layer(params, path))
    r = (int(r),) if np.ndim(r) == 0 else tuple(int(x) for x in r)
    if len(r) == 2:
      bounds = (shape[-2], shape[-1])
    else:
      bounds = (min(math.prod(shape[:-1]), shape[-1]),)
    out[path] = tuple(round_rank(x, multiple, bound=b, mode=mode)
                      for x, b in zip(r, bounds))
  return out


def split_macs(form: str, kernel_shape: Sequence[int], ranks: Sequence[int],
               in_shape: Sequence[int], out_shape: Sequence[int],
               spec: base.LayerSpec = base.LayerSpec('conv')) -> int:
  """Multiply-adds of one call of a layer in ``form`` at ``ranks``.

  Uses the form's own ``flops`` on zero-size stand-ins (nothing computed).
  """
  v = forms.stand_in(form, tuple(kernel_shape), tuple(ranks))
  return int(forms.get(form).flops(v, spec, tuple(in_shape),
                                   tuple(out_shape)))


# ---------------------------------------------------------------- layers ---


def _layer_fn(form, spec):
  return jax.jit(lambda v, x: form.forward(v, x, spec))


def time_layers(model, *args, dtype=jnp.float32, repeats: int = 10,
                select=None, min_time_s: float = 0.05, seed: int = 0,
                **apply_kwargs) -> dict[str, LayerTiming]:
  """Times each split layer of a network against its merged dense kernel.

  Every layer not in dense form is run alone, under ``jit`` on the default
  backend, on a random input of the shape it sees in the network, in its own
  form and as one dense conv / matmul with ``forms.to_kernel`` of its
  variables (the same function; bias left out of both). Parameters and input
  are cast to ``dtype``, as a model with ``dtype=...`` computes.

  Args:
    model: a linen model, then ``variables, input_shape``; or an NNX module,
      then ``input_shape`` (the network input shape, e.g. ``(128, 32, 32,
      3)``). Some layers split.
    *args: as above.
    dtype: computation dtype.
    repeats: timed rounds per layer (median taken).
    select: optional rules restricting which split layers are timed.
    min_time_s: keep timing until each function has run this long in total.
    seed: seed of the random inputs.
    **apply_kwargs: passed to the model's call when tracing shapes.

  Returns:
    ``{path: LayerTiming}`` for every split layer (in network order).
  """
  calls = counting.called_layers(model, *args, dtype=dtype, **apply_kwargs)
  split = [p for p, c in calls.items()
           if forms.identify(c.variables) != 'dense']
  if select is not None:
    split = tree.select_paths(split, select)
  dense_form = forms.get('dense')
  out = {}
  for i, path in enumerate(split):
    call = calls[path]
    form = forms.of(call.variables)
    v = {k: jnp.asarray(a, dtype) for k, a in call.variables.items()
         if k != 'bias'}
    kernel = {'kernel': forms.to_kernel(v)}
    x = jax.random.normal(jax.random.PRNGKey(seed + i), call.in_shape, dtype)
    dense_t, split_t = time_calls(
        [_layer_fn(dense_form, call.spec), _layer_fn(form, call.spec)],
        [(kernel, x), (v, x)], repeats=repeats, min_time_s=min_time_s)
    dense_macs = dense_form.flops(kernel, call.spec, call.in_shape,
                                  call.out_shape)
    split_macs_ = form.flops(v, call.spec, call.in_shape, call.out_shape)
    out[path] = LayerTiming(dense_t.median_s, split_t.median_s,
                            dense_t.median_s / split_t.median_s,
                            dense_macs / max(split_macs_, 1))
  return out


def never_slower(model, *args, margin: float = 1.0, dtype=jnp.float32,
                 repeats: int = 10, select=None,
                 timer: Callable[..., Mapping[str, LayerTiming]] | None = None,
                 **apply_kwargs):
  """Re-merges every split layer that is not faster than its dense form.

  A split layer is kept only if ``speedup >= margin`` (``margin > 1`` asks
  for a clear gain, e.g. 1.1 against timing noise); every other timed layer
  is merged back exactly with :func:`lowrank_jax.collapse`, so the network
  computes the same function and no layer is slower than in the original.

  Args:
    model: a linen model, then ``variables, input_shape``; or an NNX module,
      then ``input_shape``. The batch size of the input shape matters for
      speed. Nothing is modified.
    *args: as above.
    margin: least speed-up a split layer must show to stay split.
    dtype: computation dtype of the timing.
    repeats: timed rounds per layer.
    select: optional rules restricting which split layers are considered.
    timer: replaces :func:`time_layers` (same signature and result), e.g. a
      fake for tests or a cached table of measurements.
    **apply_kwargs: passed to the model's call when tracing shapes.

  Returns:
    ``(new_variables, NeverSlowerReport)``; for an NNX module, a new module
    in place of the variables.
  """
  timer = time_layers if timer is None else timer
  timings = dict(timer(model, *args, dtype=dtype, repeats=repeats,
                       select=select, **apply_kwargs))
  variables = model if isinstance(model, nnx.Module) else args[0]
  merged, kept = {}, {}
  for path, t in timings.items():
    why = (f'split {t.split_s * 1e3:.3f} ms vs dense {t.dense_s * 1e3:.3f} '
           f'ms: speed-up {t.speedup:.2f}x at {t.flop_ratio:.2f}x fewer '
           f'FLOPs')
    if t.speedup >= margin:
      kept[path] = why
    else:
      merged[path] = f'{why} < margin {margin:.2f}x'
  if merged:
    variables = transforms.collapse(
        variables, select=[tree.exact(p) for p in merged])
  return variables, NeverSlowerReport(merged, kept, timings)


# --------------------------------------------------------------- networks ---


def _network_fn(candidate, model, apply_kwargs):
  """(jitted f(state, x), state) running one candidate network."""
  if isinstance(candidate, nnx.Module):
    graphdef, state = nnx.split(candidate)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **apply_kwargs)), \
        state
  if model is None:
    raise TypeError('variable trees need model=, the linen model that runs '
                    'them')
  return jax.jit(lambda v, x: runner.apply(model, v, x, **apply_kwargs)), \
      candidate


def time_networks(candidates: Mapping[str, Any], input_shape, *, model=None,
                  rounds: int = 5, dtype=jnp.float32, seed: int = 0,
                  **apply_kwargs) -> dict[str, NetworkTiming]:
  """Times whole networks on one random batch, interleaved call by call.

  Each candidate is jitted, compiled and run once untimed, then all are
  called in turn, in a new random order each round
  (:func:`time_interleaved`).

  Args:
    candidates: ``{name: variables}`` of the linen ``model``, or ``{name:
      nnx.Module}`` (called as they are: ``.eval()`` them first for
      inference).
    input_shape: the network input, e.g. ``(128, 32, 32, 3)``.
    model: the linen model (``lj.apply``); None for NNX modules.
    rounds: timed calls per candidate (medians taken).
    dtype: input dtype.
    seed: seed of the input and of the call orders.
    **apply_kwargs: passed to every call (e.g. ``train=False``).

  Returns:
    ``{name: NetworkTiming}``.
  """
  x = jax.random.normal(jax.random.PRNGKey(seed), tuple(input_shape), dtype)
  fns, args = {}, {}
  for name, candidate in candidates.items():
    fns[name], state = _network_fn(candidate, model, apply_kwargs)
    args[name] = (state, x)
  return time_interleaved(fns, args, rounds, seed=seed)


def fastest_network(candidates: Mapping[str, Any], input_shape, *,
                    model=None, clock: str = 'wall', margin: float = 1.0,
                    rounds: int = 5, dtype=jnp.float32, seed: int = 0,
                    timer: Callable[..., Mapping[str, NetworkTiming]] |
                    None = None, **apply_kwargs):
  """The candidate network that runs fastest, measured whole.

  Per-layer timings miss what the compiler does across layers: on XLA:CPU
  folding a small Tucker-2 core (:func:`lowrank_jax.fold_cores`) made vgg16
  1.29x faster and resnet18 7% slower, with the same layers folded. This
  times the networks as they run and keeps the fastest; the first candidate
  is the default, replaced only by one at least ``margin`` times faster.

  Args:
    candidates: ``{name: variables}`` of the linen ``model`` or ``{name:
      nnx.Module}``, e.g. ``{'split': v, 'folded': lj.fold_cores(v)}``.
    input_shape: the network input; its batch size matters for speed.
    model: the linen model; None for NNX modules.
    clock: ``'wall'`` or ``'cpu'`` (process CPU time: steadier when other
      processes load the machine).
    margin: least speed-up over the first candidate that replaces it.
    rounds: timed calls per candidate.
    dtype: input dtype.
    seed: seed of the input and of the call orders.
    timer: replaces :func:`time_networks` (same signature and result).
    **apply_kwargs: passed to every call (e.g. ``train=False``).

  Returns:
    ``(the chosen candidate, NetworkChoice)``.
  """
  if clock not in ('wall', 'cpu'):
    raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
  timer = time_networks if timer is None else timer
  timings = dict(timer(candidates, input_shape, model=model, rounds=rounds,
                       dtype=dtype, seed=seed, **apply_kwargs))
  seconds = {k: getattr(t, f'{clock}_s') for k, t in timings.items()}
  first = next(iter(candidates))
  best = min(candidates, key=seconds.__getitem__)
  if seconds[first] < margin * seconds[best]:
    best = first
  return candidates[best], NetworkChoice(best, clock, timings)
