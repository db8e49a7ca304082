"""Default config: ResNet-20 on offline Fashion-MNIST, a full training run.

  python train.py --config configs/default.py --workdir runs/resnet20
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The default training config; variants override a few fields."""
  config = ml_collections.ConfigDict()
  config.pipeline = 'train'  # Which pipeline train.py runs ('train', ...).

  # Data.
  config.dataset = 'fashion_mnist_local'  # A name in lowrank_jax.train.data.DATASETS.
  config.data_dir = config_dict.placeholder(str)  # Data location (None: default).
  config.validation_size = 5000  # Train examples held out for validation.
  config.train_subset = config_dict.placeholder(int)  # Keep only k train examples.
  config.test_subset = config_dict.placeholder(int)  # Keep only k test examples.
  config.augment = True  # Random crop (zero pad) + horizontal flip in training.
  config.pad_crop = 2  # Padding in pixels for the random crop.

  # Model.
  config.model = 'resnet20'  # A name in lowrank_jax.models.MODELS.

  # Optimization.
  config.num_epochs = 30  # Passes over the train split.
  config.batch_size = 128  # Global batch (divisible by the device count).
  config.eval_batch_size = 512  # Evaluation batch (divisible by devices).
  config.optimizer = 'momentum'  # One of sgd, momentum, adam, adamw.
  config.learning_rate = 0.1  # Peak learning rate.
  config.momentum = 0.9  # Momentum of the 'momentum' optimizer.
  config.nesterov = True  # Nesterov momentum.
  config.weight_decay = 5e-4  # Decay of ndim > 1 params (AdamW: decoupled).
  config.grad_clip = config_dict.placeholder(float)  # Global-norm clip (None: off).
  config.schedule = 'warmup_cosine'  # One of constant, cosine, warmup_cosine.
  config.warmup_epochs = 1.0  # Linear warmup length for warmup_cosine.
  config.lr_end_factor = 0.0  # Final learning rate as a fraction of the peak.
  config.max_steps = config_dict.placeholder(int)  # Stop early (None: all epochs).

  # Bookkeeping.
  config.seed = 0  # Seeds init, data split, data order and dropout.
  config.log_every_steps = 50  # Train rows in metrics.jsonl / TensorBoard.
  config.checkpoint_every_steps = 1000  # Save period in steps (0: end only).
  config.keep_checkpoints = 3  # Checkpoints kept per stage.
  config.progress = True  # tqdm progress bar (only on a terminal).
  config.redo_from = ''  # Stage to redo from after a config change ('': refuse).
  config.distributed = False  # Call jax.distributed.initialize() (multi-host).
  config.coordinator_address = ''  # host:port of process 0 ('': auto-detect).
  config.num_processes = config_dict.placeholder(int)  # Processes (None: auto).
  config.process_id = config_dict.placeholder(int)  # This process (None: auto).
  config.local_device_ids = ''  # e.g. '0,1': local devices used ('': all).
  config.distributed_timeout_s = 300  # Seconds to wait for the coordinator.

  # Compression (pipelines direct, he2024, musco; see lowrank_jax.train.pipelines).
  config.compress = ml_collections.ConfigDict()
  config.compress.select = '.*'  # Regex of layer paths to compress.
  config.compress.exclude = ''  # Regex of layer paths never compressed.
  config.compress.rank_rule = 'vbmf'  # vbmf, weakened_vbmf, params_ratio, flops_ratio.
  config.compress.weaken = 0.8  # MUSCO weakening w for weakened_vbmf (1: EVBMF).
  config.compress.target_ratio = 4.0  # Network-wide ratio for the *_ratio rules.
  config.compress.min_rank_kxk = 8  # Minimum rank of k x k conv modes.
  config.compress.min_rank_1x1 = 2  # Minimum rank of 1x1 convs.
  config.compress.min_rank_dense = 8  # Minimum rank of dense layers.
  config.compress.conv_form = 'tucker2'  # Form of split k x k convs: tucker2 or cp.
  config.compress.hooi_iters = 0  # HOOI sweeps (0: HOSVD, as in docs/results.md).
  config.compress.recalibrate_batches = 0  # BatchNorm stats after a split (0: kept).
  config.compress.round_to = 1  # Round target-rule ranks up to this multiple.
  config.compress.pretrained = ''  # Saved variables to start from ('' trains).

  # Fine-tuning after a compression: these fields override the ones above.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.num_epochs = 5  # Fine-tuning epochs.
  config.finetune.learning_rate = 0.01  # Peak learning rate of fine-tuning.
  config.finetune.warmup_epochs = 0.0  # No warm-up when fine-tuning.
  # Distillation from the network before compression (0: off; 1: only it).
  config.finetune.distill_weight = 0.0  # Weight of the distillation loss.
  config.finetune.distill_temperature = 4.0  # Softmax temperature T.

  # He et al. 2024: over-parameterization and the orthogonality penalty.
  config.he2024 = ml_collections.ConfigDict()
  config.he2024.expansion = 1.0  # Inner widths = ceil(C * expansion).
  config.he2024.penalty_weight = 1e-2  # Lambda of orthogonal_penalty.
  config.he2024.num_epochs = 0  # Epochs of orthogonal training (0: num_epochs).
  config.he2024.select = ''  # Layers to over-parameterize ('': every conv).
  # A previous he2024 run's workdir/stages/collapse: start at its trained,
  # collapsed network and only split and fine-tune ('' trains one). A
  # frontier trains once and splits at each target.
  config.he2024.trained = ''

  # MUSCO: multi-stage weakened-VBMF compression and fine-tuning.
  config.musco = ml_collections.ConfigDict()
  config.musco.n_stages = 4  # At most this many compress -> fine-tune stages.
  config.musco.layers_per_stage = 0  # Layers compressed per stage (0: all).
  config.musco.weaken = 0.8  # Weakening factor w (paper's runs: 0.6).
  config.musco.finetune_epochs = 3  # At most this many epochs per stage.
  config.musco.patience = 3  # Early stopping on validation accuracy.

  # ADTN (Qing et al. 2023): layers encoded as deep tensor networks.
  config.adtn = ml_collections.ConfigDict()
  config.adtn.select = 'fc.*'  # Layers to encode (dense layers by default).
  config.adtn.depth = 4  # Brick-wall layers M of (Q - 1) 2x2x2x2 gates.
  config.adtn.nonlinearity = 'relu'  # Between ADTN layers: relu, tanh, identity.
  config.adtn.fit_steps = 20  # Adam steps fitting gates to the pretrained kernel.
  config.adtn.fit_learning_rate = 1e-2  # Learning rate of that fit.
  config.adtn.noise = 0.02  # Init noise on identity gates (measured: docs/results.md).
  config.adtn.match_norm = True  # Rescale the fit to the kernel's norm.
  config.adtn.normalize = False  # Decode W = scale * s / ||s||: no collapse.
  config.adtn.min_size = 4096  # Smaller kernels stay dense.
  config.adtn.share = False  # One ADTN for all selected layers (the paper's VGG case).
  config.early_stopping_patience = 0  # Stop after k evals without gain (0: off).
  return config
