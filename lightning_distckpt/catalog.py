"""What exists: committed checkpoints under a root, the newest valid one, verification, retention, cleanup.

A root directory holds checkpoint directories side by side. Only directories with a valid commit marker
count; names starting with ``.`` are staging or trash directories of saves in progress or crashed.
These functions are not collective: call them on one rank (rank 0) or on every rank independently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from lightning_distckpt import format as fmt
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistCheckpointError,
    NotACheckpointError,
    UncommittedCheckpointError,
)
from lightning_distckpt.storage import StorageLike, Store, open_store
from lightning_distckpt.storage.base import read_blocks
from lightning_distckpt.storage.reader import Source

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A committed checkpoint whose marker, manifest, metadata and state documents verified."""

    source: Source
    manifest: fmt.Manifest
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


def read_manifest(source: Source) -> fmt.Manifest:
    """The manifest of a committed checkpoint; raises a specific error for each way this can fail."""
    url = source.url()
    store, path = source.store, source.path
    if not store.exists(path):
        raise CheckpointNotFoundError(f"{url}: no such checkpoint (path does not exist)")
    if not store.isdir(path):
        raise NotACheckpointError(f"{url}: is a file, not a lightning-distckpt checkpoint directory")
    has_manifest = store.exists(store.join(path, fmt.MANIFEST))
    if not store.exists(store.join(path, fmt.MARKER)):
        if has_manifest or any(e.name.endswith(".distcp") for e in store.listdir(path)):
            raise UncommittedCheckpointError(
                f"{url}: checkpoint was never committed (no {fmt.MARKER} marker: its save crashed or is in flight)"
            )
        raise NotACheckpointError(f"{url}: not a lightning-distckpt checkpoint (no {fmt.MARKER} or {fmt.MANIFEST})")
    if not has_manifest:
        raise CorruptCheckpointError(f"{source.url(fmt.MANIFEST)}: missing from a committed checkpoint")
    manifest_bytes = _read(source, fmt.MANIFEST)
    fmt.check_marker(_read(source, fmt.MARKER), manifest_bytes, source.url(fmt.MARKER))
    return fmt.Manifest.from_json(fmt.loads(manifest_bytes, source.url(fmt.MANIFEST)), source.url(fmt.MANIFEST))


def _read_listed(source: Source, manifest: fmt.Manifest, name: str) -> bytes:
    try:
        data = _read(source, name)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{source.url(name)}: missing (listed in {fmt.MANIFEST})") from None
    want = manifest.files[name]
    if len(data) != want["size"] or fmt.digest(data) != want["xxh3"]:
        raise CorruptCheckpointError(f"{source.url(name)}: does not match its checksum in {fmt.MANIFEST}")
    return data


def open_checkpoint(source: Source, check_sizes: bool = True) -> Checkpoint:
    """Read and verify everything but the tensor bytes (those are verified block by block when read).

    With ``check_sizes`` every data file listed in the manifest must exist with its recorded size.
    """
    manifest = read_manifest(source)
    metadata = fmt.metadata_from_json(
        fmt.loads(_read_listed(source, manifest, fmt.METADATA), source.url(fmt.METADATA)), source.url(fmt.METADATA)
    )
    skeleton = fmt.loads(_read_listed(source, manifest, fmt.STATE), source.url(fmt.STATE))
    for loc in metadata.storage_data.values():
        info = manifest.files.get(loc.file)
        if info is None or loc.offset + loc.stored > info["size"]:
            raise CorruptCheckpointError(
                f"{source.url(fmt.METADATA)}: a chunk lies outside data file {loc.file!r} as listed in the manifest"
            )
    if check_sizes:
        sizes = {e.name: e.size for e in source.store.listdir(source.path)}
        for name, info in manifest.files.items():
            if name not in sizes:
                raise CorruptCheckpointError(f"{source.url(name)}: missing (listed in {fmt.MANIFEST})")
            if sizes[name] != info["size"]:
                raise CorruptCheckpointError(
                    f"{source.url(name)}: has {sizes[name]} bytes, {fmt.MANIFEST} says {info['size']} (truncated?)"
                )
    return Checkpoint(source, manifest, metadata, skeleton)


