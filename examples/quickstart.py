"""Quickstart: train a small classifier on scikit-learn's bundled digits with 2 processes, checkpoint
sharded to a local directory, and resume from the newest committed checkpoint when run again.

    torchrun --nproc_per_node=2 examples/quickstart.py --ckpt-dir ./example-ckpts --max-steps 60
    torchrun --nproc_per_node=2 examples/quickstart.py --ckpt-dir ./example-ckpts --max-steps 120   # resumes

Runs on CPU (gloo). ``--strategy model_parallel`` shards the model with FSDP2; checkpoints resume under either.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from sklearn.datasets import load_digits
from torch import nn

from lightning_distckpt import DistCheckpoint, DistCheckpointIO


class DigitsClassifier(L.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def configure_model(self) -> None:  # used by ModelParallelStrategy (FSDP2): shard every layer
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and not hasattr(self, "_sharded"):
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self, mesh=mesh["data_parallel"])
            self._sharded = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def loaders(batch_size: int = 32) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train = torch.utils.data.TensorDataset(x[:1500], y[:1500])
    val = torch.utils.data.TensorDataset(x[1500:], y[1500:])
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=256))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-dir", default="./example-ckpts")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "model_parallel"])
    parser.add_argument("--async-save", action="store_true")
    args = parser.parse_args()

    L.seed_everything(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = (DDPStrategy(process_group_backend="gloo") if args.strategy == "ddp"
                else ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=args.max_steps,
        val_check_interval=20,
        plugins=[DistCheckpointIO(async_save=args.async_save)],
        callbacks=[DistCheckpoint(dirpath=os.path.abspath(args.ckpt_dir), every_n_train_steps=20, keep_last=2)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(), *loaders(), ckpt_path="last")
    if trainer.is_global_zero:
        acc = trainer.callback_metrics.get("val_acc")
        print(f"finished at step {trainer.global_step}; val_acc={float(acc) if acc is not None else float('nan'):.3f}")


if __name__ == "__main__":
    main()
