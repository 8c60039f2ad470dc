"""Planning a save of a *regular* state in O(tensors + ranks) on the coordinator, without gathering items.

A state is regular when every tensor is either held whole by every rank (DDP weights, step counters, buffers) or
cut along dim 0 by the ``torch.chunk`` rule over all ranks of the save, rank ``r`` holding piece ``r`` (FSDP2's
``Shard(0)`` on a 1-D mesh, uneven last pieces and empty trailing pieces included). Then every rank can tell from
its own pieces whether it is regular, and the whole save plan follows from one description:

1. each rank sends a `Summary` instead of its items: a digest of the structure (keys, dtypes, global shapes) and
   two bit masks (which tensors it holds whole, which as its rule piece);
2. the coordinator checks that every rank sent the same digest and that every tensor is whole on every rank or
   sharded on every rank (O(ranks) small objects), and plans from the description alone: sharded chunks stay
   with their holder, whole chunks are dealt largest first to the least-loaded rank (a heap: O(chunks log ranks)),
   loads of the sharded pieces computed per tensor in O(1) with a difference array;
3. each rank gets back an `Assignment` (the masks' verdict and the whole chunks it writes) and keeps those of its
   own items.

The result is described by `RegularPlan.tensors` (key, dtype, global size, parts, rows per chunk, writers), the
form ``ondisk.layout`` stores. A rank that is not regular sends its items as before; when all do, the save is
planned as before (`lightning_distckpt.parallel.planner.balance`); a mix of both cannot be planned either way and
raises `NotRegular` on every rank, after which the engine plans the save the old way.

Pure functions and small frozen records; no collectives, no I/O.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from lightning_distckpt.parallel.pieces import pieces

#: ``Metadata.planner_data`` key of a regular save's description (the coordinator's global metadata)
REGULAR_PLAN = "distckpt:regular-plan"


class NotRegular(RuntimeError):
    """Some ranks are regular and some are not (or they disagree about the structure): plan with items instead."""


def torch_chunk_piece(rows: int, parts: int, i: int) -> tuple[int, int]:
    """(first row, rows) of piece ``i`` when ``rows`` rows are cut into ``parts`` by the ``torch.chunk`` rule."""
    per = -(-rows // parts)
    lo = min(rows, i * per)
    return lo, min(rows, lo + per) - lo


def rows_per_chunk(size: Sequence[int], itemsize: int, chunk_bytes: int) -> int:
    """Rows per stored chunk, as `lightning_distckpt.parallel.pieces.split_rows` cuts them."""
    row_bytes = max(1, math.prod(size[1:]) * itemsize) if len(size) else itemsize
    return max(1, chunk_bytes // row_bytes)


def chunk_count(size: Sequence[int], parts: int, rows: int) -> int:
    """How many chunks a tensor of ``size`` cut into ``parts`` pieces of chunks of ``rows`` rows has (as
    ``ondisk.layout.RegularTensor.count``)."""
    if not len(size) or math.prod(size) == 0:
        return 1
    per = -(-size[0] // parts)
    full, rem = size[0] // per, size[0] % per
    return full * -(-per // rows) + (-(-rem // rows) if rem else 0)


@dataclass(frozen=True)
class Summary:
    """What a regular rank sends to the coordinator instead of its items."""

    digest: int  #: of the structure: sorted keys with dtype and global size
    whole: int  #: bit t set: this rank holds tensor t whole
    sharded: int  #: bit t set: this rank holds piece ``rank`` of tensor t by the torch.chunk rule
    regular: bool  #: every tensor is whole or sharded on this rank (else the plan carries its items)


@dataclass(frozen=True)
class Assignment:
    """The coordinator's answer to a regular rank: which tensors are sharded, and the whole chunks it writes
    (``(tensor number, chunk number)``)."""

    digest: int
    sharded: int
    chunks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Structure:
    """One rank's view of its state: the sorted keys with dtype name and global size, and the masks."""

    keys: tuple[str, ...]
    dtypes: tuple[str, ...]
    sizes: tuple[tuple[int, ...], ...]
    itemsizes: tuple[int, ...]
    whole: int
    sharded: int
    digest: int

    @property
    def regular(self) -> bool:
        return (self.whole | self.sharded) == (1 << len(self.keys)) - 1

    def summary(self) -> Summary:
        return Summary(self.digest, self.whole, self.sharded, self.regular)


