"""Edits to ``checkpoint["state_dict"]`` in ``on_load_checkpoint`` under a sharded strategy (torchrun).

    torchrun --nproc_per_node=2 hooks.py --strategy mp --ckpt-dir D --mode {delete,read-delete}

Run 1 (no checkpoint in D yet) trains 4 steps and saves. Run 2 resumes it with a module whose hook deletes
the head's weights (``read-delete``: after reading every value, which makes the state dict read itself
from storage in this process alone). Rank 0 prints "HOOKS OK" when the body holds the checkpoint's weights
and the head its fresh initialisation.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Net, data, strategy  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, list_checkpoints, load_checkpoint  # noqa: E402

HEAD = "net.5."  # the last Linear of Net(depth=3)


class HookNet(Net):
    def __init__(self, mode: str = "none") -> None:
        super().__init__()
        self.mode = mode
        self.strict_loading = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        if self.mode == "read-delete":
            assert all(torch.is_tensor(v) for v in sd.values())
        for k in [k for k in sd if k.startswith(HEAD)]:
            del sd[k]


def full_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    sd = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="mp")
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--mode", default="delete")
    args = p.parse_args()
    os.environ.setdefault("DISTCKPT_TEST_WORLD", os.environ.get("WORLD_SIZE", "1"))
    resume = bool(list_checkpoints(args.ckpt_dir))
    torch.manual_seed(0 if not resume else 99)
    model = HookNet(args.mode if resume else "none")
    seen: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["restored"] = full_weights(trainer)

    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", "1")),
                        strategy=strategy(args.strategy), max_steps=4 if not resume else 5,
                        plugins=[DistCheckpointIO()], callbacks=[DistCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=4),
                                                                 Probe()],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    if not resume:
        trainer.fit(model, data())
        return
    # the fresh head: the same seed, same module, before any restore
    torch.manual_seed(99)
    fresh = {k: v.detach().clone() for k, v in HookNet().state_dict().items()}
    trainer.fit(model, data(), ckpt_path="last")
    if trainer.is_global_zero:
        step4 = next(c for c in list_checkpoints(args.ckpt_dir) if c.name.endswith("step=4"))
        saved = load_checkpoint(step4.url)["state_dict"]
        got = seen["restored"]
        for k, v in got.items():
            want = fresh[k] if k.startswith(HEAD) else saved[k]
            assert torch.equal(v, want), f"{k}: {'fresh head' if k.startswith(HEAD) else 'checkpoint'} expected"
        print("HOOKS OK")


if __name__ == "__main__":
    main()
