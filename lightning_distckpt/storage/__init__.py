"""Storage backends behind one small interface, chosen by the URL's scheme.

``open_store(url)`` returns the store and the path of ``url`` inside it. Local paths and ``file://``
use :class:`LocalStore`; every other scheme goes through fsspec (``hdfs://`` and ``viewfs://`` through
the hdfs-native backend once it is installed).
"""

from __future__ import annotations

from typing import Any

from lightning_distckpt.storage.base import Entry, Store, WriteStream
from lightning_distckpt.storage.local import LocalStore

__all__ = ["Entry", "LocalStore", "Store", "WriteStream", "open_store", "is_local"]


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_store(url: str, options: dict[str, Any] | None = None, durable: bool = True) -> tuple[Store, str]:
    """The store that holds ``url`` and the path of ``url`` inside it.

    ``options`` are passed to the fsspec filesystem of remote URLs; ``durable`` makes local writes fsync.
    """
    if not isinstance(url, str):
        raise TypeError(f"a checkpoint location must be a str URL or path, got {type(url).__name__}: {url!r}")
    if is_local(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        return LocalStore(durable=durable), path.rstrip("/") or "/"
    from lightning_distckpt.storage.fsspec import FsspecStore

    store = FsspecStore(url, options)
    return store, store.strip(url).rstrip("/")
