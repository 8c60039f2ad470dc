"""Reaching a store within a bounded time (``connect_timeout_s``), and failing with the URL when it cannot.

Storage clients left to themselves can wait for minutes: with its default settings hdfs-native retries a
refused NameNode connection for about 3 minutes per call, and fsspec's webhdfs sends its HTTP requests
without any timeout. Whatever must not stall goes through here:

* `probe` contacts the store that holds a URL, retrying transient errors (connection refused, reset,
  timed out) until ``connect_timeout_s`` has passed, then raises `StorageUnreachableError` naming the
  URL, the operation, the attempts, the time spent and the last error. A URL whose backend is not installed
  raises `BackendUnavailableError` at once; a location that is a file, or that refuses access, a
  `StorageError`. The callback probes every root at setup, the ``distckpt`` command every URL it is
  given.
* `within` runs one call and gives up on it after a deadline (the call's thread is left to finish on
  its own: a client blocked in the kernel cannot be interrupted from Python).
* `BoundedFileSystem` is an fsspec filesystem whose every public call is bounded that way; the
  callback gives it to ModelCheckpoint, whose own ``exists``/``isdir``/``ls`` calls on the root would
  otherwise use a client without our fast-fail settings.

Thread safety: everything here may be called from any thread; nothing is collective (the callback agrees on
the verdicts across ranks itself).
"""

from __future__ import annotations

import atexit
import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_distckpt.errors import BackendUnavailableError, StorageError, StorageUnreachableError
from lightning_distckpt.storage.registry import StorageLike, as_config, open_store
from lightning_distckpt.storage.retry import RetryPolicy, is_transient

T = TypeVar("T")

#: first wait between two attempts of a probe; doubles up to ``_MAX_BACKOFF_S``
_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class Reached:
    """What a successful `probe` found."""

    url: str
    exists: bool  # False: reachable, but nothing at the URL yet (a root that the first save creates)
    seconds: float
    attempts: int


class _Progress:
    """What a bounded attempt loop did so far (read by the waiting thread when the deadline passes)."""

    def __init__(self) -> None:
        self.attempts = 0
        self.last_error: BaseException | None = None
        self.current = ""  # the operation in flight


