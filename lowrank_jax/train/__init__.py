"""The training tool, one responsibility per module.

* :mod:`~lowrank_jax.train.errors`: ``ConfigError``, ``CheckpointError``.
* :mod:`~lowrank_jax.train.state`: ``TrainState``, ``create_train_state``,
  ``init_variables``.
* :mod:`~lowrank_jax.train.config_check`: ``validate_config``,
  ``maybe_initialize_distributed``.
* :mod:`~lowrank_jax.train.optim`: ``make_schedule``, ``make_optimizer``.
* :mod:`~lowrank_jax.train.sharding`: ``make_mesh``, ``replicated``,
  ``batch_sharding``, ``shard_batch``.
* :mod:`~lowrank_jax.train.steps`: ``make_train_step``, ``make_eval_step``,
  ``evaluate``.
* :mod:`~lowrank_jax.train.checkpoint`: ``open_checkpoint_manager``,
  ``save_checkpoint``, ``restore_checkpoint``, ``checkpoint_steps``,
  ``save_variables``, ``load_variables``.
* :mod:`~lowrank_jax.train.metrics`: the metrics log, ``summarize``.
* :mod:`~lowrank_jax.train.loop`: ``train`` (alias ``train_and_evaluate``),
  ``load_dataset``.

:mod:`lowrank_jax.training` re-exports the public names of all of them.
"""
