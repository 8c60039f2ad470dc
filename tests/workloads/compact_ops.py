"""Compact metadata under torchrun, below Lightning: ``python -m torch.distributed.run --nproc_per_node=N
compact_ops.py ROOT``. Each rank holds, of every tensor, either all of it or pieces; three saves with
``compact=True``:

* ``regular``: FSDP2-like row shards by the torch.chunk rule (uneven last piece and an empty trailing piece
  included) plus tensors every rank holds whole: the compact form (version 3);
* ``mixed``: the same, except that the last rank holds its rows of one tensor as two pieces (regular on the other
  ranks only): planned again with items, listed (version 1);
* ``irregular``: every rank's rows cut off the rule: listed at once (version 1).

After each save every rank loads its own rows back and rank 0 loads everything; prints ``COMPACT OK``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from lightning_distckpt import ondisk
from lightning_distckpt.engine.saving import WriteOptions, write_checkpoint
from lightning_distckpt.parallel.comm import SOLO, Comm
from lightning_distckpt.parallel.pieces import Piece
from lightning_distckpt.parallel.regular import torch_chunk_piece


def full_state(world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(10, 6, generator=g),  # 10 rows over the ranks: uneven pieces
        "few": torch.randn(world - 1 if world > 2 else 1, 3, generator=g),  # fewer rows than ranks: empty pieces
        "step": torch.tensor(7.0),  # a scalar every rank holds
        "bias": torch.randn(5, generator=g),  # held whole by every rank
    }


def rank_state(full: dict[str, torch.Tensor], rank: int, world: int, mode: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, t in full.items():
        if key in ("step", "bias"):
            out[key] = t.clone()
            continue
        lo, n = torch_chunk_piece(t.shape[0], world, rank)
        if mode == "irregular":  # rank r holds rows [r, r+1) and the last rank the rest: not the torch.chunk rule
            lo, n = (rank, 1) if rank < world - 1 else (world - 1, t.shape[0] - world + 1)
        rows = t[lo : lo + n].clone()
        if mode == "mixed" and key == "w" and rank == world - 1 and n > 1:
            out[key] = [Piece(rows[:1], torch.Size([lo, 0]), t.shape), Piece(rows[1:], torch.Size([lo + 1, 0]), t.shape)]
        else:
            out[key] = [Piece(rows, torch.Size([lo] + [0] * (t.dim() - 1)), t.shape)]
    return out


def main(root: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = Comm(dist.new_group(backend="gloo"))
    full = full_state(world)
    from lightning_distckpt import load_checkpoint
    from lightning_distckpt.catalog import open_checkpoint, source_of
    from lightning_distckpt.engine.loading import read_tensors

    for mode, version in (("regular", ondisk.LAYOUT_VERSION), ("mixed", 1), ("irregular", 1)):
        url = os.path.join(root, mode)
        tensors = rank_state(full, rank, world, mode)
        manifest = ondisk.Manifest(name="", created=0.0, world_size=world, global_step=1)
        write_checkpoint(url, {"note": mode}, tensors, manifest, WriteOptions(chunk_bytes=48), comm, compact=True)
        doc = json.load(open(os.path.join(url, ondisk.METADATA)))
        assert doc["version"] == version, (mode, doc["version"])
        # every rank reads its own rows back, in one collective load
        ckpt = open_checkpoint(source_of(url))
        targets: dict[str, object] = {}
        for key, t in full.items():
            if key in ("step", "bias"):
                targets[key] = torch.zeros_like(t)
            else:
                lo, n = torch_chunk_piece(t.shape[0], world, rank)
                targets[key] = [Piece(torch.zeros(n, *t.shape[1:]), torch.Size([lo] + [0] * (t.dim() - 1)), t.shape)]
        read_tensors(ckpt, targets, comm=comm)
        for key, t in full.items():
            got = targets[key] if isinstance(targets[key], torch.Tensor) else targets[key][0].local
            lo, n = torch_chunk_piece(t.shape[0], world, rank) if t.dim() and key != "bias" else (0, None)
            want = t if n is None else t[lo : lo + n]
            assert torch.equal(got, want), (mode, rank, key)
        if rank == 0:  # one process, every tensor whole
            whole = {k: torch.full_like(v, float("nan")) for k, v in full.items()}
            read_tensors(open_checkpoint(source_of(url)), whole, comm=SOLO)
            assert all(torch.equal(whole[k], v) for k, v in full.items()), mode
            assert load_checkpoint(url) == {"note": mode}
        dist.barrier()
    if rank == 0:  # the mixed save's first planning round left nothing behind
        assert sorted(os.listdir(root)) == ["irregular", "mixed", "regular"], os.listdir(root)
        print("COMPACT OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
