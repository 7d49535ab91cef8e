"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class SwarmError(Exception):
    """An error the user can fix; its message says how."""

    exit_code = 2


class ConfigError(SwarmError):
    """A bad flag, environment variable or config-file value."""


class DataError(SwarmError):
    """A dataset or tokenizer that cannot be loaded."""


class CheckpointError(SwarmError):
    """A checkpoint that is missing, unreadable or from another run."""
