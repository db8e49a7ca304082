"""The compression jobs end to end on real Fashion-MNIST (smoke settings)."""

import itertools
import json
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import smoke  # pylint: disable=g-import-not-at-top

import lowrank_jax as lj
from lowrank_jax import rank_rules
from lowrank_jax import tree
from lowrank_jax.train import checkpoint
from lowrank_jax.train import compress_config
from lowrank_jax.train import data
from lowrank_jax.train import jobs
from lowrank_jax.train import atomic
from lowrank_jax.train import errors
from lowrank_jax.train import loop
from lowrank_jax.train import optim
from lowrank_jax.train import pipelines
from lowrank_jax.train import report as report_lib


def _config(pipeline, **compress):
  config = smoke.get_config()
  config.pipeline = pipeline
  config.num_epochs = 1
  config.train_subset = 2048
  config.progress = False
  config.checkpoint_every_steps = 8
  config.finetune.num_epochs = 1
  config.finetune.learning_rate = 3e-4
  config.compress.rank_rule = 'flops_ratio'
  config.compress.target_ratio = 1.3
  config.musco.n_stages = 2
  config.musco.finetune_epochs = 1
  for key, value in compress.items():
    config.compress[key] = value
  return config


@pytest.fixture(autouse=True)
def _needs_data(fmnist):
  del fmnist


def test_min_rank_fields_become_one_rule_per_layer():
  """compress.min_rank_{kxk,1x1,dense} reach the library as path rules."""
  config = _config('direct', min_rank_kxk=5, min_rank_1x1=3,
                   min_rank_dense=7)
  geometry = {p: rank_rules.LayerGeometry(p, kind, (), (), (), 'dense', 0, 0,
                                          0)
              for p, kind in (('conv1', 'kxk'), ('block/proj', '1x1'),
                              ('fc', 'dense'))}
  rules = compress_config.min_rank_of(config, geometry)
  assert rules == {tree.exact('conv1'): 5, tree.exact('block/proj'): 3,
                   tree.exact('fc'): 7}
  assert rank_rules.min_rank_floors(geometry, rules) == {
      'conv1': 5, 'block/proj': 3, 'fc': 7}


def _stages(summary):
  return [s['name'] for s in summary['stages']]


@pytest.fixture(scope='module')
def direct_run(tmp_path_factory, fmnist):
  """One direct run of the smoke config: ``(summary, workdir)``, read (never
  written) by the tests that check its report, export and baseline."""
  del fmnist
  workdir = tmp_path_factory.mktemp('direct')
  return pipelines.run_direct(_config('direct'), str(workdir)), workdir


def test_direct_compresses_and_writes_the_report(direct_run):
  summary, tmp_path = direct_run
  assert _stages(summary) == ['baseline', 'compress', 'finetune']
  assert 1.3 <= summary['flops_ratio'] < 1.4
  report = json.loads((tmp_path / 'report.json').read_text())
  conv2 = report['layers']['conv2']['compress']
  assert conv2['form_after'] == 'tucker2' and len(conv2['chosen']) == 2
  assert conv2['flops_after'] < conv2['flops_before']
  for name in ('report.md', 'spectra.png', 'ranks.png', 'accuracy_flops.png',
               'metrics.jsonl'):
    assert (tmp_path / name).stat().st_size > 0
  md = (tmp_path / 'report.md').read_text()
  assert '| finetune |' in md and '`conv2`' in md
  # The compressed model restores into model.apply with no extra code.
  variables = checkpoint.load_variables(str(tmp_path / 'stages' / 'finetune'))
  model = lj.get_model('lenet5')
  assert lj.layer_forms(variables)['conv2'] == 'tucker2'
  assert lj.apply(model, variables, np.zeros((2, 28, 28, 1))).shape == (2, 10)


