"""Nothing silently wrong: divergence, config typos (real Fashion-MNIST)."""

import importlib
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import default  # pylint: disable=g-import-not-at-top
from configs import smoke  # pylint: disable=g-import-not-at-top

from lowrank_jax.train import checkpoint
from lowrank_jax.train import compress_config
from lowrank_jax.train import config_check
from lowrank_jax.train import errors
from lowrank_jax.train import loop


@pytest.fixture(scope='module')
def tiny(fmnist):
  del fmnist
  config = smoke.get_config()
  config.train_subset = 256
  config.validation_size = 64
  config.test_subset = 100
  config.batch_size = 32
  config.num_epochs = 1
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.progress = False
  return config


def test_divergence_ends_the_run_naming_stage_step_and_cause(tiny, tmp_path):
  config = tiny.copy_and_resolve_references()
  config.optimizer = 'sgd'
  config.learning_rate = 1e6
  with pytest.raises(errors.TrainingDiverged,
                     match=r"stage 'train' diverged: training loss is (nan|inf)"
                     r" at step \d+ \(config.learning_rate=1000000.0"):
    loop.train(config, str(tmp_path))
  # Every checkpoint left behind holds a finite state.
  ckpt = str(tmp_path / 'checkpoints' / 'train')
  for step in checkpoint.checkpoint_steps(ckpt):
    state = checkpoint.restore_checkpoint(ckpt, step=step)
    for x in jax.tree_util.tree_leaves(state):
      x = np.asarray(x)
      assert x.dtype.kind != 'f' or np.all(np.isfinite(x)), step


def test_config_typo_is_an_error_naming_the_closest_field():
  config = smoke.get_config()
  config.learnin_rate = 5.0
  config.finetune.num_epoch = 2
  with pytest.raises(errors.ConfigError) as e:
    config_check.check_known_fields(config, default.get_config())
  message = str(e.value)
  assert "config.learnin_rate" in message and 'learning_rate' in message
  assert 'config.finetune.num_epoch' in message and 'num_epochs' in message
  config_check.check_known_fields(smoke.get_config(), default.get_config())


@pytest.mark.parametrize('name', sorted(
    f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), '..',
                                            'configs'))
    if f.endswith('.py') and f != '__init__.py'))
def test_every_shipped_config_is_valid(name):
  """configs/*.py: only known fields, values that pass validation."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config_check.check_known_fields(config, default.get_config())
  compress_config.validate(config)


_EIGHT = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path.insert(0, {root!r})
import jax
from configs import smoke
from lowrank_jax.train import checkpoint, loop
assert len(jax.devices()) == 8
config = smoke.get_config()
config.update({config!r})
if sys.argv[1] == 'save':
  state, _ = loop.train(config, sys.argv[2])
  checkpoint.save_variables(sys.argv[2] + '/final', state.variables)
else:
  v = checkpoint.load_variables(sys.argv[2] + '/final')
  tree = checkpoint.restore_checkpoint(sys.argv[2] + '/checkpoints/train')
  config.num_epochs = 2
  state, _ = loop.train(config, sys.argv[2])
  print('resumed to step', int(state.step))
"""


