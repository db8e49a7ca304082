"""Two processes on localhost (gloo CPU collectives): same results as one.

Real Fashion-MNIST subsets; every subprocess is bounded in time and talks
only to 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import smoke  # pylint: disable=g-import-not-at-top

from lowrank_jax.train import config_check
from lowrank_jax.train import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--config.pipeline=direct', '--config.train_subset=512',
         '--config.validation_size=128', '--config.test_subset=200',
         '--config.batch_size=64', '--config.num_epochs=1',
         '--config.finetune.num_epochs=1', '--config.log_every_steps=2',
         '--config.checkpoint_every_steps=4', '--config.progress=False',
         '--config.compress.rank_rule=flops_ratio',
         '--config.compress.target_ratio=1.3']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
          os.path.join(ROOT, 'configs', 'smoke.py'), '--workdir',
          str(workdir), *FLAGS, *extra]


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_two_processes_match_one(tmp_path, fmnist):
  del fmnist
  env = {**os.environ, 'PYTHONPATH': ROOT}
  port = _free_port()
  multi = tmp_path / 'two'
  # The single-process reference runs beside the two processes.
  commands = [_command(tmp_path / 'one')] + [
      _command(multi, '--config.distributed=True',
               f'--config.coordinator_address=127.0.0.1:{port}',
               '--config.num_processes=2', f'--config.process_id={i}',
               '--config.distributed_timeout_s=120') for i in range(2)]
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for c in commands]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600))
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  ref, got = _rows(tmp_path / 'one'), _rows(multi)
  assert [(r['stage'], r['split'], r['step']) for r in got] == [
      (r['stage'], r['split'], r['step']) for r in ref]
  for r, g in zip(ref, got):
    # Data-parallel means reduce in another order: float tolerance.
    assert g['loss'] == pytest.approx(r['loss'], rel=2e-3, abs=1e-4), (r, g)
  # One writer: process 0's summary, report and export; no second copy.
  assert (multi / 'report.json').exists() and (multi / 'export').is_dir()
  (one, _), (two, _) = outs[:2]   # the reference's and process 0's stdout
  summary_one = json.loads(one[one.index('{'):])
  summary_two = json.loads(two[two.index('{'):])
  assert summary_two['flops_ratio'] == summary_one['flops_ratio']


def test_bad_distributed_fields_are_named():
  config = smoke.get_config()
  config.distributed = True
  config.num_processes = 2
  config.process_id = 2
  with pytest.raises(errors.ConfigError, match=r'config.process_id=2'):
    config_check._distributed_args(config)  # pylint: disable=protected-access
  config.process_id = 0
  config.coordinator_address = 'localhost'
  with pytest.raises(errors.ConfigError, match='host:port'):
    config_check._distributed_args(config)  # pylint: disable=protected-access


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
  code = (
      'import sys\n'
      f'sys.path.insert(0, {ROOT!r})\n'
      'from configs import smoke\n'
      'from lowrank_jax.train import config_check, errors\n'
      'config = smoke.get_config()\n'
      'config.distributed = True\n'
      f'config.coordinator_address = "127.0.0.1:{_free_port()}"\n'
      'config.num_processes = 2\nconfig.process_id = 1\n'
      'config.distributed_timeout_s = 5\n'
      'try:\n'
      '  config_check.maybe_initialize_distributed(config)\n'
      'except errors.ConfigError as e:\n'
      '  print("ConfigError:", e)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=120)
  assert 'ConfigError: config.coordinator_address=' in out.stdout, (
      out.stdout[-2000:], out.stderr[-2000:])
  assert 'unreachable after config.distributed_timeout_s=5' in out.stdout


def test_killing_one_process_leaves_no_corrupt_checkpoint(tmp_path, fmnist):
  import time
  from lowrank_jax.train import checkpoint
  del fmnist
  env = {**os.environ, 'PYTHONPATH': ROOT}
  port, work = _free_port(), tmp_path / 'run'
  flags = ['--config.pipeline=train', '--config.num_epochs=3',
           '--config.checkpoint_every_steps=2']
  procs = [subprocess.Popen(
      _command(work, *flags, '--config.distributed=True',
               f'--config.coordinator_address=127.0.0.1:{port}',
               '--config.num_processes=2', f'--config.process_id={i}',
               '--config.distributed_timeout_s=60'),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
           for i in range(2)]
  ckpt = str(work / 'checkpoints' / 'train')
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(
        checkpoint.checkpoint_steps(ckpt) if os.path.isdir(ckpt) else []) < 2:
      assert all(p.poll() is None for p in procs), 'a process ended early'
      time.sleep(0.2)
    procs[1].kill()          # one host dies mid-run
    time.sleep(2)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  steps = checkpoint.checkpoint_steps(ckpt)
  assert steps, 'no checkpoint was committed before the kill'
  for step in steps:        # every committed checkpoint restores whole
    checkpoint.restore_checkpoint(ckpt, step=step)
  # A 1-process run with the same global batch resumes and finishes.
  out = subprocess.run(_command(work, *flags), capture_output=True,
                       text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert max(checkpoint.checkpoint_steps(ckpt)) == 3 * 512 // 64