def test_plots_are_drawn_again_only_when_their_data_changes(direct_run,
                                                           tmp_path):
  """write_plots skips a PNG whose data it already shows; a changed stage
  or a cut PNG is drawn (and renamed into place) again."""
  report = json.loads((direct_run[1] / 'report.json').read_text())
  names = sorted(report_lib.write_plots(str(tmp_path), report).values())
  assert names == ['accuracy_flops.png', 'ranks.png', 'spectra.png']
  inodes = {n: (tmp_path / n).stat().st_ino for n in names}
  report['stages'][-1]['test']['accuracy'] -= 0.01
  (tmp_path / 'ranks.png').write_bytes(
      (tmp_path / 'ranks.png').read_bytes()[:100])
  report_lib.write_plots(str(tmp_path), report)
  again = {n: (tmp_path / n).stat().st_ino for n in names}
  assert again['spectra.png'] == inodes['spectra.png']
  assert again['accuracy_flops.png'] != inodes['accuracy_flops.png']
  assert again['ranks.png'] != inodes['ranks.png']
  assert (tmp_path / 'ranks.png').stat().st_size > 1000
  assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_failed_report_writes_keep_the_old_files(direct_run, tmp_path,
                                                monkeypatch):
  """A plot that fails half-way through savefig (a full disk) leaves the
  earlier PNGs and report.md as they were and no .tmp beside them."""
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  report = json.loads((direct_run[1] / 'report.json').read_text())
  report_lib.write_report(str(tmp_path), report)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  report['stages'][-1]['test']['accuracy'] -= 0.01   # redraw the plots

  def full_disk(fig, fname, **kwargs):
    del fig, kwargs
    with open(fname, 'wb') as f:
      f.write(b'\x89PNG cut')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk)
  with pytest.raises(OSError, match='No space left'):
    report_lib.write_report(str(tmp_path), report)
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  assert sorted(after) == sorted(before)          # no .tmp left
  # report.json is written before the plots; the plots and report.md are
  # as they were.
  for name in after:
    assert (after[name] == before[name]) == (name != 'report.json'), name


def test_a_failed_rename_leaves_no_temporary_file(tmp_path):
  """atomic.write_text onto a path a directory holds: the rename fails,
  the directory is untouched and no .tmp is left."""
  (tmp_path / 'report.md').mkdir()
  with pytest.raises(IsADirectoryError):
    atomic.write_text(str(tmp_path / 'report.md'), 'text')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['report.md']
  assert (tmp_path / 'report.md').is_dir()


def test_he2024_trains_factors_with_the_penalty(tmp_path):
  config = _config('he2024')
  summary = pipelines.run_he2024(config, str(tmp_path))
  assert _stages(summary) == ['overparameterize', 'orthogonal_train',
                              'collapse', 'compress', 'finetune']
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  ortho = [r for r in rows if r.get('stage') == 'orthogonal_train'
           and r.get('split') == 'train']
  assert ortho and all('penalty' in r for r in ortho)
  over = checkpoint.load_variables(str(tmp_path / 'stages' /
                                       'orthogonal_train'))
  assert lj.layer_forms(over)['conv2'] == 'overparam'
  stages = {s['name']: s for s in json.loads(
      (tmp_path / 'report.json').read_text())['stages']}
  # Collapsing is exact: same accuracy before and after.
  assert stages['collapse']['test']['accuracy'] == pytest.approx(
      stages['orthogonal_train']['test']['accuracy'], abs=1e-3)
  # A frontier's other target: the trained, collapsed network is split
  # again at a higher target without training it a second time.
  again = _config('he2024', target_ratio=1.5)
  again.he2024.trained = str(tmp_path / 'stages' / 'collapse')
  other = pipelines.run_he2024(again, str(tmp_path / 'again'))
  assert _stages(other) == ['collapse', 'compress', 'finetune']
  assert other['stages'][0]['test_accuracy'] == pytest.approx(
      stages['collapse']['test']['accuracy'], abs=1e-6)
  assert other['flops_ratio'] >= 1.5 > summary['flops_ratio']


def test_he2024_trained_must_be_saved_variables(tmp_path, monkeypatch):
  config = _config('he2024')
  config.he2024.trained = str(tmp_path / 'missing')
  monkeypatch.setattr(loop, 'train', lambda *a, **k: pytest.fail(
      'training started'))
  with pytest.raises(errors.ConfigError, match=r"he2024\.trained='.*missing'"
                     ": no saved variables"):
    pipelines.run_he2024(config, str(tmp_path / 'run'))


