"""User-facing errors: each one is printed as a single line and ends the job non-zero."""


class SaeError(Exception):
    """A problem the user can fix (bad config, bad input, unreachable storage)."""


class ConfigError(SaeError):
    """A config key or value is wrong."""


class InputError(SaeError):
    """An input (corpus, preset, checkpoint, shard) is missing, empty or malformed."""


class StorageError(SaeError):
    """A storage location cannot be read or written."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job stopped cleanly and should be retried


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving its progress."""
