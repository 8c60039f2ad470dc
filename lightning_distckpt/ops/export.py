"""Reading a checkpoint outside training, and exporting it to one plain file.

Everything here runs in one process, reads the checkpoint (whatever world size, strategy and compression
wrote it; only the model weights when only they are exported) into CPU memory, and does not import Lightning.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from lightning_distckpt.catalog import open_checkpoint, source_of
from lightning_distckpt.engine.loading import read_checkpoint, read_model_weights
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.ondisk.skeleton import torch_safe_globals, weights_only_trusted
from lightning_distckpt.transforms.prune import prune as prune_tensor
from lightning_distckpt.transforms.prune import quantize_int8
from lightning_distckpt.storage import StorageLike


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (not thread-safe for a moment)
    os.umask(mask)
    return mask


@contextmanager
def output_file(out: str) -> Iterator[str]:
    """A temporary path next to ``out`` to write to; on success it becomes ``out`` (atomically, replacing an
    existing file) with the permissions a new file gets under the user's umask (``0o666 & ~umask``); on
    failure it is removed and ``out`` is untouched."""
    directory = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def export_size(url: str, storage_options: StorageLike = None, weights_only: bool = False) -> int:
    """The stored bytes an export of ``url`` reads (all tensors, or the model weights only): the total for a
    progress bar fed by the ``progress`` callbacks of the export functions."""
    from lightning_distckpt.transforms import PART

    ckpt = open_checkpoint(source_of(url, storage_options), check_sizes=False)
    if ckpt.metadata.layout is not None:  # compact: stored bytes from the data files' indexes
        from lightning_distckpt.catalog.compact import stored_by_tensor

        return sum(stored for fqn, (_, stored, _) in stored_by_tensor(ckpt).items()
                   if not weights_only or fqn.split(PART)[0].startswith(state.MODEL))  # fmt: skip
    return sum(c.location.stored for fqn, c in ckpt.metadata.chunks()
               if not weights_only or fqn.split(PART)[0].startswith(state.MODEL))  # fmt: skip


def load_checkpoint(url: str, storage_options: StorageLike = None,
                    safe_globals: list[str] | None = None, weights_only: bool | None = None) -> dict[str, Any]:
    """The checkpoint at ``url`` as a plain dict of CPU tensors (optimizer state keyed by parameter FQN).

    Objects that JSON cannot hold are unpickled through an allowlist (plus ``safe_globals`` and types
    registered with ``torch.serialization.add_safe_globals``), or without one when ``weights_only=False``,
    following ``torch.load``'s rule."""
    return read_checkpoint(url, storage_options, torch_safe_globals(safe_globals), trusted=weights_only_trusted(weights_only))


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


def inference_weights(state_dict: dict[str, Any], dtype: torch.dtype | None = None, prune: float | None = None,
                      prune_threshold: float | None = None, quantize: Literal["int8"] | None = None,
                      min_elements: int = 4096) -> dict[str, torch.Tensor]:
    """Model weights for an inference artifact: optionally pruned, cast, and int8-quantized.

    Pruning (by ``prune`` fraction or ``prune_threshold`` magnitude) and quantization apply to floating
    tensors with at least 2 dimensions and ``min_elements`` elements; a quantized ``name`` becomes an int8
    ``name`` plus a float32 ``name.scale`` (one per row: ``w ≈ name * name.scale[:, None]``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not torch.is_tensor(t):
            continue
        big = t.is_floating_point() and t.dim() >= 2 and t.numel() >= min_elements
        if big and (prune is not None or prune_threshold is not None):
            t = prune_tensor(t, fraction=prune, threshold=prune_threshold)
        if big and quantize == "int8":
            q, scale = quantize_int8(t)
            out[name], out[f"{name}.scale"] = q, scale
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def export_checkpoint(url: str, out: str, weights_only: bool = False, dtype: torch.dtype | None = None,
                      format: Literal["torch", "safetensors"] = "torch", prune: float | None = None,
                      prune_threshold: float | None = None, quantize: Literal["int8"] | None = None,
                      storage_options: StorageLike = None, safe_globals: list[str] | None = None,
                      progress: Callable[[int], None] | None = None) -> str:
    """Write the checkpoint at ``url`` as one file at ``out`` (a local path) and return ``out``.

    ``format="torch"`` without ``weights_only``, pruning or quantization writes a complete Lightning
    checkpoint (resumable by Lightning without this package). Otherwise the file holds the model weights
    only: ``{"state_dict": ...}`` for torch (loadable with ``torch.load(weights_only=True)``), flat tensors
    for safetensors; see `inference_weights` for ``dtype``, ``prune``, ``quantize``. The
    checkpoint itself is never modified.

    ``out`` appears atomically when complete (an existing file is replaced; a failed export leaves it as it
    was), with the permissions of a new file under the user's umask. ``progress`` is called with the stored
    bytes read as they verify (`export_size` gives the total).
    """
    lossy = prune is not None or prune_threshold is not None or quantize is not None
    if format == "torch" and not weights_only and not lossy:
        checkpoint = read_checkpoint(url, storage_options, safe_globals, progress=progress)
        if dtype is not None:
            checkpoint["state_dict"] = inference_weights(checkpoint["state_dict"], dtype=dtype)
        with output_file(out) as tmp:
            torch.save(to_lightning_format(checkpoint), tmp)
        return out
    weights = inference_weights(read_model_weights(url, storage_options, progress), dtype, prune, prune_threshold,
                                quantize)  # fmt: skip
    with output_file(out) as tmp:
        if format == "safetensors":
            save_file = _safetensors_save_file()
            save_file(weights, tmp, metadata={"source": url, "format": "lightning-distckpt export"})
        else:
            torch.save({"state_dict": weights}, tmp)
    return out


def export_sharded_safetensors(url: str, out_dir: str, shard_bytes: int, **kwargs: Any) -> list[str]:
    """Model weights as safetensors shards of at most ``shard_bytes`` plus ``model.safetensors.index.json``
    (the Hugging Face layout), for models too large for one file. Returns the files written (each appears
    atomically, with the user's umask). ``storage_options`` and ``progress`` as in `export_checkpoint`; other
    keyword arguments go to `inference_weights`."""
    import json

    save_file = _safetensors_save_file()
    storage_options = kwargs.pop("storage_options", None)
    progress = kwargs.pop("progress", None)
    weights = inference_weights(read_model_weights(url, storage_options, progress), **kwargs)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    os.makedirs(out_dir, exist_ok=True)
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with output_file(os.path.join(out_dir, fname)) as tmp:
            save_file(shard, tmp, metadata={"source": url})
        files.append(os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in shard})
    index = os.path.join(out_dir, "model.safetensors.index.json")
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with output_file(index) as tmp, open(tmp, "w") as f:
        json.dump({"metadata": {"total_size": total, "source": url}, "weight_map": weight_map}, f, indent=1)
    return [*files, index]


def _safetensors_save_file() -> Any:
    """``safetensors.torch.save_file``; safetensors is the ``export`` extra of this package."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("exporting to safetensors needs safetensors: pip install 'lightning-distckpt[export]'") from None
    return save_file
