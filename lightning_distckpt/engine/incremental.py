"""Incremental saves: which blocks of an earlier committed checkpoint a save may reference instead of writing them.

The **base** of an incremental save is one committed checkpoint under the same root: the newest one this process
saved, or the one it resumed from (`DistCheckpointIO` keeps it in memory on rank 0). Its ``metadata.json`` lists a
fingerprint of every block (xxh3 of the raw bytes, and a 128-bit SHA-256 of them where it was computed) and where the
block lies (its own data files or ones it borrowed itself), so a save can borrow from the base and, through it, from
the base's own bases: references always name the file where the bytes lie, never a chain of checkpoints.

A block is borrowed only when its raw bytes have the same xxh3, the same length and the same block codec as a block
of the base **and** the same SHA-256 (so a 64-bit collision can never make a checkpoint hold other bytes than it was
given). The SHA-256 of a written block is computed when the save is a full one (the first, or every ``full_every``-th)
and when its xxh3 matched a block the base could not confirm; blocks that changed since the base (a parameter being
trained) get none, which keeps a save in which everything changes as cheap as a plain one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from lightning_distckpt import ondisk
from lightning_distckpt.catalog import read_document
from lightning_distckpt.storage import Source
from lightning_distckpt.errors import DistCheckpointError

log = logging.getLogger(__name__)

#: a save borrows from at most this many block directories; a base that already uses more makes the next save a
#: full one (so a checkpoint's data never spreads over an unbounded number of earlier saves)
MAX_SOURCES = 16


def strong_hash(raw: bytes | memoryview) -> str:
    """The confirming hash of raw block bytes: SHA-256, first 128 bits, as 32 hex digits."""
    return hashlib.sha256(raw).digest()[:16].hex()


@dataclass(frozen=True)
class Candidate:
    """A stored block of the base that a new block with the same raw bytes may reference."""

    key: str  #: file (block-store key)
    offset: int
    block: ondisk.Block
    strong: str  #: "" when not computed: a digest match cannot be confirmed, the block is written again


@dataclass
class BlockIndex:
    """What the writers of one incremental save know about the base (broadcast by rank 0 to every rank).

    ``data_id`` is this save's block directory; ``full`` is True when the save borrows nothing (no usable base, or
    a full save was due): then every written block gets its SHA-256, so that the next saves can borrow it.
    """

    data_id: str = ""
    full: bool = True
    candidates: dict[tuple[int, int, str], list[Candidate]] = field(default_factory=dict)
    files: dict[str, dict[str, int]] = field(default_factory=dict)  #: the base's data files (key -> size, xxh3)
    names: dict[str, str] = field(default_factory=dict)  #: block directory id -> name of the checkpoint that wrote it

    def lookup(self, raw_xxh3: int, raw_len: int, codec: str) -> list[Candidate]:
        return self.candidates.get((raw_xxh3, raw_len, codec), [])


def build_index(manifest: ondisk.Manifest, metadata: ondisk.CheckpointMetadata, name: str) -> BlockIndex:
    """The index of every fingerprinted block of a committed incremental checkpoint ``name``."""
    index = BlockIndex(full=False, names={**manifest.borrows, manifest.data_id: name})
    index.files = {k: dict(v) for k, v in manifest.files.items() if ondisk.parse_blocks_key(k) is not None}
    if metadata.layout is not None:  # a compact checkpoint fingerprints no block: nothing to borrow from it
        return index
    for _, chunk in metadata.chunks():
        loc = chunk.location
        if not loc.fps:
            continue
        for (key, offset), b, fp in zip(loc.places(), loc.blocks, loc.fps):
            if fp is None or not b.raw:
                continue
            found = index.candidates.setdefault((fp[0], b.raw, loc.codec), [])
            cand = Candidate(key, offset, b, fp[1])
            if cand not in found:
                found.append(cand)
    return index


@dataclass
class Base:
    """An earlier committed checkpoint that the next incremental save may borrow from (kept by rank 0)."""

    url: str
    manifest: ondisk.Manifest
    metadata: ondisk.CheckpointMetadata

    def same_root(self, url: str) -> bool:
        return self.url.rstrip("/").rsplit("/", 1)[0] == url.rstrip("/").rsplit("/", 1)[0]


@dataclass
class IncrementalSave:
    """How one save is incremental: its base (None or ``full``: borrow nothing, but keep the data in the block store
    and fingerprint every block)."""

    base: Base | None = None
    full: bool = False
    storage: object = None

    def base_ids(self) -> set[str]:
        """Block directories the save may reference: written into its staging directory before it relies on them."""
        if self.base is None or self.full:
            return set()
        return self.base.manifest.data_ids()

    def index(self, source: Source) -> BlockIndex:
        """Rank 0, after ``base_ids`` are recorded in the staging directory: the index of the base, if the base is
        still committed with the very manifest it had (checked on storage now), else an empty one (a full save)."""
        base = self.base
        if base is None or self.full:
            return BlockIndex()
        if not base.manifest.data_id:
            return BlockIndex()  # a self-contained checkpoint (format 1): its blocks are not in the block store
        if len(base.manifest.data_ids()) >= MAX_SOURCES:
            log.info("incremental save: the base %s uses %d block directories; this save is a full one", base.url,
                     len(base.manifest.data_ids()))  # fmt: skip
            return BlockIndex()
        try:  # still committed with the very manifest held here: its marker names that manifest (two calls on HDFS)
            ondisk.check_marker(read_document(source, ondisk.MARKER), ondisk.dumps(base.manifest.to_json()),
                                source.url(ondisk.MARKER))  # fmt: skip
        except (DistCheckpointError, OSError) as e:
            log.warning("incremental save: the base %s is not usable (%s); this save is a full one", base.url, e)
            return BlockIndex()
        return build_index(base.manifest, base.metadata, base.manifest.name)
