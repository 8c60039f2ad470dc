"""``metadata.json``: every tensor of a checkpoint, its chunks, and where each chunk's blocks lie.

DCP's own metadata is a pickle; this format stores the same information as JSON, parsed and validated
before anything is allocated from it (shapes, offsets, byte counts, file names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk.documents import _MAX_SIZE, FORMAT_NAME, FORMAT_VERSION, _short, check_int, check_version
from lightning_distckpt.ondisk.names import check_name

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
    )
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return DTYPES[name]


#: the most raw bytes one stored block may decode to (the writer uses 8 MiB blocks)
MAX_BLOCK = 1 << 30


# ---- stored locations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One stored block: its stored length, the raw (decoded) length and the digest of the stored bytes."""

    stored: int
    raw: int
    digest: int


@dataclass(frozen=True)
class Location:
    """Where a tensor chunk's bytes lie: a file, an offset and consecutive blocks.

    ``codec`` names the block codec ("" for raw bytes). Blocks split the chunk's raw bytes in order.
    """

    file: str
    offset: int
    blocks: tuple[Block, ...]
    codec: str = ""

    @property
    def stored(self) -> int:
        return sum(b.stored for b in self.blocks)

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


# ---- DCP metadata <-> JSON ---------------------------------------------------------------------
def metadata_to_json(md: Metadata, encodings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serialize DCP metadata whose storage_data maps every chunk to a `Location`.

    ``encodings`` describes tensors stored through a tensor codec (see ``compression``).
    """
    tensors: dict[str, Any] = {}
    for fqn, tmd in md.state_dict_metadata.items():
        if not isinstance(tmd, TensorStorageMetadata):
            raise TypeError(f"state key {fqn!r} is not a tensor; non-tensor state belongs in state.json")
        chunks = []
        for c in tmd.chunks:
            loc: Location = md.storage_data[MetadataIndex(fqn, c.offsets)]
            chunks.append({"offsets": list(c.offsets), "sizes": list(c.sizes), **loc.to_json()})
        tensors[fqn] = {"dtype": dtype_name(tmd.properties.dtype), "size": list(tmd.size), "chunks": chunks}
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": tensors, "encodings": encodings or {}}


def metadata_from_json(obj: Any, where: str) -> Metadata:
    """Parse and validate ``metadata.json``: shapes, offsets within bounds, byte counts consistent, and the
    chunks of every tensor covering each of its elements exactly once (no gap, no overlap), so that nothing
    is ever left uninitialised on load. Every problem is a `CorruptCheckpointError` naming ``where``
    and the tensor.

    Tensor encodings end up in ``metadata.planner_data["encodings"]``. Whether the codecs it names are known
    is checked by the reader of the checkpoint (`lightning_distckpt.transforms.check_codecs()`), which
    knows the codec registry; this layer only knows the document.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME or not isinstance(obj.get("tensors"), dict):
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} metadata document")
    check_version(obj.get("version"), where)
    sd_md: dict[str, Any] = {}
    storage: dict[MetadataIndex, Location] = {}
    for fqn, t in obj["tensors"].items():
        here = f"{where}: tensor {fqn!r}"
        if not isinstance(t, dict):
            raise CorruptCheckpointError(f"{here}: malformed entry {_short(t)}")
        dtype = parse_dtype(t.get("dtype"), here)
        size = _dims(t.get("size"), here, "size")
        numel = math.prod(size)
        if numel * dtype.itemsize >= _MAX_SIZE:
            raise CorruptCheckpointError(f"{here}: size {list(size)} is too large")
        if not isinstance(t.get("chunks"), list):
            raise CorruptCheckpointError(f"{here}: chunks must be a list")
        chunks = []
        for c in t["chunks"]:
            if not isinstance(c, dict):
                raise CorruptCheckpointError(f"{here}: malformed chunk {_short(c)}")
            offsets, sizes = _dims(c.get("offsets"), here, "chunk offsets"), _dims(c.get("sizes"), here, "chunk sizes")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise CorruptCheckpointError(f"{here}: chunk rank does not match tensor rank")
            if any(o + n > s for o, n, s in zip(offsets, sizes, size)):
                raise CorruptCheckpointError(f"{here}: chunk {list(offsets)}+{list(sizes)} outside {list(size)}")
            loc = Location.from_json(c, here)
            nbytes = math.prod(sizes) * dtype.itemsize
            if loc.raw != nbytes:
                raise CorruptCheckpointError(f"{here}: chunk holds {loc.raw} bytes, its shape needs {nbytes}")
            index = MetadataIndex(fqn, torch.Size(offsets))
            if index in storage:
                raise CorruptCheckpointError(f"{here}: two chunks at offsets {list(offsets)}")
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            storage[index] = loc
        _check_coverage(chunks, size, here)
        sd_md[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), chunks)
    encodings = obj.get("encodings", {})
    if not isinstance(encodings, dict):
        raise CorruptCheckpointError(f"{where}: malformed encodings")
    return Metadata(state_dict_metadata=sd_md, storage_data=storage, planner_data={"encodings": encodings})


def _dims(value: Any, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise CorruptCheckpointError(f"{where}: {key} must be a list of at most 64 integers, found {_short(value)}")
    return tuple(check_int(v, where, key, 0, 1 << 48) for v in value)


def _check_coverage(chunks: list[ChunkStorageMetadata], size: tuple[int, ...], where: str) -> None:
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
