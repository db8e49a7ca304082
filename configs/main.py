"""The README's main job: He et al. 2024 on LeNet-5, offline Fashion-MNIST.

  python train.py --config configs/main.py --workdir runs/default

Over-parameterize every conv, train with the orthogonality penalty, collapse,
choose ranks by plain EVBMF, split (Tucker-2 convs, SVD dense layers),
fine-tune, and write report.json / report.md / plots. Minutes on 2 CPU cores.
"""

import ml_collections

from configs import lenet5


def get_config() -> ml_collections.ConfigDict:
  """LeNet-5, he2024 pipeline, EVBMF ranks."""
  config = lenet5.get_config()
  config.pipeline = 'he2024'  # Over-parameterize -> orthogonal training -> ...
  config.num_epochs = 8  # Orthogonal training epochs (~10 s each on 2 cores).
  config.augment = False  # Fashion-MNIST LeNet-5 needs no augmentation here.
  config.compress.rank_rule = 'vbmf'  # Plain EVBMF ranks (MUSCO min ranks).
  config.compress.exclude = 'conv1'  # One input channel: nothing to split.
  config.he2024.expansion = 1.5  # Inner widths 1.5x the channel counts.
  config.he2024.penalty_weight = 1e-2  # Lambda of the orthogonality penalty.
  config.finetune.num_epochs = 3  # Fine-tuning epochs after the split.
  config.finetune.learning_rate = 3e-4  # Adam, below the training rate.
  config.checkpoint_every_steps = 500  # Resumable mid-stage.
  return config
