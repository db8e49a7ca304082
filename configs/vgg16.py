"""VGG-16 (BatchNorm, CIFAR-style) on Fashion-MNIST: SGD Nesterov 0.05."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Config for VGG-16."""
  config = default.get_config()
  config.model = 'vgg16'  # 13 convs + 512-512 classifier with dropout.
  config.num_epochs = 30  # Full run.
  config.optimizer = 'momentum'  # SGD with momentum.
  config.learning_rate = 0.05  # VGG is less stable at 0.1.
  config.nesterov = True  # Nesterov momentum 0.9.
  config.weight_decay = 5e-4  # Standard CIFAR VGG decay.
  config.schedule = 'warmup_cosine'  # 1 warmup epoch, cosine to zero.
  return config
