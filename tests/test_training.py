"""Tests of lowrank_jax.train (the training tool) on tiny subsets of real
Fashion-MNIST."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
import lowrank_jax as lj
from lowrank_jax import get_model
from lowrank_jax import orthogonal_penalty
from lowrank_jax import tucker2_split
from lowrank_jax.train import checkpoint
from lowrank_jax.train import config_check
from lowrank_jax.train import data
from lowrank_jax.train import errors
from lowrank_jax.train import loop
from lowrank_jax.train import progress
from lowrank_jax.train import sharding
from lowrank_jax.train import state as state_lib
from lowrank_jax.train import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  """Conv-BatchNorm-Dropout-Dense: exercises batch_stats and dropout rngs."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.25, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def make_config(**overrides):
  config = smoke.get_config()
  config.batch_size = 32            # 256 examples: 8 steps per epoch.
  config.eval_batch_size = 64       # 100 test examples: a padded last batch.
  config.num_epochs = 2
  config.log_every_steps = 4
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 5
  config.progress = False
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def dataset():
  return data.load_dataset('fashion_mnist_local', validation_size=128,
                           train_subset=256, test_subset=100, seed=0)


def _batch(dataset, n=32, epoch=0):
  return next(data.iterate_batches(dataset.train, n, mean=dataset.mean,
                                   std=dataset.std, seed=0, epoch=epoch))


def _assert_trees_close(a, b, atol):
  a_leaves, a_def = jax.tree_util.tree_flatten(jax.device_get(a))
  b_leaves, b_def = jax.tree_util.tree_flatten(jax.device_get(b))
  assert a_def == b_def
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_few_steps_lower_the_loss(dataset):
  config = make_config(schedule='constant')
  model = get_model('lenet5')
  mesh = sharding.make_mesh()
  state = state_lib.create_train_state(config, model, None, (1, 28, 28, 1),
                                       jax.random.PRNGKey(0))
  before = steps.evaluate(state, model, dataset.train, dataset, 64)
  step = steps.make_train_step(model)
  for epoch in range(2):
    for batch in data.iterate_batches(dataset.train, 32, mean=dataset.mean,
                                      std=dataset.std, seed=0, epoch=epoch):
      state, metrics = step(state, sharding.shard_batch(batch, mesh))
  after = steps.evaluate(state, model, dataset.train, dataset, 64)
  assert int(state.step) == 16
  assert before['count'] == after['count'] == 256
  assert after['loss'] < 0.8 * before['loss'], (before, after)
  assert after['accuracy'] > before['accuracy'] + 0.2


def test_penalty_plugs_in_and_step_does_not_retrace(dataset):
  model = get_model('lenet5')
  variables = state_lib.init_variables(model, (1, 28, 28, 1),
                                       jax.random.PRNGKey(0))
  variables = tucker2_split(variables, 4, select=r'conv2')
  # Scale a factor so it is no longer orthonormal: a non-zero penalty.
  variables['params']['conv2']['u_in'] = variables['params']['conv2'][
      'u_in'] * 1.5
  traces = []

  def penalty_fn(params):
    traces.append(1)
    return orthogonal_penalty(params)

  config = make_config(schedule='constant')
  state = state_lib.create_train_state(config, model, variables,
                                       (1, 28, 28, 1), jax.random.PRNGKey(0))
  mesh = sharding.make_mesh()
  batch = sharding.shard_batch(_batch(dataset), mesh)
  weight = 0.5
  with_penalty = steps.make_train_step(
      model, penalty_fn=penalty_fn, penalty_weight=weight, donate=False)
  state_p, m_p = with_penalty(state, batch)
  ce = jax.jit(lambda v, x, y: optax.softmax_cross_entropy_with_integer_labels(
      lj.apply(model, v, x, train=True), y).mean())(state.variables, *batch)
  expected = float(orthogonal_penalty(variables['params']))
  assert expected > 0.1
  np.testing.assert_allclose(float(m_p['penalty']), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m_p['ce']), float(ce), rtol=1e-5)
  np.testing.assert_allclose(float(m_p['loss']),
                             float(ce) + weight * expected, rtol=1e-5)
  # Second call: same shapes, no new trace or compile.
  with_penalty(state_p, batch)
  assert len(traces) == 1
  assert with_penalty._cache_size() == 1


