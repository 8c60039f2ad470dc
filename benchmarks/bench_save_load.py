"""Save and load of ~1 GiB of model + AdamW state on N ranks: Lightning's stock checkpointing vs this plugin
vs ``dd``, all in ONE run on the same machine and disk.

    torchrun --nproc_per_node=2 benchmarks/bench_save_load.py --strategy ddp --dir /tmp/bench
    torchrun --nproc_per_node=2 benchmarks/bench_save_load.py --strategy mp  --dir /tmp/bench

Each repeat measures, in this order: stock save, plugin save (durable, fsync), plugin save (no fsync), dd
of the same bytes; then loads with a dropped page cache (cold: the disk is read), stock then plugin. Every
timed step starts settled: ``os.sync()`` and the page cache dropped where allowed (root), so writeback of
one step never runs during the next. The ``dd`` baseline writes each rank's bytes as ``write_threads``
concurrent ``dd`` streams, the number of files (and streams) the plugin writes per rank. The
stock path is the same strategy object with the routing removed and TorchCheckpointIO restored, so both
checkpoint exactly the same state. Writes benchmarks/results/save_load_<strategy>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    barrier,
    bench_trainer,
    dd_read,
    dd_write_streams,
    drop_caches,
    environment,
    rank,
    settle_and_drop,
    stats,
    timed,
    write_result,
)

from lightning_distckpt import DistCheckpointIO  # noqa: E402


class Big(L.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and not hasattr(self, "_sharded"):
            from torch.distributed.fsdp import fully_shard

            for layer in self.layers:
                fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self, mesh=mesh["data_parallel"])
            self._sharded = True

    def training_step(self, batch, batch_idx):
        return self.layers(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class stock_checkpointing:
    """Temporarily give the strategy back Lightning's own checkpoint methods and TorchCheckpointIO."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __enter__(self):
        self.routed_cls, self.io = type(self.strategy), self.strategy._checkpoint_io
        self.strategy.__class__ = self.routed_cls.__mro__[1]
        self.strategy._checkpoint_io = TorchCheckpointIO()
        return self.strategy

    def __exit__(self, *exc) -> None:
        self.strategy.__class__ = self.routed_cls
        self.strategy._checkpoint_io = self.io


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def poison(model: nn.Module) -> list[torch.Tensor]:
    """CPU copies of this rank's parameters, then NaN in the parameters (a load must overwrite every one)."""
    copies = []
    with torch.no_grad():
        for p in model.parameters():
            copies.append(local(p).detach().cpu().clone())
            local(p).fill_(float("nan"))
    return copies


