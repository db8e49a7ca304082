"""ResNet-20 on Fashion-MNIST: SGD Nesterov 0.1, warmup cosine, decay 5e-4."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Config for ResNet-20 (the default's settings, stated explicitly)."""
  config = default.get_config()
  config.model = 'resnet20'  # 3 stages x 3 basic blocks, widths 16-32-64.
  config.num_epochs = 30  # Full run.
  config.optimizer = 'momentum'  # SGD with momentum.
  config.learning_rate = 0.1  # Standard CIFAR ResNet peak rate at batch 128.
  config.nesterov = True  # Nesterov momentum 0.9.
  config.weight_decay = 5e-4  # Standard CIFAR ResNet decay.
  config.schedule = 'warmup_cosine'  # 1 warmup epoch, cosine to zero.
  return config