def structure(state: dict[str, Any], rank: int, world: int) -> Structure:
    """The `Structure` of a flat ``{key: tensor | DTensor | ShardedTensor | [Piece]}`` on ``rank`` of ``world``."""
    keys = tuple(sorted(state))
    dtypes, sizes, itemsizes = [], [], []
    whole = sharded = 0
    for t, key in enumerate(keys):
        ps = pieces(state[key])
        if ps:
            gsize, dtype = tuple(ps[0].global_size), ps[0].local.dtype
        else:  # a ShardedTensor of which this rank holds nothing
            value = state[key]
            gsize, dtype = tuple(value.size()), value.dtype
        dtypes.append(str(dtype).removeprefix("torch."))
        sizes.append(gsize)
        itemsizes.append(dtype.itemsize)
        local = [p for p in ps if p.local.numel() > 0 or not len(gsize) or math.prod(gsize) == 0]
        if len(ps) == 1 and tuple(ps[0].local.shape) == gsize and not any(ps[0].offsets):
            whole |= 1 << t
        if len(gsize) and math.prod(gsize) > 0:
            lo, n = torch_chunk_piece(gsize[0], world, rank)
            if n == 0 and not local:
                sharded |= 1 << t
            elif (len(local) == 1 and tuple(local[0].local.shape) == (n, *gsize[1:]) and local[0].offsets[0] == lo
                  and not any(local[0].offsets[1:])):  # fmt: skip
                sharded |= 1 << t
    h = xxhash.xxh3_64()
    for key, dtype, size in zip(keys, dtypes, sizes):
        h.update(f"{key}\0{dtype}\0{list(size)}\0".encode("utf-8", "surrogatepass"))
    return Structure(keys, tuple(dtypes), tuple(sizes), tuple(itemsizes), whole, sharded, h.intdigest())


@dataclass(frozen=True)
class RegularPlan:
    """A regular save, planned: what ``ondisk.layout`` stores (the engine adds the files and the block codec).

    ``tensors``: ``(key, dtype, size, parts, rows, writers)`` per tensor, in key order; ``assignments``: each
    rank's whole chunks.
    """

    world: int
    tensors: tuple[tuple[str, str, tuple[int, ...], int, int, tuple[int, ...]], ...]
    assignments: tuple[tuple[tuple[int, int], ...], ...]
    digest: int
    sharded: int


