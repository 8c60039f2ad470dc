"""Tensor pieces: the part of a tensor a rank holds, wherever it lives, and how it is cut into row chunks.

A *piece* is a rank's local part of a tensor (a DTensor's local shard, a ShardedTensor's local shards, or a
whole plain tensor) with its offsets in the global tensor. Chunks are row ranges of a piece; they are what
planners deal out and what writers store. Pure functions; no I/O, no collectives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

DEFAULT_CHUNK_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class Piece:
    """A rank's local part of a tensor: ``local`` sits at ``offsets`` inside a tensor of ``global_size``.

    ``source``, when set, produces the piece's real data on first use (``local`` is then a meta tensor of
    its shape and dtype, enough to plan with): e.g. an encoded tensor part computed only when a writer
    thread needs its bytes. It must be thread-safe and return the same tensor every time.
    """

    local: torch.Tensor
    offsets: torch.Size
    global_size: torch.Size
    source: Callable[[], torch.Tensor] | None = None


def pieces(value: Any) -> list[Piece]:
    """The local pieces of a plain tensor, a DTensor or a ShardedTensor (or pieces already taken)."""
    if isinstance(value, list) and all(isinstance(p, Piece) for p in value):
        return value
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return [Piece(value.to_local(), torch.Size(offsets), value.shape)]
    if isinstance(value, ShardedTensor):
        return [Piece(s.tensor, torch.Size(s.metadata.shard_offsets), value.size()) for s in value.local_shards()]
    if isinstance(value, torch.Tensor):
        return [Piece(value, torch.Size([0] * value.dim()), value.shape)]
    raise TypeError(f"not a tensor: {type(value).__name__}")


def split_rows(piece: Piece, chunk_bytes: int) -> Iterable[tuple[torch.Size, torch.Size, torch.Tensor]]:
    """Cut a piece along dim 0 into chunks of at most ``chunk_bytes``: (offsets, sizes, view)."""
    t = piece.local
    if t.numel() == 0:  # an empty shard holds nothing; an empty tensor is one empty chunk (same on all ranks)
        if piece.global_size.numel() == 0:
            yield piece.offsets, t.shape, t
        return
    if t.dim() == 0:
        yield piece.offsets, t.shape, t
        return
    row_bytes = max(1, t[0].numel() * t.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, t.shape[0], step):
        rows = min(step, t.shape[0] - start)
        offsets = torch.Size([piece.offsets[0] + start, *piece.offsets[1:]])
        yield offsets, torch.Size([rows, *t.shape[1:]]), t.narrow(0, start, rows)
