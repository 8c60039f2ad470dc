"""The Store interface: the few operations a checkpoint needs from a storage system.

A store is addressed by URL strings and never turns one into a ``pathlib.Path``: ``hdfs://nn:8020/x``
stays exactly that from the user's config to the storage client (invariant 4 of the design).

Implementations must be safe to use from several threads at once (the writer and reader run one
stream per thread) and must not keep state that breaks across ``fork`` (create clients lazily).
"""

from __future__ import annotations

import io
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from lightning_distckpt.storage.retry import RetryPolicy

if TYPE_CHECKING:
    from lightning_distckpt.ondisk.digests import BlockDigests


@dataclass(frozen=True)
class Entry:
    """One directory entry as returned by `Store.listdir()` and `Store.info()`, about the entry itself
    (a symbolic link is described as a link, never as what it points to).

    ``kind`` is ``"file"``, ``"dir"``, ``"link"`` or ``"other"`` (FIFO, device, socket); empty means the store
    did not say, and then it follows ``is_dir``.
    """

    name: str
    is_dir: bool
    size: int
    mtime: float = 0.0
    kind: str = ""

    @property
    def type(self) -> str:
        return self.kind or ("dir" if self.is_dir else "file")

    @property
    def described(self) -> str:
        """What the entry is, for messages: "a directory", "a symbolic link", "a special file (FIFO, device or
        socket)", "a regular file"."""
        return {"dir": "a directory", "link": "a symbolic link", "file": "a regular file"}.get(
            self.type, "a special file (FIFO, device or socket)")


class WriteStream(Protocol):
    """What `Store.open_write()` returns: append-only bytes, durable once ``close`` returns."""

    def write(self, data: bytes | memoryview, /) -> object: ...

    def close(self) -> None: ...


