"""Balanced DDP loads on several hosts, simulated on this machine: 4 gloo ranks, 2 per host (``DISTCKPT_NODE_ID``),
loading the same replicated state (every rank gets all of it), the three ways in the same repeats:

    python benchmarks/bench_hosts.py          # writes benchmarks/results/hosts.json

* ``same_host_reads="auto"`` (the default; on several hosts: ``attach+send``): the job reads each byte once,
  each rank sends what it read to the rank of its local index on the other host, and the ranks of a host copy
  each other's chunks out of their memory (``process_vm_readv``);
* ``"broadcast"``: the job reads each byte once and every rank's chunks are broadcast to every other rank;
* ``"attach"``: each host reads every byte once, the ranks of a host copy each other's chunks.

The state (~384 MiB in 6 tensors) is a checkpoint on local disk written by ``import_checkpoint``; each load reads
it from a dropped page cache (as root) into tensors allocated and touched once, as a model's are. Both "hosts"
share this machine's cores and its loopback network, so the table compares the ways' costs in CPU and copies,
not a real network's bandwidth; it also reports the bytes each way read from storage and received from other
ranks, which do carry over.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
NODES = ["A", "A", "B", "B"]
WAYS = ["auto", "broadcast", "attach"]


def launcher(args: argparse.Namespace) -> None:
    import socket

    import torch

    from lightning_distckpt import import_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-hosts-", dir=args.dir) as d:
        torch.manual_seed(0)
        stock = os.path.join(d, "stock.ckpt")
        torch.save({"state_dict": {f"layer{i}.weight": torch.randn(4096, 4096) for i in range(6)}, "global_step": 1,
                    "epoch": 0}, stock)  # fmt: skip
        url = os.path.join(d, "ck")
        import_checkpoint(stock, url)
        os.remove(stock)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--url", url, "--repeats", str(args.repeats)],
                                  env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(len(NODES)), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": port, "DISTCKPT_NODE_ID": node, "OMP_NUM_THREADS": "1"})
                 for r, node in enumerate(NODES)]  # fmt: skip
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a worker failed")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from _common import drop_caches, environment, rank, stats, timed, write_result

    from lightning_distckpt.engine import loading
    from lightning_distckpt.ondisk import skeleton as state
    from lightning_distckpt.parallel.comm import Comm

    dist.init_process_group("gloo")
    comm = Comm()
    ckpt, sources = loading.open_for_load(args.url, comm)
    targets = loading.allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), args.url, comm)
    for t in targets.values():
        t.zero_()  # touched once, like a model's tensors
    total = sum(t.numel() * t.element_size() for t in targets.values())
    seconds: dict[str, list[float]] = {w: [] for w in WAYS}
    used: dict[str, set[str]] = {w: set() for w in WAYS}
    read: dict[str, list[int]] = {w: [] for w in WAYS}  # bytes the job read from storage, per load
    received: dict[str, list[int]] = {w: [] for w in WAYS}  # bytes rank 0 got from other ranks, per load
    by_group: dict[str, list[int]] = {w: [] for w in WAYS}  # of those, through the process group (TCP)
    cold = True
    for i in range(args.repeats):
        for way in WAYS if i % 2 == 0 else list(reversed(WAYS)):
            cold = drop_caches() and cold
            box = {}
            seconds[way].append(timed(lambda: box.update(s=loading.read_tensors(ckpt, targets, sources=sources, comm=comm,
                                                                                   same_host=way))))  # fmt: skip
            s = box["s"]
            used[way].add(s.same_host)
            read[way].append(sum(comm.all_gather(sum(s.bytes_by_source.values()))))
            received[way].append(s.bytes_broadcast)
            by_group[way].append(s.bytes_process_group)
    if rank() == 0:
        med = {w: stats(v)["median"] for w, v in seconds.items()}
        result = {
            "benchmark": "hosts", "env": environment(),
            "command": "python benchmarks/bench_hosts.py" + (f" --repeats {args.repeats}" if args.repeats != 7 else ""), "hosts": NODES, "state_bytes": total, "cold_cache": cold,
            "seconds": {w: stats(v) for w, v in seconds.items()}, "samples_s": seconds,
            "same_host_used": {w: sorted(v) for w, v in used.items()},
            "bytes_read_by_job": {w: max(v) for w, v in read.items()},
            "bytes_received_rank0": {w: max(v) for w, v in received.items()},
            "bytes_process_group_rank0": {w: max(v) for w, v in by_group.items()},
            "ratios": {"auto / broadcast (speed-up)": med["broadcast"] / med["auto"],
                       "auto / attach per host (speed-up)": med["attach"] / med["auto"]},
        }  # fmt: skip
        print(write_result("hosts", result))
        for k, v in result["ratios"].items():
            print(f"{k}: {v:.3f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--url")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dir", default=None, help="where the checkpoint goes (default: the system's temp dir)")
    a = p.parse_args()
    if a.worker:
        worker(a)
    else:
        launcher(a)
