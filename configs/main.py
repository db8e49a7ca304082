"""The README's main job: He et al. 2024 on the benchmark model, offline.

  python train.py --config configs/main.py --workdir runs/default

vgg7b (docs/benchmark_model.md) on Fashion-MNIST: over-parameterize every
3x3 conv, train with the orthogonality penalty, collapse, split every conv
but the first (Tucker-2) at ranks for 3x fewer multiply-adds, re-estimate
the BatchNorm statistics, fine-tune, and write report.json / report.md /
plots. 10 to 19 minutes on 2 CPU cores, depending on the VM (README); the
full 20-epoch schedule of the frontier is configs/vgg7b.py.
"""

import ml_collections

from configs import vgg7b


def get_config() -> ml_collections.ConfigDict:
  """vgg7b, he2024 pipeline, ranks for 3x fewer FLOPs."""
  config = vgg7b.get_config()
  config.pipeline = 'he2024'  # Over-parameterize -> orthogonal training -> ...
  config.num_epochs = 9  # Orthogonal epochs: 455-769 s for 9 (README).
  config.compress.rank_rule = 'flops_ratio'  # One rank fraction for all ...
  config.compress.target_ratio = 3.0  # ... chosen for 3x fewer FLOPs.
  config.compress.exclude = 'conv1_1|head'  # 1 input channel; the head.
  config.compress.min_rank_kxk = 4  # 16-channel convs may go below 8.
  config.compress.recalibrate_batches = 50  # BatchNorm stats after the split.
  config.he2024.expansion = 1.5  # Inner widths 1.5x the channel counts.
  config.he2024.penalty_weight = 1e-2  # Lambda of the orthogonality penalty.
  config.finetune.num_epochs = 2  # Fine-tuning epochs after the split.
  return config
