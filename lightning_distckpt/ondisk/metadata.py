"""``metadata.json``: every tensor of a checkpoint, its chunks, and where each chunk's blocks lie.

DCP's own metadata is a pickle; this format stores the same information as JSON, parsed and validated
before anything is allocated from it (shapes, offsets, byte counts, file names).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.gcpause import without_gc
from lightning_distckpt.ondisk.documents import (
    _MAX_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    PLAIN_VERSION,
    _short,
    check_int,
    check_version,
)
from lightning_distckpt.ondisk.names import blocks_key, check_name, is_safe_name, is_token, parse_blocks_key

#: every dtype a checkpoint may hold, by the name ``metadata.json`` records, with its bytes per element
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex64": 8, "complex128": 16,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}  # fmt: skip
#: the floating-point dtypes among them
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


def dtype_name(dtype: Any) -> str:
    """The name a checkpoint records for ``dtype`` (a ``torch.dtype`` or a name): ``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


def check_dtype(name: Any, where: str) -> str:
    """``name`` if it is a dtype a checkpoint may hold, else a `CorruptCheckpointError` naming ``where``."""
    if not isinstance(name, str) or name not in ITEMSIZE:
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return name


def parse_dtype(name: Any, where: str) -> Any:
    """The ``torch.dtype`` named ``name`` (checked as `check_dtype` does). Imports torch: for the engine and the
    skeleton; reading documents (catalog, the distckpt command) uses the names."""
    import torch

    return getattr(torch, check_dtype(name, where))


def __getattr__(name: str) -> Any:  # DTYPES (name -> torch.dtype), built on first use so that torch loads lazily
    if name == "DTYPES":
        import torch

        return {n: getattr(torch, n) for n in ITEMSIZE}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: the most raw bytes one stored block may decode to (the writer uses 8 MiB blocks)
MAX_BLOCK = 1 << 30


# ---- stored locations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One stored block: its stored length, the raw (decoded) length and the digest of the stored bytes."""

    stored: int
    raw: int
    digest: int


#: a block that lies elsewhere: (file key, offset); the key is a block-store key (`ondisk.blocks_key`)
Ref = tuple[str, int]
#: what an incremental save records of a stored block to recognise it later: (xxh3 of its raw bytes, strong hash of
#: its raw bytes as hex, or "" when it was not computed)
Fingerprint = tuple[int, str]


