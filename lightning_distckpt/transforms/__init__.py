"""Transforms of stored bytes: block codecs (identity, lossless), tensor codecs (bf16, int8 rows, 8-bit maps),
the compression presets that choose them, pruning and quantization for exports, and the codec registry.

Depends on `ondisk` and `parallel` only; no I/O.
"""

from lightning_distckpt.transforms.block import BlockCodec
from lightning_distckpt.transforms.compression import PART, PRESETS, CompressionConfig, check_codecs, resolve
from lightning_distckpt.transforms.registry import (
    block_codec,
    register_block_codec,
    register_tensor_codec,
    tensor_codec,
)
from lightning_distckpt.transforms.tensor_codecs import Codec

__all__ = [
    "PART", "PRESETS", "BlockCodec", "Codec", "CompressionConfig", "block_codec", "check_codecs",
    "register_block_codec", "register_tensor_codec", "resolve", "tensor_codec",
]  # fmt: skip
