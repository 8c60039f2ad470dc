"""Exceptions raised by lightning-distckpt.

Every error names the checkpoint URL (and the file or key) it concerns, so that a user can act on it
without a traceback. The CLI prints ``str(error)`` only.
"""

from __future__ import annotations


class DistCheckpointError(Exception):
    """Base class of every error raised by this package."""


class CheckpointNotFoundError(DistCheckpointError, FileNotFoundError):
    """The path does not exist, or it holds no committed checkpoint."""


class NotACheckpointError(DistCheckpointError):
    """The path exists but is not a checkpoint written by lightning-distckpt."""


class UncommittedCheckpointError(DistCheckpointError):
    """The directory is a checkpoint whose save never committed (crashed or still in flight)."""


class CorruptCheckpointError(DistCheckpointError):
    """Bytes or metadata of a committed checkpoint fail verification (checksum, size, schema)."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """The checkpoint asks for something that loading refuses to do (code execution, path escape)."""


class StateMismatchError(DistCheckpointError):
    """The checkpoint does not fit the model or optimizer it is loaded into."""


class CheckpointSaveError(DistCheckpointError):
    """A save failed; nothing of it became visible and earlier checkpoints are untouched."""


class StorageError(DistCheckpointError, OSError):
    """The storage backend failed after its retries (unreachable, permission denied, disk full)."""


class BackendUnavailableError(StorageError):
    """No installed storage backend serves the URL's scheme (e.g. ``s3://`` without ``s3fs``); the message
    names the URL and what to install."""


class DestinationExistsError(DistCheckpointError, FileExistsError):
    """The output of a copy or an export already exists, and the operation does not overwrite it."""


class NodeLocalRootError(DistCheckpointError):
    """The checkpoint root is not the same directory on every node of the job (see ``node_local``)."""
