"""Bounded retries with exponential backoff for transient storage errors.

Transient: a connection refused or reset, a timeout, a DataNode that went away, a NameNode in safe mode, a
file that could not be completed because its last block lacks replicas.
Not transient (raised at once): a missing or existing file, permission denied, no space left, a path that cannot
be resolved (a loop of symbolic links, a name too long, a file where a directory should be).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lightning_distckpt.errors import StorageError

T = TypeVar("T")
log = logging.getLogger(__name__)

_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                    # what the path itself is: asking again cannot change it (a loop of links, a name too long, ...)
                    # (ENOENT, EEXIST, ENOTDIR, EISDIR are the exception classes of _PERMANENT)
                    errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL, errno.EXDEV, errno.ENOTEMPTY, errno.EFBIG,
                    errno.EMLINK, errno.EBADF}  # fmt: skip
_TRANSIENT_TEXT = ("safemodeexception", "retriableexception", "eofexception", "connection reset", "connection closed",
                   "timed out", "broken pipe", "leaseexpiredexception", "could only be written to", "datanode",
                   "datatransfererror",
                   # the NameNode has not yet heard of enough replicas of the last block (a DataNode was lost):
                   # hdfs-native gave up completing the file; writing it again is what helps
                   "failed to complete file", "does not have enough number of replicas")  # fmt: skip


def is_transient(e: BaseException) -> bool:
    if isinstance(e, _PERMANENT) or isinstance(e, StorageError):
        return False
    if isinstance(e, OSError):
        return e.errno not in _PERMANENT_ERRNO
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _TRANSIENT_TEXT)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, waiting ``backoff_s``, then twice as long each time (capped at 8 s)."""

    attempts: int = 1
    backoff_s: float = 0.5

    def run(self, fn: Callable[[], T], what: str, cleanup: Callable[[], None] | None = None) -> T:
        """Call ``fn`` until it succeeds, a permanent error occurs, or the attempts are used up.

        ``cleanup`` runs before each new attempt (e.g. remove a half-written file). After the last attempt a
        `StorageError` names ``what``, the attempts and the last error.
        """
        delay = self.backoff_s
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if not is_transient(e):
                    raise
                if attempt == self.attempts:
                    if self.attempts == 1:
                        raise
                    raise StorageError(
                        errno.EIO,
                        f"{what}: failed {attempt} times over {time.monotonic() - started:.1f} s, last error: "
                        f"{type(e).__name__}: {e}",
                    ) from e
                log.warning("%s: %s (attempt %d of %d, retrying in %.1f s)", what, e, attempt, self.attempts, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                if cleanup is not None:
                    try:
                        cleanup()
                    except Exception as ce:  # noqa: BLE001 - the next attempt goes on; say what is left
                        log.warning("%s: clean-up before attempt %d failed (%s: %s); what it should have removed "
                                    "may be left behind", what, attempt + 1, type(ce).__name__, ce)
        raise AssertionError("unreachable")
