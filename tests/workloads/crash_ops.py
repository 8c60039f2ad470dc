"""One storage operation in its own process, for the crash-point tests (``DISTCKPT_CRASH_AT`` /
``DISTCKPT_PAUSE_AT`` name where it dies or pauses, see lightning_distckpt/faults.py):

    python crash_ops.py save URL STEP [compact]   save the sample checkpoint of STEP at URL (overwriting what is
                                         there; ``compact``: with compact metadata, version 3)
    python crash_ops.py remove URL       remove URL as retention does (a link as a link)
    python crash_ops.py clean ROOT       clean-up with no age limit (no writer is running)
    python crash_ops.py replicate URL REPLICA_ROOT   copy the committed checkpoint URL to REPLICA_ROOT (Replicator)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from lightning_distckpt import DistCheckpointIO, catalog  # noqa: E402


def sample(step: int) -> dict:
    """The checkpoint of ``step``: its tensors are a function of the step, so a load shows which one it got."""
    g = torch.Generator().manual_seed(step)
    return {"state_dict": {"w": torch.randn(96, 64, generator=g), "b": torch.full((64,), float(step))},
            "global_step": step, "note": ("step", step)}  # fmt: skip


def main() -> None:
    op, target = sys.argv[1], sys.argv[2]
    if op == "save":
        compact = sys.argv[4:] == ["compact"]
        DistCheckpointIO(compact_metadata=compact).save_checkpoint(sample(int(sys.argv[3])), target)
    elif op == "remove":
        DistCheckpointIO().remove_checkpoint(target)
    elif op == "clean":
        catalog.clean_stale(target, older_than_s=0)
    elif op == "replicate":
        from lightning_distckpt.catalog.replication import Replicator
        from lightning_distckpt.parallel.comm import Comm

        replicator = Replicator([sys.argv[3]], None, Comm(), max_attempts=1)
        replicator.submit(target.rstrip("/").rsplit("/", 1)[-1], target)
        replicator.close()
        if replicator.stats.snapshot()["copied"] != 1:
            raise SystemExit(f"replication failed: {replicator.stats.snapshot()['last_error']}")
    else:
        raise SystemExit(f"unknown operation {op}")


if __name__ == "__main__":
    main()
