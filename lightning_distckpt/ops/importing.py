"""Converting a stock Lightning checkpoint file into a committed checkpoint of this package.

``import_checkpoint("stock.ckpt", "ckpts/epoch=3-step=400")`` reads the file (a local path or any URL the
storage reaches) with ``torch.load`` and writes it as a checkpoint of this package, committed like any
other (atomic, checksummed). Everything in the file is kept. The optimizer state stays keyed by parameter
index, as in the file; loading maps it onto the live optimizer's parameters in order, exactly as
``torch.optim.Optimizer.load_state_dict`` does, under any strategy and world size. Runs in one process and
does not import Lightning (unpickling the file may, if the file names Lightning's classes).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_distckpt import ondisk
from lightning_distckpt.engine.saving import WriteOptions, write_checkpoint
from lightning_distckpt.errors import NotACheckpointError
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.ondisk.stock_file import torch_load
from lightning_distckpt.parallel.comm import SOLO
from lightning_distckpt.storage import StorageLike, open_store


def read_stock_file(url: str, storage: StorageLike = None, weights_only: bool | None = None) -> dict[str, Any]:
    """A stock Lightning checkpoint file as a dict of CPU tensors (``torch.load`` with ``weights_only`` as
    given: ``None`` is torch's default, which refuses arbitrary classes unless registered as safe globals)."""
    store, path = open_store(url, storage)
    if store.isdir(path):
        raise NotACheckpointError(f"{url}: is a directory; expected one file written by Lightning (torch.save)")
    checkpoint = torch_load(url, store.read_bytes(path), weights_only)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise NotACheckpointError(f"{url}: not a Lightning checkpoint (no 'state_dict' in what torch.load returns)")
    return checkpoint


def import_checkpoint(src: str, dest: str, storage: StorageLike = None, weights_only: bool | None = None,
                      write_threads: int = 2) -> ondisk.Manifest:
    """Write the stock Lightning checkpoint file ``src`` as the committed checkpoint ``dest``; return its manifest.

    ``dest`` is created atomically (an existing checkpoint there is replaced only once the new one commits).
    """
    checkpoint = read_stock_file(src, storage, weights_only)
    skeleton, tensors = state.split(checkpoint)
    from lightning_distckpt import __version__

    manifest = ondisk.Manifest(
        name="", created=0.0, world_size=1, global_step=checkpoint.get("global_step"), epoch=checkpoint.get("epoch"),
        strategy="imported",
        versions={"torch": torch.__version__, "lightning": str(checkpoint.get("pytorch-lightning_version", "")),
                  "lightning_distckpt": __version__},
    )  # fmt: skip
    result = write_checkpoint(dest, skeleton, tensors, manifest, WriteOptions(threads=write_threads), SOLO, storage)
    assert result.manifest is not None
    return result.manifest
