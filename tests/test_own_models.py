"""A user's own models: plain linen and NNX, run in any form, unmodified.

Architectures from ``tests/own_models.py`` (the Flax examples' ResNet
layout, a plain VGG, an NNX CNN with BatchNorm and Dropout), on real
Fashion-MNIST images.
"""

import math

import flax.errors
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax import tree
import own_models

SHAPE = (1, 28, 28, 1)


def _full_ranks(params):
  """Full Tucker-2 ranks for k x k convs, full SVD rank for the rest."""
  tucker, svd = {}, {}
  for path, v in tree.layers(params).items():
    k = v['kernel']
    if k.ndim == 4 and k.shape[0] * k.shape[1] > 1:
      tucker[path] = (k.shape[2], k.shape[3])
    else:
      svd[path] = min(math.prod(k.shape[:-1]), k.shape[-1])
  return tucker, svd


def _full_split(tree_or_module):
  params, _ = tree.split_variables(tree_or_module)
  tucker, svd = _full_ranks(params)
  out = lj.tucker2_split(tree_or_module, tucker)
  return lj.svd_split(out, svd)


def _half_split(tree_or_module):
  """Tucker-2 / SVD at half the channels: the factored order runs."""
  params, _ = tree.split_variables(tree_or_module)
  tucker, svd = _full_ranks(params)
  out = lj.tucker2_split(tree_or_module, {
      p: (max(1, a // 2), max(1, b // 2)) for p, (a, b) in tucker.items()})
  return lj.svd_split(out, {p: max(1, r // 2) for p, r in svd.items()})


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _plant(kernel, ranks, seed=0):
  rng = np.random.default_rng(seed)
  kh, kw, c_in, c_out = kernel.shape
  core = rng.standard_normal((kh, kw, *ranks))
  u_in, _ = np.linalg.qr(rng.standard_normal((c_in, ranks[0])))
  u_out, _ = np.linalg.qr(rng.standard_normal((c_out, ranks[1])))
  signal = np.einsum('hwrs,ir,os->hwio', core, u_in, u_out)
  return jnp.asarray(signal + 1e-3 * rng.standard_normal(kernel.shape),
                     jnp.float32)


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


LINEN = {  # model, a layer to plant ranks in and to split, planted ranks
    'resnet': (own_models.ExampleResNet, 'ExampleResNetBlock_1/Conv_0',
               (6, 10)),
    'vgg': (own_models.PlainVGG, 'Conv_3', (5, 12)),
}


@pytest.fixture(scope='module', params=sorted(LINEN))
def linen_case(request):
  cls, planted_path, planted_ranks = LINEN[request.param]
  model = cls()
  init = jax.jit(lambda k, x: model.init(k, x, train=False))
  variables = jax.device_get(init(jax.random.PRNGKey(0), jnp.zeros(SHAPE)))
  return model, variables, planted_path, planted_ranks


def test_linen_dense_tree_equals_model_apply(linen_case, real_images):
  model, variables, _, _ = linen_case
  np.testing.assert_array_equal(
      lj.apply(model, variables, real_images, train=False),
      model.apply(variables, real_images, train=False))


def test_linen_full_rank_split_keeps_outputs(linen_case, real_images):
  model, variables, _, _ = linen_case
  split = _full_split(variables)
  forms = lj.layer_forms(split)
  assert set(forms.values()) == {'tucker2', 'svd'}
  with pytest.raises(flax.errors.ScopeParamNotFoundError, match='kernel'):
    model.apply(split, real_images, train=False)  # what lj.apply fixes
  out = lj.apply(model, split, real_images, train=False)
  ref = model.apply(variables, real_images, train=False)
  assert _rel(out, ref) < 1e-5


def test_linen_planted_ranks_recovered(linen_case):
  model, variables, path, ranks = linen_case
  params, rebuild = tree.split_variables(variables)
  layer = tree.layers(params)[path]
  planted = rebuild(tree.replace_layers(
      params, {path: {**layer, 'kernel': _plant(layer['kernel'], ranks)}}))
  assert lj.vbmf_ranks(planted, select=path, min_rank=1)[path] == ranks
  del model


def test_linen_gradients_reach_factors_and_no_retrace(linen_case, real_images):
  model, variables, path, _ = linen_case
  # The ResNet's zero-initialised last norm of each block would stop every
  # gradient inside the block: start from unit scales.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.ones_like(a) if 'scale' in str(p[-1]) else a,
      variables)
  split = lj.tucker2_split(variables, {path: (4, 4)})
  traces = []

  @jax.jit
  def loss(params, x):
    traces.append(1)
    logits, _ = lj.apply(model, {**split, 'params': params}, x, train=True,
                         mutable=['batch_stats'],
                         rngs={'dropout': jax.random.PRNGKey(1)})
    return jnp.mean(logits ** 2)

  grad = jax.jit(jax.grad(loss))
  g = grad(split['params'], real_images)
  layer_grad = tree.layers(g)[path]
  assert set(layer_grad) >= {'u_in', 'core', 'u_out'}
  for name in ('u_in', 'core', 'u_out'):
    assert float(jnp.abs(layer_grad[name]).max()) > 0, name
  loss(split['params'], real_images)
  traced = len(traces)
  loss(split['params'], real_images + 1.0)
  assert len(traces) == traced


def test_linen_flops_match_xla(linen_case):
  model, variables, _, _ = linen_case
  x = jnp.zeros(SHAPE)
  for v in (variables, _half_split(variables)):
    report = lj.count_flops(model, v, SHAPE, train=False)
    assert report.total > 0
    xla = _xla_flops(lambda x, v=v: lj.apply(model, v, x, train=False), x)
    # XLA leaves out the taps that read only padding (0.88 of a 7x7 stride-2
    # conv with padding 3 on 28x28) and adds bias, norm, activation and
    # pooling flops.
    assert 0.8 < xla / (2 * report.total) < 1.15, xla / (2 * report.total)


def test_linen_batch_stats_update_and_params_only_tree(real_images):
  model = own_models.ExampleResNet()
  variables = model.init(jax.random.PRNGKey(0), real_images, train=False)
  split = lj.tucker2_split(variables, (3, 3),
                           select='ExampleResNetBlock_0/Conv_0')
  _, updates = lj.apply(model, split, real_images, train=True,
                        mutable=['batch_stats'])
  before = variables['batch_stats']['bn_init']['mean']
  assert not np.allclose(updates['batch_stats']['bn_init']['mean'], before)
  vgg = own_models.PlainVGG()
  params = vgg.init(jax.random.PRNGKey(0), real_images)['params']
  split = lj.svd_split(params, 8, select='Dense_0')
  np.testing.assert_allclose(
      lj.apply(vgg, split, real_images),
      lj.apply(vgg, {'params': split}, real_images))
  assert lj.count_flops(vgg, params, SHAPE).total == lj.count_flops(
      vgg, {'params': params}, SHAPE).total


# ------------------------------------------------------- nn.Conv options ---


CONV_OPTIONS = [  # 2-D convs (an int kernel_size is a 1-D conv in Flax)
    dict(kernel_size=(3, 3), strides=2),
    dict(kernel_size=(3, 5), strides=(1, 2), padding='VALID'),
    dict(kernel_size=(3, 3), padding='CIRCULAR'),
    dict(kernel_size=(3, 3), padding='REFLECT', strides=(2, 1)),
    dict(kernel_size=(3, 3), padding=1),
    dict(kernel_size=(3, 3), padding=((2, 0), (1, 3))),
    dict(kernel_size=(3, 3), padding='SAME_LOWER', strides=2),
    dict(kernel_size=(3, 3), kernel_dilation=2),
    dict(kernel_size=(3, 3), use_bias=False),
    dict(kernel_size=(3, 3), precision=jax.lax.Precision.HIGHEST),
    dict(kernel_size=(3, 3), precision='highest'),
]


@pytest.mark.parametrize('options', CONV_OPTIONS, ids=str)
@pytest.mark.parametrize('form', ['tucker2', 'svd', 'cp'])
def test_conv_options_every_form(options, form):
  conv = nn.Conv(8, **options)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 10, 6))
  v = conv.init(jax.random.PRNGKey(1), x)
  split = {'tucker2': lambda: lj.tucker2_split(v, (6, 8)),
           'svd': lambda: lj.svd_split(v, 8, allow_kxk=True),
           'cp': lambda: lj.cp_split(v, 60, als_iters=200)}[form]()
  assert lj.layer_forms(split)[''] == form
  ref = conv.apply(v, x)
  out = lj.apply(conv, split, x)
  assert out.shape == ref.shape
  assert _rel(out, ref) < (2e-2 if form == 'cp' else 1e-5)


def test_conv_batch_dims_and_dtype():
  conv = nn.Conv(8, (3, 3), dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 9, 9, 4))
  v = conv.init(jax.random.PRNGKey(1), x)
  split = lj.tucker2_split(v, (4, 8))
  out = lj.apply(conv, split, x)
  ref = conv.apply(v, x)
  assert out.dtype == ref.dtype == jnp.bfloat16
  assert out.shape == ref.shape == (2, 3, 9, 9, 8)
  assert _rel(out.astype(jnp.float32), ref.astype(jnp.float32)) < 2e-2
  unbatched = lj.apply(conv, split, x[0, 0])
  assert unbatched.shape == (9, 9, 8)


def test_grouped_dense_conv_runs_and_split_names_the_layer():
  model = nn.Sequential([nn.Conv(8, (3, 3), feature_group_count=2),
                         nn.Conv(8, (3, 3))])
  x = jnp.ones((1, 6, 6, 4))
  v = model.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(lj.apply(model, v, x), model.apply(v, x))
  split = lj.tucker2_split(v, (2, 2), select='layers_0')
  with pytest.raises(ValueError, match="'layers_0'.*grouped"):
    lj.apply(model, split, x)


def test_unsupported_layer_is_reported_never_left_dense():
  model = nn.Sequential([nn.ConvTranspose(4, (3, 3)), nn.Conv(4, (3, 3))])
  x = jnp.ones((1, 6, 6, 2))
  v = model.init(jax.random.PRNGKey(0), x)
  split = lj.tucker2_split(v, (2, 2), select='layers_0')
  with pytest.raises(ValueError, match="'layers_0' is a ConvTranspose"):
    lj.apply(model, split, x)
  dg = nn.DenseGeneral(4)
  v = dg.init(jax.random.PRNGKey(0), jnp.ones((2, 6)))
  with pytest.raises(ValueError, match='DenseGeneral'):
    lj.apply(dg, lj.svd_split(v, 2), jnp.ones((2, 6)))


def test_masked_and_1d_convs_are_errors_when_split():
  mask = jnp.ones((3, 3, 4, 4))
  conv = nn.Conv(4, (3, 3), mask=mask)
  x = jnp.ones((1, 5, 5, 4))
  v = conv.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='mask'):
    lj.apply(conv, lj.tucker2_split(v, (2, 2)), x)
  conv1d = nn.Conv(4, 3, padding='CAUSAL')   # int kernel_size: 1-D
  x1 = jnp.ones((1, 7, 4))
  v1 = conv1d.init(jax.random.PRNGKey(0), x1)
  np.testing.assert_array_equal(lj.apply(conv1d, v1, x1),
                                conv1d.apply(v1, x1))
  _, actions = lj.tucker2_split(v1, (2, 2), select='.*', report=True)
  assert actions[0].action == 'skipped' and '1-D' in actions[0].reason
  assert lj.vbmf_ranks(v1) == {}
  # A hand-made Tucker-2 tree for it is refused when run, naming the layer.
  fake = {'params': {'u_in': jnp.ones((4, 2)), 'core': jnp.ones((3, 2, 2)),
                     'u_out': jnp.ones((2, 4)), 'bias': jnp.zeros(4)}}
  with pytest.raises(ValueError, match='1-D conv'):
    lj.apply(conv1d, fake, x1)


def test_ranks_for_a_norm_layer_name_it():
  model = own_models.ExampleResNet()
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                        jnp.zeros(SHAPE), train=False))
  with pytest.raises(KeyError, match='bn_init'):
    lj.tucker2_split(v, {'bn_init': (2, 2)})
  with pytest.raises(ValueError, match='bn_init'):
    lj.tucker2_split(v, (2, 2), select='bn_init')


