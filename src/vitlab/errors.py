"""The project's own error types.

Anything a user can cause (bad config, missing or corrupt data, a damaged
checkpoint) raises a subclass of :class:`VitlabError`; the CLI prints its
message on one line instead of a traceback.
"""


class VitlabError(Exception):
    """Base class for errors caused by input, not by a bug."""


class ConfigError(VitlabError):
    """A configuration value is invalid or inconsistent."""


class DataError(VitlabError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(VitlabError):
    """A checkpoint is missing, damaged or incompatible."""


class TrainingInterrupted(VitlabError):
    """Raised after a SIGINT/SIGTERM (or a ``stop_when`` callback) once the last checkpoint is safely written."""


class NonFiniteLoss(VitlabError):
    """The loss became NaN or Inf."""


def out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA's allocator), or the RuntimeError MPS raises for the same."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).split("\n", 1)[0].lower()
