"""Training stall per save (async vs sync vs Lightning's stock checkpointing) and host memory over many
async saves, for ~1 GiB of model + AdamW state on N ranks, in ONE run.

    torchrun --nproc_per_node=2 benchmarks/bench_async.py --dir /tmp/bench-async

Stall = wall time of the training step that includes the save minus the median normal step of the same
run (removing the checkpoint two saves back happens in the settle step, outside it). Modes: Lightning's
stock save, a synchronous save, an async save whose snapshot is copied inside the call
(``pipelined_snapshot=False``) and the default async save (pipelined: parameters and optimizer state are
copied while the next forward/backward run; the next optimizer step waits if the copy is not done). For
each: the time inside the save call, and for the pipelined one the time the next optimizer step waited. Each save is preceded
by a "settle" step that waits for the previous save, so saves never overlap. For async saves the extra time of the two following steps (the background write shares the CPU) is
reported separately. The time inside the save call is measured from a barrier (so it does not include
waiting for the slowest rank's optimizer step). Writes benchmarks/results/async_<strategy>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time

import lightning as L
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import barrier, bench_trainer, environment, rank, stats, write_result  # noqa: E402
from bench_save_load import Big, stock_checkpointing  # noqa: E402

from lightning_distckpt import DistCheckpointIO  # noqa: E402

MODES = ("stock", "sync", "async_blocking", "async")


class Schedule(L.Callback):
    """Per step: 'normal', 'settle' (wait for the save in flight), or a save in one of MODES."""

    def __init__(self, io: DistCheckpointIO, base: str, reps: int, rss_saves: int) -> None:
        plan: list[str] = ["normal"] * 3
        for _ in range(reps):
            for mode in MODES:
                plan += ["normal", "normal", "settle", mode, "after1", "after2"]
        plan += ["settle"]
        for _ in range(rss_saves):
            plan += ["rss", "normal"]
        plan += ["settle"]
        self.plan, self.io, self.base = plan, io, base
        self.starts: list[float] = []
        self.blocked: dict[str, list[float]] = {m: [] for m in MODES}
        self.in_plugin: dict[str, list[float]] = {m: [] for m in MODES if m != "stock"}
        self.step_wait: list[float] = []
        self.copy_s: list[float] = []
        self._pending_wait = False
        self.rss: list[int] = []
        self.n = 0

    @property
    def steps(self) -> int:
        return len(self.plan)

    def on_train_batch_start(self, trainer, *args):
        self.starts.append(time.perf_counter())
        if self._pending_wait and self.plan[trainer.global_step] == "after2":  # the step after the save has stepped
            self.step_wait.append(self.io.stats.step_wait_s)
            self._pending_wait = False
        if self.plan[trainer.global_step] == "settle":
            self.io.wait()
            self._clear(self.n + 1)  # the next save's directory, outside the timed save steps

    def _clear(self, n: int) -> None:
        """Remove the previous checkpoint at save n's path (a stall of the harness, not of the save)."""
        path = os.path.join(self.base, f"ckpt-{n % 2}")
        if rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.isfile(path):
                os.remove(path)
        barrier()

    def on_train_batch_end(self, trainer, *args):
        kind = self.plan[trainer.global_step - 1]
        if kind not in MODES and kind != "rss":
            return
        self.n += 1
        path = os.path.join(self.base, f"ckpt-{self.n % 2}")
        if kind == "rss":
            self._clear(self.n)
        barrier()  # ranks finish their optimizer steps at different times: time the save, not that skew
        t0 = time.perf_counter()
        if kind == "stock":
            with stock_checkpointing(trainer.strategy):
                trainer.save_checkpoint(path)
        else:
            self.io.async_save = kind in ("async", "async_blocking", "rss")
            self.io.pipelined_snapshot = kind != "async_blocking"
            trainer.save_checkpoint(path)
        if kind in MODES:
            self.blocked[kind].append(time.perf_counter() - t0)
            if kind in self.in_plugin:
                self.in_plugin[kind].append(self.io.stats.blocked_s)
        else:  # "rss": host memory once the snapshot's buffers are filled (the write may still run)
            self.io.wait_snapshot()
            self.rss.append(psutil.Process().memory_info().rss)
        if kind == "async":
            self._pending_wait = True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["ddp", "mp"], default="ddp")
    p.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    p.add_argument("--dir", default="/tmp/distckpt-bench-async")
    p.add_argument("--width", type=int, default=3872)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rss-saves", type=int, default=30)
    p.add_argument("--name", default=None, help="results file name (default async_<strategy>)")
    args = p.parse_args()
    base = os.path.join(args.dir, args.strategy)
    if rank() == 0:
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
    io = DistCheckpointIO()  # the defaults a user gets (durable: files are fsync'ed before the commit)
    sched = Schedule(io, base, args.reps, args.rss_saves)
    trainer = bench_trainer(args.strategy, io, sched.steps, args.accelerator, callbacks=[sched])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4 * sched.steps, args.width)),
                                       batch_size=4)  # fmt: skip
    model = Big(args.width, args.depth)
    trainer.fit(model, data)
    if rank() != 0:
        return
    dur = [b - a for a, b in zip(sched.starts, sched.starts[1:])]
    kinds = sched.plan[: len(dur)]
    normal = statistics.median(d for d, k in zip(dur, kinds) if k == "normal")
    stall = {m: [d - normal for d, k in zip(dur, kinds) if k == m] for m in MODES}
    after = [d - normal for d, k in zip(dur, kinds) if k in ("after1", "after2")]
    after_async = [a for i, a in enumerate(after) if (i // 2) % len(MODES) == MODES.index("async")]
    rss = sched.rss
    result = {
        "benchmark": "async", "strategy": args.strategy, "env": environment(), "normal_step_s": normal,
        "state_bytes": 3 * sum(p.numel() * 4 for p in model.parameters()),  # DTensor.numel() is global
        "stall_s": {m: stats(v) for m, v in stall.items()},
        "blocked_in_save_s": {m: stats(v) for m, v in sched.blocked.items()},
        # of that, inside DistCheckpointIO.save_routed (the rest is Lightning building the checkpoint dict and
        # its barrier after the save)
        "blocked_in_plugin_s": {m: stats(v) for m, v in sched.in_plugin.items()},
        "extra_time_of_2_steps_after_async_save_s": stats(after_async) if after_async else None,
        "rss_bytes_after_each_async_save": rss,
        "rss_growth_after_second_save": (max(rss[2:]) - rss[1]) / rss[1] if len(rss) > 2 else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "snapshot_buffer_bytes": io._snapshots.nbytes,
        "pipelined_step_wait_s": stats(sched.step_wait) if sched.step_wait else None,
        "plan_cache_hits": io._plan_cache.hits,
    }  # fmt: skip
    med = {m: result["stall_s"][m]["median"] for m in MODES}
    blocked = {m: result["blocked_in_save_s"][m]["median"] for m in MODES}
    result["ratios"] = {"async stall / sync stall": med["async"] / med["sync"], "async stall / stock stall": med["async"] / med["stock"],
                        "time in the async save call / sync save call": blocked["async"] / blocked["sync"],
                        "time in the blocking-snapshot async save call / sync save call": blocked["async_blocking"] / blocked["sync"],
                        "time inside the plugin, async / sync": result["blocked_in_plugin_s"]["async"]["median"]
                        / result["blocked_in_plugin_s"]["sync"]["median"]}  # fmt: skip
    print(write_result(args.name or f"async_{args.strategy}", result))
    print({k: round(v, 3) for k, v in result["ratios"].items()}, "rss growth", result["rss_growth_after_second_save"])


if __name__ == "__main__":
    main()
