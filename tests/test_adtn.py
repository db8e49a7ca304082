"""Tests of the ADTN form (forms/adtn.py) and the adtn_encode transform."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax import adtn
from lowrank_jax import adtn_timing
from lowrank_jax import count_flops
from lowrank_jax import count_params
from lowrank_jax import forms
from lowrank_jax import models
from lowrank_jax import transforms
from lowrank_jax import tree
from lowrank_jax.forms import adtn as adtn_form
from lowrank_jax.forms import adtn_fit
from lowrank_jax.forms import adtn_shared as adtn_shared_form

_ACTS = {'relu': lambda x: np.maximum(x, 0), 'tanh': np.tanh,
         'identity': lambda x: x}


def _naive_state(gates, nonlin):
  """The ADTN output built from full 2^Q x 2^Q layer operators (kron)."""
  gates = np.asarray(gates, np.float64)
  m_layers, q = gates.shape[0], gates.shape[1] + 1
  state = np.zeros(2 ** q)
  state[0] = 1.0
  for m in range(m_layers):
    if m:
      state = _ACTS[nonlin](state)
    op = np.eye(2 ** q)
    for i in range(q - 1):  # staircase: (0,1), (1,2), ..., (Q-2, Q-1)
      g = gates[m, i].reshape(4, 4)
      full = np.kron(np.kron(np.eye(2 ** i), g), np.eye(2 ** (q - 2 - i)))
      op = full @ op
    state = op @ state
  return state


def _random_gates(key, m, q, dtype=jnp.float32):
  return jax.random.normal(key, (m, q - 1, 2, 2, 2, 2), dtype) * 0.7


@pytest.mark.parametrize('q,m,nonlin', [(4, 1, 'relu'), (4, 2, 'relu'),
                                        (5, 3, 'tanh'), (6, 3, 'relu'),
                                        (6, 2, 'identity')])
def test_decode_matches_naive_dense_contraction(q, m, nonlin):
  gates = _random_gates(jax.random.PRNGKey(q * 10 + m), m, q)
  want = _naive_state(gates, nonlin)
  # Gate by gate, the default blocks (a last block of fewer gates when
  # BLOCK does not divide Q-1), and a whole layer as one block.
  for block in (1, adtn_form.BLOCK, q - 1):
    got = np.asarray(adtn_form.contract(gates, nonlin, block=block),
                     np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max(),
                               err_msg=f'block={block}')


def test_block_operator_is_the_product_of_its_gates():
  gates = _random_gates(jax.random.PRNGKey(3), 1, 5)[0].reshape(4, 4, 4)
  want = np.eye(32)
  for i, g in enumerate(np.asarray(gates, np.float64)):
    want = np.kron(np.kron(np.eye(2 ** i), g), np.eye(2 ** (3 - i))) @ want
  np.testing.assert_allclose(adtn_form.block_operator(gates), want,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='block must be >= 1'):
    adtn_form.contract(gates.reshape(1, 4, 2, 2, 2, 2), block=0)


def test_blocked_decode_has_the_gate_by_gate_gradient():
  # 18 qubits, as FC-2's 784 x 256 kernel: blocks of 3 gates and a last
  # block of 2, checked in float64 against going gate by gate.
  with jax.enable_x64(True):
    gates = _random_gates(jax.random.PRNGKey(4), 3, 18, jnp.float64)
    probe = jax.random.normal(jax.random.PRNGKey(5), (2 ** 18,), jnp.float64)

    def grad(block):
      return jax.grad(lambda g: jnp.sum(
          adtn_form.contract(g, 'relu', block=block) * probe))(gates)

    got, want = grad(adtn_form.BLOCK), grad(1)
  assert got.dtype == jnp.float64
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-10,
                             atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize('channel_scale', [False, True])
def test_to_kernel_crops_padding_reshapes_and_scales(channel_scale):
  q, m, shape = 4, 2, (3, 5)          # 15 entries, padded to 2^4 = 16
  gates = _random_gates(jax.random.PRNGKey(1), m, q)
  scale = jnp.arange(1.0, 6.0) if channel_scale else jnp.asarray(2.5)
  v = {'adtn_gates': gates, 'adtn_scale': scale,
       **adtn_form.metadata(shape, 'relu')}
  assert forms.identify(v) == 'adtn'
  assert adtn_form.kernel_shape(v) == shape
  assert adtn_form.nonlinearity(v) == 'relu'
  assert adtn_form.ranks(v) == (m, q)
  want = _naive_state(gates, 'relu')[:15].reshape(shape) * np.asarray(scale)
  np.testing.assert_allclose(forms.to_kernel(v), want, rtol=1e-4, atol=1e-5)


def test_normalized_decode_norm_is_the_scale_and_ignores_gate_scaling():
  q, m, shape = 5, 3, (4, 7)                # 28 of 32 entries kept
  gates = _random_gates(jax.random.PRNGKey(4), m, q)
  v = {'adtn_gates': gates, 'adtn_scale': jnp.asarray(-2.5),
       **adtn_form.metadata(shape, 'relu', normalize=True)}
  assert forms.identify(v) == 'adtn' and adtn_form.normalized(v)
  assert v['adtn_nonlin'].shape == (0, 1, 2)
  state = _naive_state(gates, 'relu')[:28]
  want = -2.5 * state / np.linalg.norm(state)
  w = forms.to_kernel(v)
  np.testing.assert_allclose(w, want.reshape(shape), rtol=1e-4, atol=1e-6)
  assert math.isclose(float(jnp.linalg.norm(w)), 2.5, rel_tol=1e-5)
  # Shrinking or growing any gate (or all of them: the collapse seen in
  # training) leaves the kernel as it was: ReLU is positively homogeneous,
  # and the state, normalized after every layer, neither under- nor
  # overflows (gates * 1e-3 or * 1e3: a factor 1e-36 or 1e36 per layer).
  for factor in (1e-3, 0.5, 40.0):
    shrunk = gates.at[1, 2].multiply(factor)
    np.testing.assert_allclose(
        forms.to_kernel({**v, 'adtn_gates': shrunk}), w, rtol=1e-4,
        atol=1e-6)
  for factor in (1e-3, 1e3):
    np.testing.assert_allclose(
        forms.to_kernel({**v, 'adtn_gates': gates * factor}), w, rtol=1e-4,
        atol=1e-6)
  # So no gradient step changes a gate's norm to first order: each gate's
  # gradient is orthogonal to the gate.
  probe = jax.random.normal(jax.random.PRNGKey(5), shape)
  grad = jax.grad(lambda g: jnp.sum(adtn_form.decode(
      g, jnp.asarray(1.0), shape, 'relu', normalize=True) * probe))(gates)
  dots = jnp.einsum('mi...,mi...->mi', grad, gates)
  scale = float(jnp.abs(grad).max() * jnp.abs(gates).max())
  assert float(jnp.abs(dots).max()) < 1e-4 * scale
  assert float(jnp.abs(grad).max()) > 0
  # Carriers saved before the normalized decode (two axes) decode as before.
  plain = {**v, **adtn_form.metadata(shape, 'relu')}
  assert not adtn_form.normalized(plain)
  np.testing.assert_allclose(forms.to_kernel(plain),
                             -2.5 * state.reshape(shape), rtol=1e-4,
                             atol=1e-6)
  assert adtn_form.decode_macs(v) == adtn_form.decode_macs(plain) + (
      (m - 1) * 2 ** (q + 1) + 28)


def test_normalized_fit_and_encode_give_the_same_kernel_as_plain():
  # The fit's loss is scale-invariant, so the same key and steps give the
  # same gates; the kernels then agree (same norm, same direction).
  kernel = jax.random.normal(jax.random.PRNGKey(6), (24, 40))
  params = {'layer': {'kernel': kernel, 'bias': jnp.zeros(40)}}
  out = {}
  for normalize in (False, True):
    out[normalize], rep = adtn.adtn_encode(
        params, depth=2, steps=15, min_size=1, normalize=normalize,
        match_norm=True, report=True, key=jax.random.PRNGKey(0))
    assert rep[0].rel_error <= math.sqrt(2) + 1e-5
  layer = out[True]['layer']
  assert adtn_form.normalized(layer)
  assert not adtn_form.normalized(out[False]['layer'])
  assert set(layer) == adtn_form.KEYS | {'bias'}
  np.testing.assert_allclose(forms.to_kernel(layer),
                             forms.to_kernel(out[False]['layer']),
                             rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(jnp.linalg.norm(forms.to_kernel(layer)),
                             jnp.linalg.norm(kernel), rtol=1e-5)
  assert count_params(out[True]) == count_params(out[False])


@pytest.mark.parametrize('nonlin', ['tanh', 'relu'])
def test_gradient_matches_finite_differences(nonlin):
  with jax.enable_x64(True):
    q, m, shape = 5, 3, (4, 7)
    key = jax.random.PRNGKey(3)
    gates = _random_gates(key, m, q, jnp.float64)
    scale = jnp.asarray(1.3, jnp.float64)
    probe = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float64)

    def loss(g, s):
      return jnp.sum(adtn_form.decode(g, s, shape, nonlin) * probe) ** 2

    gg, gs = jax.grad(loss, argnums=(0, 1))(gates, scale)
    assert gg.dtype == jnp.float64
    eps = 1e-6
    for i in range(4):
      d = jax.random.normal(jax.random.fold_in(key, 10 + i), gates.shape,
                            jnp.float64)
      fd = (loss(gates + eps * d, scale) - loss(gates - eps * d, scale)) / (
          2 * eps)
      np.testing.assert_allclose(jnp.vdot(gg, d), fd, rtol=1e-6, atol=1e-9)
    fd = (loss(gates, scale + eps) - loss(gates, scale - eps)) / (2 * eps)
    np.testing.assert_allclose(gs, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('shape,m,channel_scale',
                         [((64, 64), 2, False), ((5, 5, 6, 16), 2, False),
                          ((40, 50), 1, True)])
def test_param_count_formula_matches_tree(shape, m, channel_scale):
  kernel = jax.random.normal(jax.random.PRNGKey(0), shape)
  params = {'layer': {'kernel': kernel, 'bias': jnp.zeros(shape[-1])}}
  new, rep = adtn.adtn_encode(params, depth=m, steps=0, min_size=1,
                              channel_scale=channel_scale, report=True,
                                  key=jax.random.PRNGKey(0))
  q = adtn_form.num_qubits(math.prod(shape))
  assert 2 ** q >= math.prod(shape) > 2 ** (q - 1)
  want = adtn.adtn_param_count(
      q, m, scale_size=shape[-1] if channel_scale else 1)
  assert want == 16 * (q - 1) * m + (shape[-1] if channel_scale else 1)
  assert count_params(new['layer']) == want + shape[-1]   # + bias
  assert new['layer']['adtn_gates'].shape == (m, q - 1, 2, 2, 2, 2)
  assert rep[0].action == 'split' and rep[0].ranks == (m, q)
  assert rep[0].params_after == want
  assert rep[0].params_before == math.prod(shape)
  assert forms.to_kernel(new['layer']).shape == shape


def test_encode_rank1_kernel_reaches_small_error():
  rng = np.random.default_rng(0)
  w = np.outer(rng.normal(size=64), rng.normal(size=64)).astype(np.float32)
  params = {'params': {'fc': {'kernel': jnp.asarray(w)}}}
  errs = {}
  for m in (1, 6):
    new, rep = adtn.adtn_encode(params, depth=m, steps=1500, min_size=1,
                                report=True, key=jax.random.PRNGKey(0))
    w_hat = np.asarray(forms.to_kernel(new['params']['fc']))
    err = np.linalg.norm(w - w_hat) / np.linalg.norm(w)
    np.testing.assert_allclose(rep[0].rel_error, err, rtol=1e-3, atol=1e-5)
    errs[m] = err
  # Measured: M=1 ~0.88 (one staircase = bond dimension 2), M=6 ~0.005
  # (0.005-0.045 over 5 random rank-1 kernels).
  assert errs[6] < 0.1
  assert errs[1] > 0.5
  assert params['params']['fc']['kernel'].shape == (64, 64)   # not modified


def _trained_like(n_in, n_out, *, rank=3, noise=0.3, seed=0):
  """A low-rank kernel with smooth factors plus Gaussian noise (noise/signal
  = ``noise`` in Frobenius norm): the SVD's error floor is ~``noise``."""
  rng = np.random.default_rng(seed)

  def smooth(n):
    x = np.arange(n)[:, None] / n
    return sum(rng.normal(size=(1, rank)) *
               np.cos(2 * np.pi * (f * x + rng.uniform(size=(1, rank))))
               for f in (1, 2, 3))
  w = smooth(n_in) @ smooth(n_out).T
  w = w / np.linalg.norm(w) + noise * rng.normal(size=w.shape) / np.sqrt(
      w.size)
  return jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize('steps', [0, 5])
