"""Helpers shared by the benchmark scripts: timing across ranks, page-cache control, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def drop_caches() -> bool:
    """Drop the page cache so that reads hit the disk (needs root; returns False when not allowed)."""
    barrier()
    ok = True
    if rank() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            ok = False
    barrier()
    return ok


def settle() -> None:
    """Flush dirty pages (rank 0, for the whole machine) so that writeback from an earlier step does not
    run during the next timed one."""
    barrier()
    if rank() == 0:
        os.sync()
    barrier()


def settle_and_drop() -> bool:
    """Before a timed step: flush dirty pages (so no writeback from an earlier step runs during it) and drop the
    page cache where allowed (root; returns whether it was dropped)."""
    return drop_caches()


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn`` on all ranks together (barrier before and after)."""
    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - t0


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def dd_write(path: str, nbytes: int, fsync: bool) -> float:
    """Seconds for ``dd`` to write ``nbytes`` of zeros (conv=fsync when ``fsync``)."""
    bs = 64 << 20
    count = max(1, nbytes // bs)
    args = ["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={count}", "status=none"]
    if fsync:
        args.append("conv=fsync")
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t0


def dd_write_streams(paths: list[str], nbytes_each: int, fsync: bool) -> float:
    """Seconds for one ``dd`` per path, all running at once (the same number of concurrent streams as the
    plugin's write threads), each writing ``nbytes_each`` of zeros (conv=fsync when ``fsync``)."""
    bs = 64 << 20
    count = max(1, nbytes_each // bs)
    cmds = [["dd", "if=/dev/zero", f"of={p}", f"bs={bs}", f"count={count}", "status=none", *(["conv=fsync"] if fsync else [])]
            for p in paths]  # fmt: skip
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c) for c in cmds]
    for p in procs:
        if p.wait() != 0:
            raise subprocess.CalledProcessError(p.returncode, p.args)
    return time.perf_counter() - t0


def dd_read(path: str) -> float:
    """Seconds for ``dd`` to read a file (to /dev/null)."""
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={64 << 20}", "status=none"], check=True)
    return time.perf_counter() - t0


def git_commit() -> str | None:
    """The commit the benchmark ran from (with "+dirty" if the package had uncommitted changes), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../lightning_distckpt", ".", ":(exclude)results"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


_COMMIT_AT_START = git_commit()  # the code this process imported, not what the tree holds when it ends


def environment() -> dict[str, Any]:
    return {
        "commit": _COMMIT_AT_START,
        "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_1_5_15": list(os.getloadavg()),  # others' work on this machine when the result was written
    }  # fmt: skip


def bench_trainer(strategy: str, io: Any, max_steps: int, accelerator: str = "cpu", callbacks: list[Any] | None = None) -> Any:
    """A quiet Trainer on ``WORLD_SIZE`` ranks: ``strategy`` "ddp" (gloo on CPU, NCCL on GPUs) or "mp"
    (ModelParallelStrategy, data parallel over every rank), with ``io`` as its CheckpointIO."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    world = int(os.environ.get("WORLD_SIZE", "1"))
    strat = (DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl") if strategy == "ddp"
             else ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1))  # fmt: skip
    return L.Trainer(accelerator=accelerator, devices=world, strategy=strat, max_steps=max_steps, plugins=[io],
                     callbacks=callbacks or [], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)  # fmt: skip


def write_result(name: str, result: dict[str, Any]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    return path