def plan_regular(mine: Structure, summaries: Sequence[Summary], chunk_bytes: int,
                 replicated: Callable[[str], bool]) -> RegularPlan:
    """The coordinator's global plan from every rank's `Summary` (``mine``: the coordinator's own structure).

    Raises `NotRegular` unless every rank is regular with ``mine``'s digest and every tensor is whole on every
    rank or sharded on every rank. Sharded chunks stay with their holder; whole chunks of tensors that are not
    ``replicated`` (buffers each rank updates on its own) are written by rank 0, as Lightning's rank-0 saves
    do; the other whole chunks go largest first to the least-loaded rank (ties: the lowest rank), which is
    `lightning_distckpt.parallel.planner.balance`'s rule. Deterministic; O(tensors + ranks + whole chunks x
    log ranks).
    """
    world = len(summaries)
    if any(not s.regular or s.digest != mine.digest for s in summaries):
        raise NotRegular("ranks hold different tensors, or some hold pieces that follow no rule")
    all_whole = all_sharded = (1 << len(mine.keys)) - 1
    for s in summaries:
        all_whole &= s.whole
        all_sharded &= s.sharded
    if world == 1:
        all_sharded = 0  # one rank: every tensor is whole (parts 1)
    diff = [0] * (world + 1)  # difference array of the sharded pieces' bytes per rank
    described: list[tuple[str, str, tuple[int, ...], int, int]] = []
    shared: list[tuple[int, int, int]] = []  # (bytes, tensor, chunk) of whole chunks dealt by load
    writer: dict[tuple[int, int], int] = {}
    for t, key in enumerate(mine.keys):
        size, itemsize = mine.sizes[t], mine.itemsizes[t]
        rows = rows_per_chunk(size, itemsize, chunk_bytes)
        if all_sharded >> t & 1:
            per = -(-size[0] // world)
            full, rem = size[0] // per, size[0] % per
            row_bytes = math.prod(size[1:]) * itemsize
            diff[0] += per * row_bytes
            diff[full] -= per * row_bytes
            if rem:
                diff[full] += rem * row_bytes
                diff[full + 1] -= rem * row_bytes
            described.append((key, mine.dtypes[t], size, world, rows))
        elif all_whole >> t & 1:
            count = chunk_count(size, 1, rows)
            row_bytes = math.prod(size[1:]) * itemsize if size else itemsize
            for c in range(count):
                n = math.prod(size) * itemsize if count == 1 else min(rows, size[0] - c * rows) * row_bytes
                if replicated(key):
                    shared.append((n, t, c))
                else:
                    writer[(t, c)] = 0
                    diff[0] += n
                    diff[1] -= n
            described.append((key, mine.dtypes[t], size, 1, rows))
        else:
            raise NotRegular(f"tensor {key!r} is neither held whole by every rank nor sharded by one rule")
    heap, acc = [], 0
    for r in range(world):
        acc += diff[r]
        heap.append((acc, r))
    heapq.heapify(heap)
    for n, t, c in sorted(shared, key=lambda x: (-x[0], x[1], x[2])):
        load, r = heapq.heappop(heap)
        writer[(t, c)] = r
        heapq.heappush(heap, (load + n, r))
    tensors = []
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for t, (key, dtype, size, parts, rows) in enumerate(described):
        writers: tuple[int, ...] = ()
        if parts == 1:
            writers = tuple(writer[(t, c)] for c in range(chunk_count(size, 1, rows)))
            for c, w in enumerate(writers):
                per_rank[w].append((t, c))
        tensors.append((key, dtype, size, parts, rows, writers))
    return RegularPlan(world, tuple(tensors), tuple(tuple(x) for x in per_rank), mine.digest, all_sharded)


@dataclass(frozen=True)
class RegularLocal:
    """``planner_data`` of a rank's final plan in a regular save: what its writer needs to number its chunks
    (every tensor's key, dtype, size, parts and rows per chunk, in key order) and how many whole chunks it was
    assigned."""

    rank: int
    world: int
    tensors: tuple[tuple[str, str, tuple[int, ...], int, int], ...]


def keep_items(items: Sequence[Any], mine: Structure, assignment: Assignment, rank: int, world: int,
               chunk_bytes: int) -> list[Any]:
    """Of a rank's write items (row chunks, as ``split_rows`` cut them), those it writes under ``assignment``:
    every chunk of its sharded pieces and the whole chunks assigned to it. Raises ``RuntimeError`` (an internal
    error: nothing is written) if an assigned chunk is not among the items or the sharded chunks miscount."""
    number = {key: t for t, key in enumerate(mine.keys)}
    wanted = set(assignment.chunks)
    kept, found, sharded_items, sharded_expected = [], set(), 0, 0
    for t, key in enumerate(mine.keys):
        if assignment.sharded >> t & 1:
            size = mine.sizes[t]
            rows = rows_per_chunk(size, mine.itemsizes[t], chunk_bytes)
            n = torch_chunk_piece(size[0], world, rank)[1]
            sharded_expected += -(-n // rows)
    for item in items:
        t = number[item.index.fqn]
        if assignment.sharded >> t & 1:
            kept.append(item)
            sharded_items += 1
            continue
        size = mine.sizes[t]
        offset = item.index.offset
        c = 0 if not len(size) or math.prod(size) == 0 else offset[0] // rows_per_chunk(size, mine.itemsizes[t], chunk_bytes)
        if (t, c) in wanted:
            kept.append(item)
            found.add((t, c))
    if found != wanted or sharded_items != sharded_expected:
        raise RuntimeError(f"internal error: rank {rank} holds {len(found)} of its {len(wanted)} assigned chunks and "
                           f"{sharded_items} of {sharded_expected} sharded chunks")  # fmt: skip
    return kept


def plan_metadata_tensors(plan: RegularPlan) -> list[list[Any]]:
    """``plan.tensors`` in the JSON form of ``ondisk.layout`` (``[key, dtype, size, parts, rows, writers]``)."""
    return [[k, d, list(s), p, r, list(w)] for k, d, s, p, r, w in plan.tensors]


def local_tensors(mine: Structure, sharded: int, world: int, chunk_bytes: int) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """Every tensor's (key, dtype, size, parts, rows), as a rank computes it from its own structure and the
    coordinator's verdict (``sharded``): what its writer needs to number its chunks."""
    return [(key, mine.dtypes[t], mine.sizes[t], world if sharded >> t & 1 else 1,
             rows_per_chunk(mine.sizes[t], mine.itemsizes[t], chunk_bytes)) for t, key in enumerate(mine.keys)]  # fmt: skip
