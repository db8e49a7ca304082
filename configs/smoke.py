"""Smoke config: LeNet-5 on 4096 Fashion-MNIST images, 2 epochs, seconds on CPU.

  python train.py --config configs/smoke.py --workdir /tmp/smoke
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """A tiny run of the whole training loop."""
  config = default.get_config()
  config.model = 'lenet5'  # Small and BatchNorm-free.
  config.train_subset = 4096  # 32 steps per epoch at batch 128.
  config.validation_size = 1000  # Small validation split.
  config.test_subset = 1000  # Small test split.
  config.augment = False  # Keep the host work minimal.
  config.num_epochs = 2  # Two passes.
  config.optimizer = 'adam'  # Robust without tuning.
  config.learning_rate = 1e-3  # Adam's usual rate.
  config.weight_decay = 0.0  # No decay for a smoke run.
  config.schedule = 'cosine'  # Decays to zero at the end.
  config.log_every_steps = 8  # A few train rows per epoch.
  config.checkpoint_every_steps = 20  # Exercises mid-epoch checkpoints.
  return config
