"""A stock Lightning checkpoint (one ``torch.save`` file) read with ``torch.load``, its failures as the package's errors.

Used by the plugin's load of stock files, `lightning_distckpt.ops.importing` and ``distckpt import``. Thread-safe;
what ``weights_only`` allows is torch's rule (``torch.serialization.add_safe_globals`` is honoured).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from lightning_distckpt.errors import CorruptCheckpointError, UnsafeCheckpointError


def torch_load(url: str, data: bytes, weights_only: bool | None, map_location: Any = "cpu") -> Any:
    """``torch.load`` of the bytes of file ``url``, its failures as this package's errors naming the file: a class
    that ``weights_only`` refuses is an `UnsafeCheckpointError` (nothing of it ran); bytes that are no readable
    ``torch.save`` file (truncated, garbage) a `CorruptCheckpointError`."""
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in first.lower() or "weights_only" in first:
            raise UnsafeCheckpointError(
                f"{url}: holds objects that torch.load refuses to unpickle in its weights_only mode ({first}); "
                "nothing of them ran. If you trust this file, load it with weights_only=False (`distckpt import "
                "--trust`) or allow its classes with torch.serialization.add_safe_globals") from e  # fmt: skip
        raise CorruptCheckpointError(f"{url}: not a readable torch.save file ({first})") from e
    except Exception as e:  # noqa: BLE001 - torch.load fails on bad bytes with many types (RuntimeError, IndexError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptCheckpointError(f"{url}: not a readable torch.save file ({type(e).__name__}: {first})") from e
