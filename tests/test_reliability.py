"""Nothing silently wrong: divergence, config typos (real Fashion-MNIST)."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import default  # pylint: disable=g-import-not-at-top
from configs import smoke  # pylint: disable=g-import-not-at-top

from lowrank_jax.train import checkpoint
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
