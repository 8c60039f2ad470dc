"""Verification: read every byte of a checkpoint and check it against its manifest and block digests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.compact import layout_blocks_by_file
from lightning_distckpt.catalog.documents import Checkpoint, open_checkpoint, source_of
from lightning_distckpt.errors import CorruptCheckpointError, DistCheckpointError
from lightning_distckpt.storage import Entry, Source, StorageLike
from lightning_distckpt.storage.base import read_at, read_blocks


@dataclass
class FileReport:
    name: str
    ok: bool
    size: int
    problem: str = ""


@dataclass
class VerifyReport:
    """Per-file result of `verify()`. ``ok`` is True only if every file verified."""

    url: str
    ok: bool
    files: list[FileReport] = field(default_factory=list)
    error: str = ""


def verify(url: str, options: StorageLike = None, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Read every byte of the checkpoint at ``url`` and check it against the manifest and metadata.

    Never raises for a bad checkpoint: the report says what is wrong, file by file. ``progress`` is
    called with the number of bytes read as the check goes.
    """
    try:
        source = source_of(url, options)
    except (DistCheckpointError, OSError, ValueError, TypeError, ImportError) as e:  # no store for this URL
        return VerifyReport(str(url), False, error=f"{url}: {type(e).__name__}: {e}")
    try:
        ckpt = open_checkpoint(source, check_sizes=False)
    except DistCheckpointError as e:
        return VerifyReport(source.url(), False, error=str(e))
    except (OSError, EOFError, ValueError, ImportError) as e:  # e.g. no fsspec backend for the URL's scheme
        return VerifyReport(source.url(), False, error=f"{source.url()}: {type(e).__name__}: {e}")
    problems: dict[str, str] = {}
    if ckpt.metadata.layout is not None:  # compact: each data file's blocks are in its own (verified) index
        blocks, problems = layout_blocks_by_file(ckpt)
    else:
        blocks = blocks_by_file(ckpt)
    files = []
    for name, info in sorted(ckpt.manifest.files.items()):
        if name in problems:
            files.append(FileReport(name, False, info["size"], problems[name]))
            continue
        files.append(verify_file(ckpt.source, name, info, blocks.get(name, []), progress, partial=is_borrowed(ckpt, name)))
    return VerifyReport(source.url(), all(f.ok for f in files), files)


def is_borrowed(ckpt: Checkpoint, name: str) -> bool:
    """Whether ``name`` is a data file of another save that the checkpoint borrows blocks from (it knows only the
    blocks it uses of such a file, not all of them)."""
    parsed = ondisk.parse_blocks_key(name)
    return parsed is not None and parsed[0] != ckpt.manifest.data_id


def blocks_by_file(ckpt: Checkpoint) -> dict[str, list[tuple[int, ondisk.Block]]]:
    """Every data file's blocks that the checkpoint uses, as (offset in the file, block), in file order (a block that
    several chunks borrow is listed once). A compact checkpoint's come from its data files' indexes (read here; a
    file whose index does not verify is a `CorruptCheckpointError`)."""
    if ckpt.metadata.layout is not None:
        blocks, problems = layout_blocks_by_file(ckpt)
        if problems:
            name, why = next(iter(sorted(problems.items())))
            raise CorruptCheckpointError(f"{ckpt.source.url(name)}: {why}")
        return blocks
    out: dict[str, dict[int, ondisk.Block]] = {}
    for loc in ckpt.metadata.storage_data.values():
        for key, pos, i, j in loc.segments():
            for b in loc.blocks[i:j]:
                out.setdefault(key, {})[pos] = b
                pos += b.stored
    return {k: sorted(v.items(), key=lambda x: x[0]) for k, v in out.items()}


def verify_file(source: Source, name: str, info: dict[str, int], blocks: list[tuple[int, ondisk.Block]],
                progress: Callable[[int], None] | None = None, partial: bool = False) -> FileReport:
    """Check one file of a checkpoint against its manifest entry ``info`` and (data files) its ``blocks``,
    reading every byte; ``progress`` gets the bytes read as the check goes. Never raises for a bad file.

    With ``partial`` (a file of another save that the checkpoint borrows from, read where it lives in the block
    store) only ``blocks`` are read and checked, and the size: the checkpoint does not know the file's other blocks.

    A file that is not a regular file (a symlink, FIFO or device) is reported bad without being read: a load
    refuses it too (sizes are those of the entry itself, never of what a link points to)."""
    try:
        if partial:
            return _verify_blocks(source, name, info, blocks, progress or (lambda n: None))
        return _verify_file(source, name, info, blocks, progress or (lambda n: None))
    except (OSError, EOFError, ValueError, DistCheckpointError) as e:
        return FileReport(name, False, 0, f"cannot read: {type(e).__name__}: {e}")


def _entry(source: Source, name: str, path: str, info: dict[str, int]) -> Entry | FileReport:
    """The store's entry for file ``name`` if it is a regular file of the listed size, else the failed report."""
    try:
        entry = source.store.info(path)
    except FileNotFoundError:
        return FileReport(name, False, 0, "missing")
    if entry.type != "file":
        return FileReport(name, False, entry.size, f"{entry.described}, not a regular file (refused)")
    if entry.size != info["size"]:
        return FileReport(name, False, entry.size, f"size {entry.size}, expected {info['size']}")
    return entry


def _verify_blocks(source: Source, name: str, info: dict[str, int], blocks: list[tuple[int, ondisk.Block]],
                   progress: Callable[[int], None]) -> FileReport:
    """The borrowed blocks of a file of another save: size as listed, each used block intact."""
    path = source.file(name)
    entry = _entry(source, name, path, info)
    if isinstance(entry, FileReport):
        return entry
    with source.store.open_read(path) as f:
        for offset, b in blocks:
            buf = memoryview(bytearray(b.stored))
            try:
                read_at(f, offset, buf, source.url(name))
            except EOFError:
                return FileReport(name, False, entry.size, f"short read at byte {offset}")
            progress(b.stored)
            if ondisk.digest(buf) != b.digest:
                return FileReport(name, False, entry.size, f"block at byte {offset} fails its checksum")
    return FileReport(name, True, entry.size)


def _verify_file(source: Source, name: str, info: dict[str, int], blocks: list[tuple[int, ondisk.Block]],
                 progress: Callable[[int], None]) -> FileReport:
    path = source.file(name)
    entry = _entry(source, name, path, info)
    if isinstance(entry, FileReport):
        return entry
    size = entry.size
    if name in (ondisk.METADATA, ondisk.STATE):
        data = source.store.read_limited(path, size) if size <= ondisk.DOCUMENT_LIMITS.get(name, 1 << 30) else b""
        progress(len(data))
        ok = len(data) == size and ondisk.digest(data) == info["xxh3"]
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
                if ondisk.digest(data) != b.digest:
                    return FileReport(name, False, size, f"block at byte {offset} fails its checksum")
                digests.append(b.digest)
                pos += b.stored
        except EOFError:
            return FileReport(name, False, size, f"short read after byte {pos}")
    if pos != size or ondisk.blocks_digest(digests) != info["xxh3"]:
        return FileReport(name, False, size, "file digest does not match the manifest")
    return FileReport(name, True, size)


