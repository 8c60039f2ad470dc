"""``metadata.json``: every tensor of a checkpoint, its chunks, and where each chunk's blocks lie.

DCP's own metadata is a pickle; this format stores the same information as JSON, parsed and validated
before anything is allocated from it (shapes, offsets, byte counts, file names).
"""

from __future__ import annotations

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

from lightning_distckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from lightning_distckpt.ondisk.documents import FORMAT_NAME, FORMAT_VERSION, check_version
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
        try:
            blocks = tuple(Block(int(s), int(r), int(d)) for s, r, d in obj["b"])
            loc = Location(check_name(obj["f"], where), int(obj["o"]), blocks, str(obj.get("c", "")))
        except UnsafeCheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: malformed chunk location {obj!r}: {e}") from None
        if loc.offset < 0 or any(b.stored < 0 or b.raw < 0 for b in blocks):
            raise CorruptCheckpointError(f"{where}: negative offset or length in {obj!r}")
        return loc


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
    """Parse and validate ``metadata.json``: shapes, offsets within bounds, byte counts consistent.

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
        try:
            dtype = parse_dtype(t["dtype"], here)
            size = torch.Size(int(s) for s in t["size"])
            chunks = []
            for c in t["chunks"]:
                offsets, sizes = torch.Size(int(v) for v in c["offsets"]), torch.Size(int(v) for v in c["sizes"])
                if len(offsets) != len(size) or len(sizes) != len(size):
                    raise CorruptCheckpointError(f"{here}: chunk rank does not match tensor rank")
                if any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, size)):
                    raise CorruptCheckpointError(f"{here}: chunk {list(offsets)}+{list(sizes)} outside {list(size)}")
                loc = Location.from_json(c, here)
                nbytes = sizes.numel() * dtype.itemsize
                if loc.raw != nbytes:
                    raise CorruptCheckpointError(f"{here}: chunk holds {loc.raw} bytes, its shape needs {nbytes}")
                chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
                storage[MetadataIndex(fqn, offsets)] = loc
        except CorruptCheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{here}: malformed entry: {e}") from None
        if sum(c.sizes.numel() for c in chunks) != size.numel():
            raise CorruptCheckpointError(f"{where}: tensor {fqn!r}: chunks do not cover its {list(size)} elements")
        sd_md[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), size, chunks)
    encodings = obj.get("encodings", {})
    if not isinstance(encodings, dict):
        raise CorruptCheckpointError(f"{where}: malformed encodings")
    return Metadata(state_dict_metadata=sd_md, storage_data=storage, planner_data={"encodings": encodings})


