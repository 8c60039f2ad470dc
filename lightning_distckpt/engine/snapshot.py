"""Host-memory snapshots of a rank's tensors for asynchronous saves, in buffers reused across saves.

``Snapshotter.take`` copies every local piece into a host buffer (pinned when the source is on a GPU,
copied with ``non_blocking`` and synchronized once) and returns pieces that the background writer can
use while training mutates the originals. Buffers are kept per (key, piece) and reused as long as
shape and dtype stay the same, so host memory stays flat over many saves. Not thread-safe: call from the
training thread only, and only after the previous save that used the buffers has finished.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_distckpt.parallel.pieces import DEFAULT_CHUNK_BYTES, Piece, pieces, split_rows


class Snapshotter:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, Any], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def take(self, tensors: dict[str, Any], owned: tuple[set[str], set[tuple[str, tuple[int, ...]]]] | None = None,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, list[Piece]]:
        """Copy ``tensors`` into host buffers; returns pieces backed by those buffers.

        ``owned``: (the keys this rank held, the chunks (key, offsets) it wrote) in the previous save of
        the same structure (from the plan cache). Of a key held then, only the chunks it wrote are copied:
        a rank never writes the chunks of a replicated tensor that another rank writes, so it need not
        snapshot them. A new key is copied whole.
        """
        out: dict[str, list[Piece]] = {}
        used = set()
        cuda = False
        owned_keys, owned = owned if owned else (set(), set())
        for key, value in tensors.items():
            snap = []
            for i, p in enumerate(pieces(value)):
                parts = ([(tuple(o), Piece(v, o, p.global_size)) for o, _, v in split_rows(p, chunk_bytes)
                          if (key, tuple(o)) in owned]  # type: ignore[operator]
                         if key in owned_keys else [(i, p)])  # fmt: skip
                for tag, part in parts:
                    buf = self._buffer((key, tag), part.local)
                    buf.copy_(part.local.detach(), non_blocking=part.local.is_cuda)
                    cuda |= part.local.is_cuda
                    used.add((key, tag))
                    snap.append(Piece(buf, part.offsets, part.global_size))
            out[key] = snap
        if cuda:
            torch.cuda.synchronize()
        for stale in set(self._buffers) - used:  # state that disappeared (e.g. a removed parameter)
            del self._buffers[stale]
        return out

    def _buffer(self, key: tuple[str, Any], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            pin = like.is_cuda and torch.cuda.is_available()
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf
