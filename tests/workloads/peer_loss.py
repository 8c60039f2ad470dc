"""A balanced load on gloo ranks where one rank (``VICTIM``, default 1) dies (``os._exit``) at a chosen point;
every other rank reports what it raised.

    python peer_loss.py CKPT_URL {attach,read,segments,send} OUT_PREFIX   (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)

``attach``: the victim exits at its first copy out of another rank's memory. ``read``: it exits as it starts
reading its part (inside DCP's collective load; the load uses ``same_host="auto"``). ``segments``: it exits right after
it created its shared-memory segment, before the ranks exchange their names. ``send`` (ranks on several hosts,
``DISTCKPT_NODE_ID``; the load uses ``same_host="auto"``): it exits instead of sending its chunks to its partners.
Each survivor writes ``OUT_PREFIX.<rank>.json``: what it raised (type, module, message) and the segment files
left (``DISTCKPT_SHM_DIR``). No Lightning here: the engine is called directly, as the plugin calls it.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from lightning_distckpt.engine import across_hosts, balanced_read, loading, reader
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.parallel.comm import Comm


def main(url: str, how: str, out: str) -> None:
    dist.init_process_group("gloo")
    comm = Comm()
    if comm.rank == int(os.environ.get("VICTIM", "1")):
        if how == "attach":
            loading.copy_from = lambda *a: os._exit(9)  # dies while the others may still copy from it
        elif how == "send":
            across_hosts.exchange = lambda *a: os._exit(9)
        elif how == "read":
            reader.CheckpointReader.read_data = lambda *a: os._exit(9)  # type: ignore[method-assign]
        else:
            create = balanced_read.SharedSegments._create

            def create_then_die(self: balanced_read.SharedSegments, size: int) -> None:
                create(self, size)
                os._exit(9)

            balanced_read.SharedSegments._create = create_then_die  # type: ignore[method-assign]
    ckpt, sources = loading.open_for_load(url, comm)
    targets = loading.allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), url, comm)
    try:
        same_host = "auto" if how in ("send", "read") else how
        loading.read_tensors(ckpt, targets, sources=sources, comm=comm, same_host=same_host)
        raised: dict[str, str] = {"type": "", "message": "returned"}
    except BaseException as e:  # noqa: BLE001 - what a user would see is the point of this workload
        raised = {"type": type(e).__name__, "message": str(e), "module": type(e).__module__}
    shm = balanced_read.shm_dir()
    raised["left"] = sorted(n for n in os.listdir(shm) if n.startswith("distckpt-"))
    with open(f"{out}.{comm.rank}.json", "w") as f:
        json.dump(raised, f)
    sys.stdout.flush()
    os._exit(0)  # the process group lost a rank: no orderly shutdown


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:4])
