"""Checkpoint compression: presets, which tensor gets which codec, and the encode/decode passes.

``DistCheckpointIO(compression="int8")`` (or ``"lossless"``, ``"bf16"``, ``None``, or a
`CompressionConfig`). Everything needed to read a compressed checkpoint is inside it: the block
codec is named in every chunk's location, and every encoded tensor's codec, version, dtype and shape are
in ``metadata.json``; loading needs no flag.

Presets:

* ``"lossless"`` -- bit-exact: every stored block is byte-shuffled and zstd-compressed
  (`lossless`; mostly-zero blocks as bitmask + values).
* ``"bf16"`` -- model parameters and optimizer moments (float32/float64) stored as bfloat16, restored to
  their training dtype on load.
* ``"int8"`` -- parameters: int8 per row (symmetric); Adam ``exp_avg``: 8-bit dynamic map per block;
  ``exp_avg_sq``: 8-bit unsigned dynamic map of its square root (never linear).

Always exact: 1-D tensors, tensors under ``min_elements`` elements, step counters, buffers (BatchNorm
statistics), and everything that is not model or optimizer state (loops, schedulers, RNG, callbacks).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk.metadata import dtype_name
from lightning_distckpt.parallel.pieces import Piece, pieces
from lightning_distckpt.transforms.block import BlockCodec
from lightning_distckpt.transforms.lossless import ShuffleZstd
from lightning_distckpt.transforms.checks import check_codecs
from lightning_distckpt.transforms.registry import block_codec, tensor_codec
from lightning_distckpt.transforms.specs import BF16, PART
from lightning_distckpt.transforms.tensor_codecs import BUILTIN

__all__ = ["CompressionConfig", "PRESETS", "resolve", "check_codecs"]

PRESETS = ("lossless", "bf16", "int8")
_FLOAT = (torch.float32, torch.float64)
_MOMENTS_SIGNED = ("exp_avg", "momentum_buffer")
_MOMENTS_SQUARED = ("exp_avg_sq", "max_exp_avg_sq")


@dataclass(kw_only=True)
class CompressionConfig:
    """Which compression a checkpoint gets.

    Args:
        preset: ``"lossless"``, ``"bf16"``, ``"int8"`` or ``None`` (no lossy codec).
        lossless: Byte-shuffle + zstd every stored block (default: only for the ``"lossless"`` preset).
        weights: Apply the preset's lossy codec to model parameters.
        moments: Apply it to optimizer moments (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``).
        min_elements: Tensors with fewer elements (and all 1-D tensors) are stored exactly.
        block_size: Elements per quantization block of the 8-bit moment codecs (blocks never cross rows).
        exact_every: Every K-th save of a run is stored without the lossy codec (0: never), so a long
            run always has a recent exact checkpoint.
        zstd_level: zstd level of the lossless block codec.
        block_codec: Name of a registered block codec (`register_block_codec()`)
            for every stored block, instead of the built-in lossless one.
    """

    preset: Literal["lossless", "bf16", "int8"] | None = None
    lossless: bool | None = None
    weights: bool = True
    moments: bool = True
    min_elements: int = 4096
    block_size: int = 256
    exact_every: int = 0
    zstd_level: int = 1
    block_codec: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"compression={self.preset!r}: choose one of {', '.join(PRESETS)} or None")
        if self.block_size < 1 or self.min_elements < 0 or self.exact_every < 0:
            raise ValueError("CompressionConfig: block_size >= 1, min_elements >= 0, exact_every >= 0")

    @property
    def uses_block_codec(self) -> bool:
        return bool(self.block_codec) or (self.lossless if self.lossless is not None else self.preset == "lossless")

    def make_block_codec(self) -> BlockCodec | None:
        """The block codec every stored block goes through (None: raw blocks)."""
        if self.block_codec:
            return block_codec(self.block_codec)
        return ShuffleZstd(self.zstd_level) if self.uses_block_codec else None

    def exact(self) -> CompressionConfig:
        """The same configuration without lossy codecs (for ``exact_every`` saves)."""
        return dataclasses.replace(self, preset="lossless" if self.uses_block_codec else None)

    def tensor_codecs(self) -> dict[str, int]:
        """The tensor codecs (name: version) this configuration may apply; none for exact presets."""
        if self.preset == "bf16":
            return {BF16: 1}
        if self.preset == "int8":
            return {c.name: c.version for c in BUILTIN}
        return {}

    def descriptor(self) -> dict[str, Any] | None:
        """What the manifest records (informational; reading relies on metadata.json)."""
        if self.preset is None and not self.uses_block_codec:
            return None
        return {"preset": self.preset, "block_codec": (self.block_codec or ShuffleZstd.name) if self.uses_block_codec else None,
                "tensor_codecs": self.tensor_codecs(), "min_elements": self.min_elements,
                "block_size": self.block_size}  # fmt: skip


def resolve(compression: str | CompressionConfig | None) -> CompressionConfig:
    if isinstance(compression, CompressionConfig):
        return compression
    if compression is None or compression in ("none", "None", ""):
        return CompressionConfig()
    return CompressionConfig(preset=compression)  # validates the name


# ---- which codec for which tensor --------------------------------------------------------------
def _rows_shardable(value: Any) -> bool:
    """True when every piece of ``value`` holds whole rows (sharded on dim 0 at most), on every rank."""
    if isinstance(value, DTensor):
        return all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in value.placements)
    if isinstance(value, ShardedTensor):
        return getattr(value.sharding_spec(), "dim", None) in (0, None)
    return isinstance(value, (torch.Tensor, list))


def choose(key: str, value: Any, config: CompressionConfig, params: set[str] | None) -> str | None:
    """The codec for state key ``key`` under ``config`` (None: exact). Same answer on every rank.

    ``params``: keys of model parameters (buffers stay exact); ``None`` treats every model tensor as one.
    """
    if config.preset in (None, "lossless"):
        return None
    ps = pieces(value)
    dtype, shape = ps[0].local.dtype, ps[0].global_size
    if dtype not in _FLOAT or len(shape) < 2 or shape.numel() < config.min_elements or not _rows_shardable(value):
        return None
    kind = None
    if key.startswith("model/") and config.weights and (params is None or key in params):
        kind = "weight"
    elif key.startswith("optim/") and config.moments:
        name = key.rsplit("/", 1)[-1]
        kind = "signed" if name in _MOMENTS_SIGNED else "squared" if name in _MOMENTS_SQUARED else None
    if kind is None:
        return None
    if config.preset == "bf16":
        return BF16
    return {"weight": "int8-rows", "signed": "dyn8", "squared": "dyn8-sqrt"}[kind]


# ---- encode (save) -----------------------------------------------------------------------------
class _Encoded:
    """The parts of one piece under a tensor codec, encoded on first use (by whichever writer thread asks first,
    so encoding overlaps with writing other tensors) and kept until the save ends. Thread-safe."""

    def __init__(self, codec: Any, src: torch.Tensor, block: int) -> None:
        self._codec, self._src, self._block = codec, src, block
        self._parts: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def part(self, name: str) -> torch.Tensor:
        with self._lock:
            if self._parts is None:
                self._parts = self._codec.encode(self._src, self._block)
                self._src = None
            return self._parts[name]


def encode(tensors: dict[str, Any], config: CompressionConfig, params: set[str] | None,
           lazy: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace tensors chosen for a lossy codec by their parts (as pieces); return them and the encodings.

    ``lazy``: the tensor-codec parts are pieces with a ``source`` that encodes on first use (the writer's
    threads then encode while other bytes are written); otherwise everything is encoded now.
    """
    out: dict[str, Any] = {}
    encodings: dict[str, Any] = {}
    for key, value in tensors.items():
        codec = choose(key, value, config, params)
        if codec is None:
            out[key] = value
            continue
        ps = pieces(value)
        entry = {"codec": codec, "version": 1, "dtype": dtype_name(ps[0].local.dtype), "size": list(ps[0].global_size)}
        if codec == BF16:
            out[key] = [Piece(p.local.detach().to(torch.bfloat16), p.offsets, p.global_size) for p in ps]
        else:
            c = _codec(codec)
            entry.update(version=c.version, block=config.block_size)
            shapes = c.part_shapes(ps[0].global_size, config.block_size)
            for p in ps:
                lazy_parts = _Encoded(c, p.local.detach(), config.block_size) if lazy else None
                parts = {} if lazy else c.encode(p.local.detach(), config.block_size)
                for part, (gsize, dtype) in shapes.items():
                    gshape = torch.Size(gsize)
                    offsets = torch.Size([p.offsets[0]] + [0] * (len(gshape) - 1))
                    if lazy_parts is None:
                        piece = Piece(parts[part], offsets, gshape)
                    else:
                        rows = p.local.shape[0] if p.local.dim() else 1
                        meta = torch.empty([rows, *gshape[1:]], dtype=dtype, device="meta")
                        piece = Piece(meta, offsets, gshape, source=functools.partial(lazy_parts.part, part))
                    out.setdefault(f"{key}{PART}{part}", []).append(piece)
        encodings[key] = entry
    return out, encodings