def test_model_without_layers_is_an_error():
  class NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm()(x)
  m = NoLayers()
  v = m.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match='nothing to count'):
    lj.count_flops(m, v, (1, 4))


# ------------------------------------------------------------------- NNX ---


@pytest.fixture(scope='module')
def nnx_model():
  model = own_models.nnx_cnn()
  model.eval()
  return model


def test_nnx_transform_returns_new_module_input_untouched(nnx_model,
                                                          real_images):
  def arrays(m):
    return jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(
        nnx.state(m, nnx.Param)))

  before = arrays(nnx_model)
  out_before = nnx_model(real_images)
  split = _full_split(nnx_model)
  assert isinstance(split, own_models.NNXCNN) and split is not nnx_model
  assert isinstance(split.conv1, lj.FormLayer)
  assert isinstance(nnx_model.conv1, nnx.Conv)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         arrays(nnx_model))
  np.testing.assert_array_equal(nnx_model(real_images), out_before)
  assert lj.layer_forms(split) == {'conv1': 'tucker2', 'conv2': 'tucker2',
                                   'mix': 'svd', 'head': 'svd'}
  split.eval()
  assert _rel(split(real_images), out_before) < 1e-5


def test_nnx_low_rank_changes_outputs_and_counts(nnx_model, real_images):
  split = lj.tucker2_split(nnx_model, (4, 4), select='conv2')
  split.eval()
  assert _rel(split(real_images), nnx_model(real_images)) > 1e-3
  assert lj.count_params(split) < lj.count_params(nnx_model)
  dense = lj.count_flops(nnx_model, SHAPE)
  low = lj.count_flops(split, SHAPE)
  assert set(dense.per_layer) == {'conv1', 'conv2', 'mix', 'head'}
  assert low.per_layer['conv2'].form == 'tucker2'
  assert low.total < dense.total
  xla = _xla_flops(lambda x: split(x), jnp.zeros(SHAPE))
  assert 0.85 < xla / (2 * low.total) < 1.15


