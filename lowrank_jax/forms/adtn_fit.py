"""Fitting ADTN gates to a kernel: the ADTN form's initialization.

:func:`fit` finds gates whose decode (:func:`lowrank_jax.forms.adtn.decode`)
is close to a given kernel: Adam on the gates from near-identity
(:func:`init_gates`), with the scale at its least-squares value throughout
(:func:`ls_scale`, variable projection). The form itself (sizes, carriers,
decoding) is :mod:`lowrank_jax.forms.adtn`; its ``from_kernel`` calls
:func:`fit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.forms.adtn import (check_nonlinearity, decode, metadata,
                                    num_qubits)


def init_gates(key, m: int, q: int, *, noise: float = 0.1,
               dtype=jnp.float32) -> jax.Array:
  """Near-identity gates: ``I_4 + noise * N(0, 1)``, shape (M, Q-1, 2,2,2,2).

  Deep products of random gates have outputs whose norm and direction are
  dominated by a few gates (vanishing/exploding through M * (Q-1) factors);
  identity-plus-noise keeps the initial output close to ``e_0`` with O(1)
  norm, and the noise breaks the symmetry so every gate gets a gradient.
  """
  eye = jnp.eye(4, dtype=dtype)
  g = eye + noise * jax.random.normal(key, (m, q - 1, 4, 4), dtype)
  return g.reshape(m, q - 1, 2, 2, 2, 2)


def _ls_loss(w, target, norm2, channel_scale: bool):
  """``||s w - target||^2 / norm2`` at the least-squares scale ``s``:
  ``(||target||^2 - <w, target>^2 / ||w||^2) / norm2`` (per column with
  ``channel_scale``); 1 where ``w`` is 0, with a zero gradient there."""
  axes = tuple(range(w.ndim - 1)) if channel_scale else None
  num = jnp.sum(w * target, axis=axes)
  den = jnp.sum(w * w, axis=axes)
  safe = jnp.where(den > 0, den, 1)
  explained = jnp.where(den > 0, num ** 2 / safe, 0)
  return jnp.sum(jnp.sum(target ** 2, axis=axes) - explained) / norm2


@functools.partial(jax.jit, static_argnames=('nonlin', 'steps',
                                             'channel_scale', 'normalize'))
def _fit(kernel, gates, learning_rate, final_lr_ratio, clip, *, nonlin,
         steps, channel_scale, normalize):
  """Adam on the gates alone, the scale solved in closed form at every step
  (variable projection): the loss is the squared relative error at the
  least-squares scale. With the scale a free Adam variable instead, a small
  initial least-squares scale (kernel nearly orthogonal to the initial
  decode) starves the gates of gradient, and 20 steps left a randomly
  initialised fc1 decoding to a spiky kernel that made training blow up."""
  shape = kernel.shape
  target = kernel.astype(gates.dtype)
  norm2 = jnp.maximum(jnp.sum(target ** 2), jnp.finfo(target.dtype).tiny)
  one = jnp.ones((), gates.dtype)

  def loss_fn(g):
    return _ls_loss(decode(g, one, shape, nonlin, normalize=normalize),
                    target, norm2, channel_scale)

  def schedule(count):
    # Cosine decay from learning_rate to learning_rate * final_lr_ratio.
    frac = jnp.minimum(count / max(steps, 1), 1.0)
    cos = 0.5 * (1 + jnp.cos(jnp.pi * frac))
    return learning_rate * (final_lr_ratio + (1 - final_lr_ratio) * cos)
  # clip <= 0 disables clipping (an infinite threshold).
  clip = jnp.where(clip > 0, clip, jnp.inf)
  opt = optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule))

  def step(carry, _):
    g, s, best_g, best_l = carry
    loss, grad = jax.value_and_grad(loss_fn)(g)
    better = loss < best_l        # False for NaN: a blow-up is never kept
    best_g = jnp.where(better, g, best_g)
    best_l = jnp.where(better, loss, best_l)
    updates, s = opt.update(grad, s, g)
    return (optax.apply_updates(g, updates), s, best_g, best_l), loss

  init = (gates, opt.init(gates), gates, jnp.asarray(jnp.inf, gates.dtype))
  (g, _, best_g, best_l), losses = jax.lax.scan(step, init, None,
                                                length=steps)
  return jnp.where(loss_fn(g) < best_l, g, best_g), losses


def ls_scale(w, target, *, channel_scale: bool = False) -> jax.Array:
  """The least-squares scale ``s`` minimising ``||s * w - target||``.

  ``<w, target> / ||w||^2`` (per output channel, i.e. per last-axis column,
  with ``channel_scale``); 0 where ``w`` is 0. With it the error
  ``||s w - target|| / ||target||`` is ``sqrt(1 - cos^2)`` of the angle
  between ``w`` and ``target``: never above 1, the error of the zero tensor.
  """
  axes = tuple(range(w.ndim - 1)) if channel_scale else None
  num = jnp.sum(w * target, axis=axes)
  den = jnp.sum(w * w, axis=axes)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def fit(kernel, depth: int, *, nonlinearity: str = 'relu', steps: int = 500,
        learning_rate: float = 1e-2, final_lr_ratio: float = 0.01,
        noise: float = 0.1, channel_scale: bool = False, clip: float = 1.0,
        match_norm: bool = False, normalize: bool = False,
        key: jax.Array | None = None):
  """Fits ADTN gates to a kernel by Adam on ``||W - W_hat||^2 / ||W||^2``.

  The scale is at its least-squares value for the gates throughout
  (:func:`ls_scale`; Adam moves the gates only) and the best iterate is
  kept, so the returned error is at most 1 (the zero tensor's) and at most
  the initialisation's. A norm-matched initial scale (``||W_hat|| =
  ||W||``, the init before 2025-06) makes the near-orthogonal initial
  decode score ``sqrt(2)``; 20 Adam steps did not move it, which is how
  ``docs/results.md`` once reported errors of 1.40-1.47.

  Args:
    kernel: the target kernel (any shape; HWIO or (C_in, C_out)).
    depth: number of layers ``M >= 1``.
    nonlinearity: between layers: 'relu', 'tanh' or 'identity'.
    steps: Adam steps (one jitted ``lax.scan``); 0 returns the
      initialisation (near-identity gates, least-squares scale). Measured on
      trained kernels (``docs/benchmarks_adtn_fit.md``) most of the gain
      comes in the first ~300 steps at learning rate 1e-2.
    learning_rate: peak learning rate (cosine decay to
      ``learning_rate * final_lr_ratio``). 3e-2 diverged for M >= 4 on
      trained LeNet-5 kernels; 1e-2 did not.
    final_lr_ratio: see above.
    noise: std of the Gaussian noise added to identity gates at init.
    channel_scale: learn a ``(C_out,)`` scale instead of a scalar.
    clip: global-norm gradient clipping threshold (<= 0 disables). The loss
      is relative, so gradients are O(1); clipping at 1 tames the occasional
      blow-up of deep (M >= 6) networks at learning rate 1e-2.
    match_norm: after the fit, rescale so ``||W_hat|| = ||W||``. The
      least-squares fit of a kernel the ADTN represents poorly (relative
      error near 1) has ``||W_hat|| = sqrt(1 - err^2) ||W||``, small; this
      keeps activations at the original scale for end-to-end training, at
      the price of a reconstruction error ``sqrt(2 - 2 sqrt(1 - err^2))``
      (above 1 once ``err > 0.87``). The returned error is that of the
      rescaled kernel.
    normalize: decode normalized (the kept entries divided by their norm,
      see the module docstring), so the kernel's norm is the scale's alone
      in end-to-end training; the fit itself is unchanged (its loss, at the
      least-squares scale, does not depend on the decode's norm).
    key: PRNG key of the init noise (required).

  Returns:
    ``(variables, rel_error, losses)``: the ADTN variables (without bias),
    the relative error ``||W - W_hat|| / ||W||`` (float) of the returned
    variables, and the ``(steps,)`` loss curve (squared relative error).
  """
  depth = int(depth)
  if depth < 1:
    raise ValueError(f'depth must be >= 1, got {depth}')
  check_nonlinearity(nonlinearity)
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  if key is None:
    raise TypeError('adtn_fit.fit needs key=jax.random.PRNGKey(seed)')
  kernel = jnp.asarray(kernel)
  dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  k = kernel.astype(dtype)
  gates = init_gates(key, depth, num_qubits(kernel.size), noise=noise,
                     dtype=dtype)

  def unit_decode(g):
    return decode(g, jnp.ones((), dtype), kernel.shape, nonlinearity,
                  normalize=normalize)

  scale = ls_scale(unit_decode(gates), k, channel_scale=channel_scale)
  losses = jnp.zeros((0,), dtype)
  if steps:
    gates, losses = _fit(
        k, gates, jnp.asarray(learning_rate, dtype),
        jnp.asarray(final_lr_ratio, dtype), jnp.asarray(clip, dtype),
        nonlin=nonlinearity, steps=int(steps), channel_scale=channel_scale,
        normalize=bool(normalize))
    scale = ls_scale(unit_decode(gates), k, channel_scale=channel_scale)
  w_hat = unit_decode(gates) * scale
  if match_norm:
    scale = scale * (jnp.linalg.norm(k) /
                     jnp.maximum(jnp.linalg.norm(w_hat), 1e-30))
    w_hat = unit_decode(gates) * scale
  err = jnp.linalg.norm(w_hat - k) / jnp.maximum(jnp.linalg.norm(k), 1e-30)
  variables = {'adtn_gates': gates.astype(kernel.dtype),
               'adtn_scale': scale.astype(kernel.dtype),
               **metadata(kernel.shape, nonlinearity, kernel.dtype,
                          normalize=normalize)}
  return variables, float(err), losses


