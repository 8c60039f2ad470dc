"""Is a checkpoint root shared by every node of the job? A probe, before anything is saved there.

Every rank writes its own part of a checkpoint into the same directory and rank 0 commits it, so the root
must be one filesystem for all nodes (HDFS, NFS, Lustre, object stores ...). A node-local path (``/tmp``,
a local NVMe) silently produces checkpoints that miss the other nodes' files. :func:`check_shared_root`
finds out: rank 0 writes a probe file with a fresh token under the root, the first rank of every other
node reads it back, and every rank raises the same :class:`~lightning_distckpt.errors.NodeLocalRootError`
naming the nodes that could not see it. Nodes are told apart by
:func:`~lightning_distckpt.engine.balanced_read.node_id` (the host name, or ``DISTCKPT_NODE_ID``).

Collective over ``comm``: every rank calls it with its own view of the root (the same URL string; on a
node-local path it names a different directory on each node). A job on one node checks nothing.
Costs one all-gather, and on several nodes one small write, one read per other node and one remove.
"""

from __future__ import annotations

import uuid

from lightning_distckpt.engine.balanced_read import node_id
from lightning_distckpt.errors import NodeLocalRootError
from lightning_distckpt.parallel.comm import Comm
from lightning_distckpt.storage import StorageLike, open_store

PROBE_PREFIX = ".distckpt-probe-"


def check_shared_root(url: str, comm: Comm, storage: StorageLike = None) -> None:
    """Raise :class:`NodeLocalRootError` on every rank unless every node sees the files rank 0 writes under ``url``."""
    if not comm.active:
        return
    hosts = comm.all_gather(node_id())
    if len(set(hosts)) == 1:
        return
    token = comm.broadcast(uuid.uuid4().hex)
    store, root = open_store(url, storage)
    probe = store.join(root, PROBE_PREFIX + token)
    error = ""
    if comm.rank == 0:
        try:
            store.makedirs(root)
            store.write_bytes(probe, token.encode())
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"rank 0 cannot write {store.url(probe)}: {e}"
    error = comm.broadcast(error)
    if error:
        raise NodeLocalRootError(f"checkpoint root {url}: {error}")
    firsts = {h: hosts.index(h) for h in hosts}
    seen = ""
    if firsts[hosts[comm.rank]] == comm.rank and comm.rank != 0:
        try:
            seen = "ok" if store.read_bytes(probe) == token.encode() else "different content"
        except FileNotFoundError:
            seen = "not found"
        except Exception as e:  # noqa: BLE001
            seen = f"{type(e).__name__}: {e}"
    seen_all = comm.all_gather(seen)
    if comm.rank == 0:
        try:
            store.remove(probe)
        except Exception:  # noqa: BLE001 - a leftover probe is harmless (a dot file; listings skip it)
            pass
    blind = [f"node {hosts[r]!r} (rank {r}: {s})" for r, s in enumerate(seen_all) if s and s != "ok"]
    if blind:
        raise NodeLocalRootError(
            f"checkpoint root {url} is not shared between the nodes of this job: rank 0 (node {hosts[0]!r}) wrote "
            f"{PROBE_PREFIX}{token[:8]}... there and {', '.join(blind)} cannot read it. Every rank writes its part of a "
            f"checkpoint into this directory, so it must be one filesystem for all nodes (HDFS, NFS, ...). If each node "
            f"keeping its own directory is intended, pass DistCheckpointIO(node_local=True)."
        )
