"""The two errors of the training tool.

They sit below every other module of :mod:`lowrank_jax.train` (the optimizer,
the config check and the checkpoints all raise them), so no module has to
import another one's state to raise; :mod:`lowrank_jax.train.state` re-exports
both.
"""


class ConfigError(ValueError):
  """A config field is missing or has a bad value; the message names it."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored: unreadable, corrupt or incompatible.

  The message names the checkpoint directory and step and what differs.
  Nothing is deleted when this is raised.
  """