@pytest.mark.parametrize('saved_on', [8, 1])
def test_checkpoints_and_variables_restore_on_another_device_count(
    tiny, tmp_path, saved_on):
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fields = {k: tiny[k] for k in ('train_subset', 'validation_size',
                                 'test_subset', 'batch_size', 'num_epochs',
                                 'log_every_steps', 'checkpoint_every_steps',
                                 'progress')}
  script = _EIGHT.format(root=root, config=fields)
  work = str(tmp_path)

  def on_eight(mode):
    out = subprocess.run([sys.executable, '-c', script, mode, work],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  if saved_on == 8:
    on_eight('save')
    variables = checkpoint.load_variables(work + '/final')
    tree = checkpoint.restore_checkpoint(work + '/checkpoints/train')
    assert int(tree['step']) == 8
    config = tiny.copy_and_resolve_references()
    config.num_epochs = 2
    state, _ = loop.train(config, work)      # resumes the 8-device run
    assert int(state.step) == 16
    assert set(variables['params']) == set(state.params)
  else:
    state, _ = loop.train(tiny, work)
    checkpoint.save_variables(work + '/final', state.variables)
    assert 'resumed to step 16' in on_eight('load')


def test_cli_names_a_corrupt_stage_index_without_a_traceback(tmp_path):
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = tmp_path / 'run'
  work.mkdir()
  (work / 'stages.json').write_text('{"baseline": ')
  out = subprocess.run(
      [sys.executable, os.path.join(root, 'train.py'), '--config',
       os.path.join(root, 'configs', 'smoke.py'), '--config.pipeline=direct',
       '--workdir', str(work)], capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': root})
  assert out.returncode == 1
  assert (f'train.py: CheckpointError: {work}/stages.json is not valid JSON'
          in out.stderr), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert (work / 'stages.json').read_text() == '{"baseline": '
  assert sorted(os.listdir(work)) == ['stages.json']


def test_cli_keeps_the_traceback_of_a_bug_in_the_config_file(tmp_path):
  """Only an unknown --config.<field> override is shortened to its
  message: a config file's own AttributeError keeps its traceback."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bad = tmp_path / 'buggy.py'
  bad.write_text('from configs import smoke\n\ndef get_config():\n'
                 '  config = smoke.get_config()\n'
                 '  config.finetun.num_epochs = 3\n  return config\n')
  out = subprocess.run(
      [sys.executable, os.path.join(root, 'train.py'), '--config', str(bad),
       '--workdir', str(tmp_path / 'run')], capture_output=True, text=True,
      timeout=300, env={**os.environ, 'PYTHONPATH': root})
  assert out.returncode != 0
  assert 'Traceback' in out.stderr and 'buggy.py' in out.stderr
  assert 'names no config field' not in out.stderr
  assert not (tmp_path / 'run').exists()


def test_cli_writes_nothing_for_a_bad_config(tmp_path):
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = tmp_path / 'run'
  bad = tmp_path / 'typo.py'
  bad.write_text('from configs import smoke\n\ndef get_config():\n'
                 '  config = smoke.get_config()\n'
                 '  config.learnin_rate = 5.0\n  return config\n')
  for args, message in (
      (['--config', os.path.join(root, 'configs', 'smoke.py'),
        '--config.model=foo'], "config.model='foo' is not one of"),
      (['--config', str(bad)], 'did you mean config.learning_rate?'),
      (['--config', os.path.join(root, 'configs', 'smoke.py'),
        '--config.learning_rat=1'], 'learning_rat'),
      (['--config', os.path.join(root, 'configs', 'smoke.py'),
        '--config.pipeline=direct', '--config.compress.select=(['],
       "compress.select='([' is not a valid regex"),
      (['--config', os.path.join(root, 'configs', 'smoke.py'),
        '--config.pipeline=direct', '--config.compress.select=nolayer'],
       "selection rule 'nolayer' matches no layer"),
      (['--config', os.path.join(root, 'configs', 'smoke.py'),
        '--config.pipeline=adtn', '--config.adtn.nonlinearity=gelu'],
       "adtn.nonlinearity='gelu' is not one of")):
    out = subprocess.run(
        [sys.executable, os.path.join(root, 'train.py'), *args,
         '--workdir', str(work)], capture_output=True, text=True,
        timeout=300, env={**os.environ, 'PYTHONPATH': root})
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert not work.exists()


def test_config_json_keeps_its_history(tmp_path):
  import json
  import train as cli  # the top-level train.py
  config = smoke.get_config()
  cli._write_config(config, str(tmp_path))   # pylint: disable=protected-access
  cli._write_config(config, str(tmp_path))   # pylint: disable=protected-access
  assert not (tmp_path / 'config_history.jsonl').exists()
  config.learning_rate = 0.5
  cli._write_config(config, str(tmp_path))   # pylint: disable=protected-access
  rows = [json.loads(l) for l in open(tmp_path / 'config_history.jsonl')]
  assert [r['config']['learning_rate'] for r in rows] == [1e-3]
  assert json.loads((tmp_path / 'config.json').read_text())[
      'learning_rate'] == 0.5


def _direct(tiny):
  """The tiny config as a direct job at a 1.3x FLOP target."""
  config = tiny.copy_and_resolve_references()
  config.pipeline = 'direct'
  config.finetune.num_epochs = 1
  config.compress.rank_rule = 'flops_ratio'
  config.compress.target_ratio = 1.3
  return config


@pytest.fixture(scope='module')
def direct_done(tiny, tmp_path_factory):
  """``(summary, workdir)`` of one finished direct run of ``tiny``; tests
  copy the workdir (:func:`_copy_of`) before changing anything."""
  from lowrank_jax.train import pipelines
  work = tmp_path_factory.mktemp('direct_done')
  return pipelines.run_direct(_direct(tiny), str(work)), work


def _copy_of(direct_done, tmp_path):
  import shutil
  work = tmp_path / 'work'
  shutil.copytree(direct_done[1], work)
  return work


def test_workdir_bookkeeping_errors_name_the_file_and_the_fix(
    tmp_path, tiny, direct_done):
  import json
  import shutil
  from lowrank_jax.train import pipelines
  config = _direct(tiny)
  tmp_path = _copy_of(direct_done, tmp_path)
  work = str(tmp_path)
  index = tmp_path / 'stages.json'
  good = index.read_text()
  # A stage run again is reported once.
  entries = json.loads(good)
  del entries['finetune']
  index.write_text(json.dumps(entries))
  summary = pipelines.run_direct(config, work)
  names = [s['name'] for s in summary['stages']]
  assert names == ['baseline', 'compress', 'finetune']
  # A garbled index names the file.
  index.write_text(good[:40])
  with pytest.raises(errors.CheckpointError, match='stages.json is not valid'):
    pipelines.run_direct(config, work)
  index.write_text(good)
  # A deleted stage directory says how to redo the stage.
  shutil.rmtree(tmp_path / 'stages' / 'compress')
  with pytest.raises(errors.CheckpointError,
                     match="stage 'compress' is marked done.*delete the entry"):
    pipelines.run_direct(config, work)


def test_a_changed_config_is_refused_or_redone_from_a_named_stage(
    tmp_path, tiny, direct_done):
  import json
  from lowrank_jax.train import pipelines
  config = _direct(tiny)
  first = direct_done[0]
  tmp_path = _copy_of(direct_done, tmp_path)
  work = str(tmp_path)
  baseline = (tmp_path / 'stages' / 'baseline').stat().st_mtime_ns
  config.compress.target_ratio = 1.5
  with pytest.raises(errors.ConfigError, match=(
      r"compress.target_ratio \(1.3 -> 1.5\).*first stage this affects is "
      r"'compress'.*--config.redo_from=compress")):
    pipelines.run_direct(config, work)
  config.redo_from = 'nope'
  with pytest.raises(errors.ConfigError, match="redo_from='nope'"):
    pipelines.run_direct(config, work)
  config.redo_from = 'compress'
  second = pipelines.run_direct(config, work)
  assert [s['name'] for s in second['stages']] == [
      'baseline', 'compress', 'finetune']
  assert second['flops_ratio'] > first['flops_ratio']
  # The baseline was kept, not retrained.
  assert (tmp_path / 'stages' / 'baseline').stat().st_mtime_ns == baseline
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report["config"]["compress"]["target_ratio"] == 1.5


def test_metrics_rows_left_out_on_resume_are_kept_aside(tmp_path):
  import json
  from lowrank_jax.train import metrics
  rows = [{'stage': 'train', 'split': 'train', 'step': s, 'loss': 1.0}
          for s in (2, 4, 6)]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
    f.write('{"stage": "train", "spl')          # cut by a kill
  log = metrics._MetricsLog(str(tmp_path), 'train', resume_step=4)  # pylint: disable=protected-access
  log.close()
  kept = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in kept] == [2, 4]
  aside = [json.loads(l) for l in open(tmp_path / 'metrics_dropped.jsonl')]
  assert [d.get('row', {}).get('step') for d in aside] == [None, 6]
  assert aside[0]['text'].startswith('{"stage": "train", "spl')
