"""Shared pieces of the examples: scikit-learn's bundled digits (no download) and an MLP classifier."""

from __future__ import annotations

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn


class DigitsData(L.LightningDataModule):
    """8x8 digits: 1500 images to train on, 297 to validate on."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y)
        self.train = torch.utils.data.TensorDataset(x[:1500], y[:1500])
        self.val = torch.utils.data.TensorDataset(x[1500:], y[1500:])

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(self.seed))  # fmt: skip

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.val, batch_size=297)


class Classifier(L.LightningModule):
    """An MLP over the 64 pixels; ``hidden`` sets its size."""

    def __init__(self, hidden: int = 128, depth: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