def test_distillation_loss_is_scaled_kl_to_the_teacher():
  rng = np.random.default_rng(0)
  logits, teacher = rng.normal(size=(2, 8, 10)).astype(np.float32) * 3
  t = 4.0
  p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
  q = np.exp(logits / t) / np.exp(logits / t).sum(-1, keepdims=True)
  want = t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  np.testing.assert_allclose(
      float(steps.distillation_loss(logits, teacher, t)), want, rtol=1e-5)
  assert float(steps.distillation_loss(teacher, teacher, t)) == (
      pytest.approx(0, abs=1e-6))


def test_distilled_step_mixes_the_teacher_loss(dataset):
  """The loss is (1 - w) CE + w T^2 KL to the teacher, run in evaluation
  mode (here split, with running BatchNorm statistics that are not the
  batch's)."""
  model = get_model('vgg7b')
  config = make_config(schedule='constant')
  student = state_lib.init_variables(model, (1, 28, 28, 1),
                                     jax.random.PRNGKey(0))
  teacher = state_lib.init_variables(model, (1, 28, 28, 1),
                                     jax.random.PRNGKey(1))
  teacher = tucker2_split(teacher, 4, select=r'conv2_2')
  teacher['batch_stats']['bn1_1']['mean'] += 0.5
  state = state_lib.create_train_state(config, model, student,
                                       (1, 28, 28, 1), jax.random.PRNGKey(0))
  mesh = sharding.make_mesh()
  batch = sharding.shard_batch(_batch(dataset), mesh)
  weight, t = 0.25, 2.0
  step = steps.make_train_step(
      model, distill=steps.Distillation(teacher, weight, t), donate=False)
  _, m = step(state, batch)
  images, labels = batch
  logits, _ = lj.apply(model, state.variables, images, train=True,
                       mutable=['batch_stats'])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  kd = steps.distillation_loss(
      logits, lj.apply(model, teacher, images, train=False), t)
  np.testing.assert_allclose(float(m['ce']), float(ce), rtol=1e-5)
  np.testing.assert_allclose(float(m['distill']), float(kd), rtol=1e-4)
  assert float(kd) > 0.01
  np.testing.assert_allclose(float(m['loss']),
                             (1 - weight) * float(ce) + weight * float(kd),
                             rtol=1e-4)
  plain = steps.make_train_step(model, donate=False)
  _, m_plain = plain(state, batch)
  assert 'distill' not in m_plain
  np.testing.assert_allclose(float(m_plain['loss']), float(ce), rtol=1e-5)


def test_checkpoint_and_variables_round_trip(dataset, tmp_path):
  model = get_model('lenet5')
  config = make_config(schedule='constant')
  state = state_lib.create_train_state(config, model, None, (1, 28, 28, 1),
                                       jax.random.PRNGKey(3))
  state = state.replace(step=jax.device_put(np.int32(7), state.step.sharding))
  manager = checkpoint.open_checkpoint_manager(str(tmp_path / 'ckpt'))
  checkpoint.save_checkpoint(manager, state)
  manager.wait_until_finished()
  manager.close()
  fresh = state_lib.create_train_state(config, model, None, (1, 28, 28, 1),
                                       jax.random.PRNGKey(4))
  restored = checkpoint.restore_checkpoint(str(tmp_path / 'ckpt'), fresh)
  assert int(restored.step) == 7
  _assert_trees_close(checkpoint._state_tree(restored),
                      checkpoint._state_tree(state), 0)
  assert type(restored.opt_state) is type(state.opt_state)

  # Final-model helpers: atomic replace, and the tree runs in model.apply.
  path = str(tmp_path / 'final')
  checkpoint.save_variables(path, {'params': fresh.params})
  checkpoint.save_variables(path, state.variables)  # Replaces the first.
  loaded = checkpoint.load_variables(path)
  x = _batch(dataset)[0]
  np.testing.assert_array_equal(lj.apply(model, loaded, x),
                                lj.apply(model, state.variables, x))
  assert sorted(os.listdir(tmp_path)) == ['ckpt', 'final']
  # A failing save leaves the good one in place.
  with pytest.raises(ValueError, match='Unsupported type'):
    checkpoint.save_variables(path, {'params': {'w': object()}})
  np.testing.assert_array_equal(checkpoint.load_variables(path)['params'][
      'head']['kernel'], state.params['head']['kernel'])


