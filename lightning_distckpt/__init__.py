"""lightning-distckpt: sharded, portable, verified checkpoints for PyTorch Lightning.

Add the plugin and the callback::

    from lightning_distckpt import DistCheckpoint, DistCheckpointIO

    trainer = Trainer(plugins=[DistCheckpointIO()],
                      callbacks=[DistCheckpoint(dirpath="file:///data/ckpts", every_n_train_steps=100, keep_last=3)])
    trainer.fit(model, ckpt_path="last")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CatalogConflictError",
    "CatalogError",
    "CatalogOptions",
    "CatalogUnavailableError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "DistCheckpoint",
    "DistCheckpointError",
    "DistCheckpointIO",
    "CompressionConfig",
    "HdfsOptions",
    "InsufficientMemoryError",
    "KnowledgeDistillation",
    "NewerFormatError",
    "NodeLocalRootError",
    "NotACheckpointError",
    "StaleOwnerError",
    "StateMismatchError",
    "StorageError",
    "StorageUnreachableError",
    "UncommittedCheckpointError",
    "UnsafeCheckpointError",
    "VerifyReport",
    "enable_load_from_checkpoint",
    "export_checkpoint",
    "import_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "verify",
]

# Public names are imported on first use, so that tools which only read or write checkpoints (the
# ``distckpt`` command, export) start without importing Lightning.
_EXPORTS = {
    "DistCheckpoint": "integration.callback",
    "DistCheckpointIO": "integration.plugin",
    "HdfsOptions": "storage.hdfs",
    "CatalogOptions": "catalog.index",
    "CompressionConfig": "transforms.compression",
    "KnowledgeDistillation": "integration.distill",
    "VerifyReport": "catalog.verify",
    "list_checkpoints": "catalog.listing",
    "verify": "catalog.verify",
    "export_checkpoint": "ops.export",
    "enable_load_from_checkpoint": "integration.load_from_checkpoint",
    "import_checkpoint": "ops.importing",
    "load_checkpoint": "ops.export",
    **{name: "errors" for name in __all__ if name.endswith("Error")},
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_distckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_distckpt.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from lightning_distckpt.catalog.index import CatalogOptions
    from lightning_distckpt.catalog.listing import list_checkpoints
    from lightning_distckpt.catalog.verify import VerifyReport, verify
    from lightning_distckpt.errors import (
        BackendUnavailableError,
        CatalogConflictError,
        CatalogError,
        CatalogUnavailableError,
        CheckpointNotFoundError,
        CheckpointSaveError,
        CorruptCheckpointError,
        DistCheckpointError,
        NewerFormatError,
        InsufficientMemoryError,
        NotACheckpointError,
        StaleOwnerError,
        StateMismatchError,
        StorageError,
        StorageUnreachableError,
        UncommittedCheckpointError,
        UnsafeCheckpointError,
    )
    from lightning_distckpt.integration.callback import DistCheckpoint
    from lightning_distckpt.integration.distill import KnowledgeDistillation
    from lightning_distckpt.integration.load_from_checkpoint import enable_load_from_checkpoint
    from lightning_distckpt.integration.plugin import DistCheckpointIO
    from lightning_distckpt.ops.export import export_checkpoint, load_checkpoint
    from lightning_distckpt.ops.importing import import_checkpoint
    from lightning_distckpt.storage.hdfs import HdfsOptions
    from lightning_distckpt.transforms.compression import CompressionConfig