def test_nnx_planted_ranks_and_penalty(nnx_model):
  planted = nnx.clone(nnx_model)
  planted.conv2.kernel = nnx.Param(_plant(planted.conv2.kernel[...], (5, 9)))
  assert lj.vbmf_ranks(planted, select='conv2', min_rank=1)['conv2'] == (5, 9)
  over = lj.overparameterize(nnx_model, select='conv2',
                             key=jax.random.PRNGKey(0))
  assert lj.layer_forms(over)['conv2'] == 'overparam'
  assert float(lj.orthogonal_penalty(over)) >= 0
  back = lj.collapse(over)
  x = jnp.ones(SHAPE)
  over.eval(), back.eval()
  np.testing.assert_allclose(back(x), nnx_model(x), rtol=1e-4, atol=1e-5)


def test_nnx_trains_with_jit_grad_optimizer(nnx_model, real_images):
  import optax
  split = lj.tucker2_split(nnx_model, (4, 8), select='conv2')
  split.train()
  labels = jnp.arange(real_images.shape[0]) % 10
  opt = nnx.Optimizer(split, optax.adam(1e-2), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, opt, x, y):
    traces.append(1)

    def loss_fn(model):
      logits = model(x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + 1e-3 * lj.orthogonal_penalty(model)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    assert set(grads['conv2']) >= {'u_in', 'core', 'u_out'}
    opt.update(model, grads)
    return loss

  losses = [float(step(split, opt, real_images, labels)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert len(traces) == 1
  assert not np.allclose(split.conv2.core[...],
                         lj.tucker2_split(nnx_model, (4, 8),
                                          select='conv2').conv2.core[...])


def test_nnx_state_round_trips_through_orbax(nnx_model, tmp_path,
                                             real_images):
  import orbax.checkpoint as ocp
  split = lj.tucker2_split(nnx_model, (4, 8), select='conv2')
  split.eval()
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'state', nnx.state(split))
  ckpt.wait_until_finished()
  fresh = lj.tucker2_split(own_models.nnx_cnn(seed=1), (4, 8), select='conv2')
  fresh.eval()
  graphdef, abstract = nnx.split(fresh)
  restored = nnx.merge(graphdef, ckpt.restore(tmp_path / 'state', abstract))
  restored.eval()
  np.testing.assert_array_equal(restored(real_images), split(real_images))


def test_nnx_tied_and_unsupported_layers_are_errors():
  class Tied(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Conv(4, 4, (3, 3), rngs=rngs)
      self.b = self.a
      self.up = nnx.ConvTranspose(4, 4, (3, 3), rngs=rngs)
      self.masked = nnx.Conv(4, 4, (3, 3), mask=jnp.ones((3, 3, 4, 4)),
                             rngs=rngs)
  m = Tied(nnx.Rngs(0))
  kernel = np.asarray(m.a.kernel[...])
  with pytest.raises(ValueError, match="'a'.*shared or tied"):
    lj.tucker2_split(m, (2, 2), select='a')
  with pytest.raises(ValueError, match="'up' is a ConvTranspose"):
    lj.tucker2_split(m, (2, 2), select='up')
  with pytest.raises(ValueError, match="'masked'.*mask"):
    lj.tucker2_split(m, (2, 2), select='masked')
  assert isinstance(m.a, nnx.Conv)
  np.testing.assert_array_equal(m.a.kernel[...], kernel)


# ------------------------------------------------------------- the jobs ---


@pytest.mark.parametrize('factory,pipeline', [
    ('own_models:example_resnet', 'direct'),
    ('own_models:nnx_cnn', 'he2024'),
])
def test_jobs_run_on_a_users_factory(factory, pipeline, tmp_path, fmnist):
  """train -> compress -> fine-tune on real Fashion-MNIST, a user's model."""
  del fmnist
  import json
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from lowrank_jax.train import pipelines  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.model = factory
  config.pipeline = pipeline
  config.num_epochs = 1
  config.train_subset = 1024
  config.test_subset = 500
  config.progress = False
  config.finetune.num_epochs = 1
  config.he2024.num_epochs = 1
  config.compress.rank_rule = 'flops_ratio'
  config.compress.target_ratio = 1.5
  config.compress.min_rank_kxk = 2
  config.compress.min_rank_dense = 2
  summary = getattr(pipelines, f'run_{pipeline}')(config, str(tmp_path))
  assert summary['stages'][-1]['name'] == 'finetune'
  assert summary['flops_ratio'] >= 1.45
  report = json.loads((tmp_path / 'report.json').read_text())
  split = [p for p, d in report['layers'].items()
           if d.get('compress', {}).get('form_after') in ('tucker2', 'svd')]
  assert split, report['layers']
  assert 0.1 < summary['stages'][-1]['test_accuracy'] <= 1.0


def test_bad_factories_are_named():
  with pytest.raises(ValueError, match="'no_such_module'"):
    lj.get_model('no_such_module:factory')
  with pytest.raises(ValueError, match="'missing'"):
    lj.get_model('own_models:missing')
  with pytest.raises(ValueError, match='not a flax.linen Module'):
    lj.get_model('builtins:dict')


def test_nnx_adtn_cp_and_never_slower(nnx_model, real_images):
  x = jnp.asarray(real_images)
  enc = lj.adtn_encode(nnx_model, select='head', depth=2, steps=20,
                       min_size=16, key=jax.random.PRNGKey(0))
  assert lj.layer_forms(enc)['head'] == 'adtn'
  enc.eval()
  assert enc(x).shape == (8, 10)
  # The normalized decode's carrier rides in an NNX module as well.
  norm = lj.adtn_encode(nnx_model, select='head', depth=2, steps=20,
                        min_size=16, normalize=True,
                        key=jax.random.PRNGKey(0))
  norm.eval()
  np.testing.assert_allclose(norm(x), enc(x), rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match='share=False'):
    lj.adtn_encode(nnx_model, select='head|mix', depth=2, steps=5,
                   min_size=16, share=True, key=jax.random.PRNGKey(0))
  cp = lj.cp_split(nnx_model, 6, select='conv2', als_iters=5)
  assert isinstance(cp.conv2, lj.FormLayer) and cp.conv2.form == 'cp'
  split = lj.tucker2_split(nnx_model, (4, 8), select='conv2')
  timings = lj.time_layers(split, (2, 28, 28, 1), repeats=1, min_time_s=0)
  assert set(timings) == {'conv2'}
  slow = lambda *a, **k: {'conv2': timings['conv2']._replace(speedup=0.5)}
  merged, report = lj.never_slower(split, (2, 28, 28, 1), timer=slow)
  assert set(report.merged) == {'conv2'}
  assert lj.layer_forms(merged)['conv2'] == 'dense'
  assert lj.layer_forms(split)['conv2'] == 'tucker2'   # input untouched


def test_ranks_for_a_layer_the_transform_cannot_split_are_an_error():
  model = own_models.PlainVGG()
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                        jnp.zeros(SHAPE)))
  with pytest.raises(ValueError, match="'Dense_0'.*cannot split"):
    lj.tucker2_split(v, {'Dense_0': (4, 4)})
  with pytest.raises(TypeError, match="'Conv_1'.*ints"):
    lj.tucker2_split(v, {'Conv_1': (2.7, 4.9)})
  with pytest.raises(TypeError, match="'Conv_1'"):
    lj.tucker2_split(v, {'Conv_1': None})
  with pytest.raises(TypeError, match="'Conv_1'"):
    lj.tucker2_split(v, {'Conv_1': ('3', '4')})
  with pytest.raises(ValueError, match="'Dense_1'.*do not fit"):
    lj.decompose(v, {'Dense_1': (2, 2)})


def test_export_linen_and_nnx_with_symbolic_batch(linen_case, nnx_model,
                                                  real_images):
  model, variables, path, _ = linen_case
  split = lj.tucker2_split(variables, {path: (4, 4)})
  exported = lj.export(model, split, jnp.zeros(SHAPE), train=False)
  again = jax.export.deserialize(exported.serialize())
  for batch in (1, 8):
    x = real_images[:batch]
    np.testing.assert_allclose(again.call(x),
                               lj.apply(model, split, x, train=False),
                               atol=1e-5)
  module = lj.tucker2_split(nnx_model, (4, 8), select='conv2')
  module.eval()
  exported = lj.export(module, jnp.zeros(SHAPE))
  np.testing.assert_allclose(exported.call(real_images), module(real_images),
                             atol=1e-5)


def test_export_of_a_shared_adtn_member_without_its_group_names_the_layer():
  from lowrank_jax.forms import adtn_shared
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE))
  shared = lj.adtn_encode(v, select='fc1|fc2', depth=2, steps=0, min_size=1,
                          share=True, key=jax.random.PRNGKey(0))
  orphan = {**shared, 'params': {k: x for k, x in shared['params'].items()
                                 if k != adtn_shared.ROOT}}
  with pytest.raises(ValueError, match="'fc1'"):
    lj.export(model, orphan, jnp.zeros(SHAPE))