@pytest.fixture(scope='module')
def killed_run(dataset, tmp_path_factory):
  """TinyNet run 'killed' after step 11: checkpoints at steps 5 and 10."""
  workdir = str(tmp_path_factory.mktemp('killed'))
  config = make_config(augment=True)
  loop.train(config, workdir, dataset=dataset, model=TinyNet(),
             stop_after_steps=11)
  return config, workdir


def _copy(workdir, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(workdir, target)
  return target


def test_resume_after_kill_matches_uninterrupted_run(dataset, killed_run,
                                                     tmp_path):
  config, killed = killed_run
  workdir = _copy(killed, tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints', 'train')
  assert sorted(int(s) for s in os.listdir(ckpt_dir)) == [5, 10]
  # What a kill during an (atomic, tmp-dir) save leaves behind is ignored
  # and cleaned up.
  os.makedirs(os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp', 'state'))
  resumed, history = loop.train(config, workdir, dataset=dataset,
                                model=TinyNet())
  assert sorted(os.listdir(ckpt_dir)) == ['10', '15', '16', '5']
  straight, straight_history = loop.train(
      config, str(tmp_path / 'straight'), dataset=dataset, model=TinyNet())
  assert int(resumed.step) == int(straight.step) == 16
  _assert_trees_close(checkpoint._state_tree(resumed),
                      checkpoint._state_tree(straight), 1e-6)

  def rows(hist):
    return [(r['split'], r['step'], r['loss'], r['accuracy']) for r in hist]

  assert rows(history) == rows(straight_history)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert rows(logged) == rows(straight_history)
  assert logged[-1]['split'] == 'test' and logged[-1]['count'] == 100
  # Re-running a finished run restores it and only re-evaluates.
  again, _ = loop.train(config, workdir, dataset=dataset, model=TinyNet())
  _assert_trees_close(again.params, resumed.params, 0)


def _largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory)
           for name in names]
  return max(files, key=os.path.getsize)


def _snapshot(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


@pytest.mark.parametrize('damage', ['truncate_data', 'garble_data',
                                    'truncate_meta'])
def test_corrupt_checkpoint_is_an_error_and_earlier_one_survives(
    dataset, killed_run, tmp_path, damage):
  config, killed = killed_run
  workdir = _copy(killed, tmp_path)
  ckpt_dir = os.path.join(workdir, 'checkpoints', 'train')
  step5_before = _snapshot(os.path.join(ckpt_dir, '5'))
  if damage == 'truncate_meta':
    target = os.path.join(ckpt_dir, '10', 'meta', 'metadata')
  else:
    target = _largest_file(os.path.join(ckpt_dir, '10', 'state'))
  with open(target, 'rb') as f:
    content = f.read()
  if damage == 'garble_data':
    mid = len(content) // 2
    content = content[:mid] + bytes(b ^ 0x5A for b in content[mid:mid + 64]
                                    ) + content[mid + 64:]
  else:
    content = content[:len(content) // 2]
  with open(target, 'wb') as f:
    f.write(content)

  with pytest.raises(errors.CheckpointError,
                     match=r'checkpoints/train/10 \(step 10\)') as err:
    loop.train(config, workdir, dataset=dataset, model=TinyNet())
  assert 'Earlier checkpoints: steps [5]' in str(err.value)
  assert sorted(int(s) for s in os.listdir(ckpt_dir)) == [5, 10]
  assert _snapshot(os.path.join(ckpt_dir, '5')) == step5_before
  tree = checkpoint.restore_checkpoint(ckpt_dir, step=5)
  assert int(tree['step']) == 5
  x = _batch(dataset)[0]
  TinyNet().apply({'params': tree['params'],
                   'batch_stats': tree['batch_stats']}, x)


def test_incompatible_checkpoint_names_what_differs(dataset, killed_run,
                                                    tmp_path):
  config, killed = killed_run
  workdir = _copy(killed, tmp_path)
  with pytest.raises(errors.CheckpointError,
                     match=r"does not match this run's train state") as err:
    loop.train(config, workdir, dataset=dataset)  # lenet5, not TinyNet.
  message = str(err.value)
  assert 'params/conv1/kernel' in message  # Missing in the checkpoint.
  assert 'params/Conv_0/kernel' in message  # Not in this run.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'train'))
                ) == ['10', '5']


@pytest.mark.parametrize('field, value, needle', [
    ('optimizer', 'rmsprop', "config.optimizer='rmsprop' is not one of"),
    ('schedule', 'linear', 'config.schedule'),
    ('model', 'resnet99', 'config.model'),
    ('dataset', 'imagenet', 'config.dataset'),
    ('batch_size', 0, 'config.batch_size=0 must be >= 1'),
    ('num_epochs', -1, 'config.num_epochs=-1'),
    ('learning_rate', 0.0, 'config.learning_rate'),
    ('augment', 1, 'config.augment'),
    ('train_subset', 0, 'config.train_subset'),
])
def test_bad_config_names_the_field(field, value, needle, tmp_path):
  config = make_config()
  with config.ignore_type():
    config[field] = value
  with pytest.raises(errors.ConfigError, match=needle.replace('(', r'\(')
                     .replace('[', r'\[')):
    loop.train(config, str(tmp_path))  # Fails before loading data.
  assert not os.listdir(tmp_path)


def test_config_batch_must_divide_over_devices_and_missing_field():
  config = make_config(batch_size=36)
  with pytest.raises(errors.ConfigError, match=r'config.batch_size=36 .*'
                     r'divisible by the number of devices \(8\)'):
    config_check.validate_config(config, num_devices=8)
  del config['seed']
  with pytest.raises(errors.ConfigError, match='config.seed is missing'):
    config_check.validate_config(config)


def test_transformed_tree_trains_with_the_same_model(dataset, tmp_path):
  model = get_model('lenet5')
  variables = state_lib.init_variables(model, (1, 28, 28, 1),
                                       jax.random.PRNGKey(0))
  variables = tucker2_split(variables, 4, select=r'conv2')
  before = jax.tree.map(np.asarray, variables)
  config = make_config(num_epochs=1, learning_rate=3e-3)
  state, history = loop.train(config, str(tmp_path), dataset=dataset,
                              variables=variables, model=model,
                              penalty_fn=orthogonal_penalty,
                              penalty_weight=0.1, stage_name='finetune')
  assert sorted(state.params['conv2']) == ['bias', 'core', 'u_in', 'u_out']
  _assert_trees_close(variables, before, 0)  # Input untouched (no donation).
  train_rows = [r for r in history if r['split'] == 'train']
  assert all('penalty' in r for r in train_rows)
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  assert history[-1]['split'] == 'test'
  # The saved checkpoint restores in its own (transformed) structure.
  tree = checkpoint.restore_checkpoint(
      str(tmp_path / 'checkpoints' / 'finetune'))
  x = _batch(dataset)[0]
  np.testing.assert_allclose(lj.apply(model, {'params': tree['params']}, x),
                             lj.apply(model, state.variables, x), atol=1e-6)
  checkpoint.save_variables(str(tmp_path / 'final'), state.variables)
  loaded = checkpoint.load_variables(str(tmp_path / 'final'))
  assert loaded['params']['conv2']['core'].shape == (5, 5, 4, 4)
  np.testing.assert_array_equal(lj.apply(model, loaded, x),
                                lj.apply(model, state.variables, x))


_SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_training import TinyNet, make_config
    from lowrank_jax.train import data, loop, sharding
    assert jax.device_count() == 8, jax.devices()
    dataset = data.load_dataset('fashion_mnist_local', validation_size=128,
                                train_subset=256, test_subset=100, seed=0)
    config = make_config(num_epochs=1, max_steps=6, augment=True,
                         optimizer='momentum', learning_rate=0.05,
                         weight_decay=5e-4, checkpoint_every_steps=0)
    out = {{}}
    for n in (1, 8):
      mesh = sharding.make_mesh(jax.devices()[:n])
      state, history = loop.train(config, {workdir!r} + str(n),
                                  dataset=dataset, model=TinyNet(),
                                  mesh=mesh)
      assert len(state.params['Conv_0']['kernel'].sharding.device_set) == n
      out[n] = (jax.device_get(state.variables), history[-1])
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                        out[1][0], out[8][0])
    print(json.dumps({{'diff': diff, 'test1': out[1][1], 'test8': out[8][1]}}))
''')


def test_eight_devices_match_one_device(tmp_path):
  script = _SHARDED_SCRIPT.format(repo=REPO,
                                  tests=os.path.join(REPO, 'tests'),
                                  workdir=str(tmp_path / 'run'))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], env=env,
                        capture_output=True, text=True, timeout=300,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  worst = max(jax.tree.leaves(result['diff']))
  assert worst < 1e-5, result['diff']
  # BatchNorm statistics are global-batch statistics on 8 devices too.
  assert max(jax.tree.leaves(result['diff']['batch_stats'])) < 1e-5
  assert result['test1']['count'] == result['test8']['count'] == 100
  np.testing.assert_allclose(result['test1']['loss'], result['test8']['loss'],
                             rtol=1e-5)


def test_no_gain_rule():
  assert not progress.no_gain([0.5, 0.4, 0.3], 0)
  assert not progress.no_gain([0.5, 0.4], 2)
  assert progress.no_gain([0.5, 0.4, 0.5], 2)
  assert not progress.no_gain([0.5, 0.4, 0.6], 2)


def test_early_stopping_stops_and_resumes_stopped(dataset, tmp_path):
  # A negligible learning rate never improves validation accuracy: with patience 1
  # the run stops after its second evaluation, not after 6 epochs.
  config = make_config(num_epochs=6, learning_rate=1e-12, schedule='constant',
                       early_stopping_patience=1, checkpoint_every_steps=0)
  state, history = loop.train(config, str(tmp_path), dataset=dataset)
  evals = [r for r in history if r['split'] == 'validation']
  assert len(evals) == 2
  assert int(state.step) == 2 * 8
  assert [r for r in history if r['split'] == 'test']
  # Re-running the finished stage does no more steps.
  state, _ = loop.train(config, str(tmp_path), dataset=dataset)
  assert int(state.step) == 2 * 8


def test_zero_size_leaves_survive_checkpoints(dataset, tmp_path):
  # ADTN layers carry shapes in zero-size arrays, which orbax cannot save.
  variables = {'params': {'layer': {'w': np.ones((3, 2), np.float32),
                                    'shape': np.zeros((0, 5, 7),
                                                      np.float32)}}}
  checkpoint.save_variables(str(tmp_path / 'v'), variables)
  back = checkpoint.load_variables(str(tmp_path / 'v'))
  assert back['params']['layer']['shape'].shape == (0, 5, 7)
  np.testing.assert_array_equal(back['params']['layer']['w'], np.ones((3, 2)))


def test_hugepages_environ_adds_the_tunable_only_where_it_helps():
  import train as cli  # the top-level train.py
  assert cli.hugepages_environ({'A': '1'}, 'glibc 2.36', 'madvise') == {
      'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  other = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  assert cli.hugepages_environ(other, 'glibc 2.35', 'madvise')[
      'GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  for environ, libc, thp in (
      ({}, 'glibc 2.34', 'madvise'),    # no hugetlb tunable before 2.35
      ({}, None, 'madvise'), ({}, 'musl 1.2.4', 'madvise'),
      ({}, 'glibc 2.36', 'always'),     # huge pages without advice
      ({}, 'glibc 2.36', 'never'), ({}, 'glibc 2.36', None),
      ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'glibc 2.36', 'madvise'),
      ({cli.HUGEPAGES_OFF: '0'}, 'glibc 2.36', 'madvise')):
    assert cli.hugepages_environ(environ, libc, thp) is None, (environ, libc,
                                                               thp)
  for value in ('off', 'false', '2'):
    with pytest.raises(ValueError, match=f"LOWRANK_JAX_HUGEPAGES='{value}'"):
      cli.hugepages_environ({cli.HUGEPAGES_OFF: value}, 'glibc 2.36',
                            'madvise')


@pytest.mark.parametrize('off', [False, True])
def test_train_py_restarts_itself_once_with_huge_pages(tmp_path, off):
  import train as cli  # the top-level train.py
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', cli.HUGEPAGES_OFF)}
  if off:
    env[cli.HUGEPAGES_OFF] = '0'
  out = subprocess.run(
      [sys.executable, os.path.join(root, 'train.py'), '--config',
       os.path.join(root, 'configs', 'smoke.py'), '--config.model=foo',
       '--workdir', str(tmp_path / 'run')], capture_output=True, text=True,
      timeout=300, env={**env, 'PYTHONPATH': root})
  # The restarted process runs the command (here: refuses the model).
  assert out.returncode != 0
  assert "config.model='foo' is not one of" in out.stderr, out.stderr[-2000:]
  wanted = cli.restart_environ(env) is not None
  # Once: the restarted process has the tunable and goes on.
  assert out.stderr.count('restarting with GLIBC_TUNABLES=') == int(wanted)
  if wanted:
    assert 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ' in out.stderr