# ---- decode (load) -----------------------------------------------------------------------------
def decode_plan(encodings: dict[str, Any], targets: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
    """Targets to read (parts replace encoded tensors) and a function that decodes them into ``targets``.

    Each target piece gets part buffers covering its rows (all columns); decoding writes the piece's
    columns back into it, so any placement of the target works.
    """
    read: dict[str, Any] = {}
    jobs: list[tuple[Piece, dict[str, torch.Tensor], dict[str, Any]]] = []
    for key, target in targets.items():
        e = encodings.get(key)
        if e is None or e["codec"] == BF16:
            read[key] = target  # bf16: copying into the target restores its dtype
            continue
        c = _codec(e["codec"])
        shapes = c.part_shapes(torch.Size(e["size"]), e["block"])
        for p in pieces(target):
            n = p.local.shape[0] if p.local.dim() else 1
            bufs = {}
            for part, (gshape, dtype) in shapes.items():
                bufs[part] = torch.empty([n, *gshape[1:]], dtype=dtype)
                offsets = torch.Size([p.offsets[0]] + [0] * (len(gshape) - 1))
                read.setdefault(f"{key}{PART}{part}", []).append(Piece(bufs[part], offsets, torch.Size(gshape)))
            jobs.append((p, bufs, e))

    def finish() -> None:
        for p, bufs, e in jobs:
            c = _codec(e["codec"])
            shape = torch.Size([p.local.shape[0], *e["size"][1:]])
            if getattr(c, "decodes_into", False) and p.local.shape == shape:  # decode straight into the target
                full = c.decode(bufs, shape, p.local.dtype, e["block"], out=p.local)
                if full.data_ptr() == p.local.data_ptr():
                    continue
            else:
                full = c.decode(bufs, shape, p.local.dtype, e["block"])
            for d in range(1, full.dim()):
                full = full.narrow(d, p.offsets[d], p.local.shape[d])
            _copy(p.local, full)

    return read, finish


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; between CPU tensors of one dtype as a numpy copy (no intra-op thread team to wake
    for one memory copy, which costs seconds on an oversubscribed machine)."""
    if (dst.device.type == src.device.type == "cpu" and dst.dtype == src.dtype and dst.dtype in _NUMPY
            and not dst.requires_grad and dst.shape == src.shape):
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


_NUMPY = (torch.float32, torch.float64, torch.float16, torch.int8, torch.uint8, torch.int32, torch.int64)


def _codec(name: str) -> Any:
    c = tensor_codec(name)
    if c is None:
        raise CorruptCheckpointError(f"tensor codec {name!r} is not known to this lightning-distckpt")
    return c
