"""Compressed checkpoints: train on digits, save with each preset, resume from each and compare.

    python examples/compression.py --steps 96

Prints, per preset, the checkpoint size relative to the uncompressed one and the training loss after
resuming (the lossless resume is bit-identical to the uncompressed one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import Classifier, DigitsData  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, load_checkpoint  # noqa: E402


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def fit(dirpath: str, steps: int, compression: str | None, resume: str | None) -> list[float]:
    torch.manual_seed(0)
    losses = Losses()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        plugins=[DistCheckpointIO(compression=compression)],
                        callbacks=[DistCheckpoint(dirpath=dirpath, every_n_train_steps=steps), losses])  # fmt: skip
    trainer.fit(Classifier(hidden=256), DigitsData(), ckpt_path=resume)
    return losses.values


def size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=94, help="steps before the save (and after it)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="compression-example-")
    try:
        fit(os.path.join(work, "base"), args.steps, None, None)
        (name,) = os.listdir(os.path.join(work, "base"))
        state = load_checkpoint(os.path.join(work, "base", name))
        print(f"{'preset':<10} {'size':>10} {'vs fp32':>8} {'loss 5 steps after resume':>28} {'final loss':>11}")
        for preset in (None, "lossless", "bf16", "int8"):
            d = os.path.join(work, str(preset))
            DistCheckpointIO(compression=preset).save_checkpoint(state, os.path.join(d, name))
            after = fit(d, 2 * args.steps, preset, "last")
            stored, base = size(os.path.join(d, name)), size(os.path.join(work, "None", name))
            print(f"{str(preset):<10} {stored:>10} {stored / base:>8.2f} "
                  f"{after[4]:>28.4f} {after[-1]:>11.4f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