def within(fn: Callable[[], T], timeout_s: float, what: str, progress: _Progress | None = None) -> T:
    """``fn()``, or `StorageUnreachableError` naming ``what`` if it has not returned after ``timeout_s``.

    ``fn`` runs in a daemon thread; on timeout that thread is abandoned (it ends when the client gives up).
    Exceptions of ``fn`` are raised here unchanged.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        finally:
            done.set()

    start = time.monotonic()
    thread = threading.Thread(target=run, name="distckpt-bounded-call", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        _abandoned.append(thread)
        raise StorageUnreachableError(_unreachable(what, timeout_s, time.monotonic() - start, progress))
    # let the thread finish its clean-up (native clients free their objects there): a daemon thread still in a
    # native library when the interpreter exits can abort the process ("FATAL: exception not rethrown")
    thread.join(1.0)
    if "error" in box:
        raise box["error"]
    return box["value"]


_abandoned: list[threading.Thread] = []  # calls given up on; their threads may still be inside a client


@atexit.register
def _let_abandoned_calls_end(limit_s: float = 1.0) -> None:
    """At exit, give calls given up on a second to return (a fast-failing attempt cut off mid-way): a thread
    that comes back from a native client while the interpreter finalizes aborts the process ("FATAL: exception
    not rethrown"). A call still hanging after that is left to the OS."""
    end = time.monotonic() + limit_s
    for t in _abandoned:
        t.join(max(0.0, end - time.monotonic()))


def _unreachable(what: str, timeout_s: float, elapsed: float, p: _Progress | None) -> str:
    tried = ""
    if p is not None and p.attempts:
        tried = f"; tried {p.current or 'it'} {p.attempts} time{'s' if p.attempts > 1 else ''}"
        if p.last_error is not None:
            tried += f", last error: {type(p.last_error).__name__}: {p.last_error}"
    return f"{what}: storage unreachable, no answer within connect_timeout_s={timeout_s:g} s ({elapsed:.1f} s){tried}"


def probe(url: str, config: StorageLike = None, *, timeout_s: float | None = None, directory: bool = True) -> Reached:
    """Reach the store holding ``url`` within ``timeout_s`` (default: the config's ``connect_timeout(url)``).

    Lists ``url`` (a directory, or nothing yet). Retries transient errors with backoff until the deadline.
    Raises `StorageUnreachableError` (no answer in time), `BackendUnavailableError` (the
    scheme's backend is not installed) or `StorageError` (``url`` is a file while ``directory``,
    permission denied, any other permanent error), each naming ``url``. Blocks at most about ``timeout_s``;
    not collective.
    """
    config = as_config(config)
    timeout = timeout_s if timeout_s is not None else config.connect_timeout(url)
    start = time.monotonic()
    # the retry loop ends a little before the hard deadline, so that normally its thread has finished when the
    # error is raised (a thread abandoned inside a native client can abort the interpreter at exit); only an
    # attempt that hangs is cut off by `within`
    deadline = start + timeout - min(0.5, 0.1 * timeout)
    progress = _Progress()

    def attempts() -> bool:
        progress.current = "opening the client"
        try:
            store, path = open_store(url, config)  # BackendUnavailableError for a scheme fsspec cannot serve
        except ImportError as e:  # a registered store whose client is missing
            raise BackendUnavailableError(f"{url}: no storage backend for this URL is installed: {e}") from None
        store = copy.copy(store)  # one attempt per call: this loop does the retrying, within the deadline
        store.retry = RetryPolicy()
        delay = _BACKOFF_S
        longest = 0.0  # the longest attempt so far: no attempt starts that would likely end after the deadline
        while True:
            progress.attempts += 1
            progress.current = f"listing {url}"
            began = time.monotonic()
            try:
                return _look(store, path, url, directory)
            except FileNotFoundError:
                return False
            except ImportError as e:  # clients created on first use (hdfs-native)
                raise BackendUnavailableError(f"{url}: no storage backend for this URL is installed: {e}") from None
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - classified here
                if not is_transient(e):
                    raise StorageError(f"{url}: {type(e).__name__}: {e}") from e
                progress.last_error = e
            longest = max(longest, time.monotonic() - began)
            left = deadline - time.monotonic() - longest
            if left <= 0.01:
                raise StorageUnreachableError(_unreachable(url, timeout, time.monotonic() - start, progress))
            time.sleep(min(delay, left - 0.01))
            delay = min(2 * delay, _MAX_BACKOFF_S)

    exists = within(attempts, timeout, url, progress)
    return Reached(url, exists, time.monotonic() - start, max(1, progress.attempts))


def _look(store: Any, path: str, url: str, directory: bool) -> bool:
    """True if ``path`` exists, FileNotFoundError if absent, StorageError if it is a file and ``directory``."""
    try:
        store.listdir(path)
    except NotADirectoryError:
        if directory:
            raise StorageError(f"{url}: is a file, not a directory (a checkpoint root must be a directory)") from None
        return True
    if directory and not store.isdir(path):
        raise StorageError(f"{url}: is a file, not a directory (a checkpoint root must be a directory)")
    return True


class BoundedFileSystem:
    """An fsspec filesystem whose public method calls each return within ``timeout_s`` or raise
    `StorageUnreachableError` naming the call and the URL. Attributes and private methods pass through."""

    def __init__(self, fs: Any, url: str, timeout_s: float) -> None:
        self._bounded_fs = fs
        self._bounded_url = url
        self._bounded_timeout = timeout_s

    @property
    def wrapped(self) -> Any:
        return self._bounded_fs

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._bounded_fs, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def bounded(*args: Any, **kwargs: Any) -> Any:
            where = args[0] if args and isinstance(args[0], str) else self._bounded_url
            return within(lambda: attr(*args, **kwargs), self._bounded_timeout, f"{name} {where}")

        return bounded

    def __repr__(self) -> str:
        return f"BoundedFileSystem({self._bounded_fs!r}, timeout_s={self._bounded_timeout:g})"


def bounded_filesystem(url: str, config: StorageLike = None) -> BoundedFileSystem:
    """The fsspec filesystem of ``url`` configured as this package configures it (fast-fail HDFS options, the
    storage options), every call bounded by the config's ``connect_timeout(url)``. Raises like `probe`
    when the backend is missing."""
    config = as_config(config)
    timeout = config.connect_timeout(url)

    def make() -> Any:
        try:
            store, _ = open_store(url, config)
            fs = getattr(store, "fs", None)
            if fs is None:  # a third-party Store without fsspec underneath: fsspec's own client for the URL
                from fsspec.core import url_to_fs

                fs = url_to_fs(url, **config.options)[0]
            return fs
        except ImportError as e:
            raise BackendUnavailableError(f"{url}: no storage backend for this URL is installed: {e}") from None

    return BoundedFileSystem(within(make, timeout, f"connect {url}"), url, timeout)
