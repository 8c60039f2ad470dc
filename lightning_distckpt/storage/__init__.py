"""Storage backends behind one small interface (bytes only), chosen by the URL's scheme.

``open_store(url)`` returns the store and the path of ``url`` inside it (see `.registry` for the
schemes and how a third party adds one). Nothing here knows what a checkpoint is.
"""

from __future__ import annotations

from lightning_distckpt.storage.base import Entry, Source, Store, WriteStream
from lightning_distckpt.storage.fsspec_store import FsspecStore
from lightning_distckpt.storage.hdfs import HdfsOptions, HdfsStore, webhdfs_store
from lightning_distckpt.storage.local import LocalStore
from lightning_distckpt.storage.reach import BoundedFileSystem, Reached, bounded_filesystem, probe, within
from lightning_distckpt.storage.registry import (
    StorageConfig,
    StorageLike,
    as_config,
    is_local,
    open_store,
    register_store,
)

__all__ = ["BoundedFileSystem", "Entry", "FsspecStore", "HdfsOptions", "HdfsStore", "LocalStore", "Reached", "Source",
           "StorageConfig", "StorageLike", "Store", "WriteStream", "as_config", "bounded_filesystem", "is_local",
           "open_store", "probe", "register_store", "webhdfs_store", "within"]
