"""EVBMF of all matrices of a network in two compiled programs.

:func:`evbmf_per_mode` takes the layer plans of
:mod:`~lowrank_jax.vbmf.network` and returns every (layer, mode)'s EVBMF
rank, sigma^2, threshold and spectrum from one call of two jitted programs
(on CPU the first is computed on the host by default, with the same
output: :mod:`~lowrank_jax.vbmf.host_spectra`):
the spectra (:mod:`~lowrank_jax.vbmf.spectra`: each matrix's L x L Gram
matrix formed from its kernel, scaled by a power of two and zero-padded to
a few size buckets, so that a network compiles a few eigensolver loops;
eigenvalues without eigenvectors) and one vmapped EVBMF solve of them all
(:func:`_network_solve`, compiled in a second thread while the spectra
compile and run). They are two programs so that each is compiled with the
options that suit it (see ``spectra._SPECTRA_CPU_OPTIONS``). Matrices the
unscaled Gram products cannot serve (extreme scales, NaN / Inf) are redone
with prescaled matrices and, under ``'auto'``, those whose spectrum the
Gram route cannot resolve with the SVD, each in a second pair of
programs. ``compilation_cache=DIR`` turns JAX's persistent compilation
cache on for that call only (:func:`_persistent_cache`).

References:
  Nakajima et al., JMLR 14, 2013 (EVBMF).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.lapack_threads import limits_threads
from lowrank_jax.vbmf import host_spectra, linalg
from lowrank_jax.vbmf.linalg import _host_ldexp, _ldexp
from lowrank_jax.vbmf.solver import _evbmf_sq, _gram_unsure
from lowrank_jax.vbmf.spectra import (_network_spectra, _program_inputs,
                                      _REDO_PRESCALED, _REDO_SVD)

if TYPE_CHECKING:
  from lowrank_jax.vbmf.network import _Layer


@limits_threads
def evbmf_per_mode(plan: tuple[_Layer, ...], all_layers, method: str, *,
                   compilation_cache=None) -> dict[tuple[int, int], tuple]:
  """EVBMF of every mode's matrix of the planned layers, on the host.

  Args:
    plan: the layers' plans (:func:`lowrank_jax.vbmf.network._plan`).
    all_layers: ``{path: variables}`` of the network (the plans' sources).
    method: 'auto', 'gram' or 'svd'.
    compilation_cache: None, or a directory for JAX's persistent compilation
      cache during this call.

  Returns:
    ``{(layer index, mode index): (rank, sigma2, threshold, gamma)}``:
    sigma2 and the threshold Python floats rescaled in float64, gamma a
    numpy array of the L singular values, largest first.

  Raises:
    ValueError: a matrix came out non-finite although its layer's variables
      are finite.
  """
  with _persistent_cache(compilation_cache):
    per_mode, redo = _run(plan, all_layers, method, prescale=False)
    # Matrices whose unscaled Gram matrix the first pass cannot trust (an
    # extreme scale, or non-finite: _REDO_PRESCALED), then 'auto''s
    # matrices whose spectra span more than the Gram route resolves
    # (_REDO_SVD): each pass is compiled only for networks that need it.
    for code, how in ((_REDO_PRESCALED, method), (_REDO_SVD, 'svd')):
      redo = _redo(per_mode, redo, plan, all_layers, code, how)
  return per_mode


def _redo(per_mode, redo, plan, all_layers, code, method):
  """Recomputes the ``(layer, mode)`` keys flagged ``code`` with prescaled
  matrices and ``method`` (in ``per_mode``); returns the flags left."""
  keys = {k for k, c in redo.items() if c == code}
  left = {k: c for k, c in redo.items() if c != code}
  if not keys:
    return left
  layers = sorted({i for i, _ in keys})
  again, more = _run(tuple(plan[i] for i in layers), all_layers, method,
                     prescale=True)
  for j, i in enumerate(layers):
    for m in range(len(plan[i].modes)):
      if (i, m) in keys:
        per_mode[(i, m)] = again[(j, m)]
        if (j, m) in more:
          left[(i, m)] = more[(j, m)]
  return left


@functools.partial(jax.jit, static_argnames=('method',))
def _network_solve(spectra, method):
  """ONE vmapped EVBMF solve of all matrices of
  :func:`~lowrank_jax.vbmf.spectra._network_spectra_impl`.

  Spectra zero-padded to the longest, true L and M passed as data (zero
  padding adds nothing to any sum of the free energy).

  Returns:
    ``{dtype: (rank (N,), sigma2 (N,), threshold (N,), gamma (N, P),
    e (N,), redo (N,))}``: sigma2 and the threshold are those of the
    matrix times ``2**-e`` (multiply by ``2**(2e)`` and ``2**e``); gamma is
    rescaled. A matrix with NaN / Inf entries has rank -1 and NaN gamma.
    ``redo`` is 0, or what the caller must redo the matrix with
    (:func:`evbmf_per_mode`): ``_REDO_PRESCALED`` (flagged by the spectra)
    or, under ``'auto'``, ``_REDO_SVD`` for a spectrum that spans more than
    the Gram route resolves, so the SVD is compiled only for networks that
    need it.
  """
  def solve(lam, big_l, big_m, e, finite, rescale):
    res, gamma = _evbmf_sq(lam, big_l, big_m)
    unsure = (_gram_unsure(lam, big_l, big_m) if method == 'auto'
              else jnp.zeros((), bool))
    redo = jnp.where(rescale, _REDO_PRESCALED,
                     jnp.where(finite & unsure, _REDO_SVD, 0))
    # sigma2 and the threshold stay normalized (the host rescales them in
    # float64, see _per_mode); rank -1 marks a non-finite matrix.
    return (jnp.where(finite, res.rank, -1), res.sigma2, res.threshold,
            jnp.where(finite, _ldexp(gamma, e), jnp.nan), e,
            redo.astype(jnp.int8))

  return {dtype: jax.vmap(solve)(*args) for dtype, args in spectra.items()}


def _run(plan, all_layers, method, *, prescale):
  """``(per_mode, redo)`` of the planned layers: their spectra (on the
  host where :func:`~lowrank_jax.vbmf.host_spectra.serves`, else the
  compiled program), then the compiled solve.

  The solve's program is compiled in a second thread from the spectra's
  output shapes while this one computes (or lowers, compiles and runs) the
  spectra
  (XLA compiles outside the GIL; on 2 cores the first ResNet-50 call
  took 3.4 s -> 2.5 s next to a training run, the solve's compilation
  having been the longest step, after the spectra's).
  """
  sources, kinds, groups = _program_inputs(plan, all_layers)
  devices = {d for x in jax.tree.leaves(sources)
             for d in getattr(x, 'devices', lambda: ())()}
  platforms = {d.platform for d in devices} or {jax.default_backend()}
  if host_spectra.serves(kinds, method, prescale, platforms):
    shapes = host_spectra.output_shapes(groups)
    compute = lambda: host_spectra.host_spectra(sources, kinds, groups)
  else:
    program = _network_spectra['cpu' if platforms == {'cpu'} else None]
    # _gram_eigenvalues reads the switch while tracing; as a static
    # argument it gives each setting its own compiled program.
    static = dict(kinds=kinds, groups=groups, method=method,
                  prescale=prescale, lapack=linalg._LAPACK['on'])
    shapes = program.trace(sources, **static).out_info  # jit keeps the trace
    compute = lambda: program(sources, **static)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    # Lowering and compiling fill _network_solve's cache for the call below.
    solve = pool.submit(lambda: _network_solve.lower(shapes, method).compile())
    spectra = compute()
    solve.result()
  out = jax.device_get(_network_solve(spectra, method))
  return _per_mode(out, groups, plan)


@contextlib.contextmanager
def _persistent_cache(directory):
  """JAX's persistent compilation cache in ``directory`` for this block.

  Sets ``jax_compilation_cache_dir`` (and a minimum compile time of 0 s, so
  that every program of the block is stored) and restores both after.
  JAX opens one cache directory per process: the first directory used, by
  this or by JAX's own setting, serves the rest of the process.
  """
  if directory is None:
    yield
    return
  directory = os.fspath(directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f'compilation_cache={directory!r} cannot be used as a '
                     f'directory: {e}') from e
  if not os.access(directory, os.W_OK):
    raise ValueError(f'compilation_cache={directory!r} is not writable')
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], directory)
  jax.config.update(names[1], 0.0)
  try:
    yield
  finally:
    for n, v in before.items():
      jax.config.update(n, v)


def _per_mode(out, groups, plan) -> tuple[dict[tuple[int, int], tuple],
                                         dict[tuple[int, int], int]]:
  """``{(layer, mode): (rank, sigma2, threshold, gamma)}`` on the host, and
  ``{(layer, mode): redo code}`` of the matrices to redo.

  Raises:
    ValueError: a matrix came out non-finite (rank -1) although its layer's
      variables are finite.
  """
  per_mode, row, redo = {}, {}, {}
  for (big_l, _, dtype), members in groups:
    rank, sigma2, thr, gamma, e, again = out[dtype]
    for i, m in members:
      j = row.setdefault(dtype, 0)
      row[dtype] += 1
      if rank[j] < 0:
        _raise_non_finite(plan[i], m, dtype)
      # Rescaled in float64: exact for every float32 layer, where the
      # device's float32 sigma2 may over- or underflow (see evbmf).
      per_mode[(i, m)] = (int(rank[j]), _host_ldexp(float(sigma2[j]),
                                                    2 * int(e[j])),
                          _host_ldexp(float(thr[j]), int(e[j])),
                          np.asarray(gamma[j, :big_l]))
      if again[j]:
        redo[(i, m)] = int(again[j])
  return per_mode, redo


def _raise_non_finite(layer, m, dtype):
  rows, cols = layer.matrices[m]
  raise ValueError(
      f'layer {layer.path!r}: its {rows} x {cols} matrix of mode '
      f'{layer.modes[m]!r} has non-finite (NaN or Inf) entries although '
      f'the layer\'s variables are finite: building it from the '
      f'{layer.form!r} form ({layer.source}) overflowed {dtype}')
