"""The dense form: one kernel, one conv or matmul.

Variables: ``kernel`` (kh, kw, C_in/groups, C_out) for convs, (C_in, C_out)
for dense layers; plus the layer's optional ``bias`` (C_out,).
"""

from __future__ import annotations


from lowrank_jax.forms import base

NAME = 'dense'
KEYS = frozenset({'kernel'})
FACTORS = ()
SUPPORTS_GROUPS = True


def forward(v, x, spec: base.LayerSpec):
  if spec.kind == 'conv':
    return base.conv(x, v['kernel'], spec)
  return base.channel_matmul(x, v['kernel'])


def to_kernel(v):
  return v['kernel']


def kernel_shape(v) -> tuple[int, ...]:
  return tuple(v['kernel'].shape)


def from_kernel(kernel, ranks=None):
  del ranks
  return {'kernel': kernel}


def ranks(v):
  del v
  return ()


def flops(v, spec, in_shape, out_shape):
  """Multiply-adds for activations of the given (batched) shapes."""
  del in_shape
  k = v['kernel']
  per_out = k.size // k.shape[-1]  # kh*kw*C_in/groups, or C_in
  return base.spatial(out_shape) * k.shape[-1] * per_out
