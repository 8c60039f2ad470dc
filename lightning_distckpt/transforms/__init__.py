"""Transforms of stored bytes: block codecs (identity, lossless), tensor codecs (bf16, int8 rows, 8-bit maps),
the compression presets that choose them, pruning and quantization for exports, and the codec registry.

Depends on `ondisk` and `parallel` only; no I/O. Names are imported on first use: checking a checkpoint's
codecs (`check_codecs`, from the catalog and the ``distckpt`` command) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "PART", "PRESETS", "BlockCodec", "Codec", "CompressionConfig", "block_codec", "check_codecs",
    "register_block_codec", "register_tensor_codec", "resolve", "tensor_codec",
]  # fmt: skip

_EXPORTS = {
    "PART": "specs", "BlockCodec": "block", "check_codecs": "checks",
    "PRESETS": "compression", "CompressionConfig": "compression", "resolve": "compression",
    "block_codec": "registry", "register_block_codec": "registry", "register_tensor_codec": "registry",
    "tensor_codec": "registry", "Codec": "tensor_codecs",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from lightning_distckpt.transforms.block import BlockCodec
    from lightning_distckpt.transforms.checks import check_codecs
    from lightning_distckpt.transforms.compression import PRESETS, CompressionConfig, resolve
    from lightning_distckpt.transforms.registry import block_codec, register_block_codec, register_tensor_codec, tensor_codec
    from lightning_distckpt.transforms.specs import PART
    from lightning_distckpt.transforms.tensor_codecs import Codec
