"""VGG-8 (BatchNorm, 109k params): vgg7 with a second conv at 28x28.

  python train.py --config configs/vgg8.py --workdir runs/vgg8

A benchmark-model candidate, trained as vgg7 for 20 epochs; the candidates,
the measurements behind the choice and the training curves are in
docs/benchmark_model.md.
"""

import ml_collections

from configs import vgg7


def get_config() -> ml_collections.ConfigDict:
  """Config for VGG-8 (vgg7's data and SGD settings, 20 epochs)."""
  config = vgg7.get_config()
  config.model = 'vgg8'  # conv16 x2 pool conv32 x2 pool conv64 x3, GAP, head.
  config.num_epochs = 20  # Full run (see docs/benchmark_model.md).
  return config
