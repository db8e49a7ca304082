"""Empirical VBMF ranks of matrices and of every layer of a network.

:func:`evbmf` is the global analytic solution of empirical variational
Bayesian matrix factorization (EVBMF) of one L x M matrix: it estimates the
noise variance sigma^2 and keeps the singular values above the EVB threshold.
It is pure ``jnp``, jittable and vmappable.

:func:`vbmf_ranks` applies it to every selected layer of a parameter tree in
one call of two compiled programs, spectra and solve (on CPU the spectra are
computed on the host by default, with the same result; a second call only for
matrices at extreme scales or whose spectrum the Gram route cannot resolve;
eigenproblems are grouped in size buckets): the two Tucker-2
unfoldings of each k x k conv, the (everything but C_out) x C_out matrix of
each dense layer and 1x1 conv, and the core of each layer already in Tucker-2
form (MUSCO re-compression). The ranks are then weakened
(:func:`weakened_rank`) and clamped on the host.

Modules:

* :mod:`~lowrank_jax.vbmf.linalg`: spectra (Gram route / SVD), the CPU
  LAPACK eigenvalue path (:func:`use_lapack_eigenvalues` turns it off),
  exact power-of-two scaling.
* :mod:`~lowrank_jax.vbmf.solver`: :func:`evbmf`, :class:`EVBMFResult`, the
  free energy and its global minimizer, input checks (implementation notes
  there).
* :mod:`~lowrank_jax.vbmf.weaken`: :func:`weakened_rank` and minimum ranks.
* :mod:`~lowrank_jax.vbmf.network`: :func:`vbmf_ranks` (per-layer plans:
  which matrices each layer contributes, unfoldings, cores, minimum ranks;
  the weakened, clamped ranks).
* :mod:`~lowrank_jax.vbmf.batched`: EVBMF of all the planned matrices in one
  call of two compiled programs (the prescaled and ``'auto'`` SVD redos,
  the opt-in persistent compilation cache).
* :mod:`~lowrank_jax.vbmf.spectra`: the first of them, the spectra program
  (Gram matrices from the kernels, size buckets, zero padding).
* :mod:`~lowrank_jax.vbmf.host_spectra`: the same spectra on the host for
  CPU calls (no compiling; :func:`use_host_spectra` turns it off).

References:
  Nakajima, Sugiyama, Babacan, Tomioka, Global Analytic Solution of
  Fully-observed Variational Bayesian Matrix Factorization, JMLR 14, 2013.
  Gusak et al., Automated Multi-Stage Compression of Neural Networks (MUSCO),
  ICCV Workshops 2019 (weakened ranks, minimum ranks).
"""

from lowrank_jax.vbmf.host_spectra import use_host_spectra
from lowrank_jax.vbmf.linalg import METHODS, use_lapack_eigenvalues
from lowrank_jax.vbmf.network import vbmf_ranks
from lowrank_jax.vbmf.solver import evbmf, EVBMFResult
from lowrank_jax.vbmf.weaken import (DEFAULT_MIN_RANK_1X1,
                                     DEFAULT_MIN_RANK_KXK, MinRank,
                                     weakened_rank)

# Internals used by tests/ and bench/: the very objects the modules use (the
# _LAPACK dict is linalg's, mutated in place by use_lapack_eigenvalues, never
# rebound; _network_spectra holds the jitted spectra programs (CPU and other
# backends) and _network_solve the jitted solve, with their caches).
from lowrank_jax.vbmf.linalg import (_gram_eigenvalues, _LAPACK,
                                     _squared_singular_values)
from lowrank_jax.vbmf.batched import _network_solve
from lowrank_jax.vbmf.spectra import _network_spectra
from lowrank_jax.vbmf.solver import _evbmf_matrix

__all__ = ['EVBMFResult', 'evbmf', 'vbmf_ranks', 'weakened_rank']