@pytest.mark.parametrize('channel_scale', [False, True])
def test_fit_error_never_above_the_zero_kernel(steps, channel_scale):
  # A Gaussian kernel the ADTN cannot represent: the least-squares scale
  # keeps the error <= 1 (the zero kernel's). The old norm-matched initial
  # scale gave ~sqrt(2) here at steps=0 and ~1.4 after 20 steps.
  kernel = jax.random.normal(jax.random.PRNGKey(1), (40, 30))
  v, err, _ = adtn_fit.fit(kernel, 2, steps=steps, noise=0.5,
                            channel_scale=channel_scale,
                            key=jax.random.PRNGKey(0))
  w_hat = adtn_form.to_kernel(v)
  want = float(jnp.linalg.norm(w_hat - kernel) / jnp.linalg.norm(kernel))
  assert err == pytest.approx(want, rel=1e-4)
  assert err <= 1.0 + 1e-6
  # The scale is least-squares: a better multiple of the decode there isn't.
  for factor in (0.9, 1.1):
    assert float(jnp.linalg.norm(factor * w_hat - kernel)) >= float(
        jnp.linalg.norm(w_hat - kernel)) * (1 - 1e-6)
  # match_norm trades the error for the kernel's norm.
  v, err_mn, _ = adtn_fit.fit(kernel, 2, steps=steps, noise=0.5,
                               channel_scale=channel_scale, match_norm=True,
                               key=jax.random.PRNGKey(0))
  np.testing.assert_allclose(jnp.linalg.norm(adtn_form.to_kernel(v)),
                             jnp.linalg.norm(kernel), rtol=1e-4)
  assert err_mn >= err - 1e-6


