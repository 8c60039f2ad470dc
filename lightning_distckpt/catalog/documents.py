"""Opening one checkpoint: its commit marker, manifest, metadata and state documents, each verified.

Not collective: call on one rank (the engine broadcasts what rank 0 opened) or in a tool.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lightning_distckpt import ondisk
from lightning_distckpt.ondisk.names import PENDING
from lightning_distckpt.ondisk import skeleton as _skeleton
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistCheckpointError,
    NotACheckpointError,
    StorageError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
)
from lightning_distckpt.storage import Source, StorageLike, open_store
from lightning_distckpt.transforms.checks import check_codecs

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A committed checkpoint whose marker, manifest, metadata and state documents verified."""

    source: Source
    manifest: ondisk.Manifest
    metadata: ondisk.CheckpointMetadata  #: plain Python; the engine converts it to DCP's Metadata for a load
    skeleton: Any

    @property
    def url(self) -> str:
        return self.source.url()


def source_of(url: str, options: StorageLike = None) -> Source:
    store, path = open_store(url, options)
    return Source(store, path)


def read_document(source: Source, name: str, limit: int | None = None) -> bytes:
    """The bytes of document ``name`` of a checkpoint, read only if it is a regular file (not a link, FIFO or
    device: `UnsafeCheckpointError`) of at most ``limit`` bytes (default: its
    ``ondisk.DOCUMENT_LIMITS`` entry; `CorruptCheckpointError`), checked before any byte is read.
    ``FileNotFoundError`` if it does not exist; `StorageError` naming the file if the storage fails (after the
    store's retries): that says nothing about whether the checkpoint is intact."""
    store, path = source.store, source.store.join(source.path, name)
    limit = ondisk.DOCUMENT_LIMITS.get(name, 1 << 30) if limit is None else limit
    try:
        entry = store.info(path)
        if entry.type != "file":
            raise UnsafeCheckpointError(f"{source.url(name)}: is {entry.described}, not a regular file; refused")
        if entry.size > limit:
            raise CorruptCheckpointError(f"{source.url(name)}: {entry.size} bytes, more than the {limit} it may have")

        def once() -> bytes:
            with store.open_read(path) as f:  # a FIFO swapped in since the check is refused by the store
                return f.read(limit + 1)

        data = store.retry.run(once, f"read {source.url(name)}")  # e.g. a DataNode lost meanwhile: retried
    except (DistCheckpointError, FileNotFoundError):
        raise
    except (OSError, RuntimeError) as e:  # the storage failed (hdfs-native raises RuntimeError): not the bytes
        raise StorageError(errno.EIO, f"{source.url(name)}: could not be read ({type(e).__name__}: {e})") from e
    if len(data) > limit:  # grew since the check
        raise CorruptCheckpointError(f"{source.url(name)}: more than the {limit} bytes it may have")
    return data


def read_manifest(source: Source) -> ondisk.Manifest:
    """The manifest of a committed checkpoint; raises a specific error for each way this can fail."""
    url = source.url()
    store, path = source.store, source.path
    if not store.exists(path):
        raise CheckpointNotFoundError(f"{url}: no such checkpoint (path does not exist)")
    if not store.isdir(path):
        raise NotACheckpointError(f"{url}: is a file, not a lightning-distckpt checkpoint directory")
    manifest_there, marker_there = concurrently(lambda: store.exists(store.join(path, ondisk.MANIFEST)),
                                                lambda: store.exists(store.join(path, ondisk.MARKER)))
    has_manifest = manifest_there.result()
    if not marker_there.result():
        if has_manifest or any(e.name.endswith(".distcp") or e.name == PENDING for e in store.listdir(path)):
            raise UncommittedCheckpointError(
                f"{url}: checkpoint was never committed (no {ondisk.MARKER} marker: its save crashed or is in flight)"
            )
        raise NotACheckpointError(f"{url}: not a lightning-distckpt checkpoint (no {ondisk.MARKER} or {ondisk.MANIFEST})")
    if not has_manifest:
        raise CorruptCheckpointError(f"{source.url(ondisk.MANIFEST)}: missing from a committed checkpoint")
    manifest_read, marker_read = concurrently(lambda: read_document(source, ondisk.MANIFEST),
                                              lambda: read_document(source, ondisk.MARKER))
    manifest_bytes = manifest_read.result()
    ondisk.check_marker(marker_read.result(), manifest_bytes, source.url(ondisk.MARKER))
    return ondisk.Manifest.from_json(ondisk.loads(manifest_bytes, source.url(ondisk.MANIFEST)), source.url(ondisk.MANIFEST))


def concurrently(*calls: Callable[[], Any]) -> list[Future[Any]]:
    """Run ``calls`` (storage round trips without side effects) at the same time; returns once all are done, their
    futures in order. Callers take each ``result()`` where they would have made the call, so that the errors they
    raise, and their order, are those of calling them one after the other."""
    with ThreadPoolExecutor(len(calls), thread_name_prefix="distckpt-documents") as pool:
        return [pool.submit(c) for c in calls]


