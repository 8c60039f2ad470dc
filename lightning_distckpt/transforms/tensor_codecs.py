"""Tensor codecs: how one tensor is stored as one or more *parts* that shard like the tensor itself.

Every codec works row by row (rows = dim 0; a row is everything else, flattened), and every part has the
tensor's number of rows. So the parts of a DTensor/ShardedTensor shard sharded on dim 0 are themselves row
ranges, DCP reshards them like any tensor (save on 2 ranks, load on 3), and a rank decodes only its rows.

Codecs are versioned; a checkpoint names the codec and version of every encoded tensor, and reading an
unknown one is an error (never a guess).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from lightning_distckpt.transforms.specs import PartSpecs, dynamic8_parts, int8_rows_parts

_DECADES = {True: 5, False: 6}  # magnitudes span 10^-decades .. 1
_STEPS = {True: 126, False: 254}  # geometric steps between the smallest and the largest magnitude


@lru_cache(maxsize=None)
def dynamic_map(signed: bool) -> torch.Tensor:
    """A 256-entry non-linear code book on [-1, 1] (signed) or [0, 1] (unsigned), sorted.

    Magnitudes are geometric (constant *relative* spacing) from 1e-5 (signed) / 1e-6 (unsigned) of the
    block's maximum up to 1, plus an exact 0: an optimizer moment of any scale within a block keeps about
    2% (signed) / 1.5% (unsigned) relative precision, which linear 8-bit codes lose for small values (the
    reason bitsandbytes' 8-bit optimizers use a dynamic map).
    """
    if signed:
        mags = torch.logspace(-_DECADES[True], 0, _STEPS[True] + 1, dtype=torch.float64)
        codes = torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags, torch.ones(1, dtype=torch.float64)])
    else:
        mags = torch.logspace(-_DECADES[False], 0, _STEPS[False] + 1, dtype=torch.float64)
        codes = torch.cat([torch.zeros(1, dtype=torch.float64), mags])
    return codes.sort().values.to(torch.float32)


def _code_index(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Index into `dynamic_map()` of the code nearest (in log scale) to every element of ``x``.

    ``x`` is normalized (|x| <= 1). Computed arithmetically (the map is geometric), in a few passes.
    """
    d, n = _DECADES[signed], _STEPS[signed]
    mag = x.abs()
    k = torch.log10(mag.clamp(min=10.0 ** -(d + 1))).add_(d).mul_(n / d).round_().clamp_(0, n)
    if signed:  # [-1 .. -1e-5] (127), 0, [1e-5 .. 1] (127), 1
        tiny = mag < 10.0 ** (-d) / 2
        idx = torch.where(x < 0, n - k, n + 2 + k)
        idx = torch.where(tiny, torch.full_like(idx, n + 1), idx)
    else:  # 0, [1e-6 .. 1] (255); a positive value never maps to 0
        idx = torch.where(mag > 0, k + 1, torch.zeros_like(k))
    return idx.to(torch.uint8)


def _torch_dtypes(specs: PartSpecs) -> dict[str, tuple[list[int], torch.dtype]]:
    return {part: (shape, getattr(torch, dtype)) for part, (shape, dtype) in specs.items()}


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D [rows, row elements] float32 view/copy."""
    return t.reshape(t.shape[0], -1).to(torch.float32)


@dataclass(frozen=True)
class Codec:
    """A tensor codec. ``parts`` names the stored parts (suffixes); ``encode``/``decode`` are row-wise."""

    name: str
    version: int
    parts: tuple[str, ...]

    def part_shapes(self, shape: torch.Size, block: int) -> dict[str, tuple[list[int], torch.dtype]]:
        raise NotImplementedError

    def encode(self, t: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, block: int) -> torch.Tensor:
        raise NotImplementedError


class Int8Rows(Codec):
    """Symmetric int8 per row: ``q = round(x / s)``, ``s = max|row| / 127`` (for weights)."""

    def part_shapes(self, shape, block):
        return _torch_dtypes(int8_rows_parts(shape, block))

    def encode(self, t, block):
        x = rows(t)
        scale = x.abs().amax(dim=1).div_(127.0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"q": q.reshape(t.shape), "scale": scale}

    def decode(self, parts, shape, dtype, block):
        q = parts["q"].reshape(shape[0], -1).to(torch.float32)
        return (q * parts["scale"].to(torch.float32)[:, None]).reshape(shape).to(dtype)


class Dynamic8(Codec):
    """8-bit codes of a non-linear map, per block of ``block`` elements inside a row, scaled by the block's
    absolute maximum. ``sqrt=True`` stores sqrt(x) with the unsigned map (for Adam's ``exp_avg_sq``: never
    linear-quantized, and its square root halves the dynamic range)."""

    def __init__(self, name: str, version: int, signed: bool, sqrt: bool) -> None:
        super().__init__(name, version, ("q", "absmax"))
        object.__setattr__(self, "signed", signed)
        object.__setattr__(self, "sqrt", sqrt)

    def part_shapes(self, shape, block):
        return _torch_dtypes(dynamic8_parts(shape, block))

    def _blocks(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
        r, n = x.shape
        nb = math.ceil(n / block)
        pad = nb * block - n
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(r, nb, block), pad

    def encode(self, t, block):
        x = rows(t)
        if self.sqrt:
            x = x.clamp(min=0).sqrt_()
        b, pad = self._blocks(x, block)
        absmax = b.abs().amax(dim=2)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        q = _code_index(b / safe[..., None], self.signed)  # a positive second moment never becomes 0
        q = q.reshape(x.shape[0], -1)[:, : x.shape[1]] if pad else q.reshape(x.shape)
        return {"q": q.reshape(t.shape), "absmax": absmax}

    def decode(self, parts, shape, dtype, block):
        r = shape[0]
        q = parts["q"].reshape(r, -1)
        n = q.shape[1]
        vals = dynamic_map(self.signed)[q.long()]
        b, _ = self._blocks(vals, block)
        x = (b * parts["absmax"].to(torch.float32)[..., None]).reshape(r, -1)[:, :n]
        if self.sqrt:
            x = x.square()
        return x.reshape(shape).to(dtype)


#: The codecs this package ships (registered in `lightning_distckpt.transforms.registry`).
BUILTIN: tuple[Codec, ...] = (
    Int8Rows("int8-rows", 1, ("q", "scale")),
    Dynamic8("dyn8", 1, signed=True, sqrt=False),
    Dynamic8("dyn8-sqrt", 1, signed=False, sqrt=True),
)