def test_fit_of_trained_like_kernel_falls_with_steps_and_depth():
  w = _trained_like(32, 32)               # SVD: rank 1 0.43, rank 3 0.26
  errs = {}
  for m, steps in ((1, 300), (3, 30), (3, 300)):
    _, errs[m, steps], losses = adtn_fit.fit(w, m, steps=steps,
                                              key=jax.random.PRNGKey(0))
    assert losses.shape == (steps,)
    assert errs[m, steps] <= math.sqrt(float(losses[0])) + 1e-6
  # Measured (seeds 0-2 of the kernel): M=3 after 300 steps 0.28-0.29,
  # after 30 steps 0.80-0.97; M=1 (bond dimension 2) after 300: 0.48-0.64.
  assert errs[3, 300] < 0.4
  assert errs[3, 300] < errs[3, 30] - 0.2
  assert errs[3, 300] < errs[1, 300] - 0.1


def test_model_apply_equals_decoded_dense_and_collapse():
  model = models.get_model('lenet5')
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  new, rep = adtn.adtn_encode(
      variables, select=['conv2', 'fc2', 'head'], depth=2, steps=0,
      noise=0.5, min_size=2000, report=True, key=jax.random.PRNGKey(0))
  by_path = {a.path: a for a in rep}
  assert by_path['conv2'].action == 'split'
  assert by_path['fc2'].action == 'split'
  assert by_path['head'].action == 'skipped'            # 840 < 2000
  assert 'min_size' in by_path['head'].reason
  assert transforms.layer_forms(new) == {
      'conv1': 'dense', 'conv2': 'adtn', 'fc1': 'dense', 'fc2': 'adtn',
      'head': 'dense'}
  out = lj.apply(model, new, x)
  # Same tree with every ADTN replaced by its decoded kernel, by hand.
  dense = {'params': dict(new['params'])}
  for path in ('conv2', 'fc2'):
    layer = new['params'][path]
    dense['params'][path] = {'kernel': adtn_form.to_kernel(layer),
                             'bias': layer['bias']}
  np.testing.assert_allclose(out, lj.apply(model, dense, x), rtol=1e-5,
                             atol=1e-5)
  # collapse merges ADTN layers into dense kernels through forms.to_kernel.
  merged, crep = transforms.collapse(new, report=True)
  assert set(transforms.layer_forms(merged).values()) == {'dense'}
  assert {a.path for a in crep if a.action == 'merged'} == {'conv2', 'fc2'}
  np.testing.assert_allclose(lj.apply(model, merged, x), out, rtol=1e-5,
                             atol=1e-5)
  # flops: an ADTN layer runs as its dense kernel.
  f_new = count_flops(model, new, (1, 28, 28, 1))
  f_dense = count_flops(model, variables, (1, 28, 28, 1))
  assert f_new.total == f_dense.total
  assert f_new.per_layer['conv2'].form == 'adtn'
  assert count_params(new) < count_params(variables)
  # decode time helper and decode cost.
  timing = adtn_timing.decode_time(new, repeats=2)
  assert set(timing.macs) == {'conv2', 'fc2'} and timing.seconds > 0
  v = new['params']['fc2']                # 120 x 84 -> Q = 14, M = 2
  # Layer 0 on the growing prefix; layer 1's 13 gates in four blocks of 3
  # (16 x 16 operators, each built from its gates) and one of 1 (4 x 4).
  assert timing.macs['fc2'] == (8 * (2 ** 13 - 1)
                                + 4 * (16 * 2 ** 14 + 4 * 3 * 16 ** 2)
                                + (4 * 2 ** 14 + 4 * 1 * 4 ** 2)
                                + 120 * 84)


