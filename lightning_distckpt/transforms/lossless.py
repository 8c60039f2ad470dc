"""The lossless block codec: byte shuffle + zstd, with a bitmask + values form for mostly-zero blocks.

Byte shuffling splits a block into byte planes (the k-th byte of every element): the planes that hold
exponents compress, the mantissa planes do not and are kept raw (zstd gives up on them quickly, so this
costs little). A block whose elements are at least half zeros is stored as a bitmask of the non-zero
elements plus those elements (packed the same way). Each block starts with one byte naming its form and
the element size, so decoding needs nothing else. Thread-safe (one zstd context per thread).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.transforms.block import BlockCodec

_DENSE, _SPARSE, _RAW = 0, 1, 2


class ShuffleZstd(BlockCodec):
    name = "shuffle-zstd-1"

    def __init__(self, level: int = 1) -> None:
        self.level = level
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"level": self.level}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:  # noqa: D102
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def _pack(self, data: np.ndarray, itemsize: int) -> bytes:
        """Byte planes of ``data`` (elements of ``itemsize`` bytes), each zstd'ed or kept raw if that is smaller."""
        planes = np.ascontiguousarray(data.reshape(-1, itemsize).T) if itemsize > 1 else data.reshape(1, -1)
        out = []
        for plane in planes:
            raw = memoryview(plane)
            z = self._cctx().compress(raw)
            keep, flag = (z, 1) if len(z) < len(raw) * 0.98 else (raw.tobytes(), 0)
            out.append(bytes([flag]) + len(keep).to_bytes(4, "little") + keep)
        return b"".join(out)

    def _unpack(self, data: memoryview, itemsize: int, nbytes: int) -> np.ndarray:
        plane_len = nbytes // itemsize
        planes = np.empty((itemsize, plane_len), np.uint8)
        pos = 0
        for i in range(itemsize):
            if pos + 5 > len(data):
                raise CorruptCheckpointError("compressed block is truncated")
            flag, n = data[pos], int.from_bytes(data[pos + 1 : pos + 5], "little")
            body = data[pos + 5 : pos + 5 + n]
            pos += 5 + n
            try:
                plane = self._dctx().decompress(bytes(body), max_output_size=plane_len) if flag else bytes(body)
            except zstandard.ZstdError as e:
                raise CorruptCheckpointError(f"compressed block does not decompress: {e}") from None
            if len(plane) != plane_len:
                raise CorruptCheckpointError("compressed block decodes to the wrong size")
            planes[i] = np.frombuffer(plane, np.uint8)
        return planes.T.reshape(-1) if itemsize > 1 else planes.reshape(-1)

    def encode(self, raw: memoryview, itemsize: int = 1) -> bytes:
        a = np.frombuffer(raw, np.uint8)
        if itemsize < 1 or itemsize > 8 or len(a) % itemsize:
            itemsize = 1
        if itemsize in (1, 2, 4, 8):
            nonzero = np.frombuffer(raw, f"u{itemsize}") != 0
        else:
            nonzero = a.reshape(-1, itemsize).any(axis=1)
        n = len(nonzero)
        nnz = int(np.count_nonzero(nonzero))
        if n and nnz * 2 <= n:
            mask = np.packbits(nonzero)
            values = a.reshape(-1, itemsize)[nonzero].reshape(-1)
            body = nnz.to_bytes(8, "little") + self._cctx().compress(mask.tobytes())
            body = len(body).to_bytes(4, "little") + body + self._pack(values, itemsize)
            form = _SPARSE
        else:
            body, form = self._pack(a, itemsize), _DENSE
        if len(body) >= len(a):  # incompressible: keep it raw
            body, form = a.tobytes(), _RAW
        return bytes([form << 4 | itemsize]) + body

    def decode(self, stored: memoryview, raw_len: int) -> bytes:
        if len(stored) < 1:
            raise CorruptCheckpointError("empty compressed block")
        stored = memoryview(stored).cast("B")
        form, itemsize = stored[0] >> 4, stored[0] & 0x0F
        body = stored[1:]
        if form == _RAW:
            return bytes(body)
        if itemsize < 1 or raw_len % itemsize:
            raise CorruptCheckpointError(f"compressed block: bad element size {itemsize} for {raw_len} bytes")
        if form == _DENSE:
            return self._unpack(body, itemsize, raw_len).tobytes()
        n = raw_len // itemsize
        head = int.from_bytes(body[:4], "little")
        nvalues = int.from_bytes(body[4:12], "little")
        try:
            mask = self._dctx().decompress(bytes(body[12 : 4 + head]), max_output_size=(n + 7) // 8)
        except zstandard.ZstdError as e:
            raise CorruptCheckpointError(f"compressed block does not decompress: {e}") from None
        nonzero = np.unpackbits(np.frombuffer(mask, np.uint8))[:n].astype(bool)
        if nvalues != int(nonzero.sum()) or nvalues > n:
            raise CorruptCheckpointError("sparse block: mask and values disagree")
        values = self._unpack(body[4 + head :], itemsize, nvalues * itemsize).reshape(-1, itemsize)
        out = np.zeros((n, itemsize), np.uint8)
        out[nonzero] = values
        return out.tobytes()
