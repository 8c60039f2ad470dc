"""Compact metadata (format version 3): tensors described by a sharding rule, blocks indexed per data file.

A version-1 ``metadata.json`` lists every stored chunk of every tensor with its file, offset and blocks, so its
size and the work to plan, write and parse it grow with ``ranks x tensors``. Version 3 describes each tensor of a
*regular* save by its rule instead, and moves the block checksums into the data files:

``metadata.json`` (``"version": 3``)::

    {"format": "lightning-distckpt", "version": 3, "tensors": {}, "encodings": {...},
     "regular": {"world": N, "codec": "", "files": [[files, ranks], ...],
                 "tensors": [[key, dtype, size, parts, rows, writers], ...]}}

* ``world``: the ranks of the save; rank ``w`` wrote data files ``__<w>_<k>.distcp`` for ``k < files[w]``
  (``files`` is run-length encoded: ``[2, 4096]`` means 4,096 ranks with 2 files each).
* A tensor is cut along dim 0 into ``parts`` pieces by the ``torch.chunk`` rule (piece ``i`` holds rows
  ``[i * per, min((i + 1) * per, rows))`` with ``per = ceil(rows / parts)``; FSDP2's ``Shard(0)``, uneven last
  pieces and empty trailing pieces included), and each piece into chunks of ``rows`` rows (the last one
  shorter). Chunks are numbered in row order. With ``parts > 1`` piece ``i`` was written by rank ``i``
  (``writers`` is ``[]``); with ``parts == 1`` (a tensor every rank held whole: DDP weights, step counters)
  ``writers`` names the rank that wrote each chunk. A scalar or an empty tensor is one chunk.
* ``codec``: the block codec of every block ("" for raw bytes).

Coverage is exact by construction (the pieces of the rule partition dim 0, the chunks partition each piece), so
checking a document is O(tensors + ranks): field types and ranges, writers in range, every rank that owns a chunk
has a data file. Nothing is allocated from a declared size.

**Data files with an index.** Each data file is its blocks followed by a *tail*: the file's index (JSON, below),
its length (8 bytes, little endian) and the magic ``DCKPTIX1``. The index lists the file's chunks in file order
as flat triples ``[tensor number, chunk number, blocks]`` and its blocks as ``[stored, raw, xxh3]`` triples::

    {"format": "lightning-distckpt-index", "version": 1, "file": "__3_0.distcp", "codec": "",
     "chunks": [t, c, n, ...], "blocks": [stored, raw, xxh3, ...]}

The manifest's digest of such a file is the xxh3 over its blocks' digests followed by the digest of its tail, so
a reader that reads the tail, parses it and recomputes that digest has verified the index (and with it every
block digest) against the manifest; ``verify`` and copies treat the tail as the file's last block. The rank that
wrote a file wrote its index: nothing per chunk is gathered on one rank.

Plain Python (no torch, no I/O): the engine and the catalog read the bytes.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk.digests import blocks_digest, digest
from lightning_distckpt.ondisk.documents import _MAX_SIZE, FORMAT_NAME, _short, check_int, dumps, loads
from lightning_distckpt.ondisk.metadata import (
    ITEMSIZE,
    MAX_BLOCK,
    Block,
    CheckpointMetadata,
    Location,
    check_dtype,
    metadata_from_json,
)
from lightning_distckpt.ondisk.names import data_file_name

#: the ``metadata.json`` version of compact documents (version 2 is taken by incremental checkpoints, issue 17)
LAYOUT_VERSION = 3
#: the field of a version-3 document that holds the rule-described tensors
REGULAR = "regular"
INDEX_FORMAT = "lightning-distckpt-index"
INDEX_VERSION = 1
#: the last 8 bytes of a data file that carries its index
MAGIC = b"DCKPTIX1"
TRAILER = 16  # index length (u64 little endian) + MAGIC
#: the most bytes a data file's index may have (checked before it is read; ~30 bytes per block)
MAX_INDEX = 64 << 20
_MAX_DIMS = 64
_MAX_WORLD = 1 << 24


class RegularTensor:
    """A stored tensor described by its rule (see the module docstring), with the arithmetic of its chunks.

    Usable where a `TensorEntry` is read for its ``dtype``, ``size``, ``itemsize`` and ``numel``; its chunks are
    not listed: ``chunks`` raises, use `chunk()`, `chunk_number()`, `chunk_range()` and `writer()`. All methods
    are O(1) (``writer`` of a whole tensor indexes its list). Immutable; thread-safe.
    """

    __slots__ = ("key", "dtype", "size", "parts", "rows", "writers", "single", "per", "full", "cpp", "rem", "count")

    def __init__(self, key: str, dtype: str, size: tuple[int, ...], parts: int, rows: int,
                 writers: tuple[int, ...] = ()) -> None:
        self.key, self.dtype, self.size = key, dtype, tuple(size)
        self.parts, self.rows, self.writers = parts, rows, tuple(writers)
        #: a scalar or a tensor without elements: one chunk, the whole tensor
        self.single = not self.size or math.prod(self.size) == 0
        s0 = 1 if self.single else self.size[0]
        self.per = s0 if self.single else -(-s0 // parts)  # rows per piece (torch.chunk)
        self.full = 1 if self.single else s0 // self.per  # pieces with `per` rows
        self.rem = 0 if self.single else s0 - self.full * self.per  # rows of the one shorter piece (0: none)
        self.cpp = 1 if self.single else -(-self.per // rows)  # chunks per full piece
        self.count = self.full * self.cpp + (-(-self.rem // rows) if self.rem else 0)

    def __repr__(self) -> str:
        return (f"RegularTensor({self.key!r}, {self.dtype}, {list(self.size)}, parts={self.parts}, rows={self.rows}, "
                f"chunks={self.count})")  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegularTensor) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash((self.key, self.size, self.parts, self.rows))

    def __reduce__(self) -> Any:  # pickles (broadcasts) as its fields
        return RegularTensor, (self.key, self.dtype, self.size, self.parts, self.rows, self.writers)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def chunks(self) -> Any:
        raise TypeError(f"tensor {self.key!r} is described by a rule (metadata version {LAYOUT_VERSION}); its chunks "
                        "are not listed: use the layout's arithmetic (chunk, chunk_range, writer)")  # fmt: skip

    @property
    def row_bytes(self) -> int:
        return math.prod(self.size[1:]) * self.itemsize if self.size else self.itemsize

    def chunk(self, c: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of chunk ``c`` (0 <= c < count)."""
        if self.single:
            return (0,) * len(self.size), self.size
        if c < self.full * self.cpp:
            i, j = divmod(c, self.cpp)
            start, n = i * self.per + j * self.rows, min(self.rows, self.per - j * self.rows)
        else:
            j = c - self.full * self.cpp
            start, n = self.full * self.per + j * self.rows, min(self.rows, self.rem - j * self.rows)
        return (start,) + (0,) * (len(self.size) - 1), (n, *self.size[1:])

    def chunk_bytes(self, c: int) -> int:
        return math.prod(self.chunk(c)[1]) * self.itemsize

    def chunk_at(self, row: int) -> int:
        """The number of the chunk that holds row ``row`` (0 <= row < size[0])."""
        if self.single:
            return 0
        i = row // self.per
        if i >= self.full:
            return self.full * self.cpp + (row - self.full * self.per) // self.rows
        return i * self.cpp + (row - i * self.per) // self.rows

    def chunk_range(self, lo: int, hi: int) -> range:
        """The chunks that hold rows [lo, hi), in row order (chunks are numbered in row order)."""
        if self.single:
            return range(1)
        lo, hi = max(0, lo), min(self.size[0], hi)
        return range(self.chunk_at(lo), self.chunk_at(hi - 1) + 1) if hi > lo else range(0)

    def chunk_number(self, offsets: Sequence[int], sizes: Sequence[int]) -> int | None:
        """The number of the chunk at exactly ``offsets`` with ``sizes``, or None if there is no such chunk."""
        offsets, sizes = tuple(offsets), tuple(sizes)
        if len(offsets) != len(self.size):
            return None
        if self.single:
            return 0 if (offsets, sizes) == self.chunk(0) else None
        if not 0 <= offsets[0] < self.size[0]:
            return None
        c = self.chunk_at(offsets[0])
        return c if self.chunk(c) == (offsets, sizes) else None

    def writer(self, c: int) -> int:
        """The rank that wrote chunk ``c``."""
        if self.parts == 1:
            return self.writers[c]
        return c // self.cpp if c < self.full * self.cpp else self.full

    def sharded_count(self, w: int) -> int:
        """Chunks of piece ``w`` (tensors with ``parts > 1``: the chunks rank ``w`` wrote)."""
        if w < self.full:
            return self.cpp
        return -(-self.rem // self.rows) if w == self.full and self.rem else 0

    def writer_prefix(self) -> int:
        """Tensors with ``parts > 1``: ranks ``0 .. n-1`` hold a non-empty piece; this is ``n``."""
        return self.full + (1 if self.rem else 0)

    def to_json(self) -> list[Any]:
        return [self.key, self.dtype, list(self.size), self.parts, self.rows, list(self.writers)]

    @staticmethod
    def from_json(obj: Any, world: int, where: str) -> RegularTensor:
        """Parse and validate one tensor entry (O(1) plus its writer list); errors name ``where`` and the key."""
        if not isinstance(obj, list) or len(obj) != 6 or not isinstance(obj[0], str):
            raise CorruptCheckpointError(f"{where}: a regular tensor must be [key, dtype, size, parts, rows, writers], "
                                         f"found {_short(obj)}")  # fmt: skip
        key, dtype, size, parts, rows, writers = obj
        here = f"{where}: tensor {key!r}"
        check_dtype(dtype, here)
        if not isinstance(size, list) or len(size) > _MAX_DIMS:
            raise CorruptCheckpointError(f"{here}: size must be a list of at most {_MAX_DIMS} integers")
        size = tuple(check_int(n, here, "size", 0, 1 << 48) for n in size)
        if math.prod(size) * ITEMSIZE[dtype] >= _MAX_SIZE:
            raise CorruptCheckpointError(f"{here}: size {list(size)} is too large")
        parts = check_int(parts, here, "parts", 1, world + 1)
        rows = check_int(rows, here, "rows per chunk", 1, 1 << 48)
        if not isinstance(writers, list):
            raise CorruptCheckpointError(f"{here}: writers must be a list")
        t = RegularTensor(key, dtype, size, parts, rows, ())
        if t.single and parts != 1:
            raise CorruptCheckpointError(f"{here}: a scalar or empty tensor is stored whole (parts 1), found {parts}")
        if parts == 1:
            if len(writers) != t.count:
                raise CorruptCheckpointError(f"{here}: {len(writers)} writers for {t.count} chunks")
            for w in writers:
                if type(w) is not int or not 0 <= w < world:
                    raise CorruptCheckpointError(f"{here}: writer {_short(w)} is not a rank of the {world} that saved")
            t.writers = tuple(writers)
        elif writers:
            raise CorruptCheckpointError(f"{here}: a sharded tensor's pieces are written by their ranks; writers must "
                                         "be empty")  # fmt: skip
        return t


class Layout:
    """The ``regular`` field of a version-3 ``metadata.json``: every tensor by its rule, and who wrote which files.

    Immutable after construction; thread-safe. ``number[key]`` is a tensor's number (its position), which the
    data files' indexes use.
    """

    def __init__(self, world: int, codec: str, files: Sequence[int], tensors: Sequence[RegularTensor]) -> None:
        self.world, self.codec = world, codec
        self.files = tuple(files)
        self.tensors = tuple(tensors)
        self.number = {t.key: i for i, t in enumerate(self.tensors)}
        self._whole: Counter[int] | None = None

    def __reduce__(self) -> Any:
        return Layout, (self.world, self.codec, self.files, self.tensors)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Layout(world={self.world}, tensors={len(self.tensors)}, files={sum(self.files)})"

    def data_files(self, w: int) -> list[str]:
        """The data files rank ``w`` wrote, in order."""
        return [data_file_name(w, k) for k in range(self.files[w])]

    def all_files(self) -> Iterator[tuple[int, str]]:
        """(writer, name) of every data file, writer by writer."""
        for w in range(self.world):
            for name in self.data_files(w):
                yield w, name

    def chunks_of(self, w: int) -> int:
        """How many chunks rank ``w`` wrote (O(tensors); O(1) more per call for whole tensors)."""
        if self._whole is None:
            whole: Counter[int] = Counter()
            for t in self.tensors:
                if t.parts == 1:
                    whole.update(t.writers)
            self._whole = whole
        return self._whole[w] + sum(t.sharded_count(w) for t in self.tensors if t.parts > 1)

    def to_json(self) -> dict[str, Any]:
        runs: list[list[int]] = []
        for n in self.files:
            if runs and runs[-1][0] == n:
                runs[-1][1] += 1
            else:
                runs.append([n, 1])
        return {"world": self.world, "codec": self.codec, "files": runs, "tensors": [t.to_json() for t in self.tensors]}

    @staticmethod
    def from_json(obj: Any, where: str) -> Layout:
        """Parse and validate the ``regular`` field in O(tensors + ranks); every problem is a
        `CorruptCheckpointError` naming ``where``."""
        if not isinstance(obj, dict):
            raise CorruptCheckpointError(f"{where}: {REGULAR} must be an object, found {_short(obj)}")
        world = check_int(obj.get("world"), where, f"{REGULAR}.world", 1, _MAX_WORLD + 1)
        codec = obj.get("codec")
        if not isinstance(codec, str):
            raise CorruptCheckpointError(f"{where}: {REGULAR}.codec must be a string, found {_short(codec)}")
        runs = obj.get("files")
        if not isinstance(runs, list):
            raise CorruptCheckpointError(f"{where}: {REGULAR}.files must be a list of [files, ranks] runs")
        files: list[int] = []
        for run in runs:
            if not isinstance(run, list) or len(run) != 2:
                raise CorruptCheckpointError(f"{where}: {REGULAR}.files: a run must be [files, ranks], found {_short(run)}")
            n = check_int(run[0], where, "files per rank", 0, 1 << 16)
            repeat = check_int(run[1], where, "ranks of a run", 1, world + 1)
            if len(files) + repeat > world:
                raise CorruptCheckpointError(f"{where}: {REGULAR}.files names more than the {world} ranks")
            files.extend([n] * repeat)
        if len(files) != world:
            raise CorruptCheckpointError(f"{where}: {REGULAR}.files names {len(files)} ranks, world is {world}")
        raw_tensors = obj.get("tensors")
        if not isinstance(raw_tensors, list):
            raise CorruptCheckpointError(f"{where}: {REGULAR}.tensors must be a list")
        tensors = [RegularTensor.from_json(t, world, where) for t in raw_tensors]
        keys = {t.key for t in tensors}
        if len(keys) != len(tensors):
            raise CorruptCheckpointError(f"{where}: a tensor is described twice")
        # every rank that wrote a chunk has a data file (the chunks' coverage is exact by construction)
        prefix = max((t.writer_prefix() for t in tensors if t.parts > 1), default=0)
        owners = {w for t in tensors if t.parts == 1 for w in t.writers}
        missing = [w for w in range(prefix) if not files[w]] + sorted(w for w in owners if not files[w])
        if missing:
            raise CorruptCheckpointError(f"{where}: rank {missing[0]} wrote chunks but no data file")
        return Layout(world, codec, files, tensors)


# ---- metadata.json, version 3 ------------------------------------------------------------------------
def layout_metadata(layout: Layout, encodings: dict[str, Any]) -> CheckpointMetadata:
    """The parsed form of a compact checkpoint: ``tensors`` maps every key to its `RegularTensor`."""
    return CheckpointMetadata({t.key: t for t in layout.tensors}, dict(encodings), layout=layout)  # type: ignore[misc]


def layout_to_json(md: CheckpointMetadata) -> dict[str, Any]:
    """The version-3 ``metadata.json`` document of ``md`` (which must have a layout)."""
    assert md.layout is not None
    return {"format": FORMAT_NAME, "version": LAYOUT_VERSION, "tensors": {}, "encodings": md.encodings,
            REGULAR: md.layout.to_json()}  # fmt: skip


def parse_metadata(obj: Any, where: str) -> CheckpointMetadata:
    """Parse and validate ``metadata.json`` of any version this package reads: version 3 (compact, here) or the
    listed form (`lightning_distckpt.ondisk.metadata.metadata_from_json()`, versions 1 and up). Plain Python."""
    if isinstance(obj, dict) and type(obj.get("version")) is int and obj.get("version") == LAYOUT_VERSION:
        if obj.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} metadata document")
        if obj.get("tensors") != {}:
            raise CorruptCheckpointError(f"{where}: a version-{LAYOUT_VERSION} document describes its tensors in "
                                         f"{REGULAR!r}; tensors must be empty")  # fmt: skip
        encodings = obj.get("encodings", {})
        if not isinstance(encodings, dict):
            raise CorruptCheckpointError(f"{where}: malformed encodings")
        extra = set(obj) - {"format", "version", "tensors", "encodings", REGULAR}
        if extra:
            raise CorruptCheckpointError(f"{where}: unknown field {sorted(extra)[0]!r} in a version-{LAYOUT_VERSION} "
                                         "document")  # fmt: skip
        return layout_metadata(Layout.from_json(obj.get(REGULAR), where), encodings)
    return metadata_from_json(obj, where)