def test_bad_inputs_and_skips():
  params = {'a': {'kernel': jnp.ones((64, 64))},
            'b': {'kernel': jnp.ones((8, 8))}}
  with pytest.raises(ValueError, match='depth'):
    adtn.adtn_encode(params, depth=0, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='relu'):
    adtn.adtn_encode(params, depth=2, nonlinearity='gelu',
                     key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='unknown nonlinearity'):
    adtn_form.contract(jnp.zeros((1, 1, 2, 2, 2, 2)), 'swish')
  with pytest.raises(ValueError, match='matches no layer'):
    adtn.adtn_encode(params, depth=2, select='nope', key=jax.random.PRNGKey(0))
  new, rep = adtn.adtn_encode(params, depth=2, steps=0, min_size=1,
                              report=True, key=jax.random.PRNGKey(0))
  by_path = {a.path: a for a in rep}
  # 8x8 = 64 entries; ADTN Q=6, M=2 has 161 parameters -> skipped.
  assert by_path['b'].action == 'skipped'
  assert '161 parameters' in by_path['b'].reason
  assert by_path['a'].action == 'split'
  assert forms.identify(new['b']) == 'dense'
  _, rep = adtn.adtn_encode(params, depth=2, steps=0, min_size=5000,
                            report=True, key=jax.random.PRNGKey(0))
  assert all(a.action == 'skipped' and 'min_size' in a.reason for a in rep)


