"""Storage backends behind one small interface, chosen by the URL's scheme.

``open_store(url)`` returns the store and the path of ``url`` inside it. Local paths and ``file://``
use :class:`LocalStore`; ``hdfs://`` and ``viewfs://`` use hdfs-native, ``webhdfs://`` fsspec's client
(both configured by :class:`HdfsOptions`); every other scheme goes through fsspec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_distckpt.storage.base import Entry, Store, WriteStream
from lightning_distckpt.storage.fsspec import FsspecStore
from lightning_distckpt.storage.hdfs import HdfsOptions, HdfsStore, webhdfs_store
from lightning_distckpt.storage.local import LocalStore

__all__ = ["Entry", "FsspecStore", "HdfsOptions", "LocalStore", "StorageConfig", "StorageLike", "Store", "WriteStream",
           "is_local", "open_store"]


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@dataclass(frozen=True)
class StorageConfig:
    """Everything that decides how a URL is stored; one per DistCheckpointIO, identical on every rank.

    ``options`` go to the fsspec filesystem of remote URLs; ``durable`` makes local writes fsync;
    ``hdfs`` configures ``hdfs://``, ``viewfs://`` and ``webhdfs://`` URLs.
    """

    options: dict[str, Any] = field(default_factory=dict)
    durable: bool = True
    hdfs: HdfsOptions | None = None


#: What functions taking a storage configuration accept: a StorageConfig, fsspec options, or nothing.
StorageLike = StorageConfig | dict[str, Any] | None


def open_store(url: str, config: StorageLike = None) -> tuple[Store, str]:
    """The store that holds ``url`` and the path of ``url`` inside it."""
    if not isinstance(url, str):
        raise TypeError(f"a checkpoint location must be a str URL or path, got {type(url).__name__}: {url!r}")
    if not isinstance(config, StorageConfig):
        config = StorageConfig(options=dict(config or {}))
    if is_local(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        return LocalStore(durable=config.durable), path.rstrip("/") or "/"
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("hdfs", "viewfs"):
        store: FsspecStore = HdfsStore(url, config.hdfs or HdfsOptions(), config.options)
    elif scheme in ("webhdfs", "swebhdfs"):
        store = webhdfs_store(url, config.hdfs or HdfsOptions(), config.options)
    else:
        store = FsspecStore(url, config.options)
    return store, store.strip(url).rstrip("/")