# ---- the index at the end of each data file --------------------------------------------------------------
@dataclass(frozen=True)
class FileIndex:
    """A data file's index, parsed and checked against the layout: where each of its chunks lies.

    ``blocks`` are the file's blocks in order; ``tail`` is the index's own stored form (it follows the blocks at
    ``data_end``); ``entries`` maps (tensor number, chunk number) to (offset, first block, end block).
    """

    name: str
    writer: int
    codec: str
    blocks: tuple[Block, ...]
    entries: dict[tuple[int, int], tuple[int, int, int]]
    data_end: int
    tail: Block

    def location(self, t: int, c: int) -> Location:
        offset, i, j = self.entries[(t, c)]
        return Location(self.name, offset, self.blocks[i:j], self.codec)

    def file_digest(self) -> int:
        """The digest the manifest records for this file."""
        return blocks_digest([b.digest for b in self.blocks] + [self.tail.digest])

    def placed_blocks(self) -> list[tuple[int, Block]]:
        """Every block with its offset, the tail last (what ``verify`` and copies check)."""
        out, pos = [], 0
        for b in self.blocks:
            out.append((pos, b))
            pos += b.stored
        out.append((pos, self.tail))
        return out


def index_tail(name: str, codec: str, chunks: Sequence[tuple[int, int, int]], blocks: Sequence[Block]) -> bytes:
    """The tail a writer appends to data file ``name``: its index, the index's length and the magic."""
    doc = dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION, "file": name, "codec": codec,
                 "chunks": [x for ch in chunks for x in ch],
                 "blocks": [x for b in blocks for x in (b.stored, b.raw, b.digest)]})  # fmt: skip
    return doc + struct.pack("<Q", len(doc)) + MAGIC


