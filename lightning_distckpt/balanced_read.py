"""Balanced reads of replicated tensors: every byte is read from storage by one rank, then broadcast.

When every rank loads the same plain tensor (DDP's model and optimizer state, Adam step counters, callback
state), reading it on every rank multiplies the storage traffic by the world size. Instead the rows of
those tensors are cut into chunks, the chunks are dealt to ranks by bytes (largest first), each rank reads
(and verifies, and decodes) only its chunks straight into the target rows, and each rank's rows are then
broadcast to the others over the checkpoint's process group, one packed buffer per rank.

Only CPU tensors are balanced (the broadcast runs on a gloo group); others are read by every rank.
Collective: every rank must pass the same keys with the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_distckpt._dist import Comm
from lightning_distckpt.planner import Piece


@dataclass(frozen=True)
class _Chunk:
    key: str
    start: int
    rows: int
    nbytes: int


def _chunks(key: str, t: torch.Tensor, chunk_bytes: int) -> list[_Chunk]:
    if t.dim() == 0:
        return [_Chunk(key, 0, 1, t.element_size())]
    if t.numel() == 0:
        return []
    row = t[0].numel() * t.element_size()
    step = max(1, chunk_bytes // max(1, row))
    return [_Chunk(key, s, min(step, t.shape[0] - s), min(step, t.shape[0] - s) * row) for s in range(0, t.shape[0], step)]


def is_balanceable(t: object) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous()


def split(targets: dict[str, object], comm: Comm, chunk_bytes: int = 16 << 20) -> tuple[dict[str, object], list[list[_Chunk]]]:
    """The targets this rank reads (its chunks of balanceable tensors as row pieces, everything else as is)
    and every rank's chunks (for :func:`broadcast`)."""
    chunks = sorted((c for k, t in targets.items() if is_balanceable(t) for c in _chunks(k, t, chunk_bytes)),
                    key=lambda c: (-c.nbytes, c.key, c.start))  # fmt: skip
    load = [0] * comm.world_size
    owned: list[list[_Chunk]] = [[] for _ in range(comm.world_size)]
    for c in chunks:
        r = load.index(min(load))
        owned[r].append(c)
        load[r] += c.nbytes
    mine: dict[str, object] = {k: t for k, t in targets.items() if not is_balanceable(t)}
    for c in owned[comm.rank]:
        t = targets[c.key]
        assert isinstance(t, torch.Tensor)
        view = t if t.dim() == 0 else t.narrow(0, c.start, c.rows)
        offsets = torch.Size([c.start] + [0] * (t.dim() - 1)) if t.dim() else torch.Size([])
        mine.setdefault(c.key, []).append(Piece(view, offsets, t.shape))  # type: ignore[union-attr]
    return mine, owned


def broadcast(targets: dict[str, object], owned: list[list[_Chunk]], comm: Comm) -> int:
    """Send every rank's chunks to the others; returns the bytes this rank received."""
    received = 0
    for src, chunks in enumerate(owned):
        total = sum(c.nbytes for c in chunks)
        if not total:
            continue
        views = []
        for c in chunks:
            t = targets[c.key]
            assert isinstance(t, torch.Tensor)
            v = t if t.dim() == 0 else t.narrow(0, c.start, c.rows)
            views.append(v.reshape(-1).view(torch.uint8))
        if comm.rank == src:
            buf = torch.cat(views) if len(views) > 1 else views[0].clone()
        else:
            buf = torch.empty(total, dtype=torch.uint8)
        global_src = dist.get_global_rank(comm.group, src) if comm.group is not None else src
        dist.broadcast(buf, src=global_src, group=comm.group)
        if comm.rank != src:
            pos = 0
            for v in views:
                v.copy_(buf[pos : pos + v.numel()])
                pos += v.numel()
            received += total
    return received
