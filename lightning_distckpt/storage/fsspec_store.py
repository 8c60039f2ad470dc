"""Any fsspec filesystem (``s3://``, ``gs://``, ``webhdfs://``, ``memory://`` ...) as a Store."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from lightning_distckpt.errors import BackendUnavailableError, StorageError
from lightning_distckpt.storage.base import Entry, Store
from lightning_distckpt.storage.retry import RetryPolicy


class _OnceClosing:
    """A write stream whose ``close`` runs exactly once (some clients retry or fail on a second close)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._closed = False

    def write(self, data: bytes | memoryview, /) -> int:
        self._f.write(data)
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._f.close()


class FsspecStore(Store):
    """A store over ``fsspec.core.url_to_fs(url, **options)``.

    The filesystem object is created lazily, and again in a forked child (clients are not fork-safe).
    Metadata operations are retried on transient errors per ``retry``. Renames are verified: some
    backends (webhdfs) report success for a rename that did not happen.
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> None:
        self._root_url = url
        self._options = dict(options or {})
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self.scheme = url.split("://", 1)[0] if "://" in url else "file"
        if retry is not None:
            self.retry = retry

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": -1, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            with self._lock:
                if self._fs is None or self._pid != os.getpid():
                    self._fs = self._make_fs()
                    self._pid = os.getpid()
        return self._fs

    def _make_fs(self) -> Any:
        from fsspec.core import url_to_fs

        try:
            return url_to_fs(self._root_url, **self._options)[0]
        except ImportError as e:  # fsspec knows the scheme, its implementation is not installed
            raise BackendUnavailableError(
                f"{self._root_url}: no storage backend for {self.scheme}:// is installed ({e})"
            ) from e
        except ValueError as e:
            if "protocol not known" not in str(e).lower():
                raise
            raise BackendUnavailableError(
                f"{self._root_url}: unknown URL scheme {self.scheme}:// (no fsspec implementation "
                "or registered store serves it)"
            ) from e

    def _do(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.retry.run(lambda: fn(*args, **kwargs), f"{what} {self.url(args[0]) if args else self._root_url}")

    def strip(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    def url(self, path: str) -> str:
        """The URL of ``path``, with the host and port of the store's URL (fsspec's ``unstrip_protocol``
        drops them for webhdfs, which would make the URL unusable in another process)."""
        if "://" in path:  # fsspec keeps whole URLs as paths for some protocols (http, https)
            return path
        parts = urlsplit(self._root_url)
        if parts.netloc and not self.strip(self._root_url).lstrip("/").startswith(parts.netloc):
            return f"{parts.scheme}://{parts.netloc}/{path.lstrip('/')}"  # host-based: hdfs, webhdfs
        return f"{parts.scheme}://{path.lstrip('/')}"  # bucket-based: s3, gs, memory

    def open_write(self, path: str) -> Any:
        return _OnceClosing(self._do("create", self.fs.open, path, "wb"))

    def makedirs(self, path: str) -> None:
        self._do("mkdir", self.fs.makedirs, path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        if self._do("stat", self.fs.exists, dst):
            raise StorageError(errno.EEXIST, f"cannot rename {self.url(src)}: {self.url(dst)} exists")
        self._do("rename", self.fs.mv, src, dst, recursive=True)
        self.fs.invalidate_cache()
        if not self._do("stat", self.fs.exists, dst) or self._do("stat", self.fs.exists, src):
            raise StorageError(
                errno.EIO, f"rename of {self.url(src)} to {self.url(dst)} reported success but did not happen"
            )

    def remove(self, path: str, recursive: bool = False) -> None:
        try:
            self._do("remove", self.fs.rm, path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def open_read(self, path: str) -> BinaryIO:
        return self._do("open", self.fs.open, path, "rb")

    def read_bytes(self, path: str) -> bytes:
        return self._do("read", self.fs.cat_file, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        def once() -> None:
            with self.fs.open(path, "wb") as f:
                f.write(data)

        self.retry.run(once, f"write {self.url(path)}")

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        view = buffer.cast("B")
        data = self._do("read", self.fs.cat_file, path, start=offset, end=offset + len(view))
        if len(data) != len(view):
            raise EOFError(f"{self.url(path)}: file ends after {len(data)} of {len(view)} expected bytes")
        view[:] = data

    def size(self, path: str) -> int:
        return int(self._do("stat", self.fs.size, path))

    def exists(self, path: str) -> bool:
        return bool(self._do("stat", self.fs.exists, path))

    def isdir(self, path: str) -> bool:
        return bool(self._do("stat", self.fs.isdir, path))

    def listdir(self, path: str) -> list[Entry]:
        self.fs.invalidate_cache(path)
        out = []
        for info in self._do("list", self.fs.ls, path, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("size") is None and info.get("type") == "file":  # an HTML index (http): no sizes listed
                info = self._do("stat", self.fs.info, info["name"])
            out.append(_entry(name, info))
        return out

    def info(self, path: str) -> Entry:
        return _entry(path.rstrip("/").rsplit("/", 1)[-1], self._do("stat", self.fs.info, path))


def _entry(name: str, info: dict[str, Any]) -> Entry:
    """An `Entry` from an fsspec ``info`` dict (``islink``/``type: link`` where the backend reports links)."""
    mtime = info.get("mtime") or info.get("modificationTime") or 0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    elif mtime and float(mtime) > 1e11:  # milliseconds (HDFS)
        mtime = float(mtime) / 1000
    kind = {"directory": "dir", "file": "file", "link": "link", "symlink": "link"}.get(str(info.get("type")).lower(), "other")
    if info.get("islink"):
        kind = "link"
    return Entry(name, kind == "dir", int(info.get("size") or 0), float(mtime or 0), kind)