def tail_length(trailer: bytes, size: int, where: str) -> int:
    """The length of a data file's tail (index + trailer) from its last `TRAILER` bytes; ``size``: the file's size
    as the manifest lists it."""
    if len(trailer) != TRAILER or trailer[8:] != MAGIC:
        raise CorruptCheckpointError(f"{where}: no block index at the end of the file (magic missing)")
    (n,) = struct.unpack("<Q", trailer[:8])
    if n > MAX_INDEX or n + TRAILER > size:
        raise CorruptCheckpointError(f"{where}: block index of {n} bytes does not fit the file ({size} bytes)")
    return n + TRAILER


def _ints(value: Any, where: str, key: str, per: int) -> list[int]:
    if not isinstance(value, list) or len(value) % per:
        raise CorruptCheckpointError(f"{where}: index {key} must be a flat list of {per}-tuples")
    for v in value:
        if type(v) is not int:
            raise CorruptCheckpointError(f"{where}: index {key} holds {_short(v)}, not an integer")
    return value


def parse_index(tail: bytes, name: str, writer: int, layout: Layout, size: int, xxh3: int, where: str) -> FileIndex:
    """Parse and verify the tail of data file ``name`` (written by rank ``writer``; ``size`` and ``xxh3`` as the
    manifest lists it): the digest over its blocks and the tail must be the manifest's (so every block digest is
    verified), the blocks must fill the file up to the tail, and every chunk must be one that the layout assigns to
    ``writer``, listed once, with blocks that hold exactly its bytes. Any problem is a `CorruptCheckpointError`
    naming ``where``."""
    if len(tail) < TRAILER or tail[-8:] != MAGIC or struct.unpack("<Q", tail[-TRAILER:-8])[0] != len(tail) - TRAILER:
        raise CorruptCheckpointError(f"{where}: malformed block index trailer")
    obj = loads(tail[:-TRAILER], where, 4)
    if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
        raise CorruptCheckpointError(f"{where}: not a {INDEX_FORMAT} document")
    if obj.get("version") != INDEX_VERSION or type(obj.get("version")) is not int:
        raise CorruptCheckpointError(f"{where}: block index version {_short(obj.get('version'))} is not supported")
    if obj.get("file") != name:
        raise CorruptCheckpointError(f"{where}: the block index is that of {_short(obj.get('file'))}, not of {name!r}")
    if obj.get("codec") != layout.codec:
        raise CorruptCheckpointError(f"{where}: block codec {_short(obj.get('codec'))} differs from metadata's "
                                     f"{layout.codec!r}")  # fmt: skip
    flat_blocks = _ints(obj.get("blocks"), where, "blocks", 3)
    flat_chunks = _ints(obj.get("chunks"), where, "chunks", 3)
    blocks = []
    for k in range(0, len(flat_blocks), 3):
        stored, raw, d = flat_blocks[k : k + 3]
        if not 0 <= stored < _MAX_SIZE or not 0 <= raw <= MAX_BLOCK or not 0 <= d < 1 << 64:
            raise CorruptCheckpointError(f"{where}: block {k // 3} has sizes or digest out of range")
        if not layout.codec and stored != raw:
            raise CorruptCheckpointError(f"{where}: uncompressed block {k // 3} stores {stored} bytes for {raw} raw bytes")
        blocks.append(Block(stored, raw, d))
    tail_block = Block(len(tail), len(tail), digest(tail))
    if blocks_digest([b.digest for b in blocks] + [tail_block.digest]) != xxh3:
        raise CorruptCheckpointError(f"{where}: block index does not match the file's digest in the manifest")
    data_end = sum(b.stored for b in blocks)
    if data_end + len(tail) != size:
        raise CorruptCheckpointError(f"{where}: blocks of {data_end} bytes and an index of {len(tail)} bytes do not "
                                     f"make the file's {size} bytes")  # fmt: skip
    entries: dict[tuple[int, int], tuple[int, int, int]] = {}
    i = offset = 0
    for k in range(0, len(flat_chunks), 3):
        t, c, n = flat_chunks[k : k + 3]
        if not 0 <= t < len(layout.tensors) or not 0 <= c < layout.tensors[t].count or n < 1 or i + n > len(blocks):
            raise CorruptCheckpointError(f"{where}: index entry {k // 3} names no chunk of the layout")
        tensor = layout.tensors[t]
        if tensor.writer(c) != writer:
            raise CorruptCheckpointError(f"{where}: chunk {c} of tensor {tensor.key!r} belongs to rank "
                                         f"{tensor.writer(c)}, not to rank {writer} that wrote this file")  # fmt: skip
        if (t, c) in entries:
            raise CorruptCheckpointError(f"{where}: chunk {c} of tensor {tensor.key!r} is listed twice")
        raw = sum(b.raw for b in blocks[i : i + n])
        if raw != tensor.chunk_bytes(c):
            raise CorruptCheckpointError(f"{where}: chunk {c} of tensor {tensor.key!r} holds {raw} bytes, its shape "
                                         f"needs {tensor.chunk_bytes(c)}")  # fmt: skip
        entries[(t, c)] = (offset, i, i + n)
        offset += sum(b.stored for b in blocks[i : i + n])
        i += n
    if i != len(blocks):
        raise CorruptCheckpointError(f"{where}: {len(blocks) - i} blocks belong to no chunk")
    return FileIndex(name, writer, layout.codec, tuple(blocks), entries, data_end, tail_block)


def check_writer(layout: Layout, w: int, indexes: Sequence[FileIndex], where: str) -> None:
    """The indexes of all of rank ``w``'s files list every chunk the layout assigns to ``w`` exactly once (each
    index already holds only ``w``'s chunks, each once): their counts add up, and no chunk is in two files."""
    total = sum(len(ix.entries) for ix in indexes)
    union = set().union(*(ix.entries for ix in indexes)) if indexes else set()
    if len(union) != total:
        raise CorruptCheckpointError(f"{where}: a chunk of rank {w} is listed in two of its files")
    expected = layout.chunks_of(w)
    if total != expected:
        raise CorruptCheckpointError(f"{where}: the files of rank {w} hold {total} chunks, the layout assigns it "
                                     f"{expected}")  # fmt: skip
