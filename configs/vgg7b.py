"""VGG-7b (BatchNorm, 72.7k params), the benchmark model for 2 CPU cores.

  python train.py --config configs/vgg7b.py --workdir runs/vgg7b

Two 3x3 convs at each of 28, 14 and 7 pixels (16, 32, 64 channels), global
average pool, one dense head. 93.29% test accuracy after these 20 epochs
(trained as `a16`); the candidates, the measurements behind the choice and
the training curve are in docs/benchmark_model.md.
"""

import ml_collections

from configs import vgg7


def get_config() -> ml_collections.ConfigDict:
  """Config for VGG-7b (vgg7's data and SGD settings, 20 epochs)."""
  config = vgg7.get_config()
  config.model = 'vgg7b'  # conv16 x2 pool conv32 x2 pool conv64 x2, GAP, head.
  config.num_epochs = 20  # Full run (see docs/benchmark_model.md).
  return config