def _planted_lenet(path):
  """LeNet-5 whose conv2 (ranks 3 x 4) and fc1 (rank 10) are low-rank plus
  small noise, saved as a pretrained checkpoint."""
  model = lj.get_model('lenet5')
  v = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)
  u_in, _ = np.linalg.qr(rng.normal(size=(6, 3)))
  u_out, _ = np.linalg.qr(rng.normal(size=(16, 4)))
  core = rng.normal(size=(5, 5, 3, 4))
  conv2 = np.einsum('ir,hwrs,os->hwio', u_in, core, u_out) * 0.1
  fc1 = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 120)) * 0.02
  v['params']['conv2']['kernel'] = np.float32(
      conv2 + 1e-3 * rng.normal(size=conv2.shape))
  v['params']['fc1']['kernel'] = np.float32(
      fc1 + 1e-3 * rng.normal(size=fc1.shape))
  checkpoint.save_variables(str(path), v)


def test_musco_recompresses_split_layers_by_their_cores(tmp_path):
  config = _config('musco')
  config.compress.select = 'conv2|fc1'
  config.compress.rank_rule = 'weakened_vbmf'
  config.compress.min_rank_kxk = 2
  config.compress.min_rank_dense = 2
  config.musco.weaken = 0.5
  config.finetune.learning_rate = 1e-5
  _planted_lenet(tmp_path / 'pretrained')
  config.compress.pretrained = str(tmp_path / 'pretrained')
  summary = pipelines.run_musco(config, str(tmp_path / 'musco'))
  assert _stages(summary) == ['baseline', 'stage1_compress',
                              'stage1_finetune', 'stage2_compress',
                              'stage2_finetune']
  layers = json.loads(
      (tmp_path / 'musco' / 'report.json').read_text())['layers']
  # Stage 1 weakens from the full sizes: floor(R - w (R - R_vbmf)).
  assert layers['conv2']['stage1_compress']['vbmf'] == [3, 4]
  assert layers['conv2']['stage1_compress']['chosen'] == [4, 10]
  assert layers['fc1']['stage1_compress']['chosen'] == [65]
  # Stage 2 decomposes the Tucker-2 core and the SVD product further.
  assert layers['conv2']['stage2_compress']['chosen'] == [3, 7]
  assert layers['fc1']['stage2_compress']['chosen'] == [37]
  final = checkpoint.load_variables(str(tmp_path / 'musco' / 'stages' /
                                        'stage2_finetune'))
  conv2 = final['params']['conv2']
  assert lj.layer_forms(final)['conv2'] == 'tucker2'
  assert conv2['u_in'].shape == (6, 3) and conv2['u_out'].shape == (7, 16)


def test_a_killed_job_resumes_at_its_stage_and_step(tmp_path, monkeypatch,
                                                    direct_run):
  config = _config('direct')
  reference, reference_dir = direct_run   # the same config, never killed
  real_train = loop.train
  calls = []

  def killed_train(*args, **kwargs):
    calls.append(kwargs.get('stage_name'))
    if kwargs.get('stage_name') == 'finetune':
      real_train(*args, stop_after_steps=5, **kwargs)
      raise KeyboardInterrupt('killed')
    return real_train(*args, **kwargs)

  monkeypatch.setattr(loop, 'train', killed_train)
  with pytest.raises(KeyboardInterrupt):
    pipelines.run_direct(config, str(tmp_path / 'run'))
  monkeypatch.setattr(loop, 'train', real_train)
  rows_before = sum(1 for _ in open(tmp_path / 'run' / 'metrics.jsonl'))
  resumed = pipelines.run_direct(config, str(tmp_path / 'run'))
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  # The baseline was not trained again; fine-tuning continued after step 5.
  assert not [r for r in rows[rows_before:] if r.get('stage') == 'baseline']
  ft = [r for r in rows[rows_before:] if r.get('stage') == 'finetune'
        and r.get('split') == 'train']
  assert ft and min(r['step'] for r in ft) > 5
  got = checkpoint.load_variables(str(tmp_path / 'run' / 'stages' / 'finetune'))
  want = checkpoint.load_variables(str(reference_dir / 'stages' /
                                       'finetune'))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)
  assert resumed['stages'][-1]['test_accuracy'] == pytest.approx(
      reference['stages'][-1]['test_accuracy'], abs=1e-3)