@dataclass(frozen=True)
class Location:
    """Where a tensor chunk's bytes lie: a file, an offset and consecutive blocks.

    ``codec`` names the block codec ("" for raw bytes). Blocks split the chunk's raw bytes in order.

    Incremental checkpoints: ``refs`` (empty, or one entry per block) says where each *borrowed* block lies (a file
    of another save in the block store, and its offset); the blocks without a ref are this checkpoint's own and lie
    one after the other in ``file`` from ``offset`` on. ``fps`` (empty, or one per block) are their fingerprints.
    """

    file: str
    offset: int
    blocks: tuple[Block, ...]
    codec: str = ""
    refs: tuple[Ref | None, ...] = ()
    fps: tuple[Fingerprint | None, ...] = ()

    @property
    def stored(self) -> int:
        """Stored bytes of all the blocks, wherever they lie."""
        return sum(b.stored for b in self.blocks)

    @property
    def own_stored(self) -> int:
        """Stored bytes of the blocks that lie in ``file`` (all of them unless some are borrowed)."""
        if not self.refs:
            return self.stored
        return sum(b.stored for b, r in zip(self.blocks, self.refs) if r is None)

    def places(self) -> list[Ref]:
        """Where each block lies: (file key, offset), block by block."""
        out: list[Ref] = []
        for key, off, a, b in self.segments():
            for blk in self.blocks[a:b]:
                out.append((key, off))
                off += blk.stored
        return out

    def segments(self, i: int = 0, j: int | None = None) -> list[tuple[str, int, int, int]]:
        """Blocks ``i`` to ``j`` as runs that lie one after the other in one file: ``(file key, offset, first, end)``
        (block indices). One run unless some blocks are borrowed."""
        j = len(self.blocks) if j is None else j
        if not self.refs:
            pos = self.offset + sum(b.stored for b in self.blocks[:i])
            return [(self.file, pos, i, j)] if j > i else []
        own = self.offset + sum(b.stored for b, r in zip(self.blocks[:i], self.refs[:i]) if r is None)
        out: list[list[Any]] = []
        for k in range(i, j):
            ref = self.refs[k]
            if ref is None:
                key, off = self.file, own
                own += self.blocks[k].stored
            else:
                key, off = ref
            last = out[-1] if out else None
            if last is not None and last[0] == key and last[4] == off:
                last[3], last[4] = k + 1, off + self.blocks[k].stored
            else:
                out.append([key, off, k, k + 1, off + self.blocks[k].stored])
        return [(key, off, a, b) for key, off, a, b, _ in out]

    @property
    def raw(self) -> int:
        return sum(b.raw for b in self.blocks)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"f": self.file, "o": self.offset, "b": [[b.stored, b.raw, b.digest] for b in self.blocks]}
        if self.codec:
            out["c"] = self.codec
        return out

    @staticmethod
    def from_json(obj: Any, where: str) -> Location:
        """Parse and validate one chunk's location: a safe file name, a non-negative offset, blocks of
        ``[stored, raw, digest]`` integers (uncompressed blocks store exactly their raw bytes)."""
        if not isinstance(obj, dict):
            raise CorruptCheckpointError(f"{where}: malformed chunk location {_short(obj)}")
        file = check_name(obj.get("f"), where)
        offset = check_int(obj.get("o"), where, "chunk offset")
        codec = obj.get("c", "")
        raw_blocks = obj.get("b")
        if not isinstance(codec, str):
            raise CorruptCheckpointError(f"{where}: chunk codec must be a string, found {_short(codec)}")
        if not isinstance(raw_blocks, list):
            raise CorruptCheckpointError(f"{where}: chunk blocks must be a list, found {_short(raw_blocks)}")
        blocks = []
        for b in raw_blocks:
            if not isinstance(b, list) or len(b) != 3:
                raise CorruptCheckpointError(f"{where}: a block must be [stored, raw, xxh3], found {_short(b)}")
            stored, raw = check_int(b[0], where, "block stored size"), check_int(b[1], where, "block raw size", 0, MAX_BLOCK + 1)
            if not codec and stored != raw:
                raise CorruptCheckpointError(f"{where}: uncompressed block stores {stored} bytes for {raw} raw bytes")
            blocks.append(Block(stored, raw, check_int(b[2], where, "block xxh3", 0, 1 << 64)))
        return Location(file, offset, tuple(blocks), codec)


# ---- metadata.json, parsed: plain Python (no torch) ------------------------------------------------
class ChunkIndex(NamedTuple):
    """Names one stored chunk: the tensor's key and the chunk's offsets (what DCP's ``MetadataIndex`` holds)."""

    fqn: str
    offset: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a tensor: where it sits in the tensor, and where its bytes lie."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    location: Location


@dataclass(frozen=True)
class TensorEntry:
    """A stored tensor (an encoded tensor's parts are stored tensors of their own, ``<key>::<part>``)."""

    dtype: str  #: dtype name, a key of `ITEMSIZE`
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.size)


