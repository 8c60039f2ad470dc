"""The one place where a checkpoint's parsed metadata meets DCP's ``Metadata`` (which holds torch types).

The catalog parses ``metadata.json`` into plain Python (`lightning_distckpt.ondisk.CheckpointMetadata`) so that
listing, verifying and copying never import torch; a load hands DCP a ``Metadata`` made here (`to_dcp`, cached on
the parsed object), and a save turns DCP's ``Metadata`` back into the plain form to write it (`from_dcp`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from lightning_distckpt.gcpause import without_gc
from lightning_distckpt.ondisk.metadata import CheckpointMetadata, Chunk, Location, TensorEntry, dtype_name, parse_dtype


@without_gc
def to_dcp(md: CheckpointMetadata) -> Metadata:
    """DCP's ``Metadata`` for ``md`` (made once per object; the result is shared, do not modify it)."""
    if md._dcp is not None:
        return md._dcp
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, Location] = {}
    if md.layout is not None:  # compact: no chunk lists; the load planner and the reader use the layout's rules
        for fqn, t in md.tensors.items():
            state[fqn] = TensorStorageMetadata(TensorProperties(dtype=parse_dtype(t.dtype, fqn)), torch.Size(t.size), [])
        md._dcp = Metadata(state_dict_metadata=state, storage_data={},
                           planner_data={"encodings": md.encodings, "layout": md.layout})  # fmt: skip
        return md._dcp
    for fqn, t in md.tensors.items():
        chunks = []
        for c in t.chunks:
            offsets = torch.Size(c.offsets)
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(c.sizes)))
            storage[MetadataIndex(fqn, offsets)] = c.location
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=parse_dtype(t.dtype, fqn)), torch.Size(t.size), chunks)
    md._dcp = Metadata(state_dict_metadata=state, storage_data=storage, planner_data={"encodings": md.encodings})
    return md._dcp


@without_gc
def from_dcp(md: Metadata, encodings: dict[str, Any] | None = None) -> CheckpointMetadata:
    """The plain form of DCP metadata whose ``storage_data`` maps every chunk to a `Location` (what the writer
    produces); ``encodings`` describes tensors stored through a tensor codec."""
    tensors: dict[str, TensorEntry] = {}
    for fqn, tmd in md.state_dict_metadata.items():
        if not isinstance(tmd, TensorStorageMetadata):
            raise TypeError(f"state key {fqn!r} is not a tensor; non-tensor state belongs in state.json")
        chunks = tuple(Chunk(tuple(c.offsets), tuple(c.sizes), md.storage_data[MetadataIndex(fqn, c.offsets)])
                       for c in tmd.chunks)  # fmt: skip
        tensors[fqn] = TensorEntry(dtype_name(tmd.properties.dtype), tuple(tmd.size), chunks)
    return CheckpointMetadata(tensors, dict(encodings or {}))
