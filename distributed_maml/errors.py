"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Something the user can fix (bad config, bad file, bad flag). Never a bug in this package."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class StoreError(UserError):
    """A task store is missing, truncated, corrupt, of another format version or the wrong shape."""


class CheckpointError(UserError):
    """A run folder or checkpoint is missing, incomplete or does not match the request."""


class InputError(UserError):
    """A user's own task (a support or query set, a request) does not fit the meta-model."""


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, no healthy worker left)."""


_HINTS = {
    errno.ENOSPC: "free some space or use a folder on another disk",
    errno.EDQUOT: "free some space or use a folder on another disk",
    errno.EFBIG: "the file grew past the size this process may write (ulimit -f); raise it or write less",
    errno.EACCES: "choose a path you may write, or fix its permissions",
    errno.EPERM: "choose a path you may write, or fix its permissions",
    errno.EROFS: "the file system is read-only; choose a path on a writable one",
    errno.ENOENT: "check the path (its folder must exist or be creatable)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "the path is a folder; give a file",
    errno.EEXIST: "a file stands where a folder is needed; check the path",
}


def os_error_line(e: OSError) -> str:
    """An operating-system error (a full disk, a path that cannot be written) as one line that
    names the file, the reason and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    hint = _HINTS.get(e.errno or 0)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def with_filename(e: OSError, path: object) -> OSError:
    """The same error naming `path` (writes to an open file raise errors that name none)."""
    return e if e.filename else OSError(e.errno, e.strerror or str(e), str(path))
