"""Balanced reads over several hosts: every replicated byte crosses the network once per host, not once per rank.

The chunks are dealt over all ranks (the job reads each byte once). A rank is then paired with the ranks of the
same local index on the other hosts (its *partners*: the n-th rank of each host), and sends them what it read,
point to point over the process group; after that, each chunk is held on every host by one rank, and the other
ranks of that host copy it out of that rank's memory (`lightning_distckpt.engine.attach`). With ``k`` ranks per
host, a host receives each byte from the network once, where broadcasts deliver it to each of its ``k`` ranks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_distckpt.engine.balanced_read import chunk_bytes
from lightning_distckpt.parallel.comm import Comm

PACK_BELOW = 1 << 20  # chunks smaller than this travel packed, one buffer per pair of ranks


def local_indices(hosts: Sequence[str]) -> list[int]:
    """Each rank's position among the ranks of its host (in rank order); O(ranks)."""
    seen: Counter[str] = Counter()
    out = []
    for h in hosts:
        out.append(seen[h])
        seen[h] += 1
    return out


def even(hosts: Sequence[str]) -> bool:
    """Whether every host runs the same number of ranks (then every rank has one partner on each other host)."""
    return len(set(Counter(hosts).values())) == 1


def held(owned: Sequence[Sequence[Any]], hosts: Sequence[str], ranks: Sequence[int]) -> list[list[Any]]:
    """What each of ``ranks`` holds once partners have exchanged: its own chunks, then its partners' (in rank
    order); ``[]`` for the other ranks. Needs `even` hosts; O(ranks + what is listed)."""
    index = local_indices(hosts)
    by_index: dict[int, list[int]] = defaultdict(list)  # local index -> the ranks that have it, one per host
    for r, i in enumerate(index):
        by_index[i].append(r)
    out: list[list[Any]] = [[] for _ in hosts]
    for r in ranks:
        out[r] = list(owned[r]) + [c for p in by_index[index[r]] if p != r for c in owned[p]]
    return out


def _split(targets: dict[str, Any], chunks: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The chunks' bytes in ``targets``: those sent one by one, and those that travel packed."""
    big = [chunk_bytes(targets, c) for c in chunks if c.nbytes >= PACK_BELOW]
    small = [chunk_bytes(targets, c) for c in chunks if c.nbytes < PACK_BELOW]
    return big, small


def exchange(targets: dict[str, Any], comm: Comm, owned: Sequence[Sequence[Any]], hosts: Sequence[str]) -> int:
    """Send this rank's chunks (read into ``targets``) to its partners (the ranks of its local index on the other
    hosts) and receive theirs into ``targets``.

    Collective over ``comm`` (every rank calls it with the same ``owned`` and ``hosts``, after every rank's chunks
    are in place); blocks until this rank's sends and receives are done. Returns the bytes received. A lost peer
    raises the process group's error.
    """
    group = comm.group
    index = local_indices(hosts)
    partners = [r for r in range(len(hosts)) if index[r] == index[comm.rank] and r != comm.rank]
    big, small = _split(targets, owned[comm.rank])  # ours, the same to every partner (tags: position, packed last)
    packed = torch.cat(small) if small else None
    works, unpack = [], []
    for p in partners:
        peer = dist.get_global_rank(group, p) if group is not None else p
        works += [dist.isend(v, peer, group=group, tag=tag) for tag, v in enumerate(big)]
        if packed is not None:
            works.append(dist.isend(packed, peer, group=group, tag=len(big)))
        their_big, their_small = _split(targets, owned[p])  # the partner's, into our targets
        works += [dist.irecv(v, peer, group=group, tag=tag) for tag, v in enumerate(their_big)]
        if their_small:
            unpack.append((torch.empty(sum(v.numel() for v in their_small), dtype=torch.uint8), their_small))
            works.append(dist.irecv(unpack[-1][0], peer, group=group, tag=len(their_big)))
    for w in works:
        w.wait()
    for buf, views in unpack:
        pos = 0
        for v in views:
            v.copy_(buf[pos : pos + v.numel()])
            pos += v.numel()
    return sum(c.nbytes for p in partners for c in owned[p])
