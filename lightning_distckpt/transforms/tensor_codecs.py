"""Tensor codecs: how one tensor is stored as one or more *parts* that shard like the tensor itself.

Every codec works row by row (rows = dim 0; a row is everything else, flattened), and every part has the
tensor's number of rows. So the parts of a DTensor/ShardedTensor shard sharded on dim 0 are themselves row
ranges, DCP reshards them like any tensor (save on 2 ranks, load on 3), and a rank decodes only its rows.

Codecs are versioned; a checkpoint names the codec and version of every encoded tensor, and reading an
unknown one is an error (never a guess).

Speed: CPU tensors go through vectorised numpy kernels over cache-sized chunks on a few threads
(:mod:`~lightning_distckpt.transforms.vector`); other devices use the torch formulation
(``encode_torch``/``decode_torch``, also the reference the tests compare with). Both write the same
format: ``int8-rows`` gives identical bytes; the ``dyn8`` codes of the fast path come from a table over the
upper 16 bits of each normalized value (nearest code in log scale, with decision boundaries on a grid of
2^-7 relative width), so a value within 0.4% of the midpoint between two codes may get the other one.
Decoding is the same arithmetic on both paths, so every version-1 checkpoint decodes identically.
Thread safety: every codec is stateless; call from any thread.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lightning_distckpt.transforms.specs import PartSpecs, dynamic8_parts, int8_rows_parts
from lightning_distckpt.transforms.vector import CHUNK_ELEMENTS, map_chunks

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


_LITTLE = sys.byteorder == "little"


def _upper16(y: np.ndarray) -> np.ndarray:
    """The upper 16 bits (sign, exponent, 7 mantissa bits) of every float32 of ``y`` (a view, no copy)."""
    u = y.view(np.uint16)
    return u[..., 1::2] if _LITTLE else u[..., 0::2]


#: unsigned codes read ``y * 2**64``: a positive value, however small, then has a non-zero upper half,
#: so only an exact zero gets code 0 (a positive second moment never becomes zero)
_LIFT = np.float32(2.0**64)


@lru_cache(maxsize=None)
def code_table(signed: bool, sqrt: bool) -> np.ndarray:
    """65,536 codes, one per value of a normalized float32's upper 16 bits: the :func:`_code_index` of the
    middle of that bucket (of its square root for ``sqrt``: the table then reads ``x / max x`` directly).
    Unsigned tables are indexed by ``y * 2**64`` (see ``_LIFT``)."""
    h = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(all="ignore"):  # NaN patterns stay NaN
        mid = torch.from_numpy(((h << 16) | 0x8000).view(np.float32).astype(np.float64))
    if not signed:
        mid = mid.clamp(min=0) * 2.0**-64  # negative values (and -0.0) get code 0, as clamp(min=0) does
    x = (mid.sqrt() if sqrt else mid).to(torch.float32)
    with np.errstate(all="ignore"):
        table = _code_index(x, signed).numpy().copy()
    if not signed:
        table[[0, 0x8000]] = 0  # exact zeros
    return table


def _as_rows_np(t: torch.Tensor) -> np.ndarray:
    """``t`` on the CPU as a C-contiguous 2-D float32 numpy array (a view when it already is one)."""
    x = t.detach().reshape(t.shape[0], -1)
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    return x.numpy()


def _out(out: torch.Tensor | None, r: int, n: int) -> np.ndarray:
    """Where a fast decode writes: ``out`` (a contiguous CPU float32 tensor of r x n elements, e.g. the tensor
    being restored: no extra copy, no fresh pages) or a new array."""
    if out is not None and out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous() \
            and out.numel() == r * n and not out.requires_grad:
        return out.detach().numpy().reshape(r, n)
    return np.empty((r, n), np.float32)


def _fast(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and not t.requires_grad for t in ts) and all(t.dim() >= 1 and t.shape[0] for t in ts)


@dataclass(frozen=True)
class Codec:
    """A tensor codec. ``parts`` names the stored parts (suffixes); ``encode``/``decode`` are row-wise.

    A codec whose ``decode`` accepts ``out=`` (a float32 CPU tensor of the decoded shape to write into, which
    it may ignore) sets ``decodes_into = True``; loading then passes the restored tensor itself.
    """

    decodes_into = False

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

    decodes_into = True

    def part_shapes(self, shape, block):
        return _torch_dtypes(int8_rows_parts(shape, block))

    def encode(self, t, block):
        if not _fast(t) or t.numel() == 0:
            return self.encode_torch(t, block)
        x = _as_rows_np(t)
        r, n = x.shape
        q = np.empty((r, n), np.int8)
        scale = np.empty(r, np.float32)

        def work(lo: int, hi: int) -> None:
            xs = x[lo:hi]
            s = np.abs(xs).max(axis=1)
            s /= np.float32(127.0)
            scale[lo:hi] = s
            y = xs / np.where(s > 0, s, np.float32(1.0))[:, None]
            np.rint(y, out=y)
            np.clip(y, -127, 127, out=y)
            q[lo:hi] = y  # float32 -> int8 (values are integers in [-127, 127])

        with np.errstate(invalid="ignore"):
            map_chunks(work, r, CHUNK_ELEMENTS // max(1, n))
        return {"q": torch.from_numpy(q).reshape(t.shape), "scale": torch.from_numpy(scale)}

    def encode_torch(self, t, block):
        x = rows(t)
        scale = x.abs().amax(dim=1).div_(127.0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"q": q.reshape(t.shape), "scale": scale}

    def decode(self, parts, shape, dtype, block, out=None):
        qt, st = parts["q"], parts["scale"]
        if not _fast(qt, st) or qt.numel() == 0:
            return self.decode_torch(parts, shape, dtype, block)
        q = qt.reshape(shape[0], -1).contiguous().numpy()
        s = st.to(torch.float32).contiguous().numpy()
        r, n = q.shape
        out = _out(out, r, n)

        def work(lo: int, hi: int) -> None:
            o = out[lo:hi]
            np.copyto(o, q[lo:hi], casting="unsafe")  # int8 -> float32, exact
            o *= s[lo:hi, None]

        map_chunks(work, r, CHUNK_ELEMENTS // max(1, n))
        return torch.from_numpy(out).reshape(shape).to(dtype)

    def decode_torch(self, parts, shape, dtype, block):
        q = parts["q"].reshape(shape[0], -1).to(torch.float32)
        return (q * parts["scale"].to(torch.float32)[:, None]).reshape(shape).to(dtype)


class Dynamic8(Codec):
    """8-bit codes of a non-linear map, per block of ``block`` elements inside a row, scaled by the block's
    absolute maximum. ``sqrt=True`` stores sqrt(x) with the unsigned map (for Adam's ``exp_avg_sq``: never
    linear-quantized, and its square root halves the dynamic range)."""

    decodes_into = True

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

    @staticmethod
    def _parts(a: np.ndarray, nf: int, block: int) -> list[tuple[np.ndarray, slice]]:
        """Rows of ``a`` (k, n) as blocks: the ``nf`` whole blocks as a (k, nf, block) view and, if the row does
        not end on a block boundary, the shorter last block as a (k, 1, rest) view; with their block columns."""
        k, n = a.shape
        out = []
        if nf:
            out.append((a[:, : nf * block].reshape(k, nf, block), slice(0, nf)))
        if nf * block < n:
            out.append((a[:, nf * block :].reshape(k, 1, n - nf * block), slice(nf, nf + 1)))
        return out

    def encode(self, t, block):
        if not _fast(t) or t.numel() == 0:
            return self.encode_torch(t, block)
        x = _as_rows_np(t)
        r, n = x.shape
        nb, nf = math.ceil(n / block), n // block
        q = np.empty((r, n), np.uint8)
        absmax = np.empty((r, nb), np.float32)
        table = code_table(self.signed, self.sqrt)
        one = np.float32(1.0)

        def work(lo: int, hi: int) -> None:
            for (bs, cols), (qv, _) in zip(self._parts(x[lo:hi], nf, block), self._parts(q[lo:hi], nf, block)):
                if self.sqrt:  # codes of sqrt(x) / max sqrt(x) == sqrt(x / max x): the table takes the square root
                    m = np.maximum(bs.max(axis=2), np.float32(0.0))
                    absmax[lo:hi, cols] = np.sqrt(m)
                else:
                    m = np.abs(bs).max(axis=2)
                    absmax[lo:hi, cols] = m
                y = bs / np.where(m > 0, m, one)[..., None]
                if not self.signed:
                    y *= _LIFT
                qv[...] = np.take(table, _upper16(y), mode="clip")

        with np.errstate(invalid="ignore"):
            map_chunks(work, r, CHUNK_ELEMENTS // max(1, n))
        return {"q": torch.from_numpy(q).reshape(t.shape), "absmax": torch.from_numpy(absmax)}

    def encode_torch(self, t, block):
        x = rows(t)
        if self.sqrt:
            x = x.clamp(min=0).sqrt_()
        b, pad = self._blocks(x, block)
        absmax = b.abs().amax(dim=2)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        q = _code_index(b / safe[..., None], self.signed)  # a positive second moment never becomes 0
        q = q.reshape(x.shape[0], -1)[:, : x.shape[1]] if pad else q.reshape(x.shape)
        return {"q": q.reshape(t.shape), "absmax": absmax}

    def decode(self, parts, shape, dtype, block, out=None):
        qt, at = parts["q"], parts["absmax"]
        if not _fast(qt, at) or qt.numel() == 0:
            return self.decode_torch(parts, shape, dtype, block)
        r = shape[0]
        q = qt.reshape(r, -1).contiguous().numpy()
        n = q.shape[1]
        nb, nf = math.ceil(n / block), n // block
        a = at.to(torch.float32).reshape(r, nb).contiguous().numpy()
        out = _out(out, r, n)
        table = dynamic_map(self.signed).numpy()

        def work(lo: int, hi: int) -> None:
            for (qs, cols), (o, _) in zip(self._parts(q[lo:hi], nf, block), self._parts(out[lo:hi], nf, block)):
                v = np.take(table, qs, mode="clip")
                v *= a[lo:hi, cols, None]
                if self.sqrt:
                    v *= v
                o[...] = v

        map_chunks(work, r, CHUNK_ELEMENTS // max(1, n))
        return torch.from_numpy(out).reshape(shape).to(dtype)

    def decode_torch(self, parts, shape, dtype, block):
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
