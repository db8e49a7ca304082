"""Host BLAS threads during the library's LAPACK calls (lapack_threads)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg  # noqa: F401  (loads the BLAS jaxlib's LAPACK uses)
from threadpoolctl import threadpool_info

import lowrank_jax as lj
from lowrank_jax import forms
from lowrank_jax import lapack_threads
from lowrank_jax.vbmf import batched
from lowrank_jax.vbmf import host_spectra


def _blas_threads():
  return sorted((i['filepath'], i['num_threads']) for i in threadpool_info()
                if i['user_api'] == 'blas')


@pytest.fixture(autouse=True)
def _default_setting():
  yield
  lj.set_lapack_threads(1)


@pytest.mark.parametrize('bad', [0, -2, 1.5, True, '2'])
def test_set_lapack_threads_rejects_bad_counts(bad):
  with pytest.raises(ValueError, match=f'threads .*{bad!r}'):
    lj.set_lapack_threads(bad)


def test_limited_holds_one_thread_and_restores_nested_and_on_error():
  before = _blas_threads()
  assert before, 'no BLAS library loaded'
  seen = []

  @lapack_threads.limits_threads
  def inner():
    seen.append(_blas_threads())
    return jnp.ones(3)

  @lapack_threads.limits_threads
  def outer(fail):
    inner()
    seen.append(_blas_threads())
    if fail:
      raise RuntimeError('boom')
    return jnp.zeros(2)

  np.testing.assert_array_equal(outer(False), np.zeros(2))
  assert _blas_threads() == before
  with pytest.raises(RuntimeError, match='boom'):
    outer(True)
  assert _blas_threads() == before
  assert len(seen) == 4
  assert all(n == 1 for got in seen for _, n in got)


def test_none_leaves_the_blas_threads_alone():
  before = _blas_threads()
  assert lj.set_lapack_threads(None) is None
  with lapack_threads.limited():
    assert _blas_threads() == before


def test_threads_restore_the_counts_when_the_last_leaves():
  # OpenBLAS (pthreads) honours a limit set from the main thread; set from
  # another Python thread it may not hold (threadpoolctl documents that),
  # so only the bookkeeping is checked here: nested across threads, the
  # counts come back once, when the last call leaves.
  before = _blas_threads()
  entered, release = threading.Barrier(3), threading.Event()

  def work():
    with lapack_threads.limited():
      entered.wait()
      release.wait()

  workers = [threading.Thread(target=work) for _ in range(2)]
  for w in workers:
    w.start()
  entered.wait()
  assert lapack_threads._ACTIVE['depth'] == 2
  release.set()
  for w in workers:
    w.join()
  assert lapack_threads._ACTIVE == {'depth': 0, 'saved': ()}
  assert _blas_threads() == before


def test_vbmf_ranks_and_splits_run_under_the_limit(monkeypatch):
  seen, grams = [], []
  run, mode_gram = batched._run, host_spectra._mode_gram

  def spy(*args, **kwargs):
    seen.append(_blas_threads())
    return run(*args, **kwargs)

  def spy_gram(*args):  # in the host spectra's worker threads
    grams.append(lapack_threads.blas_threads())
    return mode_gram(*args)

  monkeypatch.setattr(batched, '_run', spy)
  monkeypatch.setattr(host_spectra, '_mode_gram', spy_gram)
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 24))
  params = {'conv': {'kernel': kernel}}
  ranks = lj.vbmf_ranks(params, min_rank=1)
  assert seen and all(n == 1 for got in seen for _, n in got)
  assert grams == [1, 1]  # both modes' Gram matrices, on one BLAS thread
  # The same factors with the host BLAS as it is.
  split = forms.get('tucker2').from_kernel(kernel, (4, 6))
  lj.set_lapack_threads(None)
  assert lj.vbmf_ranks(params, min_rank=1) == ranks
  free = forms.get('tucker2').from_kernel(kernel, (4, 6))
  for name in split:
    np.testing.assert_allclose(split[name], free[name], rtol=1e-5,
                               atol=1e-6)


def test_eager_evbmf_and_overparam_factors_run_under_the_limit(monkeypatch):
  from lowrank_jax.forms import overparam  # pylint: disable=g-import-not-at-top
  from lowrank_jax.vbmf import solver  # pylint: disable=g-import-not-at-top
  seen = {}

  def spy(name, fn):
    def call(*args, **kwargs):
      seen.setdefault(name, []).append(_blas_threads())
      return fn(*args, **kwargs)
    return call

  monkeypatch.setitem(solver._EVBMF_COMPILED, 'auto',
                      spy('evbmf', solver._EVBMF_COMPILED['auto']))
  monkeypatch.setattr(overparam, '_orthonormal_rows',
                      spy('overparam', overparam._orthonormal_rows))
  y = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (24, 40)))
  kernel = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 8, 12))
  key = jax.random.PRNGKey(3)
  got = lj.evbmf(y)
  factors = overparam.from_kernel(kernel, (16, 24), key=key)
  assert set(seen) == {'evbmf', 'overparam'}
  assert all(n == 1 for calls in seen.values() for got_ in calls
             for _, n in got_)
  # The same results with the host BLAS as it is.
  lj.set_lapack_threads(None)
  free = lj.evbmf(y)
  assert int(free.rank) == int(got.rank)
  np.testing.assert_allclose(free.shrunk, got.shrunk, rtol=1e-5, atol=1e-6)
  again = overparam.from_kernel(kernel, (16, 24), key=key)
  for name in factors:
    np.testing.assert_allclose(again[name], factors[name], rtol=1e-5,
                               atol=1e-6)
