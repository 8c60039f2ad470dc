"""Checkpoints on HDFS with a local replica: resume from whichever copy is intact.

    torchrun --nproc_per_node=2 examples/hdfs_replicas.py --dirpath hdfs://namenode:8020/user/me/ckpts \\
        --replica /local/nvme/ckpts --max-steps 80

Run it twice: the second run resumes from the newest committed checkpoint on HDFS or on the replica (if a
file on HDFS is missing or corrupt, it is read from the replica). Needs ``pip install "lightning-distckpt[hdfs]"``.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import Classifier, DigitsData  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, HdfsOptions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dirpath", required=True, help="hdfs://namenode:port/path (or webhdfs://, or any path)")
    p.add_argument("--replica", action="append", default=[], help="a replica root (repeatable)")
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--hdfs-replication", type=int, default=None)
    args = p.parse_args()
    L.seed_everything(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=args.max_steps,
        plugins=[DistCheckpointIO(async_save=True, hdfs=HdfsOptions(replication=args.hdfs_replication, retries=4))],
        callbacks=[DistCheckpoint(dirpath=args.dirpath, replicas=args.replica, every_n_train_steps=20, keep_last=2)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Classifier(), DigitsData(), ckpt_path="last")
    if trainer.is_global_zero:
        cb = trainer.checkpoint_callback
        print(f"finished at step {trainer.global_step}; resumed from {trainer.strategy.checkpoint_io.stats.loaded_from or 'nothing'}")
        print(f"replication: {cb.replication}")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # gloo's threads can abort a finished job while Python shuts down (docs/troubleshooting.md):
        # destroy the process group, then leave without the interpreter's shutdown
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
