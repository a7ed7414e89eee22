"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (bad config, bad file, bad flag). Never a bug in this package."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class StoreError(UserError):
    """A task store is missing, truncated, corrupt, of another format version or the wrong shape."""


class CheckpointError(UserError):
    """A run folder or checkpoint is missing, incomplete or does not match the request."""


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, no healthy worker left)."""
