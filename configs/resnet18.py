"""ResNet-18 (CIFAR-style) on Fashion-MNIST: SGD Nesterov 0.05, cosine."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Config for ResNet-18."""
  config = default.get_config()
  config.model = 'resnet18'  # 4 stages x 2 basic blocks, widths 64-512.
  config.num_epochs = 30  # Full run.
  config.optimizer = 'momentum'  # SGD with momentum.
  config.learning_rate = 0.05  # Wider net: a lower peak rate.
  config.nesterov = True  # Nesterov momentum 0.9.
  config.weight_decay = 5e-4  # Standard CIFAR ResNet decay.
  config.schedule = 'warmup_cosine'  # 1 warmup epoch, cosine to zero.
  return config
