"""One balanced load of a checkpoint by gloo ranks that `DISTCKPT_NODE_ID` places on simulated hosts.

    python hosts_load.py CKPT_URL SAME_HOST OUT_PREFIX      (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)

Each rank loads every tensor of the checkpoint (as DDP does) with ``same_host=SAME_HOST`` and writes
``OUT_PREFIX.<rank>.json``: the sha256 of each tensor's bytes, how the load shared them, the bytes it received
from other ranks (and how many of them through the process group) and the bytes it read from storage. No
Lightning: the engine is called as the plugin calls it.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from lightning_distckpt.engine import loading
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.parallel.comm import Comm


def main(url: str, how: str, out: str) -> None:
    dist.init_process_group("gloo")
    comm = Comm()
    ckpt, sources = loading.open_for_load(url, comm)
    targets = loading.allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), url, comm)
    stats = loading.read_tensors(ckpt, targets, sources=sources, comm=comm, same_host=how)
    digests = {k: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
               for k, t in targets.items()}  # raw bytes: any dtype (numpy has no bfloat16)
    with open(f"{out}.{comm.rank}.json", "w") as f:
        json.dump({"digests": digests, "same_host": stats.same_host, "received": stats.bytes_broadcast,
                   "by_group": stats.bytes_process_group, "read": sum(stats.bytes_by_source.values())}, f)  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
