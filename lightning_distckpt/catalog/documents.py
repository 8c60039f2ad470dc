"""Opening one checkpoint: its commit marker, manifest, metadata and state documents, each verified.

Not collective: call on one rank (the engine broadcasts what rank 0 opened) or in a tool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from lightning_distckpt import ondisk
from lightning_distckpt.ondisk.names import PENDING
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
    UncommittedCheckpointError,
)
from lightning_distckpt.storage import Source, StorageLike, open_store
from lightning_distckpt.transforms import check_codecs

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A committed checkpoint whose marker, manifest, metadata and state documents verified."""

    source: Source
    manifest: ondisk.Manifest
    metadata: Metadata
    skeleton: Any

    @property
    def url(self) -> str:
        return self.source.url()


def source_of(url: str, options: StorageLike = None) -> Source:
    store, path = open_store(url, options)
    return Source(store, path)


def _read(source: Source, name: str) -> bytes:
    return source.store.read_bytes(source.store.join(source.path, name))


def read_manifest(source: Source) -> ondisk.Manifest:
    """The manifest of a committed checkpoint; raises a specific error for each way this can fail."""
    url = source.url()
    store, path = source.store, source.path
    if not store.exists(path):
        raise CheckpointNotFoundError(f"{url}: no such checkpoint (path does not exist)")
    if not store.isdir(path):
        raise NotACheckpointError(f"{url}: is a file, not a lightning-distckpt checkpoint directory")
    has_manifest = store.exists(store.join(path, ondisk.MANIFEST))
    if not store.exists(store.join(path, ondisk.MARKER)):
        if has_manifest or any(e.name.endswith(".distcp") or e.name == PENDING for e in store.listdir(path)):
            raise UncommittedCheckpointError(
                f"{url}: checkpoint was never committed (no {ondisk.MARKER} marker: its save crashed or is in flight)"
            )
        raise NotACheckpointError(f"{url}: not a lightning-distckpt checkpoint (no {ondisk.MARKER} or {ondisk.MANIFEST})")
    if not has_manifest:
        raise CorruptCheckpointError(f"{source.url(ondisk.MANIFEST)}: missing from a committed checkpoint")
    manifest_bytes = _read(source, ondisk.MANIFEST)
    ondisk.check_marker(_read(source, ondisk.MARKER), manifest_bytes, source.url(ondisk.MARKER))
    return ondisk.Manifest.from_json(ondisk.loads(manifest_bytes, source.url(ondisk.MANIFEST)), source.url(ondisk.MANIFEST))


def _read_listed(source: Source, manifest: ondisk.Manifest, name: str) -> bytes:
    try:
        data = _read(source, name)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{source.url(name)}: missing (listed in {ondisk.MANIFEST})") from None
    want = manifest.files[name]
    if len(data) != want["size"] or ondisk.digest(data) != want["xxh3"]:
        raise CorruptCheckpointError(f"{source.url(name)}: does not match its checksum in {ondisk.MANIFEST}")
    return data


def open_checkpoint(source: Source, check_sizes: bool = True) -> Checkpoint:
    """Read and verify everything but the tensor bytes (those are verified block by block when read).

    With ``check_sizes`` every data file listed in the manifest must exist with its recorded size.
    """
    manifest = read_manifest(source)
    metadata = ondisk.metadata_from_json(
        ondisk.loads(_read_listed(source, manifest, ondisk.METADATA), source.url(ondisk.METADATA)), source.url(ondisk.METADATA)
    )
    check_codecs(metadata, source.url(ondisk.METADATA))
    skeleton = ondisk.loads(_read_listed(source, manifest, ondisk.STATE), source.url(ondisk.STATE))
    for loc in metadata.storage_data.values():
        info = manifest.files.get(loc.file)
        if info is None or loc.offset + loc.stored > info["size"]:
            raise CorruptCheckpointError(
                f"{source.url(ondisk.METADATA)}: a chunk lies outside data file {loc.file!r} as listed in the manifest"
            )
    if check_sizes:
        sizes = {e.name: e.size for e in source.store.listdir(source.path)}
        for name, info in manifest.files.items():
            if name not in sizes:
                raise CorruptCheckpointError(f"{source.url(name)}: missing (listed in {ondisk.MANIFEST})")
            if sizes[name] != info["size"]:
                raise CorruptCheckpointError(
                    f"{source.url(name)}: has {sizes[name]} bytes, {ondisk.MANIFEST} says {info['size']} (truncated?)"
                )
    return Checkpoint(source, manifest, metadata, skeleton)


