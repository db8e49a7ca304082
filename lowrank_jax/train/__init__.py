"""The training tool, one responsibility per module.

Import the modules themselves (``from lowrank_jax.train import loop``); this
package re-exports nothing, and the library (:mod:`lowrank_jax`) never
imports it.

* :mod:`~lowrank_jax.train.errors`: ``ConfigError``, ``CheckpointError``,
  ``TrainingDiverged``.
* :mod:`~lowrank_jax.train.data`: datasets as numpy arrays,
  ``load_dataset``, ``iterate_batches``.
* :mod:`~lowrank_jax.train.state`: ``TrainState``, ``create_train_state``,
  ``init_variables``.
* :mod:`~lowrank_jax.train.config_check`: ``validate_config``,
  ``maybe_initialize_distributed``.
* :mod:`~lowrank_jax.train.optim`: ``make_schedule``, ``make_optimizer``.
* :mod:`~lowrank_jax.train.sharding`: ``make_mesh``, ``replicated``,
  ``batch_sharding``, ``shard_batch``.
* :mod:`~lowrank_jax.train.steps`: ``make_train_step``, ``make_eval_step``,
  ``evaluate``, ``Distillation`` and ``distillation_loss`` (a teacher's
  loss mixed into the step's).
* :mod:`~lowrank_jax.train.checkpoint`: ``open_checkpoint_manager``,
  ``save_checkpoint``, ``restore_checkpoint``, ``checkpoint_steps``,
  ``save_variables``, ``load_variables``.
* :mod:`~lowrank_jax.train.metrics`: the metrics log, ``summarize``.
* :mod:`~lowrank_jax.train.loop`: ``train`` (alias ``train_and_evaluate``),
  ``load_dataset`` (from the config's data fields); its epoch and step loop
  is :mod:`~lowrank_jax.train.epochs`, the run's state and guards (early
  stopping, divergence) :mod:`~lowrank_jax.train.progress`.
* :mod:`~lowrank_jax.train.report`: ``report.json``, ``report.md`` and plots
  of a job.
* :mod:`~lowrank_jax.train.jobs`: the stage bookkeeping of a job (saved
  stages, ``stages.json``, resume, measurements, report),
  ``evaluate_variables``.
* :mod:`~lowrank_jax.train.compress_config`: the compression fields of a
  config: ``validate`` (before any training), ``selection_rules``,
  ``min_rank_of``.
* :mod:`~lowrank_jax.train.pipelines`: the jobs ``run_direct``,
  ``run_he2024``, ``run_musco``, ``run_adtn`` (``PIPELINES``) and their
  stages ``choose_ranks``, ``compress``, ``finetune_config``,
  ``distillation`` (the fine-tuning's teacher), and
  ``adtn_collapse`` (the ADTN layers whose kernels vanished in training).

Data parallelism (one mesh axis ``'data'``, batches sharded, state
replicated) is described in :mod:`~lowrank_jax.train.sharding`.

Layouts: batches are NHWC float32 images and (B,) int32 labels; params trees
are the models' (conv kernels HWIO) or any transformed tree the same model
runs.

Every piece is importable on its own so a notebook can run a stage at a
time::

  from lowrank_jax.train import checkpoint, data, loop
  config = configs.smoke.get_config()
  dataset = data.load_dataset(config.dataset, train_subset=4096)
  model = models.get_model('lenet5')
  state, history = loop.train(config, '/tmp/run', dataset=dataset)
  # ... transform state.params, e.g. tucker2_split, then fine-tune the new tree:
  state2, _ = loop.train(config, '/tmp/run', variables=new_variables,
                         model=model, stage_name='finetune')
"""