@pytest.mark.parametrize('field,value,message', [
    ('musco.weaken', 0.0, 'musco.weaken=0.0 must be in'),
    ('compress.target_ratio', 50.0, 'compress.target_ratio=50.0'),
    ('compress.rank_rule', 'vbmff', "compress.rank_rule='vbmff'"),
    ('compress.pretrained', '/nonexistent/ckpt',
     "compress.pretrained='/nonexistent/ckpt': no saved variables"),
    ('compress.recalibrate_batches', -1,
     'compress.recalibrate_batches=-1 must be an integer >= 0'),
    ('finetune.distill_weight', 1.5,
     'finetune.distill_weight=1.5 must be a number in [0, 1]'),
    ('finetune.distill_temperature', 0.0,
     'finetune.distill_temperature=0.0 must be a finite number > 0'),
])
def test_bad_configs_fail_at_start_up(tmp_path, field, value, message,
                                      monkeypatch):
  config = _config('musco')
  group, key = field.split('.')
  config[group][key] = value
  monkeypatch.setattr(loop, 'train', lambda *a, **k: pytest.fail(
      'training started'))
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    pipelines.run_musco(config, str(tmp_path))


def test_compress_stage_recalibrates_batch_norm_on_the_first_batches(
    tmp_path):
  """compress.recalibrate_batches=2 on vgg7b: the compress stage's network
  is the split with BatchNorm statistics re-estimated on the first 2
  training batches of epoch 0, as the training loop draws them."""
  config = _config('direct', recalibrate_batches=2,
                   exclude='conv1_1|head')
  config.model = 'vgg7b'
  job = jobs.Job(config, str(tmp_path), 'direct')
  variables = job.model.init(jax.random.PRNGKey(0),
                             jnp.zeros(job.input_shape))
  out = pipelines._compress_stage(job, 'compress', variables)
  ranks = {p: tuple(r) for p, r in
           job.report['stages'][-1]['ranks'].items()}
  assert ranks
  split = pipelines.compress(variables, ranks)
  batches = data.iterate_batches(
      job.dataset.train, config.batch_size, mean=job.dataset.mean,
      std=job.dataset.std, seed=config.seed, epoch=0,
      augment=config.augment, pad_crop=config.pad_crop)
  want = lj.recalibrate_batch_stats(job.model, split,
                                    itertools.islice(batches, 2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               jax.device_get(out), jax.device_get(want))
  assert not np.allclose(out['batch_stats']['bn2_1']['mean'],
                         split['batch_stats']['bn2_1']['mean'])


@pytest.mark.parametrize('pipeline', ['direct', 'musco', 'adtn'])
def test_finetuning_distills_from_the_network_before_compression(
    tmp_path, pipeline, monkeypatch):
  """finetune.distill_weight > 0: every fine-tuning stage trains with the
  baseline as its teacher; 0 (the default) passes no teacher (one
  function, pipelines.distillation, decides for every pipeline)."""
  config = _config(pipeline, select='conv2|fc1', min_rank_kxk=2,
                   min_rank_dense=2)
  _planted_lenet(tmp_path / 'pretrained')
  config.compress.pretrained = str(tmp_path / 'pretrained')
  config.musco.weaken = 0.5
  config.adtn.fit_steps = 10
  config.finetune.distill_weight = 0.7
  config.finetune.distill_temperature = 3.0
  calls = []

  def fake_train(config, workdir, *, variables, stage_name, distill=None,
                 **kwargs):
    del config, workdir, kwargs
    calls.append((stage_name, distill))
    return types.SimpleNamespace(variables=variables), []

  monkeypatch.setattr(loop, 'train', fake_train)
  monkeypatch.setattr(jobs.Job, 'export', lambda *a, **k: None)
  pipelines.PIPELINES[pipeline](config, str(tmp_path / pipeline))
  baseline = checkpoint.load_variables(str(tmp_path / 'pretrained'))
  assert calls
  for name, distill in calls:
    assert (distill.weight, distill.temperature) == (0.7, 3.0), name
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(distill.teacher), jax.device_get(baseline))
  if pipeline == 'direct':
    config.finetune.distill_weight = 0.0
    calls.clear()
    pipelines.PIPELINES[pipeline](config, str(tmp_path / 'plain'))
    assert calls and all(d is None for _, d in calls)