# ---- verification ---------------------------------------------------------------------------------
@dataclass
class FileReport:
    name: str
    ok: bool
    size: int
    problem: str = ""


@dataclass
class VerifyReport:
    """Per-file result of :func:`verify`. ``ok`` is True only if every file verified."""

    url: str
    ok: bool
    files: list[FileReport] = field(default_factory=list)
    error: str = ""


def verify(url: str, options: StorageLike = None, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Read every byte of the checkpoint at ``url`` and check it against the manifest and metadata.

    Never raises for a bad checkpoint: the report says what is wrong, file by file. ``progress`` is
    called with the number of bytes read as the check goes.
    """
    source = source_of(url, options)
    try:
        ckpt = open_checkpoint(source, check_sizes=False)
    except DistCheckpointError as e:
        return VerifyReport(source.url(), False, error=str(e))
    blocks = blocks_by_file(ckpt)
    files = []
    for name, info in sorted(ckpt.manifest.files.items()):
        files.append(verify_file(ckpt.source, name, info, blocks.get(name, []), progress))
    return VerifyReport(source.url(), all(f.ok for f in files), files)


def blocks_by_file(ckpt: Checkpoint) -> dict[str, list[tuple[int, fmt.Block]]]:
    """Every data file's blocks as (offset in the file, block), in file order."""
    out: dict[str, list[tuple[int, fmt.Block]]] = {}
    for loc in ckpt.metadata.storage_data.values():
        pos = loc.offset
        for b in loc.blocks:
            out.setdefault(loc.file, []).append((pos, b))
            pos += b.stored
    return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}


def verify_file(source: Source, name: str, info: dict[str, int], blocks: list[tuple[int, fmt.Block]],
                progress: Callable[[int], None] | None = None) -> FileReport:
    """Check one file of a checkpoint against its manifest entry ``info`` and (data files) its ``blocks``,
    reading every byte; ``progress`` gets the bytes read as the check goes. Never raises for a bad file."""
    path = source.store.join(source.path, name)
    progress = progress or (lambda n: None)
    try:
        size = source.store.size(path)
    except FileNotFoundError:
        return FileReport(name, False, 0, "missing")
    if size != info["size"]:
        return FileReport(name, False, size, f"size {size}, expected {info['size']}")
    if name.endswith(".json"):
        data = source.store.read_bytes(path)
        progress(len(data))
        ok = fmt.digest(data) == info["xxh3"]
        return FileReport(name, ok, size, "" if ok else "checksum mismatch")
    pos = 0
    for offset, b in blocks:
        if offset != pos:
            return FileReport(name, False, size, f"gap or overlap in blocks at byte {pos}")
        pos += b.stored
    digests, pos = [], 0
    with source.store.open_read(path) as f:
        try:
            for (offset, b), data in zip(blocks, read_blocks(f, [b.stored for _, b in blocks], path)):
                progress(len(data))
                if fmt.digest(data) != b.digest:
                    return FileReport(name, False, size, f"block at byte {offset} fails its checksum")
                digests.append(b.digest)
                pos += b.stored
        except EOFError:
            return FileReport(name, False, size, f"short read after byte {pos}")
    if pos != size or fmt.blocks_digest(digests) != info["xxh3"]:
        return FileReport(name, False, size, "file digest does not match the manifest")
    return FileReport(name, True, size)


# ---- discovery ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Listed:
    """A checkpoint directory under a root, committed or not."""

    name: str
    url: str
    committed: bool
    manifest: fmt.Manifest | None
    problem: str = ""

    @property
    def order(self) -> tuple[float, int, str]:
        m = self.manifest
        return (m.created if m else 0.0, (m.global_step or 0) if m else 0, self.name)


