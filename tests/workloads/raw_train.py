"""A Lightning-free 2-rank training loop over the package's core (save, load, catalog, replication).

Used by the torture test: it starts in ~half the time of a Lightning job, so 30+ kill/resume cycles fit in
the test budget. It does what ``ckpt_path="last"`` with DistCheckpoint does: resume from the newest
committed checkpoint on the primary or the replica, save every step, keep the newest 3, replicate.

    torchrun --nproc_per_node=2 raw_train.py --primary DIR --replica DIR --digest-dir DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from lightning_distckpt import catalog
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.parallel.comm import Comm
from lightning_distckpt.engine.loading import open_for_load, read_tensors
from lightning_distckpt.catalog.replication import Replicator
from lightning_distckpt.engine.saving import WriteOptions, write_checkpoint
from lightning_distckpt.ondisk import Manifest
from lightning_distckpt.storage import open_store


def digest(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    def h(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

    osd = get_optimizer_state_dict(model, opt)
    return {"step": step, "model": {k: h(v) for k, v in sorted(model.module.state_dict().items())},
            "optim": {f"{p}/{n}": h(v) for p, st in sorted(osd["state"].items()) for n, v in sorted(st.items())}}


def write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--primary", required=True)
    p.add_argument("--replica", default=None)
    p.add_argument("--digest-dir", required=True)
    p.add_argument("--width", type=int, default=384)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    comm = Comm(dist.new_group(backend="gloo"))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
                      nn.Linear(args.width, 8)))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    roots = [args.primary] + ([args.replica] if args.replica else [])
    replicator = Replicator([args.replica], None, Comm(dist.new_group(backend="gloo")), retry_delay_s=0.5) if args.replica else None

    step = 0
    found = catalog.latest(roots)
    if found:
        name = found[0].name
        ckpt, sources = open_for_load([f"{r}/{name}" for r in roots], comm)
        live = get_optimizer_state_dict(model, opt)  # creates the AdamW state to read into
        targets = {state.model_key(k): v for k, v in model.module.state_dict().items()}
        targets.update({state.optim_key(0, fqn, n): t for fqn, st in live["state"].items() for n, t in st.items()})
        read_tensors(ckpt, targets, sources=sources, comm=comm)
        skeleton = state.join(ckpt.skeleton, lambda k: targets[k])
        set_optimizer_state_dict(model, opt, skeleton["optimizer_states"][0])
        step = skeleton["global_step"]
        d = digest(model, opt, step)
        if rank == 0:
            write_json(os.path.join(args.digest_dir, f"restored-{step}.json"), d)
    if rank == 0:
        write_json(os.path.join(args.digest_dir, "started.json"), {"step": step})

    g = torch.Generator().manual_seed(1)
    while True:
        x = torch.randn(32, 64, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        ck = {"state_dict": model.module.state_dict(), "optimizer_states": [get_optimizer_state_dict(model, opt)],
              "global_step": step}  # fmt: skip
        if rank == 0:
            write_json(os.path.join(args.digest_dir, f"saved-{step}.json"), digest(model, opt, step))
        skeleton, tensors = state.split(ck)
        url = f"{args.primary}/step-{step:06d}"
        write_checkpoint(url, skeleton, tensors, Manifest(name="", created=0.0, world_size=2, global_step=step),
                         WriteOptions(), comm)  # fmt: skip
        if replicator is not None:
            replicator.submit(f"step-{step:06d}", url)
        if rank == 0:
            done = catalog.committed(args.primary)
            for c in done[:-3]:
                store, path = open_store(c.url)
                catalog.remove_checkpoint(store, path)


if __name__ == "__main__":
    sys.exit(main())
