"""Reading a checkpoint outside training, and exporting it to one plain ``torch.save`` file.

Both run in one process and read the whole checkpoint (whatever world size wrote it) into CPU memory.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_distckpt.loading import read_checkpoint
from lightning_distckpt.storage import StorageLike


def load_checkpoint(url: str, storage_options: StorageLike = None,
                    safe_globals: list[str] | None = None) -> dict[str, Any]:
    """The checkpoint at ``url`` as a plain dict of CPU tensors (optimizer state keyed by parameter FQN)."""
    return read_checkpoint(url, storage_options, safe_globals)


def to_lightning_format(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Re-key optimizer state from parameter FQNs to the integer ids of ``optimizer.state_dict()``.

    The result is what Lightning's stock checkpointing writes, so ``Trainer.fit(ckpt_path=...)`` without
    this package can resume from the exported file (DDP or single device).
    """
    out = dict(checkpoint)
    states = []
    for opt in checkpoint.get("optimizer_states", []):
        ids: dict[Any, int] = {}
        groups = []
        for group in opt.get("param_groups", []):
            params = []
            for fqn in group["params"]:
                ids.setdefault(fqn, len(ids))
                params.append(ids[fqn])
            groups.append({**group, "params": params})
        states.append({"state": {ids[k]: v for k, v in opt.get("state", {}).items() if k in ids}, "param_groups": groups})
    if "optimizer_states" in checkpoint:
        out["optimizer_states"] = states
    return out


def export_checkpoint(url: str, out: str, weights_only: bool = False, dtype: torch.dtype | None = None,
                      storage_options: StorageLike = None, safe_globals: list[str] | None = None) -> str:
    """Write the checkpoint at ``url`` as one ``torch.save`` file at ``out`` (a local path) and return it.

    ``weights_only=True`` writes ``{"state_dict": ...}`` only, loadable with ``torch.load(weights_only=True)``;
    otherwise a complete Lightning checkpoint. ``dtype`` casts floating-point model tensors.
    """
    checkpoint = load_checkpoint(url, storage_options, safe_globals)
    if dtype is not None:
        checkpoint["state_dict"] = {
            k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in checkpoint["state_dict"].items()
        }
    data = {"state_dict": checkpoint["state_dict"]} if weights_only else to_lightning_format(checkpoint)
    torch.save(data, out)
    return out
