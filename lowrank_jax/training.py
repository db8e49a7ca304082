"""Training: train state, sharded jitted steps, the loop, checkpoints, resume.

The code lives in :mod:`lowrank_jax.train`, one responsibility per module
(``state``, ``config_check``, ``optim``, ``sharding``, ``steps``,
``checkpoint``, ``metrics``, ``loop``); this module re-exports its public
names, so ``training.train`` and the rest keep working.

Every piece is importable on its own so a notebook (or a pipeline) can run a
stage at a time::

  config = configs.smoke.get_config()
  dataset = data.load_dataset(config.dataset, train_subset=4096)
  model = models.get_model('lenet5')
  state, history = training.train(config, '/tmp/run', dataset=dataset)
  # ... transform state.params, e.g. tucker2_split, then fine-tune the new tree:
  state2, _ = training.train(config, '/tmp/run', variables=new_variables,
                             model=model, stage_name='finetune')

Data parallelism uses ``jax.sharding``: a 1-D :class:`~jax.sharding.Mesh` over
all devices with axis ``'data'``; batches are sharded along axis 0
(``P('data')``), the train state is replicated (``P()``), and the jitted steps
carry these shardings, so XLA inserts the gradient all-reduce (and computes
BatchNorm statistics over the *global* batch). The same code runs on one CPU,
on 8 forced host devices, and on several hosts (see
:func:`maybe_initialize_distributed`).

Resume: the data order of an epoch is a function of ``(config.seed, epoch)``,
the dropout key of step ``s`` is ``fold_in(state.rng, s)``, and a checkpoint
holds step, params, batch statistics, optimizer state and the rng. Re-running
the same command after a kill restores the latest checkpoint, skips the
batches already done in its epoch and continues with results identical to an
uninterrupted run.

Layouts: batches are NHWC float32 images and (B,) int32 labels; params trees
are the models' (conv kernels HWIO) or any transformed tree the same model
runs.
"""

# Besides the public names: _state_tree, _no_gain and _MetricsLog, which
# tests and benches use.
from lowrank_jax.train.checkpoint import (_state_tree, checkpoint_steps,
                                          load_variables,
                                          open_checkpoint_manager,
                                          restore_checkpoint, save_checkpoint,
                                          save_variables)
from lowrank_jax.train.config_check import (maybe_initialize_distributed,
                                            validate_config)
from lowrank_jax.train.errors import CheckpointError, ConfigError
from lowrank_jax.train.loop import (_no_gain, load_dataset, train,
                                    train_and_evaluate)
from lowrank_jax.train.metrics import _MetricsLog, summarize
from lowrank_jax.train.optim import (OPTIMIZERS, SCHEDULES, make_optimizer,
                                     make_schedule)
from lowrank_jax.train.sharding import (DATA_AXIS, batch_sharding, make_mesh,
                                        replicated, shard_batch)
from lowrank_jax.train.state import (PyTree, TrainState, create_train_state,
                                     init_variables)
from lowrank_jax.train.steps import evaluate, make_eval_step, make_train_step

__all__ = [
    'CheckpointError', 'ConfigError', 'DATA_AXIS', 'OPTIMIZERS', 'PyTree',
    'SCHEDULES', 'TrainState', 'batch_sharding', 'checkpoint_steps',
    'create_train_state', 'evaluate', 'init_variables', 'load_dataset',
    'load_variables', 'make_eval_step', 'make_mesh', 'make_optimizer',
    'make_schedule', 'make_train_step', 'maybe_initialize_distributed',
    'open_checkpoint_manager', 'replicated', 'restore_checkpoint',
    'save_checkpoint', 'save_variables', 'shard_batch', 'summarize', 'train',
    'train_and_evaluate', 'validate_config',
]
