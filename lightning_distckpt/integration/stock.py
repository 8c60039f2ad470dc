"""Stock Lightning checkpoints (one ``torch.save`` file) and Lightning's loading rules, for the plugin.

* `kind()` tells a checkpoint of this package (a directory) from a stock file, without reading either;
* `load_file()` reads a stock file through the plugin's storage (any URL), unpickling it by Lightning's
  own ``weights_only`` rule (``torch.load``: ``None`` is the torch default, restricted unless
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set; ``torch.serialization.add_safe_globals`` is honoured);
* `trusted()` applies the same rule to the objects this package's ``state.json`` pickles;
* optimizer states saved by parameter index (what ``optimizer.state_dict()`` and stock files hold) are
  mapped onto the live optimizer by `lightning_distckpt.integration.adapters` (``by_fqn``).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning_distckpt.integration.adapters import by_fqn, index_fqns, is_index_keyed
from lightning_distckpt.ondisk.skeleton import torch_safe_globals as safe_globals
from lightning_distckpt.ondisk.skeleton import weights_only_trusted as trusted
from lightning_distckpt.ondisk.stock_file import torch_load
from lightning_distckpt.storage import StorageLike, open_store


def kind(url: str, storage: StorageLike = None) -> Literal["ours", "file", "missing"]:
    """``"ours"`` for a directory (a checkpoint of this package, committed or not), ``"file"`` for a file
    (a stock Lightning checkpoint), ``"missing"`` when nothing is there."""
    store, path = open_store(url, storage)
    if store.isdir(path):
        return "ours"
    return "file" if store.exists(path) else "missing"


def load_file(url: str, storage: StorageLike = None, weights_only: bool | None = None,
              map_location: Any = "cpu") -> dict[str, Any]:
    """A stock Lightning checkpoint file at ``url`` (local path or any URL the plugin's storage reaches), read
    with ``torch.load`` exactly as Lightning would (``weights_only`` as given, so ``None`` is torch's
    default). Tensors land on ``map_location`` (CPU by default)."""
    store, path = open_store(url, storage)
    return torch_load(url, store.read_bytes(path), weights_only, map_location)


__all__ = ["by_fqn", "index_fqns", "is_index_keyed", "kind", "load_file", "safe_globals", "torch_load", "trusted"]
