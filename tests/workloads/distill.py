"""KD test workload: a student trained with KnowledgeDistillation against a teacher from a checkpoint.

    torchrun --nproc_per_node=N distill.py --strategy ddp --teacher-ckpt URL --out DIR [--resume last]
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Net, data, end_process, full_state_digest, strategy, tensor_digest, write_json  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, KnowledgeDistillation  # noqa: E402


class Losses(L.Callback):
    def __init__(self) -> None:
        self.kl: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kl.append(float(trainer.callback_metrics["kd/kl"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--teacher-ckpt", required=True)
    p.add_argument("--teacher-width", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("DISTCKPT_TEST_WORLD", os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kd = KnowledgeDistillation(teacher=lambda: Net(width=args.teacher_width), teacher_ckpt=args.teacher_ckpt,
                               alpha=args.alpha, temperature=2.0)  # fmt: skip
    losses = Losses()
    callbacks = [kd, losses]
    if args.ckpt_dir:
        callbacks.append(DistCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=4))
    trainer = L.Trainer(accelerator="cpu", devices=world if args.strategy != "single" else 1,
                        strategy=strategy(args.strategy), max_steps=args.max_steps, plugins=[DistCheckpointIO()],
                        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(args.ckpt_dir))  # fmt: skip
    trainer.fit(Net(width=args.width), data(), ckpt_path=args.resume)
    digest = full_state_digest(trainer)
    if trainer.is_global_zero:
        digest["teacher"] = {k: tensor_digest(v) for k, v in sorted(kd.teacher.state_dict().items())}
        digest["teacher_grads"] = [p.grad is not None for p in kd.teacher.parameters()]
        digest["kd_steps"] = kd.steps
        digest["kl"] = losses.kl
        write_json(os.path.join(args.out, "kd.json"), digest)


if __name__ == "__main__":
    main()
    end_process()
