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
    """The checkpoint asks for something that loading refuses to do (code execution, path escape, a special
    file such as a FIFO, a device or a symlink where a regular file belongs)."""


class NewerFormatError(CorruptCheckpointError):
    """The checkpoint was written in a newer on-disk format than this lightning-distckpt reads: it is not
    damaged, and it is never treated as missing (``ckpt_path="last"`` refuses instead of starting over)."""


class StateMismatchError(DistCheckpointError):
    """The checkpoint does not fit the model or optimizer it is loaded into."""


class CheckpointSaveError(DistCheckpointError):
    """A save failed; nothing of it became visible and earlier checkpoints are untouched."""


class StorageError(DistCheckpointError, OSError):
    """The storage backend failed after its retries (unreachable, permission denied, disk full).

    ``errno`` is set where one applies; the message is the text alone (no ``[Errno N]`` prefix)."""

    def __str__(self) -> str:
        return self.strerror if self.strerror is not None and self.filename is None else super().__str__()


class StorageUnreachableError(StorageError):
    """A store did not answer within its ``connect_timeout_s``: the message names the URL, what was tried,
    how often and for how long, and the last error."""


class BackendUnavailableError(StorageError):
    """No installed storage backend serves the URL's scheme (e.g. ``s3://`` without ``s3fs``); the message
    names the URL and what to install."""


class DestinationExistsError(DistCheckpointError, FileExistsError):
    """The output of a copy or an export already exists, and the operation does not overwrite it."""


class InsufficientMemoryError(DistCheckpointError):
    """A load needs more host memory than some rank has free. Decided by all ranks together (every rank raises
    the same error, naming the ranks that are short); never a reason to fall back to another checkpoint."""


class CatalogError(DistCheckpointError):
    """The checkpoint catalog (an index of committed checkpoints, e.g. in HBase) refused or failed an operation.

    The storage stays the source of truth: training never fails on a catalog error (it logs, counts and falls
    back to listing storage); tools report it with the catalog URL and the row concerned.
    """


class CatalogUnavailableError(CatalogError, StorageError):
    """The catalog could not be reached (connection refused, timeout) within its retries."""


class StaleOwnerError(CatalogError):
    """Fencing: a job whose ownership epoch of a run is older than the catalog's (a zombie) tried to register,
    move a pointer or prune. Nothing was changed."""


class CatalogConflictError(CatalogError):
    """A catalog row already names a different checkpoint (another manifest digest) under the same key."""


class NodeLocalRootError(DistCheckpointError):
    """The checkpoint root is not the same directory on every node of the job (see ``node_local``)."""
