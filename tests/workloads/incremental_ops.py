"""Incremental saves in their own process, for the crash-point tests (``DISTCKPT_CRASH_AT`` names where it dies):

    python incremental_ops.py chain ROOT FIRST LAST KEEP   incremental saves of steps FIRST..LAST as ROOT/step-NNN, each
                                                           followed by retention: all but the KEEP newest are removed

The checkpoint of a step is `sample()`: a frozen "backbone" (the same bytes at every step), a "head" that changes at
every step and an "emb" table of four parts of which one changes every third step, so that every save borrows most of
its bytes from earlier saves.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from lightning_distckpt import DistCheckpointIO, catalog  # noqa: E402


def sample(step: int) -> dict:
    g = torch.Generator().manual_seed(0)
    backbone = {f"backbone.{i}": torch.randn(256, 256, generator=g) for i in range(3)}
    emb = {f"emb.{k}": torch.randn(256, 64, generator=g) + (step // 3 if k == (step // 3) % 4 else 0) for k in range(4)}
    head = torch.full((64, 64), float(step))
    return {"state_dict": {**backbone, **emb, "head": head}, "global_step": step, "note": ("step", step)}


def name(step: int) -> str:
    return f"step-{step:03d}"


def chain(root: str, first: int, last: int, keep: int) -> None:
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    for step in range(first, last + 1):
        io.save_checkpoint(sample(step), os.path.join(root, name(step)))
        committed = catalog.committed(root)
        for c in committed[: max(0, len(committed) - keep)]:
            io.remove_checkpoint(c.url)
        print(step, io.stats.last_save.bytes_written, io.stats.last_save.bytes_borrowed, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "chain":
        chain(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown operation {sys.argv[1]}")
