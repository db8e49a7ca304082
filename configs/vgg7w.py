"""VGG-7w: vgg7b at twice the width (32, 64, 128 channels; 288k params).

  python train.py --config configs/vgg7w.py --workdir runs/vgg7w

The same schedule as configs/vgg7b.py on a network with room to compress:
split 4x, it is about vgg7b's size again (docs/results.md, the wide
model's frontier). About 2.7x vgg7b's CPU time per image
(docs/benchmark_model.md, candidate a32).
"""

import ml_collections

from configs import vgg7b


def get_config() -> ml_collections.ConfigDict:
  """Config for VGG-7w (vgg7b's data, SGD settings and 20 epochs)."""
  config = vgg7b.get_config()
  config.model = 'vgg7w'  # conv32 x2 pool conv64 x2 pool conv128 x2, GAP.
  return config
