"""``LightningModule.load_from_checkpoint`` on checkpoints of this package.

Lightning reads the file behind ``MyModule.load_from_checkpoint(path)`` with one function,
``lightning.pytorch.core.saving.pl_load`` (``lightning.fabric.utilities.cloud_io._load``), which opens
``path`` as a single file and offers no hook. `enable_load_from_checkpoint()` replaces that module
attribute by a function that reads a checkpoint *directory* of this package and hands every other path
(a stock ``.ckpt`` file, a URL to one, a file object) to the original, unchanged. Over ``http(s)://`` a
checkpoint directory is recognised by its ``manifest.json`` and read file by file (fsspec's HTTP client).

It is an explicit call, never an import side effect. Constructing a `DistCheckpointIO`
makes it too (so a process that trained with the plugin can load its checkpoints); a process that never
builds one (an inference script) calls it once::

    import lightning_distckpt
    lightning_distckpt.enable_load_from_checkpoint()
    model = MyModule.load_from_checkpoint("hdfs://nn:8020/ckpts/epoch=3-step=400")
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_distckpt import ondisk
from lightning_distckpt.engine.loading import read_checkpoint
from lightning_distckpt.errors import CorruptCheckpointError, DistCheckpointError
from lightning_distckpt.integration import stock
from lightning_distckpt.storage import HdfsOptions, StorageConfig, open_store

_lock = threading.Lock()
_storage = StorageConfig()
_safe_globals: list[str] = []


def enable_load_from_checkpoint(storage_options: dict[str, Any] | None = None, hdfs: HdfsOptions | None = None,
                                safe_globals: list[str] | None = None) -> None:
    """Let ``LightningModule.load_from_checkpoint`` and ``LightningDataModule.load_from_checkpoint`` read this
    package's checkpoints, from a local path or any URL, in this process.

    Guarantees: only paths that are checkpoint directories of this package are read differently; for them
    the result is the checkpoint dict Lightning expects (``state_dict``, ``hyper_parameters``, ...), read by
    this process alone, whatever world size or strategy wrote it. Objects that JSON cannot hold (e.g. an
    OmegaConf hyper-parameter) are unpickled through the allowlist plus ``safe_globals`` and
    ``torch.serialization.add_safe_globals``, or without one when ``load_from_checkpoint(...,
    weights_only=False)``, as ``torch.load`` would. Idempotent and thread-safe; the latest call's settings
    (fsspec ``storage_options``, ``hdfs``, ``safe_globals``) apply.
    """
    global _storage, _safe_globals
    from lightning.pytorch.core import saving

    with _lock:
        _storage = StorageConfig(options=dict(storage_options or {}), hdfs=hdfs)
        _safe_globals = list(safe_globals or [])
        if not getattr(saving.pl_load, "_distckpt", False):
            saving.pl_load = _wrap(saving.pl_load)


def _is_ours(url: str) -> bool:
    """Whether ``url`` is a checkpoint directory of this package. Over ``http(s)://`` (no directories: a file
    server's index page at best) that is whether ``<url>/manifest.json`` exists, one HEAD request; a server
    that cannot be asked (no aiohttp, unreachable) leaves the URL to Lightning."""
    if url.startswith(("http://", "https://")):
        try:
            store, path = open_store(url, _storage)
            return store.exists(store.join(path, ondisk.MANIFEST))
        except (OSError, DistCheckpointError):
            return False
    return stock.kind(url, _storage) == "ours"


def _check_module_checkpoint(checkpoint: dict[str, Any], url: str) -> None:
    """What ``load_from_checkpoint`` indexes without a check: a ``state_dict`` mapping, ``hyper_parameters`` a mapping
    when present (else Lightning fails with a bare KeyError or TypeError that names no file)."""
    where = f"{url.rstrip('/')}/{ondisk.STATE}"
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CorruptCheckpointError(f"{where}: holds no 'state_dict' mapping, which load_from_checkpoint needs")
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if key in checkpoint and not isinstance(checkpoint[key], Mapping):
            raise CorruptCheckpointError(f"{where}: {key!r} is a {type(checkpoint[key]).__name__}, not a mapping")


def _wrap(original: Any) -> Any:
    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if isinstance(path_or_url, (str, Path)):
            url = str(path_or_url)
            if _is_ours(url):
                checkpoint = read_checkpoint(url, _storage, stock.safe_globals(_safe_globals),
                                             trusted=stock.trusted(weights_only))
                _check_module_checkpoint(checkpoint, url)
                if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
                    from lightning.fabric.utilities.apply_func import move_data_to_device

                    checkpoint = move_data_to_device(checkpoint, map_location)
                return checkpoint
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    pl_load._distckpt = True  # type: ignore[attr-defined]
    pl_load.__wrapped__ = original  # type: ignore[attr-defined]
    pl_load.__doc__ = original.__doc__
    return pl_load