def load_everything(trainer: L.Trainer, path: str) -> None:
    """What a resume does with the checkpoint: read it, load model and optimizer state."""
    s = trainer.strategy
    ckpt = s.load_checkpoint(path)
    s.load_model_state_dict(ckpt)
    s.load_optimizer_state_dict(ckpt)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["ddp", "mp"], default="ddp")
    p.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    p.add_argument("--dir", default="/tmp/distckpt-bench")
    p.add_argument("--width", type=int, default=3872)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plugin-only", action="store_true", help="skip the stock and no-fsync saves (scaling runs)")
    p.add_argument("--name", default=None, help="results file name (default save_load_<strategy>)")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    io = DistCheckpointIO()
    trainer = bench_trainer(args.strategy, io, 1, args.accelerator)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, args.width)), batch_size=4)
    model = Big(args.width, args.depth)
    trainer.fit(model, data)  # one step: AdamW state exists

    base = os.path.join(args.dir, args.strategy)
    if rank() == 0:
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
    barrier()
    paths = {k: os.path.join(base, k) for k in ("stock", "plugin", "plugin_nosync")}
    rows: dict[str, list[float]] = {k: [] for k in ("stock_save", "plugin_save", "plugin_save_nosync", "dd_fsync",
                                                       "dd", "stock_load_cold", "plugin_load_cold",
                                                       "read_files_cold")}  # fmt: skip
    read_per_rank: list[int] = []
    restored_ok: list[bool] = []
    phases: list[dict[str, float]] = []
    bytes_per_rank: list[int] = []
    for _ in range(args.repeats):
        for k in paths.values():
            if rank() == 0:
                shutil.rmtree(k, ignore_errors=True)
                if os.path.exists(k):
                    os.remove(k)
            barrier()
        if not args.plugin_only:
            settle_and_drop()
            with stock_checkpointing(trainer.strategy):
                rows["stock_save"].append(timed(lambda: trainer.save_checkpoint(paths["stock"])))
        settle_and_drop()
        rows["plugin_save"].append(timed(lambda: trainer.save_checkpoint(paths["plugin"])))
        bytes_per_rank = [int(b) for b in _gather(io.stats.last_save.bytes_written)]
        if not args.plugin_only:
            io.storage = dataclasses.replace(io.storage, durable=False)
            settle_and_drop()
            rows["plugin_save_nosync"].append(timed(lambda: trainer.save_checkpoint(paths["plugin_nosync"])))
            io.storage = dataclasses.replace(io.storage, durable=True)
        total = sum(bytes_per_rank)
        streams = io.write_options.threads  # as many concurrent dd streams per rank as the plugin writes files
        dd_paths = [os.path.join(base, f"dd{rank()}-{k}") for k in range(streams)]
        each = total // world // streams
        settle_and_drop()
        rows["dd_fsync"].append(timed(lambda: dd_write_streams(dd_paths, each, True)))
        settle_and_drop()
        rows["dd"].append(timed(lambda: dd_write_streams(dd_paths, each, False)))
        barrier()
        for f in dd_paths:
            os.remove(f)
        cold = drop_caches()
        if not args.plugin_only:
            with stock_checkpointing(trainer.strategy):
                rows["stock_load_cold"].append(timed(lambda: load_everything(trainer, paths["stock"])))
        drop_caches()
        copies = poison(model) if not restored_ok else None  # first repeat: the load must overwrite NaNs
        rows["plugin_load_cold"].append(timed(lambda: load_everything(trainer, paths["plugin"])))
        if copies is not None:
            restored_ok.append(all(torch.equal(local(p).cpu(), c) for p, c in zip(model.parameters(), copies)))
            if not restored_ok[-1]:
                raise SystemExit("the plugin's load did not restore the saved parameters")
        read_per_rank = [int(b) for b in _gather(sum(io.stats.load_bytes_read.values()))]
        phases.append(dict(io.stats.load_s))
        drop_caches()
        mine = [os.path.join(paths["plugin"], f) for f in sorted(os.listdir(paths["plugin"])) if f.startswith(f"__{rank()}_")]
        rows["read_files_cold"].append(timed(lambda: [dd_read(f) for f in mine]))

    if rank() == 0:
        result = {
            "benchmark": "save_load", "strategy": args.strategy, "env": environment(), "page_cache_dropped": cold,
            "state_bytes": total, "bytes_per_rank": bytes_per_rank, "bytes_read_per_rank": read_per_rank,
            "max_read_over_state": max(read_per_rank) / total,
            "load_restores_the_saved_parameters": all(restored_ok), "plugin_load_phases_rank0": phases,
            "max_over_mean_bytes": max(bytes_per_rank) / (sum(bytes_per_rank) / world),
            "dd_streams_per_rank": io.write_options.threads, "settled_before_each_timed_step": True,
            "seconds": {k: stats(v) for k, v in rows.items() if v},
        }  # fmt: skip
        med = {k: v["median"] for k, v in result["seconds"].items()}
        if args.plugin_only:
            result["ratios"] = {"plugin throughput / dd (both fsync)": med["dd_fsync"] / med["plugin_save"],
                                "plugin load throughput / read of the same files (cold)":
                                    med["read_files_cold"] / med["plugin_load_cold"]}  # fmt: skip
            print(write_result(args.name or f"save_load_{args.strategy}", result))
            return
        result["ratios"] = {
            "plugin_save / stock_save": med["plugin_save"] / med["stock_save"],
            "plugin_save_nosync / stock_save": med["plugin_save_nosync"] / med["stock_save"],
            "plugin_load / stock_load (cold)": med["plugin_load_cold"] / med["stock_load_cold"],
            "plugin throughput / dd (both fsync)": med["dd_fsync"] / med["plugin_save"],
            "plugin throughput / dd (no fsync)": med["dd"] / med["plugin_save_nosync"],
            "plugin load throughput / read of the same files (cold)": med["read_files_cold"] / med["plugin_load_cold"],
        }
        print(write_result(args.name or f"save_load_{args.strategy}", result))
        for k, v in result["ratios"].items():
            print(f"{k}: {v:.3f}")
        print("bytes per rank", bytes_per_rank)


def _gather(x: int) -> list[int]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


if __name__ == "__main__":
    main()
