"""Which Store serves a URL: a registry of URL schemes, built-in or added by a third party.

Built in: local paths and ``file://`` (`LocalStore`), ``hdfs://`` and ``viewfs://`` (hdfs-native),
``webhdfs://``/``swebhdfs://`` (fsspec's client); every other scheme goes through fsspec
(`FsspecStore`), so any installed fsspec backend works without registration.

A third party serves a scheme its own way, by a call::

    from lightning_distckpt.storage import register_store
    register_store("mystore", lambda url, config: (MyStore(url, config.options), path_in_store(url)))

or by a Python entry point (looked up the first time an unregistered scheme is opened)::

    [project.entry-points."lightning_distckpt.stores"]
    mystore = "my_package.store:open_mystore"

A factory takes ``(url, StorageConfig)`` and returns ``(store, path of url inside the store)``.
Thread safety: registration takes a lock; lookups read a dict.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from lightning_distckpt.storage.base import Store
from lightning_distckpt.storage.fsspec_store import FsspecStore
from lightning_distckpt.storage.hdfs import HdfsOptions, HdfsStore, webhdfs_store
from lightning_distckpt.storage.local import LocalStore

STORE_GROUP = "lightning_distckpt.stores"


@dataclass(frozen=True)
class StorageConfig:
    """Everything that decides how a URL is stored; one per DistCheckpointIO, identical on every rank.

    ``options`` go to the fsspec filesystem of remote URLs; ``durable`` makes local writes fsync;
    ``hdfs`` configures ``hdfs://``, ``viewfs://`` and ``webhdfs://`` URLs; ``connect_timeout_s`` bounds how
    long reaching a store may take (`lightning_distckpt.storage.reach.probe`; for HDFS URLs
    ``HdfsOptions.connect_timeout_s`` wins when set).
    """

    options: dict[str, Any] = field(default_factory=dict)
    durable: bool = True
    hdfs: HdfsOptions | None = None
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s={self.connect_timeout_s}: must be a positive number of seconds")

    def connect_timeout(self, url: str) -> float:
        """Seconds allowed to reach the store of ``url``."""
        scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
        if self.hdfs is not None and self.hdfs.connect_timeout_s is not None and scheme in HDFS_SCHEMES:
            return self.hdfs.connect_timeout_s
        return self.connect_timeout_s


#: What functions taking a storage configuration accept: a StorageConfig, fsspec options, or nothing.
StorageLike = StorageConfig | dict[str, Any] | None
StoreFactory = Callable[[str, StorageConfig], "tuple[Store, str]"]


HDFS_SCHEMES = ("hdfs", "viewfs", "webhdfs", "swebhdfs")


def as_config(config: StorageLike) -> StorageConfig:
    """``config`` as a `StorageConfig` (fsspec options or nothing become one with defaults)."""
    return config if isinstance(config, StorageConfig) else StorageConfig(options=dict(config or {}))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local(url: str, config: StorageConfig) -> tuple[Store, str]:
    path = url[len("file://") :] if url.startswith("file://") else url
    return LocalStore(durable=config.durable), path.rstrip("/") or "/"


def _fsspec(store: FsspecStore, url: str) -> tuple[Store, str]:
    return store, store.strip(url).rstrip("/")


_lock = threading.Lock()
_factories: dict[str, StoreFactory] = {
    "file": _local,
    "hdfs": lambda url, c: _fsspec(HdfsStore(url, c.hdfs or HdfsOptions(), c.options), url),
    "viewfs": lambda url, c: _fsspec(HdfsStore(url, c.hdfs or HdfsOptions(), c.options), url),
    "webhdfs": lambda url, c: _fsspec(webhdfs_store(url, c.hdfs or HdfsOptions(), c.options), url),
    "swebhdfs": lambda url, c: _fsspec(webhdfs_store(url, c.hdfs or HdfsOptions(), c.options), url),
}
_scanned = False


def register_store(scheme: str, factory: StoreFactory, *, replace: bool = False) -> None:
    """Serve URLs ``scheme://...`` by ``factory(url, config) -> (store, path)``. A taken scheme raises
    ``ValueError`` unless ``replace``."""
    scheme = scheme.lower()
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"not a URL scheme: {scheme!r}")
    with _lock:
        if scheme in _factories and not replace and _factories[scheme] is not factory:
            raise ValueError(f"URL scheme {scheme!r} already has a store")
        _factories[scheme] = factory


def _factory(scheme: str) -> StoreFactory | None:
    global _scanned
    if scheme not in _factories and not _scanned:
        _scanned = True
        for ep in entry_points(group=STORE_GROUP):
            if ep.name.lower() not in _factories:
                register_store(ep.name, ep.load())
    return _factories.get(scheme)


def open_store(url: str, config: StorageLike = None) -> tuple[Store, str]:
    """The store that holds ``url`` and the path of ``url`` inside it."""
    if not isinstance(url, str):
        raise TypeError(f"a checkpoint location must be a str URL or path, got {type(url).__name__}: {url!r}")
    config = as_config(config)
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    factory = _factory(scheme)
    if factory is None:
        return _fsspec(FsspecStore(url, config.options), url)
    return factory(url, config)
