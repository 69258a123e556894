"""The one error a checkpoint raytp cannot load raises, whatever its format."""


class CheckpointError(ValueError):
    """The path is not a checkpoint raytp can load; the message names the file and says why."""
