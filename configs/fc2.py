"""FC-2 (784-256-10 MLP) on Fashion-MNIST with Adam."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Config for the two-layer perceptron."""
  config = default.get_config()
  config.model = 'fc2'  # 784 -> 256 -> 10.
  config.augment = False  # An MLP gains little from crops/flips.
  config.num_epochs = 20  # Converges quickly.
  config.optimizer = 'adam'  # Adam for the small nets.
  config.learning_rate = 1e-3  # Adam's usual rate.
  config.weight_decay = 0.0  # No decay.
  config.schedule = 'cosine'  # Cosine decay to zero.
  return config
