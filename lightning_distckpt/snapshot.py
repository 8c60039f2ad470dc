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

from lightning_distckpt.planner import Piece, pieces


class Snapshotter:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def take(self, tensors: dict[str, Any]) -> dict[str, list[Piece]]:
        out: dict[str, list[Piece]] = {}
        used = set()
        cuda = False
        for key, value in tensors.items():
            snap = []
            for i, p in enumerate(pieces(value)):
                buf = self._buffer((key, i), p.local)
                buf.copy_(p.local.detach(), non_blocking=p.local.is_cuda)
                cuda |= p.local.is_cuda
                used.add((key, i))
                snap.append(Piece(buf, p.offsets, p.global_size))
            out[key] = snap
        if cuda:
            torch.cuda.synchronize()
        for stale in set(self._buffers) - used:  # state that disappeared (e.g. a removed parameter)
            del self._buffers[stale]
        return out

    def _buffer(self, key: tuple[str, int], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            pin = like.is_cuda and torch.cuda.is_available()
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf
