"""Any fsspec filesystem (``s3://``, ``gs://``, ``webhdfs://``, ``memory://`` ...) as a Store."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, BinaryIO

from lightning_distckpt.errors import StorageError
from lightning_distckpt.storage.base import Entry, Store


class FsspecStore(Store):
    """A store over ``fsspec.core.url_to_fs(url, **options)``.

    The filesystem object is created lazily and again after a ``fork`` (clients are not fork-safe).
    Renames are verified: some backends (webhdfs) report success for a rename that did not happen.
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self._root_url = url
        self._options = dict(options or {})
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self.scheme = url.split("://", 1)[0] if "://" in url else "file"

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            with self._lock:
                if self._fs is None or self._pid != os.getpid():
                    from fsspec.core import url_to_fs

                    self._fs, _ = url_to_fs(self._root_url, **self._options)
                    self._pid = os.getpid()
        return self._fs

    def strip(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def open_write(self, path: str) -> Any:
        return self.fs.open(path, "wb")

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            raise StorageError(errno.EEXIST, f"cannot rename {self.url(src)}: {self.url(dst)} exists")
        self.fs.mv(src, dst, recursive=True)
        self.fs.invalidate_cache()
        if not self.fs.exists(dst) or self.fs.exists(src):
            raise StorageError(
                errno.EIO, f"rename of {self.url(src)} to {self.url(dst)} reported success but did not happen"
            )

    def remove(self, path: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B")
        data = self.fs.cat_file(path, start=offset, end=offset + len(view))
        if len(data) != len(view):
            raise EOFError(f"{self.url(path)}: file ends after {len(data)} of {len(view)} expected bytes")
        view[:] = data

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def listdir(self, path: str) -> list[Entry]:
        self.fs.invalidate_cache(path)
        out = []
        for info in self.fs.ls(path, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            mtime = info.get("mtime") or info.get("modificationTime") or 0
            out.append(Entry(name, info["type"] == "directory", int(info.get("size") or 0), float(mtime or 0)))
        return out
