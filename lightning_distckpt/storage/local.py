"""Local (POSIX) filesystem store: plain paths and ``file://`` URLs."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import BinaryIO

from lightning_distckpt.errors import StorageError
from lightning_distckpt.storage.base import Entry, Store, read_exactly


class _LocalWriteStream:
    """A file created (or truncated) for writing, fsync'ed on close when ``durable``.

    Never writes through a symbolic link or into a FIFO, device or socket at ``path``: a link there (a file of a
    staging directory swapped for a link to something outside the root) is refused with ``ELOOP``, anything but a
    regular file with ``EINVAL``, both as `StorageError` naming the path; the open never blocks."""

    def __init__(self, path: str, durable: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StorageError(errno.ELOOP, f"{path}: is a symbolic link; not written through") from None
            if e.errno == errno.ENXIO:  # a FIFO nobody reads
                raise StorageError(errno.EINVAL, f"{path}: not a regular file (FIFO); refused") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(errno.EINVAL, f"{path}: not a regular file (FIFO, device or socket); refused")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self._f = os.fdopen(fd, "wb", buffering=0)
        self._durable = durable

    def write(self, data: bytes | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self._f.write(view[done:]) or 0
        return done

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            if self._durable:
                os.fsync(self._f.fileno())
        finally:
            self._f.close()


def _entry(name: str, st: os.stat_result) -> Entry:
    mode = st.st_mode
    kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "link" if stat.S_ISLNK(mode) else "other"
    return Entry(name, kind == "dir", st.st_size, st.st_mtime, kind)


class LocalStore(Store):
    """Files on a local or network-mounted POSIX filesystem.

    ``durable=True`` fsyncs every file on close and every directory after a rename, so that a
    committed checkpoint survives a power loss. Thread-safe: it holds no state besides the flag.
    """

    scheme = "file"

    def __init__(self, durable: bool = True) -> None:
        self.durable = durable

    def url(self, path: str) -> str:
        return path

    def open_write(self, path: str) -> _LocalWriteStream:
        return _LocalWriteStream(path, self.durable)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        if os.path.lexists(dst):
            raise StorageError(errno.EEXIST, f"cannot rename {src} to {dst}: destination exists")
        os.rename(src, dst)
        if self.durable:
            self._fsync_dir(os.path.dirname(dst.rstrip("/")) or ".")

    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete ``path``; a symbolic link is unlinked (never followed), and ``shutil.rmtree`` unlinks the
        links it meets inside a directory."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                if not recursive:
                    raise IsADirectoryError(errno.EISDIR, f"{path} is a directory (remove it with recursive=True)")
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass

    def open_read(self, path: str, buffering: int = -1) -> BinaryIO:
        """Open a regular file (through a link if ``path`` is one). A FIFO, device or socket is refused with
        an ``OSError`` instead of blocking or streaming forever."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(errno.EINVAL, f"{path}: not a regular file (FIFO, device or socket); refused")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb", buffering=buffering)
        except BaseException:
            os.close(fd)
            raise

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        with self.open_read(path, buffering=0) as f:
            f.seek(offset)
            read_exactly(f, buffer, path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[Entry]:
        out = []
        with os.scandir(path) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed while listing
                    continue
                out.append(_entry(e.name, st))
        return out

    def info(self, path: str) -> Entry:
        return _entry(os.path.basename(path.rstrip("/")), os.lstat(path))

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