class Store(ABC):
    """A storage backend. Paths are ``/``-separated strings in the store's own namespace.

    ``url(path)`` gives back the full URL for messages and for other processes.
    """

    #: URL scheme(s) this store answers, for messages ("file", "hdfs", ...).
    scheme: str = ""
    #: How operations are retried on transient errors (one attempt: no retries).
    retry: RetryPolicy = RetryPolicy()

    # ---- naming -------------------------------------------------------------------------------
    @abstractmethod
    def url(self, path: str) -> str:
        """The full URL of ``path`` (what a user would pass to open it again)."""

    @staticmethod
    def join(base: str, *names: str) -> str:
        return posixpath.join(base, *names)

    @staticmethod
    def parent(path: str) -> str:
        return posixpath.dirname(path.rstrip("/"))

    @staticmethod
    def basename(path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    # ---- writing ------------------------------------------------------------------------------
    @abstractmethod
    def open_write(self, path: str) -> WriteStream:
        """Create (or truncate) ``path`` for writing. The parent directory exists."""

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents; no error if it exists."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (``dst`` must not exist) and verify that it happened.

        Atomic where the storage system offers it (POSIX, HDFS); raises `StorageError` if the
        rename did not take effect.
        """

    @abstractmethod
    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete a file, or a directory with ``recursive=True``; no error if it is already gone.

        Never follows a symbolic link: a link is removed as a link, and the directory it points to is untouched.
        """

    def write_bytes(self, path: str, data: bytes) -> None:
        stream = self.open_write(path)
        try:
            stream.write(data)
        finally:
            stream.close()

    # ---- reading ------------------------------------------------------------------------------
    @abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """Open ``path`` for reading (seekable)."""

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes of ``path`` at ``offset``; a short file is an error."""
        with self.open_read(path) as f:
            read_at(f, offset, buffer, path)

    def read_bytes(self, path: str) -> bytes:
        with self.open_read(path) as f:
            return f.read()

    def read_limited(self, path: str, limit: int) -> bytes:
        """The whole file at ``path`` if it is a regular file of at most ``limit`` bytes; otherwise
        `ValueError` saying why (checked before reading, so a FIFO never blocks and ``/dev/zero``
        never fills memory). ``FileNotFoundError`` if it does not exist."""
        entry = self.info(path)
        if entry.type != "file":
            raise ValueError(f"{self.url(path)}: not a regular file ({entry.described}); refused")
        if entry.size > limit:
            raise ValueError(f"{self.url(path)}: {entry.size} bytes, more than the {limit} a document may have")
        with self.open_read(path) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{self.url(path)}: more than the {limit} bytes a document may have")
        return data

    @abstractmethod
    def size(self, path: str) -> int:
        """Size of a file in bytes; ``FileNotFoundError`` if it does not exist."""

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def isdir(self, path: str) -> bool: ...

    @abstractmethod
    def listdir(self, path: str) -> list[Entry]:
        """Entries directly under ``path``; ``FileNotFoundError`` if it does not exist."""

    def info(self, path: str) -> Entry:
        """The entry at ``path`` itself (a link as a link); ``FileNotFoundError`` if there is none.

        The default asks `isdir()` and `size()`; stores that know links and special files override it.
        """
        if self.isdir(path):
            return Entry(self.basename(path), True, 0, 0.0, "dir")
        return Entry(self.basename(path), False, self.size(path), 0.0, "file")


@dataclass(frozen=True)
class Source:
    """A copy of a checkpoint: a store and the checkpoint directory's path in it."""

    store: Store
    path: str

    def file(self, name: str) -> str:
        """The path of a file the checkpoint lists: a plain name lies in the checkpoint directory, a block-store key
        (``.distckpt-blocks/<id>/<file>``, validated when the documents were parsed) in the root that holds it."""
        if "/" in name:
            return self.store.join(self.store.parent(self.path), name)
        return self.store.join(self.path, name)

    def url(self, name: str = "") -> str:
        return self.store.url(self.file(name) if name else self.path)


def read_at(f: BinaryIO, offset: int, buffer: memoryview, what: str, digests: BlockDigests | None = None) -> None:
    """Fill ``buffer`` with the bytes of ``f`` at ``offset``; raise ``EOFError`` naming ``what`` if short."""
    read_scatter(f, offset, [buffer], what, digests)


def read_scatter(f: BinaryIO, offset: int, views: Sequence[memoryview], what: str,
                 digests: BlockDigests | None = None) -> None:
    """Fill ``views`` one after the other with the bytes of ``f`` from ``offset`` on; ``EOFError`` naming
    ``what`` if the file is shorter. ``digests`` (if given) is fed every byte read, in order.

    Uses one ``read_range_stream`` where the file has it: hdfs-native's streams the blocks with pipelining and
    beats ``seek`` + ``read`` calls (``benchmarks/bench_hdfs.py``: rows ``raw_read`` vs ``raw_read_8mib``). The
    file position is then left unspecified.
    """
    views = [v.cast("B") for v in views]
    total = sum(len(v) for v in views)
    stream = getattr(f, "read_range_stream", None)
    length = _length(f) if stream is not None else None
    if stream is None or length is None:
        f.seek(offset)
        for v in views:
            read_exactly(f, v, what)
            if digests is not None:
                digests.update(v)
        return
    if offset + total > length:  # checked first: hdfs-native panics when asked to read past the end
        raise EOFError(f"{what}: file ends after {max(0, length - offset)} of {total} expected bytes at offset {offset}")
    k, done, filled = 0, 0, 0  # view index, bytes done in it, bytes done in all
    for piece in stream(offset, total):
        piece = memoryview(piece)
        if filled + len(piece) > total:
            raise OSError(f"{what}: the stream returned more than the {total} bytes asked for")
        filled += len(piece)
        if digests is not None:
            digests.update(piece)
        while len(piece):
            while done == len(views[k]):
                k, done = k + 1, 0
            n = min(len(piece), len(views[k]) - done)
            views[k][done : done + n] = piece[:n]
            piece, done = piece[n:], done + n
    if filled < total:
        raise EOFError(f"{what}: file ends after {filled} of {total} expected bytes at offset {offset}")


def windows(sizes: Sequence[int], limit: int) -> Iterator[tuple[int, int, int]]:
    """Consecutive groups of ``sizes`` of at most ``limit`` bytes (at least one item each): ``(i, j, total)``
    for ``sizes[i:j]``."""
    i = 0
    while i < len(sizes):
        j, total = i + 1, sizes[i]
        while j < len(sizes) and total + sizes[j] <= limit:
            total += sizes[j]
            j += 1
        yield i, j, total
        i = j


def read_blocks(f: BinaryIO, sizes: Sequence[int], what: str, window: int = 64 << 20) -> Iterator[memoryview]:
    """Consecutive pieces of ``sizes`` bytes from the start of ``f``, read about ``window`` bytes at a time
    with `read_at()`; ``EOFError`` naming ``what`` if the file is shorter."""
    offset = 0
    for i, j, total in windows(sizes, window):
        buf = memoryview(bytearray(total))
        read_at(f, offset, buf, what)
        pos = 0
        for n in sizes[i:j]:
            yield buf[pos : pos + n]
            pos += n
        offset += total


def _length(f: Any) -> int | None:
    try:
        return len(f)
    except TypeError:
        return None


def read_exactly(f: BinaryIO, buffer: memoryview, what: str) -> None:
    """Read ``len(buffer)`` bytes from ``f`` into ``buffer``; raise ``EOFError`` naming ``what`` if short."""
    view = buffer.cast("B")
    done = 0
    readinto = getattr(f, "readinto", None)
    while done < len(view):
        n = None
        if readinto is not None:
            try:
                n = readinto(view[done:])
            except (NotImplementedError, io.UnsupportedOperation):  # e.g. hdfs-native's reader
                readinto = None
        if n is None:
            chunk = f.read(len(view) - done)
            n = len(chunk)
            view[done : done + n] = chunk
        if not n:
            raise EOFError(f"{what}: file ends after {done} of {len(view)} expected bytes")
        done += n