@dataclass(eq=False)
class CheckpointMetadata:
    """``metadata.json`` parsed and validated, in plain Python: what the catalog, ``verify``, copies and the
    ``distckpt`` command read. The engine converts it to DCP's ``Metadata`` for a load
    (``lightning_distckpt.engine.dcp_metadata``), once per object.

    ``encodings`` maps a tensor key to how a tensor codec stored it (codec, version, dtype, size, block).

    ``layout``: for a compact document (version 3, `lightning_distckpt.ondisk.layout`), the rule that describes
    every tensor; ``tensors`` then maps each key to its ``RegularTensor`` (dtype, size, no listed chunks) and
    `chunks()` / `storage_data` raise: where a chunk lies is in the data files' indexes.
    """

    tensors: dict[str, TensorEntry]
    encodings: dict[str, Any] = field(default_factory=dict)
    #: incremental checkpoints: the block-store directory of this checkpoint's own data files ("": format 1, its
    #: files are in the checkpoint directory); chunk locations then name files by block-store key
    data_id: str = ""
    _dcp: Any = field(default=None, repr=False)  # the engine's DCP form, cached
    layout: Any = None  #: ``ondisk.layout.Layout`` of a compact document, else None

    def __getstate__(self) -> dict[str, Any]:  # broadcast to other ranks without the cached DCP form
        return {**self.__dict__, "_dcp": None}

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        """Every stored chunk with its tensor's key, tensor by tensor (listed documents only)."""
        if self.layout is not None:
            raise TypeError("a compact checkpoint (metadata version 3) does not list its chunks; read the layout and "
                            "the data files' indexes (lightning_distckpt.catalog.compact)")
        for fqn, t in self.tensors.items():
            for c in t.chunks:
                yield fqn, c

    @property
    def storage_data(self) -> dict[ChunkIndex, Location]:
        """Every chunk's location by (key, offsets): the shape of DCP's ``Metadata.storage_data``."""
        return {ChunkIndex(fqn, c.offsets): c.location for fqn, c in self.chunks()}

    @property
    def planner_data(self) -> dict[str, Any]:
        """``{"encodings": ...}``: the shape of the ``Metadata.planner_data`` this package writes."""
        return {"encodings": self.encodings}

    def to_json(self) -> dict[str, Any]:
        """The ``metadata.json`` document (format 2 with an ``incremental`` field when ``data_id`` is set)."""
        tensors = {fqn: {"dtype": t.dtype, "size": list(t.size),
                         "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes), **self._own(c.location).to_json()}
                                    for c in t.chunks]}
                   for fqn, t in self.tensors.items()}  # fmt: skip
        out = {"format": FORMAT_NAME, "version": FORMAT_VERSION if self.data_id else PLAIN_VERSION, "tensors": tensors,
               "encodings": self.encodings}  # fmt: skip
        if self.data_id:
            out[INCREMENTAL] = incremental_to_json(self)
        return out

    def _own(self, loc: Location) -> Location:
        """``loc`` as the chunk fields store it: the own file by its plain name (its directory is ``data_id``)."""
        parsed = parse_blocks_key(loc.file)
        if self.data_id and parsed is not None and parsed[0] == self.data_id:
            return Location(parsed[1], loc.offset, loc.blocks, loc.codec)
        return Location(loc.file, loc.offset, loc.blocks, loc.codec)


#: the optional top-level field of ``metadata.json`` (format 2) that incremental saves add, kept apart from the chunk
#: fields: ``{"data_id": id, "strong": "sha256-128", "chunks": {key: [[offsets, [[raw xxh3, strong, ref], ...]], ...]}}``
#: with one entry per block of a listed chunk; ``ref`` is ``[id, file, offset]`` for a borrowed block, else null
INCREMENTAL = "incremental"
#: the strong hash of raw block bytes that confirms a digest match before a block is borrowed
STRONG = "sha256-128"


def incremental_to_json(md: CheckpointMetadata) -> dict[str, Any]:
    chunks: dict[str, list[Any]] = {}
    for fqn, c in md.chunks():
        loc = c.location
        if not loc.refs and not loc.fps:
            continue
        entries = []
        for k in range(len(loc.blocks)):
            fp = loc.fps[k] if loc.fps else None
            ref = loc.refs[k] if loc.refs else None
            parsed = parse_blocks_key(ref[0]) if ref is not None else None
            entries.append([fp[0] if fp else None, (fp[1] or None) if fp else None,
                            [parsed[0], parsed[1], ref[1]] if ref is not None and parsed else None])  # type: ignore[index]
        chunks.setdefault(fqn, []).append([list(c.offsets), entries])
    return {"data_id": md.data_id, "strong": STRONG, "chunks": chunks}


@without_gc
def metadata_to_json(md: CheckpointMetadata) -> dict[str, Any]:
    """The ``metadata.json`` document of ``md`` (the engine builds ``md`` from DCP's metadata at save); a compact
    ``md`` (with a layout) is written by ``ondisk.layout.layout_to_json``."""
    if md.layout is not None:
        raise TypeError("a compact metadata document is written by ondisk.layout.layout_to_json")
    return md.to_json()


