"""Exception types whose messages a user can act on.

The CLI prints ``str(error)`` as one line and exits non-zero, so every message here names the file,
key or sample at fault and says what to do — no traceback needed.
"""


class ZeroVLError(Exception):
    """Base class: an expected failure with a user-facing one-line message."""

    exit_code = 1


class ConfigError(ZeroVLError):
    """Invalid configuration (unknown key, wrong type, impossible value, conflicting settings)."""

    exit_code = 2


class DataError(ZeroVLError):
    """A dataset file or sample cannot be used (missing image, tag/image mismatch, bad JSON)."""


class CheckpointError(ZeroVLError):
    """No usable checkpoint where one was asked for, or one that does not fit the model."""


class RendezvousError(ZeroVLError):
    """The ranks did not all meet within ``train.dist_timeout_s`` (wrong address or port, a node missing)."""
