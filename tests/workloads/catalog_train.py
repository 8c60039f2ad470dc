"""A training run with an HBase catalog: ``torchrun --nproc_per_node=N catalog_train.py --catalog URL --run R ...``.

Saves every ``--save-every`` steps with ``DistCheckpoint(catalog=..., run=..., monitor="train_loss")``, optionally
resumes (``--resume last|best``) and writes what it did to ``--out`` (rank 0): the checkpoint it loaded, the
step it started from, the catalog's counters, the best path.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Net, data, strategy, write_json  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO  # noqa: E402
from lightning_distckpt.catalog.index import CatalogOptions  # noqa: E402


class Started(L.Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


def fit(args: argparse.Namespace, resume: str | None) -> dict:
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = Started()
    cb = DistCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=args.save_every, monitor="train_loss", mode=args.mode,
                        save_top_k=args.save_top_k, replicas=args.replicas, catalog=args.catalog, run=args.run_name,
                        catalog_options=CatalogOptions(timeout_s=5.0, retries=1))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=world if args.strategy != "single" else 1,
                        strategy=strategy(args.strategy), max_steps=args.max_steps, plugins=[DistCheckpointIO()],
                        callbacks=[cb, started], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(Net(), data(), ckpt_path=resume)
    io = trainer.strategy.checkpoint_io
    return {"resume": resume, "loaded_from": io.stats.loaded_from, "started_step": started.step,
            "catalog": cb.catalog_stats, "best_model_path": cb.best_model_path,
            "best_score": float(cb.best_model_score) if cb.best_model_score is not None else None,
            "global_step": trainer.global_step, "rank": trainer.global_rank}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="ddp", choices=["single", "ddp"])
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--catalog", required=True)
    p.add_argument("--run-name", required=True)
    p.add_argument("--replicas", nargs="*", default=None)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--save-top-k", type=int, default=-1)
    p.add_argument("--resume", nargs="*", default=[None], help='"last", "best", ...: one fit each, in this process')
    p.add_argument("--mode", default="min", choices=["min", "max"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = [fit(args, resume) for resume in args.resume]
    if results[0]["rank"] == 0:
        write_json(args.out, results if len(results) > 1 else results[0])


if __name__ == "__main__":
    main()
