"""The errors of the training tool.

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


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the message names the stage, the step
  and the likely cause. Checkpoints saved before the divergence are kept and
  no non-finite state is saved."""