def test_training_through_decode_lowers_loss():
  data = pytest.importorskip('lowrank_jax.train.data')
  try:
    ds = data.load_dataset('fashion_mnist_local', train_subset=2048,
                           test_subset=512)
  except data.DatasetUnavailableError as e:   # pragma: no cover
    pytest.skip(str(e))
  model = models.get_model('fc2')
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  # A randomly initialised fc1 is not representable (fit error ~1; the
  # least-squares fit shrinks it towards 0): match_norm keeps its scale.
  # Measured with init noise 0.5, the first Adam step (lr 1e-2) took the
  # loss from 2.4 to 50-340 (20 or 100 fit steps, with or without
  # match_norm); with noise 0.1 it falls steadily.
  new, rep = adtn.adtn_encode(variables, select='fc1', depth=3, steps=20,
                              noise=0.1, match_norm=True, report=True,
                              key=jax.random.PRNGKey(0))
  assert rep[0].ranks == (3, 18)                    # 784*256 -> 2^18
  params = new['params']
  trainable = params['fc1']                         # gates, scale, bias

  def loss_fn(fc1, x, y):
    logits = lj.apply(model, {'params': {**params, 'fc1': fc1}}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  opt = optax.adam(1e-2)

  @jax.jit
  def step(fc1, state, x, y):
    loss, grad = jax.value_and_grad(loss_fn)(fc1, x, y)
    updates, state = opt.update(grad, state, fc1)
    return optax.apply_updates(fc1, updates), state, loss, grad

  state = opt.init(trainable)
  gates0 = trainable['adtn_gates']
  losses = []
  for epoch in range(2):
    for x, y in data.iterate_batches(ds.train, 256, mean=ds.mean, std=ds.std,
                                     seed=0, epoch=epoch):
      trainable, state, loss, grad = step(trainable, state, x, y)
      losses.append(float(loss))
      assert float(jnp.abs(grad['adtn_gates']).max()) > 0
  assert len(losses) == 16
  assert float(jnp.abs(trainable['adtn_gates'] - gates0).max()) > 1e-3
  # Measured: 2.42 -> 2.07 (mean of the last 4; only the ADTN layer's
  # gates, scale and bias train).
  assert np.mean(losses[-4:]) < losses[0] - 0.2, losses


def _shared_lenet5(steps=0):
  model = models.get_model('lenet5')
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  new, rep = adtn.adtn_encode(variables, select='fc1|fc2', depth=2,
                              steps=steps, noise=0.5, share=True, report=True,
                                  key=jax.random.PRNGKey(0))
  return model, x, variables, new, rep


def test_shared_adtn_one_network_for_two_layers():
  model, x, variables, new, rep = _shared_lenet5(steps=5)
  # fc1 (400 x 120) and fc2 (120 x 84): 58,080 entries -> Q = 16, M = 2.
  assert [(a.path, a.action, a.group, a.ranks) for a in rep] == [
      ('fc1', 'split', 'g0', (2, 16)), ('fc2', 'split', 'g0', (2, 16))]
  group = new['params']['adtn_shared']['g0']
  assert group['adtn_gates'].shape == (2, 15, 2, 2, 2, 2)
  assert transforms.layer_forms(new)['fc1'] == 'adtn_shared'
  # Parameters: the dense kernels go, one network + one scalar per member
  # come; the report's params_after adds up to the same.
  group_params = 16 * 15 * 2 + 1
  assert count_params(new) == (count_params(variables) - 400 * 120
                               - 120 * 84 + group_params + 2)
  assert sum(a.params_after for a in rep) == group_params + 2
  # Each member's kernel is its slot of the one decoded vector.
  flat = np.asarray(adtn_form.contract(group['adtn_gates'], 'relu'))
  flat = flat * float(group['adtn_scale'])
  dense = adtn.adtn_unshare(new)
  assert 'adtn_shared' not in dense['params']
  for path, start, shape in (('fc1', 0, (400, 120)),
                             ('fc2', 48000, (120, 84))):
    want = flat[start:start + math.prod(shape)].reshape(shape) * float(
        new['params'][path]['adtn_ref_scale'])
    np.testing.assert_allclose(dense['params'][path]['kernel'], want,
                               rtol=1e-5, atol=1e-7)
    assert rep[start > 0].rel_error <= 1.0 + 1e-6   # least-squares ref
    assert math.isclose(rep[start > 0].rel_error, float(
        np.linalg.norm(want - variables['params'][path]['kernel']) /
        np.linalg.norm(variables['params'][path]['kernel'])), rel_tol=1e-4)
  # The same model.apply runs the shared tree, as the dense one.
  out = lj.apply(model, new, x)
  np.testing.assert_allclose(out, lj.apply(model, dense, x), rtol=1e-5,
                             atol=1e-5)


def test_shared_adtn_normalized_decode():
  model = models.get_model('lenet5')
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
  variables = model.init(jax.random.PRNGKey(0), x)
  new = adtn.adtn_encode(variables, select='fc1|fc2', depth=2, steps=3,
                         noise=0.5, share=True, normalize=True,
                         key=jax.random.PRNGKey(0))
  group = new['params']['adtn_shared']['g0']
  assert adtn_form.normalized(group)
  flat = np.asarray(adtn_form.contract(group['adtn_gates'], 'relu'))[:58080]
  flat = flat / np.linalg.norm(flat) * float(group['adtn_scale'])
  np.testing.assert_allclose(adtn_shared_form.decode_group(group), flat,
                             rtol=1e-4, atol=1e-7)
  # A group's whole decode has the scale's norm, so shrunk gates change
  # nothing, even at 0.05^30 ~ 1e-39 over M (Q-1) = 30 gates (the state
  # is normalized per layer); the model runs it as the unshared tree.
  shrunk = {**group, 'adtn_gates': group['adtn_gates'] * 0.05}
  np.testing.assert_allclose(adtn_shared_form.decode_group(shrunk), flat,
                             rtol=1e-4, atol=1e-7)
  dense = adtn.adtn_unshare(new)
  np.testing.assert_allclose(
      dense['params']['fc2']['kernel'],
      flat[48000:].reshape(120, 84) * float(
          new['params']['fc2']['adtn_ref_scale']), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(lj.apply(model, new, x),
                             lj.apply(model, dense, x), rtol=1e-5, atol=1e-5)


def test_shared_adtn_gradients_from_all_members_reach_the_gates():
  model, x, _, new, _ = _shared_lenet5()

  def via_model(gates):
    p = dict(new['params'])
    p['adtn_shared'] = {'g0': {**p['adtn_shared']['g0'],
                               'adtn_gates': gates}}
    return jnp.sum(lj.apply(model, {'params': p}, x) ** 2)

  def via_unshare(gates):   # members decoded by hand, outside the layers
    p = dict(new['params'])
    p['adtn_shared'] = {'g0': {**p['adtn_shared']['g0'],
                               'adtn_gates': gates}}
    return jnp.sum(lj.apply(model, adtn.adtn_unshare({'params': p}), x) ** 2)

  gates = new['params']['adtn_shared']['g0']['adtn_gates']
  g_model = jax.jit(jax.grad(via_model))(gates)
  np.testing.assert_allclose(g_model, jax.grad(via_unshare)(gates),
                             rtol=1e-4, atol=1e-6)
  # Both members contribute: freezing fc2's slot changes the gradient.
  def fc1_only(gates):
    p = dict(new['params'])
    p['adtn_shared'] = {'g0': {**p['adtn_shared']['g0'],
                               'adtn_gates': gates}}
    p['fc2'] = adtn.adtn_unshare(new)['params']['fc2']
    return jnp.sum(lj.apply(model, {'params': p}, x) ** 2)
  # (Relative: with steps=0 on random kernels the least-squares scales,
  # hence the gradients, are small.)
  assert float(jnp.abs(jax.grad(fc1_only)(gates) - g_model).max()) > (
      1e-3 * float(jnp.abs(g_model).max()))
  # The decode cost is the group's, counted once.
  timing = adtn_timing.decode_time(new, repeats=1)
  assert set(timing.macs) == {'adtn_shared/g0'}


def test_shared_adtn_bad_inputs():
  model, x, variables, new, _ = _shared_lenet5()
  orphan = {'params': {k: v for k, v in new['params'].items()
                       if k != 'adtn_shared'}}
  with pytest.raises(ValueError, match=r"'fc1'.*'g0'"):
    lj.apply(model, orphan, x)
  with pytest.raises(ValueError, match='adtn_unshare'):
    forms.to_kernel(new['params']['fc1'])
  with pytest.raises(ValueError, match='adtn_unshare'):
    transforms.svd_split(new, {'fc1': 4})
  with pytest.raises(TypeError, match='one int depth'):
    adtn.adtn_encode(variables, select='fc1|fc2', depth={'fc1': 2},
                     share=True, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='per-channel'):
    adtn.adtn_encode(variables, select='fc1|fc2', depth=2, share=True,
                     channel_scale=True, key=jax.random.PRNGKey(0))
  # Encoding again with share: members are skipped, a second group is new.
  again, rep = adtn.adtn_encode(new, select='fc1|fc2|conv2', depth=2,
                                steps=0, min_size=1000, share=True,
                                report=True, key=jax.random.PRNGKey(0))
  by_path = {a.path: a for a in rep}
  assert by_path['conv2'].action == 'split' and by_path['conv2'].group == 'g1'
  assert by_path['fc1'].action == 'skipped'
  assert 'shared group' in by_path['fc1'].reason
  assert set(again['params']['adtn_shared']) == {'g0', 'g1'}
  np.testing.assert_allclose(
      lj.apply(model, again, x),
      lj.apply(model, adtn.adtn_unshare(again), x), rtol=1e-5, atol=1e-5)
  # A group that would not be smaller than its members is not made.
  small = {'a': {'kernel': jnp.ones((8, 8))}, 'b': {'kernel': jnp.ones((4, 4))}}
  _, rep = adtn.adtn_encode(small, depth=2, steps=0, min_size=1, share=True,
                            report=True, key=jax.random.PRNGKey(0))
  assert all(a.action == 'skipped' and 'parameters >=' in a.reason
             for a in rep)
