"""The on-disk format: names, the manifest, the commit marker and DCP metadata as JSON.

A checkpoint is a directory::

    <root>/<name>/
        __<rank>_<k>.distcp   tensor bytes, stored in blocks (raw or compressed)
        metadata.json         DCP metadata: every tensor, its chunks, where each chunk's blocks lie
        state.json            everything that is not a tensor (loops, callbacks, schedulers, hparams)
        manifest.json         format version, step, world size, versions, every file with size and digest
        COMMITTED             the commit marker, written last; it names the manifest's digest

Nothing in a checkpoint is a pickle that loading executes: JSON is parsed, tensor bytes are copied.
A directory without a valid ``COMMITTED`` does not exist as far as resume and retention are concerned.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from lightning_distckpt.errors import CorruptCheckpointError, UnsafeCheckpointError

FORMAT_NAME = "lightning-distckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.json"
STATE = "state.json"
MARKER = "COMMITTED"
STAGING_INFIX = ".staging-"
TRASH_INFIX = ".trash-"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,254}$")

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
    )
}  # fmt: skip


def digest(data: bytes | memoryview) -> int:
    """The checksum used everywhere: xxh3-64 of the bytes (about 10 GB/s)."""
    return xxhash.xxh3_64_intdigest(data)


class BlockDigests:
    """The :func:`digest` of each of consecutive blocks of ``sizes`` bytes, fed in pieces of any size, so a
    reader checks bytes while they are still in the CPU cache instead of reading them back from memory.

    ``digests`` holds the finished blocks' digests in order. One instance per read; not thread safe.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.digests: list[int] = []
        self._hash = xxhash.xxh3_64()
        self._i, self._left = -1, 0
        self._next_block()

    def update(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece).cast("B")
        while len(view):
            if self._i >= len(self.sizes):
                raise ValueError(f"{len(view)} bytes more than the {sum(self.sizes)} that the blocks hold")
            n = min(len(view), self._left)
            self._hash.update(view[:n])
            view, self._left = view[n:], self._left - n
            if not self._left:
                self.digests.append(self._hash.intdigest())
                self._hash.reset()
                self._next_block()

    def _next_block(self) -> None:
        """Move to the next block; empty blocks are finished on the way."""
        while True:
            self._i += 1
            if self._i >= len(self.sizes):
                return
            self._left = self.sizes[self._i]
            if self._left:
                return
            self.digests.append(digest(b""))


def blocks_digest(block_digests: list[int]) -> int:
    """A data file's digest: xxh3-64 over its blocks' digests in file order."""
    return digest(struct.pack(f"<{len(block_digests)}Q", *block_digests))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return DTYPES[name]


def check_name(name: Any, where: str) -> str:
    """A file name inside a checkpoint: one path component, no escape (``..``, ``/``, absolute)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise UnsafeCheckpointError(f"{where}: refusing file name {name!r} (must be a plain name inside the checkpoint)")
    return name


def staging_name(name: str, token: str) -> str:
    return f".{name}{STAGING_INFIX}{token}"


def trash_name(name: str, token: str) -> str:
    return f".{name}{TRASH_INFIX}{token}"


def trashed_name(dirname: str) -> str | None:
    """The checkpoint name a trash directory (an overwrite in progress or crashed) belongs to, else None."""
    if dirname.startswith(".") and TRASH_INFIX in dirname:
        return dirname[1:].rsplit(TRASH_INFIX, 1)[0]
    return None


def data_file_name(rank: int, k: int) -> str:
    return f"__{rank}_{k}.distcp"


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
    """Serialize DCP metadata whose storage_data maps every chunk to a :class:`Location`.

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
    """Parse and validate ``metadata.json``: shapes, offsets within bounds, byte counts consistent, codecs known.

    Tensor encodings end up in ``metadata.planner_data["encodings"]``.
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
                if loc.codec:
                    from lightning_distckpt.compression.lossless import block_codec

                    block_codec(loc.codec)  # an unknown block codec is an error here, not at read time
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
    from lightning_distckpt.compression import check_encodings

    encodings = check_encodings(obj.get("encodings", {}), where)
    return Metadata(state_dict_metadata=sd_md, storage_data=storage, planner_data={"encodings": encodings})


def check_version(version: Any, where: str) -> None:
    if version != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: format version {version!r} is not supported (this lightning-distckpt reads version "
            f"{FORMAT_VERSION}); upgrade lightning-distckpt to read it"
        )


# ---- manifest and marker -----------------------------------------------------------------------
@dataclass
class Manifest:
    """What ``manifest.json`` says about a checkpoint. ``files`` maps name -> {"size", "xxh3"}."""

    name: str
    created: float
    world_size: int
    global_step: int | None = None
    epoch: int | None = None
    strategy: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    tensor_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **self.__dict__}

    @staticmethod
    def from_json(obj: Any, where: str) -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} manifest")
        check_version(obj.get("version"), where)
        fields = {k: obj[k] for k in Manifest.__dataclass_fields__ if k in obj}
        try:
            m = Manifest(**fields)
            m.files = {check_name(n, where): {"size": int(f["size"]), "xxh3": int(f["xxh3"])} for n, f in m.files.items()}
            m.world_size = int(m.world_size)
        except (TypeError, ValueError, KeyError) as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest: {e}") from None
        for required in (METADATA, STATE):
            if required not in m.files:
                raise CorruptCheckpointError(f"{where}: manifest does not list {required}")
        return m


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({e})") from None


def marker_bytes(manifest_bytes: bytes) -> bytes:
    return dumps({"format": FORMAT_NAME, "manifest_xxh3": digest(manifest_bytes)})


def check_marker(marker: bytes, manifest_bytes: bytes, where: str) -> None:
    """Raise unless ``marker`` is a complete commit marker naming exactly this manifest."""
    obj = loads(marker, where)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME or "manifest_xxh3" not in obj:
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} commit marker")
    if obj["manifest_xxh3"] != digest(manifest_bytes):
        raise CorruptCheckpointError(f"{where}: commit marker does not match {MANIFEST} (manifest changed or corrupt)")
