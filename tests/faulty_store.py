"""Stores for the unit tests: a real store underneath, with chosen reads going wrong and every operation logged.

:class:`FaultyStore` implements the :class:`~lightning_distckpt.storage.Store` interface by delegating to a
real store (a :class:`~lightning_distckpt.storage.LocalStore` in the tests) and damages what chosen byte
ranges of chosen files read back as: flipped bits (``"flip"``), the file ending early (``"truncate"``), or an
``OSError`` (``"raise"``). The bytes on disk are never changed, so the same files can serve as an intact
replica through another store. Every operation is appended to ``ops`` (thread-safe), so tests can check what
was read from where and in which order things were written, renamed and removed.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from lightning_distckpt.storage import LocalStore, Store, register_store
from lightning_distckpt.storage.base import Entry, WriteStream

Kind = Literal["flip", "truncate", "raise"]


@dataclass(frozen=True)
class Fault:
    """Reads of bytes [start, end) of a file whose name (last path component) is ``file`` go wrong.

    ``truncate`` makes the file end at ``start`` (``end`` is ignored).
    """

    file: str
    start: int
    end: int
    kind: Kind = "flip"


class _FaultyFile(io.RawIOBase):
    """A seekable read-only file over a real one, with the faults of one file applied to what it returns."""

    def __init__(self, inner: BinaryIO, faults: list[Fault], log: Any) -> None:
        super().__init__()
        self._inner = inner
        self._faults = faults
        self._log = log
        self._pos = 0
        ends = [f.start for f in faults if f.kind == "truncate"]
        self._end = min(ends) if ends else None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            size = self._inner.seek(0, io.SEEK_END)
            self._pos = (size if self._end is None else min(size, self._end)) + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if self._end is not None:
            want = max(0, min(want, self._end - self._pos))
        lo, hi = self._pos, self._pos + want
        for f in self._faults:
            if f.kind == "raise" and f.start < hi and f.end > lo:
                self._log(("read-error", lo, want))
                raise OSError(f"injected I/O error reading bytes [{f.start}, {f.end})")
        self._inner.seek(lo)
        n = 0
        while n < want:
            got = self._inner.readinto(view[n:want])
            if not got:
                break
            n += got
        for f in self._faults:
            if f.kind == "flip":
                for i in range(max(f.start, lo), min(f.end, lo + n)):
                    view[i - lo] ^= 0xFF
        self._log(("read", lo, n))
        self._pos += n
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


class FaultyStore(Store):
    """``inner`` with the reads that ``faults`` name going wrong, and a log of every operation in ``ops``.

    ``ops`` holds tuples: ``("open_read", path)``, ``("read", path, offset, n)``, ``("read-error", path, offset,
    n)``, ``("write", path)`` (on close of the written file), ``("makedirs", path)``, ``("rename", src, dst)``,
    ``("remove", path, recursive)``. Faults can be changed between operations (``faults`` is a plain list).
    """

    def __init__(self, inner: Store | None = None, faults: list[Fault] | None = None) -> None:
        self.inner = inner or LocalStore(durable=False)
        self.faults = list(faults or [])
        self.scheme = self.inner.scheme
        self.retry = self.inner.retry
        self._mount: tuple[str, str] | None = None  # (URL prefix, root) once registered under a scheme
        self.ops: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _record(self, *op: Any) -> None:
        with self._lock:
            self.ops.append(op)

    def reads(self, file: str) -> list[tuple[int, int]]:
        """(offset, bytes) of every successful read of files named ``file``, in order."""
        with self._lock:
            return [(op[2], op[3]) for op in self.ops if op[0] == "read" and self.basename(op[1]) == file]

    def url(self, path: str) -> str:
        if self._mount is not None and (path + "/").startswith(self._mount[1] + "/"):
            return self._mount[0] + path[len(self._mount[1]) :].lstrip("/")
        return self.inner.url(path)

    def open_write(self, path: str) -> WriteStream:
        stream = self.inner.open_write(path)
        close = stream.close

        def logged_close() -> None:
            close()
            self._record("write", path)

        stream.close = logged_close  # type: ignore[method-assign]
        return stream

    def makedirs(self, path: str) -> None:
        self._record("makedirs", path)
        self.inner.makedirs(path)

    def rename(self, src: str, dst: str) -> None:
        self._record("rename", src, dst)
        self.inner.rename(src, dst)

    def remove(self, path: str, recursive: bool = False) -> None:
        self._record("remove", path, recursive)
        self.inner.remove(path, recursive)

    def open_read(self, path: str) -> BinaryIO:
        self._record("open_read", path)
        faults = [f for f in self.faults if f.file == self.basename(path)]
        inner = self.inner.open_read(path)
        if not faults:
            return _LoggedFile(inner, lambda op: self._record(op[0], path, *op[1:]))  # type: ignore[return-value]
        return _FaultyFile(inner, faults, lambda op: self._record(op[0], path, *op[1:]))  # type: ignore[return-value]

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def isdir(self, path: str) -> bool:
        return self.inner.isdir(path)

    def listdir(self, path: str) -> list[Entry]:
        return self.inner.listdir(path)


class _LoggedFile(_FaultyFile):
    def __init__(self, inner: BinaryIO, log: Any) -> None:
        super().__init__(inner, [], log)


def register_faulty(scheme: str, store: FaultyStore, root: str) -> str:
    """Serve ``<scheme>://<path>`` by ``store`` at ``<root>/<path>``; returns the URL of ``root``.

    URLs are what the catalog, the replicator and the retention take, so this is how a test puts a
    :class:`FaultyStore` behind them (through the public store registry).
    """
    prefix, root = f"{scheme}://", root.rstrip("/")

    def factory(url: str, config: Any) -> tuple[Store, str]:
        return store, (root + "/" + url[len(prefix) :].lstrip("/")).rstrip("/")

    register_store(scheme, factory, replace=True)
    store._mount = (prefix, root)
    store.scheme = scheme
    return prefix