def list_checkpoints(root: str, options: StorageLike = None) -> list[Listed]:
    """Checkpoint directories directly under ``root``, oldest first (by commit time); empty if none.

    A committed checkpoint that a crashed overwrite left in a trash directory is listed under its own
    name (with the trash directory's URL) until :func:`clean_stale` moves it back: nothing committed is
    ever invisible.
    """
    store, path = open_store(root, options)
    try:
        entries = store.listdir(path)
    except FileNotFoundError:
        return []
    out = []
    present = {e.name for e in entries}
    for e in entries:
        name = e.name if not e.name.startswith(".") else fmt.trashed_name(e.name)
        if not e.is_dir or name is None or (name != e.name and name in present):
            continue
        src = Source(store, store.join(path, e.name))
        try:
            out.append(Listed(name, src.url(), True, read_manifest(src)))
        except DistCheckpointError as err:
            if name == e.name:
                out.append(Listed(name, src.url(), False, None, str(err)))
    return sorted(out, key=lambda c: c.order)


def committed(root: str, options: StorageLike = None) -> list[Listed]:
    return [c for c in list_checkpoints(root, options) if c.committed]


def latest(roots: list[str], options: StorageLike = None) -> list[Listed]:
    """Committed checkpoints across ``roots`` (primary first, then replicas), newest first, by name.

    When the same name exists in several roots, the first root's copy is listed (replicas are read from
    when its files fail). A root that cannot be listed is skipped with a warning.
    """
    seen: dict[str, Listed] = {}
    for root in roots:
        try:
            found = committed(root, options)
        except (OSError, DistCheckpointError) as e:  # an unreachable target is skipped, not fatal
            log.warning("cannot list checkpoints under %s: %s", root, e)
            continue
        for c in found:
            seen.setdefault(c.name, c)
    return sorted(seen.values(), key=lambda c: c.order, reverse=True)


# ---- retention and cleanup ----------------------------------------------------------------------
def remove_checkpoint(store: Store, path: str) -> None:
    """Remove a checkpoint so that it is invisible before any data goes: marker first, then the rest.

    A plain file at ``path`` (e.g. a checkpoint of Lightning's own format being overwritten) is removed too.
    """
    if store.isdir(path):
        store.remove(store.join(path, fmt.MARKER))
    store.remove(path, recursive=True)


def clean_stale(root: str, options: StorageLike = None, older_than_s: float = 0.0,
                dry_run: bool = False) -> list[str]:
    """Remove staging/trash directories and uncommitted checkpoint directories under ``root``.

    A trash directory whose checkpoint name no longer exists is a committed checkpoint that a crashed
    overwrite moved aside: it is renamed back, never deleted. Returns the URLs removed (or that would be).
    """
    store, path = open_store(root, options)
    try:
        entries = store.listdir(path)
    except FileNotFoundError:
        return []
    names = {e.name for e in entries}
    now = time.time()
    removed = []
    for e in entries:
        if not e.is_dir or (older_than_s and e.mtime and now - e.mtime < older_than_s):
            continue
        full = store.join(path, e.name)
        original = fmt.trashed_name(e.name)
        if original is not None:
            if original not in names:
                try:
                    read_manifest(Source(store, full))
                    if not dry_run:
                        store.rename(full, store.join(path, original))
                    log.warning("restored %s from an interrupted overwrite", store.url(store.join(path, original)))
                    continue
                except DistCheckpointError:
                    pass
        elif e.name.startswith(".") and fmt.STAGING_INFIX in e.name:
            pass
        elif not e.name.startswith("."):
            try:
                read_manifest(Source(store, full))
                continue  # committed: never touched here
            except UncommittedCheckpointError:
                pass
            except DistCheckpointError:
                continue  # not ours, or corrupt committed: leave it for a human
        else:
            continue
        removed.append(store.url(full))
        if not dry_run:
            store.remove(full, recursive=True)
    return removed
