"""Magnitude pruning and quantization for exported weights (never applied to training checkpoints).

``prune(t, fraction=0.3)`` zeroes the 30% of entries with the smallest magnitude; ``prune(t,
threshold=1e-3)`` zeroes entries with ``|x| < 1e-3``. ``quantize_int8(t)`` gives an int8 tensor and one
float32 scale per row (``x ≈ q * scale[:, None]``), the same symmetric per-row scheme as the ``int8`` preset.
"""

from __future__ import annotations

import torch

from lightning_distckpt.transforms.registry import tensor_codec


def prune(t: torch.Tensor, fraction: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """A copy of ``t`` with its smallest-magnitude entries set to zero (by fraction or by threshold)."""
    if (fraction is None) == (threshold is None):
        raise ValueError("prune: give exactly one of fraction= or threshold=")
    mags = t.detach().abs()
    if fraction is not None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"prune: fraction={fraction} must be in [0, 1)")
        k = int(fraction * t.numel())
        if k == 0:
            return t.clone()
        cut = mags.reshape(-1).float().kthvalue(k).values
        keep = mags.float() > cut
        # ties at the cut: keep exactly numel - k entries
        extra = int(keep.numel() - keep.sum()) - k
        if extra > 0:
            ties = ((mags.float() == cut) & ~keep).reshape(-1).nonzero().reshape(-1)[:extra]
            keep.reshape(-1)[ties] = True
    else:
        keep = mags >= threshold
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype))


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` int8 of ``t``'s shape and ``scale`` float32 of shape ``[rows]``."""
    parts = tensor_codec("int8-rows").encode(t.detach().float() if t.dim() > 1 else t.detach().float().reshape(1, -1), 0)
    return parts["q"].reshape(t.shape), parts["scale"]


def sparsity(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / max(1, t.numel())
