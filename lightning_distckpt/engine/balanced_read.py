"""Balanced reads of replicated tensors: every byte is read from storage by one rank, then broadcast.

When every rank loads the same plain tensor (DDP's model and optimizer state, Adam step counters, callback
state), reading it on every rank multiplies the storage traffic by the world size. Instead the rows of
those tensors are cut into chunks, the chunks are dealt to ranks by bytes (largest first), each rank reads
(and verifies, and decodes) only its chunks straight into the target rows, and each rank's rows are then
broadcast to the others over the checkpoint's process group, one packed buffer per rank.

The work runs in rounds: while the chunks of one round are broadcast (asynchronously, on a second gloo
group), the next round is read. Only CPU tensors are balanced (the broadcast runs on gloo); others are
read by every rank. Collective: every rank must pass the same keys with the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_distckpt.parallel.comm import Comm


@dataclass(frozen=True)
class _Chunk:
    key: str
    start: int
    rows: int
    nbytes: int


def _chunks(key: str, t: torch.Tensor, chunk_bytes: int, stored: list[tuple[int, int]] | None) -> list[_Chunk]:
    """Row ranges of ``t`` to deal out: the stored chunks' own row ranges when known (so that no rank reads
    part of a block another rank needs too), else ranges of about ``chunk_bytes``."""
    if t.dim() == 0:
        return [_Chunk(key, 0, 1, t.element_size())]
    if t.numel() == 0:
        return []
    row = t[0].numel() * t.element_size()
    if stored:
        return [_Chunk(key, s, n, n * row) for s, n in sorted(stored) if n > 0]
    step = max(1, chunk_bytes // max(1, row))
    return [_Chunk(key, s, min(step, t.shape[0] - s), min(step, t.shape[0] - s) * row) for s in range(0, t.shape[0], step)]


def is_balanceable(t: object) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous()


def deal(targets: dict[str, object], comm: Comm, layout: dict[str, list[tuple[int, int]]] | None = None,
         places: dict[tuple[str, int], tuple[str, int]] | None = None,
         chunk_bytes: int = 16 << 20) -> list[list[_Chunk]]:
    """Every rank's chunks of the balanceable targets, in about equal bytes.

    ``layout`` gives each key's stored row ranges, so that no block is read by two ranks. The chunks are
    taken in file order (``places``: where each stored chunk starts, file and offset; chunks without a place
    go last, in key order) and cut into ``world`` runs of about equal bytes (a chunk goes to the rank whose
    share holds its middle byte): each rank then reads long adjacent ranges, one stream each.
    """
    layout, places = layout or {}, places or {}
    chunks = [c for k, t in targets.items() if is_balanceable(t) for c in _chunks(k, t, chunk_bytes, layout.get(k))]
    last = ("\uffff", 0)
    chunks.sort(key=lambda c: (places.get((c.key, c.start), last), c.key, c.start))
    owned: list[list[_Chunk]] = [[] for _ in range(comm.world_size)]
    total, done = sum(c.nbytes for c in chunks) or 1, 0
    for c in chunks:
        owned[min(comm.world_size - 1, (2 * done + c.nbytes) * comm.world_size // (2 * total))].append(c)
        done += c.nbytes
    return owned


def rounds(owned: list[list[_Chunk]], n: int) -> list[list[list[_Chunk]]]:
    """Split every rank's chunks into ``n`` rounds of about equal bytes: ``out[round][rank]``."""
    out: list[list[list[_Chunk]]] = [[[] for _ in owned] for _ in range(n)]
    for r, chunks in enumerate(owned):
        total = sum(c.nbytes for c in chunks) or 1
        done = 0
        for c in chunks:
            out[min(n - 1, done * n // total)][r].append(c)
            done += c.nbytes
    return out


class Broadcaster:
    """Issues the broadcasts of each round without waiting for them (on ``comm.bulk`` when there is one,
    so that the next round's reads, which coordinate on ``comm.group``, overlap with them)."""

    def __init__(self, targets: dict[str, object], comm: Comm, pack_below: int = 1 << 20) -> None:
        self.targets, self.comm, self.pack_below = targets, comm, pack_below
        self.group = comm.bulk if comm.bulk is not None else comm.group
        self.pending: list[tuple[Any, list[torch.Tensor] | None, torch.Tensor | None]] = []
        self.received = 0

    def _view(self, c: _Chunk) -> torch.Tensor:
        t = self.targets[c.key]
        assert isinstance(t, torch.Tensor)
        return (t if t.dim() == 0 else t.narrow(0, c.start, c.rows)).reshape(-1).view(torch.uint8)

    def send(self, owned: list[list[_Chunk]]) -> None:
        rank = self.comm.rank
        for src, chunks in enumerate(owned):
            global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
            small = []
            for c in chunks:
                v = self._view(c)
                if c.nbytes < self.pack_below:
                    small.append(v)
                    continue
                self.pending.append((dist.broadcast(v, src=global_src, group=self.group, async_op=True), None, None))
                self.received += c.nbytes if rank != src else 0
            if small:
                total = sum(v.numel() for v in small)
                buf = torch.cat(small) if rank == src else torch.empty(total, dtype=torch.uint8)
                work = dist.broadcast(buf, src=global_src, group=self.group, async_op=True)
                self.pending.append((work, small if rank != src else None, buf))
                self.received += total if rank != src else 0

    def wait(self) -> int:
        """Wait for every broadcast issued; returns the bytes this rank received."""
        for work, small, buf in self.pending:
            work.wait()
            if small is not None and buf is not None:
                pos = 0
                for v in small:
                    v.copy_(buf[pos : pos + v.numel()])
                    pos += v.numel()
        self.pending.clear()
        return self.received