def read_uncommitted_manifest(source: Source) -> ondisk.Manifest | None:
    """The manifest of a directory whose marker is missing, if it is a valid manifest of this package's
    format (a save that crashed between its rename and its marker); None if there is none or it does not
    parse. Clean-up uses this to prove a directory is its own garbage."""
    try:
        data = read_document(source, ondisk.MANIFEST)
        return ondisk.Manifest.from_json(ondisk.loads(data, source.url(ondisk.MANIFEST)), source.url(ondisk.MANIFEST))
    except (DistCheckpointError, OSError):
        return None


def _read_listed(source: Source, manifest: ondisk.Manifest, name: str) -> bytes:
    want = manifest.files[name]
    limit = ondisk.DOCUMENT_LIMITS[name]
    if want["size"] > limit:
        raise CorruptCheckpointError(f"{source.url(name)}: {ondisk.MANIFEST} lists {want['size']} bytes, more than "
                                     f"the {limit} it may have")  # fmt: skip
    try:
        data = read_document(source, name, want["size"])
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{source.url(name)}: missing (listed in {ondisk.MANIFEST})") from None
    if len(data) != want["size"] or ondisk.digest(data) != want["xxh3"]:
        raise CorruptCheckpointError(f"{source.url(name)}: does not match its checksum in {ondisk.MANIFEST}")
    return data


def open_checkpoint(source: Source, check_sizes: bool = True) -> Checkpoint:
    """Read and verify everything but the tensor bytes (those are verified block by block when read).

    Every file listed in the manifest that is present must be a regular file (a symlink, FIFO or device
    inside a checkpoint is refused: `UnsafeCheckpointError`). With ``check_sizes`` every one must
    exist with its recorded size. Any problem is an error of this package naming the file and the key.
    """
    manifest = read_manifest(source)
    metadata_bytes, skeleton_bytes, listing = concurrently(lambda: _read_listed(source, manifest, ondisk.METADATA),
                                                           lambda: _read_listed(source, manifest, ondisk.STATE),
                                                           lambda: source.store.listdir(source.path))
    metadata = ondisk.parse_metadata(
        ondisk.loads(metadata_bytes.result(), source.url(ondisk.METADATA)), source.url(ondisk.METADATA)
    )
    check_codecs(metadata, source.url(ondisk.METADATA))
    skeleton = ondisk.loads(skeleton_bytes.result(), source.url(ondisk.STATE), ondisk.MAX_DEPTH)
    if not isinstance(skeleton, dict):  # what Lightning's save_checkpoint is given: a dict
        raise CorruptCheckpointError(f"{source.url(ondisk.STATE)}: must hold an object (the checkpoint dict), not a "
                                     f"{type(skeleton).__name__}")  # fmt: skip
    _skeleton.tensor_refs(skeleton)  # every tensor reference is a string
    if metadata.data_id != manifest.data_id:
        raise CorruptCheckpointError(f"{source.url(ondisk.METADATA)}: data_id {metadata.data_id!r} differs from the "
                                     f"manifest's {manifest.data_id!r}")  # fmt: skip
    if metadata.layout is not None:  # compact: chunks are placed by the data files' indexes, read when used
        from lightning_distckpt.catalog.compact import check_layout_files

        check_layout_files(metadata.layout, manifest, source.url(ondisk.METADATA))
    for loc in metadata.storage_data.values() if metadata.layout is None else ():
        for key, offset, i, j in loc.segments():
            info = manifest.files.get(key)
            if info is None or offset + sum(b.stored for b in loc.blocks[i:j]) > info["size"]:
                raise CorruptCheckpointError(
                    f"{source.url(ondisk.METADATA)}: a chunk lies outside data file {key!r} as listed in the manifest"
                )
    entries = {e.name: e for e in listing.result()}
    for name, info in manifest.files.items():
        if "/" in name:  # in the root's block store (incremental checkpoints)
            try:
                entry = source.store.info(source.file(name))
            except (FileNotFoundError, NotADirectoryError):  # also: the block store, or its directory, is a file
                entry = None
            except DistCheckpointError:
                raise
            except OSError as e:  # e.g. a loop of symbolic links on the way
                raise UnsafeCheckpointError(f"{source.url(name)}: cannot be reached ({e.strerror or e}); refused") from e
        else:
            entry = entries.get(name)
        if entry is None:
            if check_sizes:
                raise CorruptCheckpointError(f"{source.url(name)}: missing (listed in {ondisk.MANIFEST})")
            continue
        if entry.type != "file":
            raise UnsafeCheckpointError(f"{source.url(name)}: is {entry.described}, not a regular file; refused")
        if check_sizes and entry.size != info["size"]:
            raise CorruptCheckpointError(
                f"{source.url(name)}: has {entry.size} bytes, {ondisk.MANIFEST} says {info['size']} (truncated?)"
            )
    return Checkpoint(source, manifest, metadata, skeleton)


