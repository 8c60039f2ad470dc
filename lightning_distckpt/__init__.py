"""lightning-distckpt: sharded, portable, verified checkpoints for PyTorch Lightning.

Add the plugin and the callback::

    from lightning_distckpt import DistCheckpoint, DistCheckpointIO

    trainer = Trainer(plugins=[DistCheckpointIO()],
                      callbacks=[DistCheckpoint(dirpath="file:///data/ckpts", every_n_train_steps=100, keep_last=3)])
    trainer.fit(model, ckpt_path="last")
"""

from lightning_distckpt.callback import DistCheckpoint
from lightning_distckpt.catalog import VerifyReport, list_checkpoints, verify
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    CorruptCheckpointError,
    DistCheckpointError,
    NotACheckpointError,
    StateMismatchError,
    StorageError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
)
from lightning_distckpt.export import export_checkpoint, load_checkpoint
from lightning_distckpt.integration import install_hook as _install_hook
from lightning_distckpt.io import DistCheckpointIO

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "DistCheckpoint",
    "DistCheckpointError",
    "DistCheckpointIO",
    "NotACheckpointError",
    "StateMismatchError",
    "StorageError",
    "UncommittedCheckpointError",
    "UnsafeCheckpointError",
    "VerifyReport",
    "export_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "verify",
]

_install_hook()
