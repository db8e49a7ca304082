"""VGG-16's classifier encoded by ONE shared ADTN (Qing et al. 2023's case).

  python train.py --config configs/vgg16_adtn.py --workdir runs/vgg16_adtn \
      --config.compress.pretrained=runs/<a vgg16 run>/stages/baseline

The baseline trains (or is loaded) with VGG-16's SGD settings; the
end-to-end training through the decode uses Adam with clipping, because SGD
with momentum at VGG's rates diverged to NaN through the 2^19-entry decode
(docs/results.md).
"""

import ml_collections

from configs import vgg16


def get_config() -> ml_collections.ConfigDict:
  """Config of the shared-ADTN VGG-16 job."""
  config = vgg16.get_config()
  config.pipeline = 'adtn'  # Baseline -> encode -> train end to end.
  config.adtn.select = 'fc1|fc2'  # The two 512 x 512 linear layers.
  config.adtn.share = True  # One network for both (2^19 entries, Q = 19).
  config.adtn.depth = 4  # Brick-wall layers.
  config.finetune.num_epochs = 30  # End-to-end training through the decode.
  config.finetune.learning_rate = 1e-3  # Adam's peak rate.
  config.finetune.optimizer = 'adam'  # Overrides VGG's SGD for this stage.
  config.finetune.weight_decay = 0.0  # No decay on the gates.
  config.finetune.grad_clip = 1.0  # Global-norm clip.
  return config