def test_vgg16_adtn_config_switches_the_decode_stage_to_clipped_adam():
  from configs import vgg16_adtn  # pylint: disable=g-import-not-at-top
  config = vgg16_adtn.get_config()
  compress_config.validate(config)
  assert config.pipeline == 'adtn' and config.adtn.share
  # The baseline keeps VGG's SGD; only the stage through the decode switches.
  assert config.optimizer == 'momentum'
  stage = pipelines.finetune_config(config)
  assert (stage.optimizer, stage.learning_rate, stage.grad_clip,
          stage.weight_decay) == ('adam', 1e-3, 1.0, 0.0)
  optim.make_optimizer(stage, steps_per_epoch=10)   # a valid optax chain


def test_direct_with_cp_convs(tmp_path, direct_run):
  # From the direct run's trained baseline: the same job, CP-split.
  config = _config('direct', conv_form='cp',
                   pretrained=str(direct_run[1] / 'stages' / 'baseline'))
  summary = pipelines.run_direct(config, str(tmp_path))
  assert _stages(summary) == ['baseline', 'compress', 'finetune']
  assert summary['flops_ratio'] >= 1.3
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['layers']['conv2']['compress']['form_after'] == 'cp'


def test_the_pipeline_exports_a_network_that_runs_without_lowrank_jax(
    tmp_path, direct_run):
  import subprocess
  summary, workdir = direct_run
  export = workdir / 'export'
  info = json.loads((export / 'export.json').read_text())
  spec = json.loads((export / 'input_spec.json').read_text())
  assert info['forms']['conv2'] == 'tucker2'
  assert info['flops'] == summary['stages'][-1]['flops']
  assert spec['shape'] == ['batch', 28, 28, 1]
  assert (export / 'baseline.stablehlo').stat().st_size > (
      export / 'model.stablehlo').stat().st_size
  x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
  np.save(tmp_path / 'x.npy', x)
  code = (
      'import sys, numpy as np, jax\n'
      'from jax import export\n'
      f'e = export.deserialize(open({str(export / "model.stablehlo")!r}, '
      '"rb").read())\n'
      f'np.save({str(tmp_path / "y.npy")!r}, '
      f'np.asarray(e.call(np.load({str(tmp_path / "x.npy")!r}))))\n'
      'assert not any(m.startswith("lowrank_jax") for m in sys.modules)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  variables = checkpoint.load_variables(str(workdir / 'stages' / 'finetune'))
  ref = lj.apply(lj.get_model('lenet5'), variables, x, train=False)
  np.testing.assert_allclose(np.load(tmp_path / 'y.npy'), ref, atol=1e-5)


def test_adtn_collapse_names_the_layer_whose_kernel_vanished(caplog):
  kernel = jax.random.normal(jax.random.PRNGKey(0), (32, 48))
  params = {'fc1': {'kernel': kernel, 'bias': jnp.zeros(48)},
            'fc2': {'kernel': kernel[:, :40], 'bias': jnp.zeros(40)}}
  for normalize in (False, True):
    encoded = lj.adtn_encode(params, depth=3, steps=0, min_size=1,
                             match_norm=True, normalize=normalize,
                             key=jax.random.PRNGKey(0))
    # Training shrank fc1's gates 0.2x each: 0.2^(3 * 10) ~ 1e-21 in a plain
    # decode; fc2 kept its own.
    trained = {**encoded, 'fc1': {**encoded['fc1'], 'adtn_gates':
                                  encoded['fc1']['adtn_gates'] * 0.2}}
    caplog.clear()
    got = pipelines.adtn_collapse(encoded, trained)
    assert set(got['kernel_norms']) == {'fc1', 'fc2'}
    before, after = got['kernel_norms']['fc1']
    assert before == pytest.approx(float(jnp.linalg.norm(kernel)), rel=1e-4)
    if normalize:
      assert got['collapsed_layers'] == [] and not caplog.records
      assert after == pytest.approx(before, rel=1e-4)
    else:
      assert got['collapsed_layers'] == ['fc1'] and after < 1e-10
      assert "ADTN layer 'fc1'" in caplog.text
      assert 'adtn.normalize=True' in caplog.text
    assert got['kernel_norms']['fc2'][0] == got['kernel_norms']['fc2'][1]
  # "More than 100-fold" is strict; the results tables call the same test.
  assert pipelines.collapsed_layers(
      {'a': [100., 1.], 'b': [100., 0.5], 'c': [1., 2.]}) == ['b']
