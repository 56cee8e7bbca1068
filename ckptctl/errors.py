"""Errors ckptctl reports as one line and an exit code, never a traceback.

Exit codes (documented in README.md):
  0  success
  1  the operation failed (bad data, a failed check, an aborted confirmation)
  2  bad command-line usage
  3  a path, bucket or object does not exist
  4  access denied or no credentials
  5  the path exists but is not a checkpoint tree (or not the kind of path the command needs)
  6  resolve-resume: SkyRL would fail to resume (or there is nothing usable to resume)

Every command maps an error to its code the same way: the class decides (``exit_code``), and
``ckptctl.cli.handle_errors`` prints it (one line on stderr; with ``--json`` also an object
``{"error": ..., "exit_code": ...}`` on stdout).
"""

from __future__ import annotations


class CkptctlError(Exception):
    """Base class: ``str(error)`` is the one-line message shown to the user."""

    exit_code = 1


class UsageError(CkptctlError):
    exit_code = 2


class OptimizerLayoutError(UsageError):
    """Layout-bound optimizer state (megatron's dp_reshardable buckets) that cannot be mapped to
    parameters with certainty: the message names ``--drop-optimizer``."""


class NotFoundError(CkptctlError):
    exit_code = 3


class BucketNotFoundError(NotFoundError):
    """The bucket itself is missing (a typo), not just a path inside it."""


class AccessDeniedError(CkptctlError):
    exit_code = 4


class NotACheckpointError(CkptctlError):
    exit_code = 5


class NotResumableError(CkptctlError):
    exit_code = 6


class StorageError(CkptctlError):
    """The store answered with an error that is neither 'missing' nor 'denied'."""

    exit_code = 1


class PartialDeleteError(StorageError):
    """A bulk deletion stopped part-way; ``deleted`` objects are already gone (may be 0).

    The exit code is that of the failure that stopped it (4 when access was denied, 1 for a
    store that stopped answering, ...).
    """

    def __init__(self, message: str, *, deleted: int, exit_code: int = 1):
        super().__init__(message)
        self.deleted = deleted
        self.exit_code = exit_code


class CorruptFileError(CkptctlError):
    """A file exists but its content cannot be parsed (invalid JSON, a truncated file, ...)."""

    exit_code = 1


class AbortedError(CkptctlError):
    exit_code = 1