@without_gc
def metadata_from_json(obj: Any, where: str) -> CheckpointMetadata:
    """Parse and validate ``metadata.json``: shapes, offsets within bounds, byte counts consistent, and the
    chunks of every tensor covering each of its elements exactly once (no gap, no overlap), so that nothing
    is ever left uninitialised on load. Every problem is a `CorruptCheckpointError` naming ``where``
    and the tensor. Plain Python: no torch.

    Whether the codecs the document names are known is checked by the reader of the checkpoint
    (`lightning_distckpt.transforms.check_codecs()`), which knows the codec registry; this layer only knows the
    document.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME or not isinstance(obj.get("tensors"), dict):
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} metadata document")
    check_version(obj.get("version"), where)
    tensors: dict[str, TensorEntry] = {}
    for fqn, t in obj["tensors"].items():
        here = f"{where}: tensor {fqn!r}"
        if not isinstance(t, dict):
            raise CorruptCheckpointError(f"{here}: malformed entry {_short(t)}")
        dtype = check_dtype(t.get("dtype"), here)
        size = _dims(t.get("size"), here, "size")
        numel = math.prod(size)
        if numel * ITEMSIZE[dtype] >= _MAX_SIZE:
            raise CorruptCheckpointError(f"{here}: size {list(size)} is too large")
        if not isinstance(t.get("chunks"), list):
            raise CorruptCheckpointError(f"{here}: chunks must be a list")
        chunks: list[Chunk] = []
        seen: set[tuple[int, ...]] = set()
        for c in t["chunks"]:
            if not isinstance(c, dict):
                raise CorruptCheckpointError(f"{here}: malformed chunk {_short(c)}")
            offsets, sizes = _dims(c.get("offsets"), here, "chunk offsets"), _dims(c.get("sizes"), here, "chunk sizes")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise CorruptCheckpointError(f"{here}: chunk rank does not match tensor rank")
            if any(o + n > s for o, n, s in zip(offsets, sizes, size)):
                raise CorruptCheckpointError(f"{here}: chunk {list(offsets)}+{list(sizes)} outside {list(size)}")
            loc = Location.from_json(c, here)
            nbytes = math.prod(sizes) * ITEMSIZE[dtype]
            if loc.raw != nbytes:
                raise CorruptCheckpointError(f"{here}: chunk holds {loc.raw} bytes, its shape needs {nbytes}")
            if offsets in seen:
                raise CorruptCheckpointError(f"{here}: two chunks at offsets {list(offsets)}")
            seen.add(offsets)
            chunks.append(Chunk(offsets, sizes, loc))
        _check_coverage(chunks, size, here)
        tensors[fqn] = TensorEntry(dtype, size, tuple(chunks))
    encodings = obj.get("encodings", {})
    if not isinstance(encodings, dict):
        raise CorruptCheckpointError(f"{where}: malformed encodings")
    md = CheckpointMetadata(tensors, encodings)
    if INCREMENTAL in obj:
        if obj["version"] == PLAIN_VERSION:
            raise CorruptCheckpointError(f"{where}: an {INCREMENTAL} field needs format version {FORMAT_VERSION}")
        apply_incremental(md, obj[INCREMENTAL], where)
    return md


_HEX = frozenset("0123456789abcdef")


def apply_incremental(md: CheckpointMetadata, inc: Any, where: str) -> None:
    """Read the ``incremental`` field into ``md`` (in place): own files become block-store keys of ``data_id``,
    borrowed blocks get their refs, blocks their fingerprints. Everything is validated: ids are tokens, files plain
    names, offsets integers, one entry per block of a chunk that exists; a problem is a `CorruptCheckpointError`
    naming ``where`` and the tensor."""
    if not isinstance(inc, dict) or not is_token(inc.get("data_id")) or not isinstance(inc.get("chunks"), dict):
        raise CorruptCheckpointError(f"{where}: {INCREMENTAL} must name a data_id and list chunks")
    if inc.get("strong") != STRONG:
        raise CorruptCheckpointError(f"{where}: {INCREMENTAL}.strong {_short(inc.get('strong'))} is not {STRONG!r}")
    md.data_id = data_id = inc["data_id"]
    extra: dict[tuple[str, tuple[int, ...]], tuple[tuple[Ref | None, ...], tuple[Fingerprint | None, ...]]] = {}
    for fqn, listed in inc["chunks"].items():
        here = f"{where}: {INCREMENTAL} of tensor {_short(fqn)}"
        t = md.tensors.get(fqn)
        if t is None or not isinstance(listed, list):
            raise CorruptCheckpointError(f"{here}: no such tensor, or not a list of chunks")
        by_offsets = {c.offsets: c for c in t.chunks}
        for item in listed:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
                raise CorruptCheckpointError(f"{here}: a chunk must be [offsets, blocks], found {_short(item)}")
            offsets = _dims(item[0], here, "chunk offsets")
            chunk = by_offsets.get(offsets)
            if chunk is None or (fqn, offsets) in extra or len(item[1]) != len(chunk.location.blocks):
                raise CorruptCheckpointError(f"{here}: chunk {list(offsets)} does not exist, is listed twice or has "
                                             f"another number of blocks")  # fmt: skip
            refs: list[Ref | None] = []
            fps: list[Fingerprint | None] = []
            for e in item[1]:
                if not isinstance(e, list) or len(e) != 3:
                    raise CorruptCheckpointError(f"{here}: a block entry must be [xxh3, strong, ref], found {_short(e)}")
                raw_xh, strong, ref = e
                if raw_xh is None:
                    fps.append(None)
                else:
                    check_int(raw_xh, here, "raw xxh3", 0, 1 << 64)
                    if strong is not None and (not isinstance(strong, str) or len(strong) != 32 or not set(strong) <= _HEX):
                        raise CorruptCheckpointError(f"{here}: strong hash must be 32 hex digits, found {_short(strong)}")
                    fps.append((raw_xh, strong or ""))
                if ref is None:
                    refs.append(None)
                    continue
                if (not isinstance(ref, list) or len(ref) != 3 or not is_token(ref[0]) or ref[0] == data_id
                        or not is_safe_name(ref[1])):  # fmt: skip
                    raise CorruptCheckpointError(f"{here}: a borrowed block must be [id of another save, file, offset], "
                                                 f"found {_short(ref)}")  # fmt: skip
                refs.append((blocks_key(ref[0], ref[1]), check_int(ref[2], here, "borrowed block offset")))
            extra[(fqn, offsets)] = (tuple(refs) if any(r is not None for r in refs) else (), tuple(fps) if any(fps) else ())
    for fqn, t in list(md.tensors.items()):
        chunks = []
        for c in t.chunks:
            refs_, fps_ = extra.get((fqn, c.offsets), ((), ()))
            loc = c.location
            chunks.append(Chunk(c.offsets, c.sizes, Location(blocks_key(data_id, loc.file), loc.offset, loc.blocks,
                                                             loc.codec, refs_, fps_)))  # fmt: skip
        md.tensors[fqn] = TensorEntry(t.dtype, t.size, tuple(chunks))


def _dims(value: Any, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise CorruptCheckpointError(f"{where}: {key} must be a list of at most 64 integers, found {_short(value)}")
    return tuple(check_int(v, where, key, 0, 1 << 48) for v in value)


def _check_coverage(chunks: list[Chunk], size: tuple[int, ...], where: str) -> None:
    """Every element of a tensor of ``size`` lies in exactly one chunk: the chunks' volumes add up to the
    tensor's and no two non-empty chunks overlap (a sweep along dim 0, so row chunks cost n log n)."""
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks if math.prod(c.sizes) > 0)
    total = sum(math.prod(n) for _, n in boxes)
    if total != math.prod(size):
        raise CorruptCheckpointError(f"{where}: chunks cover {total} elements, the tensor {list(size)} has {math.prod(size)}")
    if not size:
        if len(boxes) > 1:
            raise CorruptCheckpointError(f"{where}: a scalar stored in {len(boxes)} chunks")
        return
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for box in boxes:
        start = box[0][0]
        active = [a for a in active if a[0][0] + a[1][0] > start]  # chunks that still reach this row
        for other in active:
            if all(o1 < o2 + n2 and o2 < o1 + n1 for o1, n1, o2, n2 in zip(box[0], box[1], other[0], other[1])):
                raise CorruptCheckpointError(
                    f"{where}: chunks at {list(other[0])} and {list(box[0])} overlap (some elements would be left "
                    f"uncovered)"
                )
        active.append(box)
