"""Balanced reads over several hosts: every replicated byte crosses the network once per host, not once per rank.

The chunks are dealt over all ranks (the job reads each byte once). A rank is then paired with the ranks of the
same local index on the other hosts (:func:`partners`: the n-th rank of each host), and sends them what it read,
point to point over the process group; after that, each chunk is held on every host by one rank, and the other
ranks of that host copy it out of that rank's memory (`lightning_distckpt.engine.attach`). With ``k`` ranks per
host, a host receives each byte from the network once, where broadcasts deliver it to each of its ``k`` ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_distckpt.parallel.comm import Comm

PACK_BELOW = 1 << 20  # chunks smaller than this travel packed, one buffer per pair of ranks


def local_index(hosts: Sequence[str], rank: int) -> int:
    """``rank``'s position among the ranks of its host (in rank order)."""
    return sum(1 for r in range(rank) if hosts[r] == hosts[rank])


def even(hosts: Sequence[str]) -> bool:
    """Whether every host runs the same number of ranks (then every rank has one partner on each other host)."""
    counts = {h: sum(1 for x in hosts if x == h) for h in hosts}
    return len(set(counts.values())) == 1


def partners(hosts: Sequence[str], rank: int) -> list[int]:
    """The ranks of ``rank``'s local index on the other hosts (needs `even` hosts), in rank order."""
    i = local_index(hosts, rank)
    return [r for r in range(len(hosts)) if hosts[r] != hosts[rank] and local_index(hosts, r) == i]


def held(owned: Sequence[Sequence[Any]], hosts: Sequence[str]) -> list[list[Any]]:
    """What each rank holds once partners have exchanged: its own chunks, then its partners' (in rank order)."""
    return [list(owned[r]) + [c for p in partners(hosts, r) for c in owned[p]] for r in range(len(hosts))]


def _view(targets: dict[str, Any], c: Any) -> torch.Tensor:
    t = targets[c.key]
    return (t if t.dim() == 0 else t.narrow(0, c.start, c.rows)).reshape(-1).view(torch.uint8)


def _views(targets: dict[str, Any], chunks: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The chunks' bytes in ``targets``: those sent one by one, and those that travel packed."""
    big = [_view(targets, c) for c in chunks if c.nbytes >= PACK_BELOW]
    small = [_view(targets, c) for c in chunks if c.nbytes < PACK_BELOW]
    return big, small


def exchange(targets: dict[str, Any], comm: Comm, owned: Sequence[Sequence[Any]], hosts: Sequence[str]) -> int:
    """Send this rank's chunks (read into ``targets``) to its partners and receive theirs into ``targets``.

    Collective over ``comm`` (every rank calls it with the same ``owned`` and ``hosts``, after every rank's chunks
    are in place); blocks until this rank's sends and receives are done. Returns the bytes received. A lost peer
    raises the process group's error.
    """
    group = comm.group
    works, keep, unpack = [], [], []  # keep: packed send buffers, alive until their sends are done
    received = 0
    for p in partners(hosts, comm.rank):
        peer = dist.get_global_rank(group, p) if group is not None else p
        big, small = _views(targets, owned[comm.rank])  # ours, to the partner (tags: position, packed last)
        works += [dist.isend(v, peer, group=group, tag=tag) for tag, v in enumerate(big)]
        if small:
            keep.append(torch.cat(small))
            works.append(dist.isend(keep[-1], peer, group=group, tag=len(big)))
        big, small = _views(targets, owned[p])  # the partner's, into our targets
        works += [dist.irecv(v, peer, group=group, tag=tag) for tag, v in enumerate(big)]
        if small:
            unpack.append((torch.empty(sum(v.numel() for v in small), dtype=torch.uint8), small))
            works.append(dist.irecv(unpack[-1][0], peer, group=group, tag=len(big)))
        received += sum(c.nbytes for c in owned[p])
    for w in works:
        w.wait()
    for buf, views in unpack:
        pos = 0
        for v in views:
            v.copy_(buf[pos : pos + v.numel()])
            pos += v.numel()
    return received
