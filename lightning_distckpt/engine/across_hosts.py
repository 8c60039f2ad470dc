"""Balanced reads over several hosts: every replicated byte crosses the network once per host, not once per rank.

The chunks are dealt over all ranks (the job reads each byte once). Each rank then sends what it read, point to
point over the process group, to one rank of every other host: its *receiver* there, the rank whose local index
is the sender's local index modulo that host's number of ranks (with hosts of one size: the rank of the same
local index). After that, each chunk is held on every host by one rank, and the other ranks of that host copy it
out of that rank's memory (`lightning_distckpt.engine.attach`). With ``k`` ranks per host, a host receives each
byte from the network once, where broadcasts deliver it to each of its ``k`` ranks. Hosts may differ in size; a
host of one rank receives from every other host everything it did not read.
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


def applies(hosts: Sequence[str]) -> bool:
    """Whether sending between hosts and attaching inside them pays: several hosts, one of them with several
    ranks (with one rank per host there is nothing to attach to, and broadcasts do the same). The same on every
    rank: it depends on ``hosts`` only."""
    sizes = Counter(hosts)
    return len(sizes) > 1 and max(sizes.values()) > 1


class HostMap:
    """Where the ranks run (``hosts[r]``: rank ``r``'s host), with each rank's local index and each host's ranks,
    computed once (O(ranks)); then who sends to whom. Immutable; the same on every rank that has the same ``hosts``."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.hosts = list(hosts)
        self.index = local_indices(hosts)
        self.members: dict[str, list[int]] = defaultdict(list)  # each host's ranks, in rank order
        for r, h in enumerate(hosts):
            self.members[h].append(r)

    def receivers(self, rank: int) -> list[int]:
        """The ranks that ``rank`` sends its chunks to: one per other host (in host order of first appearance)."""
        return [ranks[self.index[rank] % len(ranks)] for h, ranks in self.members.items() if h != self.hosts[rank]]

    def senders(self, rank: int) -> list[int]:
        """The ranks that send their chunks to ``rank`` (those of other hosts whose receiver on its host it is), in
        rank order; O(ranks)."""
        host, n = self.hosts[rank], len(self.members[self.hosts[rank]])
        return [r for r, h in enumerate(self.hosts) if h != host and self.index[r] % n == self.index[rank]]


def held(owned: Sequence[Sequence[Any]], hosts: Sequence[str], ranks: Sequence[int]) -> list[list[Any]]:
    """What each of ``ranks`` holds once the hosts have exchanged: its own chunks, then those of its senders (in
    rank order); ``[]`` for the other ranks. O(ranks x len(ranks) + what is listed); ``ranks`` is one host's."""
    where = HostMap(hosts)
    out: list[list[Any]] = [[] for _ in hosts]
    for r in ranks:
        out[r] = list(owned[r]) + [c for p in where.senders(r) for c in owned[p]]
    return out


def _split(targets: dict[str, Any], chunks: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The chunks' bytes in ``targets``: those sent one by one, and those that travel packed."""
    big = [chunk_bytes(targets, c) for c in chunks if c.nbytes >= PACK_BELOW]
    small = [chunk_bytes(targets, c) for c in chunks if c.nbytes < PACK_BELOW]
    return big, small


def exchange(targets: dict[str, Any], comm: Comm, owned: Sequence[Sequence[Any]], hosts: Sequence[str]) -> int:
    """Send this rank's chunks (read into ``targets``) to its receivers on the other hosts and receive those of
    its senders into ``targets`` (`HostMap`).

    Collective over ``comm`` (every rank calls it with the same ``owned`` and ``hosts``, after every rank's chunks
    are in place); blocks until this rank's sends and receives are done. Returns the bytes received. A lost peer
    raises the process group's error.
    """
    group = comm.group
    where = HostMap(hosts)
    to, frm = where.receivers(comm.rank), where.senders(comm.rank)

    def peer(r: int) -> int:
        return dist.get_global_rank(group, r) if group is not None else r

    big, small = _split(targets, owned[comm.rank])  # ours, the same to every receiver (tags: position, packed last)
    packed = torch.cat(small) if small else None
    works, unpack = [], []
    for r in to:
        works += [dist.isend(v, peer(r), group=group, tag=tag) for tag, v in enumerate(big)]
        if packed is not None:
            works.append(dist.isend(packed, peer(r), group=group, tag=len(big)))
    for r in frm:
        their_big, their_small = _split(targets, owned[r])  # the sender's, into our targets
        works += [dist.irecv(v, peer(r), group=group, tag=tag) for tag, v in enumerate(their_big)]
        if their_small:
            unpack.append((torch.empty(sum(v.numel() for v in their_small), dtype=torch.uint8), their_small))
            works.append(dist.irecv(unpack[-1][0], peer(r), group=group, tag=len(their_big)))
    for w in works:
        w.wait()
    for buf, views in unpack:
        pos = 0
        for v in views:
            v.copy_(buf[pos : pos + v.numel()])
            pos += v.numel()
    return sum(c.nbytes for r in frm for c in owned[r])
