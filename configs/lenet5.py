"""LeNet-5 on Fashion-MNIST with Adam."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Config for LeNet-5."""
  config = default.get_config()
  config.model = 'lenet5'  # conv6-conv16-fc120-fc84-fc.
  config.augment = False  # Plain data, as in the LeNet baselines.
  config.num_epochs = 20  # Enough to converge.
  config.optimizer = 'adam'  # Adam for the small nets.
  config.learning_rate = 1e-3  # Adam's usual rate.
  config.weight_decay = 0.0  # No decay.
  config.schedule = 'cosine'  # Cosine decay to zero.
  return config
