"""Save and load of ~1 GiB of model + AdamW state by 2 ranks on the MiniDFS cluster: DistCheckpointIO vs
raw hdfs-native writes and reads of the same bytes by the same number of processes, in ONE run.

    python benchmarks/bench_hdfs.py            # starts a MiniDFSCluster (needs Java 17 + Maven), runs torchrun

The raw baseline: each rank writes (then reads) one file per plugin write thread holding exactly the bytes
that rank's plugin save wrote, in 8 MiB writes through hdfs-native, on concurrent threads, and reads them
back with ``read_range_stream``, discarding the bytes (hdfs-native's fastest read: ``raw_read``). Reported
beside it: ``raw_read_8mib`` (8 MiB ``read`` calls), ``raw_read_copy`` (the stream copied into preallocated,
touched memory, as a load must) and ``raw_read_verified`` (that plus the xxh3 of every 8 MiB block, the least
work a verified load does). Every timed step starts after a ``sync`` (writeback from the previous step would
slow it down) and the reads alternate their order between repeats. Under DDP every rank needs all of the
state, so two more rows: ``raw_read_all_copy`` (every rank streams every rank's files into memory) and
``plugin_load_unbalanced`` (the plugin with ``balanced_reads=False``: every rank reads everything).
Each timed read also records the machine's idle CPU share (``cpu_idle_share``; the MiniDFS datanodes run on the
same cores) and, for the default DDP load, how fast rank 0 got the other rank's half (``same_host_copy_Bps_rank0``).
Compressed saves
of the same state (``plugin_save_int8``, ``plugin_save_lossless``) are timed in the same repeats (target: int8
>= 2.5x faster than the uncompressed save, lossless faster). Replication is
the cluster's (3). ``--strategy mp`` (sharded: each rank loads exactly its share, like the baseline) or
``ddp`` (replicated: each rank reads its half and gets the other half from the other rank, so every rank
ends up with all of the state: ``plugin_load`` with the default ``same_host_reads="auto"``, which copies it out
of the other rank's memory; ``plugin_load_broadcast`` and ``plugin_load_segments`` with the other two ways, in
the same repeats; target: ``plugin_load`` >= 0.85x of ``raw_read_copy``). Writes benchmarks/results/hdfs_<strategy>.json.

``--thp`` runs the ranks with PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (tensors of 2 MiB or more on transparent huge
pages: the kernel copy out of another rank pins one page per 2 MiB instead of one per 4 KiB) and writes
hdfs_<strategy>_thp.json; the result records how much of rank 0's memory was on huge pages (``rank0_anon_huge_bytes``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def launcher(args: argparse.Namespace) -> None:
    from hdfs_cluster import MiniDfs, java_home_or_none

    java_home, reason = java_home_or_none()
    if java_home is None:
        raise SystemExit(f"needs Java 17: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-minidfs-") as base, MiniDfs.start(base, datanodes=4, java_home=java_home) as dfs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29710", __file__,
               "--worker", "--url", dfs.namenode_url + "/bench", "--repeats", str(args.repeats),
               "--width", str(args.width), "--depth", str(args.depth), "--strategy", args.strategy,
               *([] if args.compression_rows else ["--no-compression-rows"]), *(["--thp"] if args.thp else [])]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"THP_MEM_ALLOC_ENABLE": "1"} if args.thp else {})}
        subprocess.run(cmd, check=True, env=env)


def worker(args: argparse.Namespace) -> None:
    import torch
    from _common import barrier, bench_trainer, environment, rank, settle, stats, timed, write_result
    from bench_save_load import Big, load_everything

    from lightning_distckpt import DistCheckpointIO
    from lightning_distckpt.ondisk import BlockDigests
    from lightning_distckpt.storage import HdfsOptions, StorageConfig, open_store
    from lightning_distckpt.transforms import resolve

    world = int(os.environ["WORLD_SIZE"])
    io = DistCheckpointIO()
    trainer = bench_trainer(args.strategy, io, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, args.width)), batch_size=4)
    trainer.fit(Big(args.width, args.depth), data)
    store, root = open_store(args.url, StorageConfig(hdfs=HdfsOptions()))
    threads = io.write_options.threads
    payload = os.urandom(8 << 20)

    def raw_write(nbytes: int) -> None:
        def one(k: int) -> None:
            s = store.open_write(store.join(root, f"raw-{rank()}-{k}"))
            left = nbytes // threads
            while left > 0:
                n = min(left, len(payload))
                s.write(memoryview(payload)[:n])
                left -= n
            s.close()

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(threads)))

    buffers: dict[str, memoryview] = {}  # for reads into memory, allocated (and touched) once, like model state

    def raw_read(mode: str) -> Callable[[], None]:
        # "copy_all": every rank streams every rank's files into memory (what a DDP resume needs on each rank)
        names = [f"raw-{r}-{k}" for r in range(world) for k in range(threads)] if mode == "copy_all" else \
                [f"raw-{rank()}-{k}" for k in range(threads)]  # fmt: skip

        def one(k: int) -> None:
            with store.open_read(store.join(root, names[k])) as f:
                if mode == "stream":  # hdfs-native's fastest way to read a file
                    for _ in f.read_range_stream(0, len(f)):
                        pass
                elif mode in ("copy", "copy_all", "verified"):  # into preallocated memory; "verified" checks it like a load
                    if names[k] not in buffers:
                        buffers[names[k]] = memoryview(bytearray(len(f)))
                    view, pos = buffers[names[k]], 0
                    digests = BlockDigests([8 << 20] * (len(f) // (8 << 20)) + [len(f) % (8 << 20)]) \
                        if mode == "verified" else None  # fmt: skip
                    for piece in f.read_range_stream(0, len(f)):
                        if digests is not None:
                            digests.update(piece)
                        view[pos : pos + len(piece)] = piece
                        pos += len(piece)
                else:
                    while f.read(8 << 20):
                        pass

        def run() -> None:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(len(names))))

        return run

    ddp = args.strategy == "ddp"
    rows: dict[str, list[float]] = {k: [] for k in ("plugin_save", "raw_write", "plugin_load", "raw_read",
                                                       "raw_read_8mib", "raw_read_copy", "raw_read_verified")}  # fmt: skip
    if ddp:
        rows.update(plugin_load_broadcast=[], plugin_load_segments=[], plugin_load_unbalanced=[], raw_read_all_copy=[])
    if args.compression_rows:
        rows.update(plugin_save_int8=[], plugin_save_lossless=[])
    compressed_bytes: dict[str, int] = {}

    def compressed_save(preset: str, path: str) -> None:
        io.compression = resolve(preset)
        try:
            trainer.save_checkpoint(path)
        finally:
            io.compression = resolve(None)

    used: dict[str, list[str]] = {"auto": [], "segments": [], "broadcast": []}  # how each load shared its bytes

    def load_with(path: str, same_host: str) -> None:
        io.same_host_reads = same_host
        try:
            load_everything(trainer, path)
            used[same_host].append(io.stats.load_same_host)
        finally:
            io.same_host_reads = "auto"

    def unbalanced_load(path: str) -> None:
        io.balanced_reads = False
        try:
            load_everything(trainer, path)
        finally:
            io.balanced_reads = True

    phases: list[dict[str, float]] = []
    idle: dict[str, list[float]] = {}  # the machine's idle CPU share during each timed read (rank 0's view of /proc/stat)
    copy_rates: list[float] = []  # rank 0's default loads: bytes of the other rank's half / seconds to get them

    def cpu_times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    for i in range(args.repeats):
        path = f"{args.url}/ckpt-{i}"
        settle()
        rows["plugin_save"].append(timed(lambda: trainer.save_checkpoint(path)))
        mine = io.stats.last_save.bytes_written
        if args.compression_rows:
            for preset in ("int8", "lossless"):
                settle()
                rows[f"plugin_save_{preset}"].append(timed(lambda: compressed_save(preset, f"{path}-{preset}")))
                compressed_bytes[preset] = io.stats.last_save.bytes_written
                barrier()
                if rank() == 0:
                    store.remove(store.join(root, f"ckpt-{i}-{preset}"), recursive=True)
                barrier()
        settle()
        rows["raw_write"].append(timed(lambda: raw_write(mine)))
        if i == 0:  # allocate and touch the buffers outside the timing
            raw_read("verified")()
            if ddp:
                raw_read("copy_all")()
        reads = [("plugin_load", lambda: load_with(path, "auto")), ("raw_read", raw_read("stream")),
                 ("raw_read_8mib", raw_read("8mib")), ("raw_read_copy", raw_read("copy")),
                 ("raw_read_verified", raw_read("verified"))]
        if ddp:
            reads += [("plugin_load_broadcast", lambda: load_with(path, "broadcast")),
                      ("plugin_load_segments", lambda: load_with(path, "segments")),
                      ("plugin_load_unbalanced", lambda: unbalanced_load(path)), ("raw_read_all_copy", raw_read("copy_all"))]
        for name, fn in reads if i % 2 == 0 else reversed(reads):  # alternate who reads first
            settle()
            before = cpu_times()
            rows[name].append(timed(fn))
            after = cpu_times()
            idle.setdefault(name, []).append((after[1] - before[1]) / max(1, after[0] - before[0]))
            if name == "plugin_load":
                phases.append(dict(io.stats.load_s))
                if io.stats.load_s.get("broadcast"):
                    copy_rates.append(io.stats.load_bytes_broadcast / io.stats.load_s["broadcast"])
        barrier()
        if rank() == 0:
            store.remove(store.join(root, f"ckpt-{i}"), recursive=True)
            for r in range(world):
                for k in range(threads):
                    store.remove(store.join(root, f"raw-{r}-{k}"))
        barrier()
    total = io.stats.last_save.bytes_written * world
    if rank() == 0:
        med = {k: stats(v)["median"] for k, v in rows.items()}
        result = {
            "benchmark": "hdfs", "strategy": args.strategy, "env": environment(), "state_bytes": total,
            "replication": 3, "datanodes": 4, "plugin_load_phases_rank0": phases,
            "cpu_idle_share": idle, "same_host_copy_Bps_rank0": copy_rates,
            "same_host_used": {k: sorted(set(v)) for k, v in used.items() if v},
            "compressed_bytes_rank0": compressed_bytes, "thp_alloc": args.thp,
            "rank0_anon_huge_bytes": anon_huge_bytes(),
            "seconds": {k: stats(v) for k, v in rows.items()}, "samples_s": rows,
            "throughput_MBps": {k: total / med[k] / 1e6 for k in med},
            "ratios": {"save: plugin / raw throughput": med["raw_write"] / med["plugin_save"],
                       "load: plugin / raw throughput": med["raw_read"] / med["plugin_load"],
                       "load: plugin / raw 8 MiB read() calls": med["raw_read_8mib"] / med["plugin_load"],
                       "load: plugin / raw stream into memory": med["raw_read_copy"] / med["plugin_load"],
                       "load: plugin / raw stream into memory + checksum": med["raw_read_verified"] / med["plugin_load"]},
        }  # fmt: skip
        if args.compression_rows:
            result["ratios"].update({
                "save: uncompressed / int8 (speed-up)": med["plugin_save"] / med["plugin_save_int8"],
                "save: uncompressed / lossless (speed-up)": med["plugin_save"] / med["plugin_save_lossless"],
            })  # fmt: skip
        if ddp:
            result["ratios"].update({
                "load: plugin / raw stream of all the state into memory by every rank": med["raw_read_all_copy"] / med["plugin_load"],
                "load: plugin / plugin without balanced reads": med["plugin_load_unbalanced"] / med["plugin_load"],
                "load (broadcasts): plugin / raw stream into memory": med["raw_read_copy"] / med["plugin_load_broadcast"],
                "load (segments): plugin / raw stream into memory": med["raw_read_copy"] / med["plugin_load_segments"],
            })  # fmt: skip
        print(write_result(f"hdfs_{args.strategy}" + ("_thp" if args.thp else ""), result))
        for k, v in result["ratios"].items():
            print(f"{k}: {v:.3f}")


def anon_huge_bytes() -> int:
    """This process's anonymous memory on transparent huge pages (/proc/self/smaps_rollup), in bytes."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--url")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--width", type=int, default=3872)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--strategy", choices=["ddp", "mp"], default="mp")
    p.add_argument("--no-compression-rows", dest="compression_rows", action="store_false",
                   help="skip the int8 and lossless saves")
    p.add_argument("--thp", action="store_true", help="run the ranks with THP_MEM_ALLOC_ENABLE=1 (PyTorch's tensors "
                   "on transparent huge pages); writes hdfs_<strategy>_thp.json")
    a = p.parse_args()
    if a.worker:
        worker(a)
        import torch

        if torch.distributed.is_initialized():
            # gloo's threads can abort a finished job while Python shuts down (docs/troubleshooting.md):
            # destroy the process group, then leave without the interpreter's shutdown
            torch.distributed.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    else:
        launcher(a)
