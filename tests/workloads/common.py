"""Shared pieces of the test workloads: a small model that every strategy can shard, data, digests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any, NoReturn

import lightning as L
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict


class Net(L.LightningModule):
    """An MLP with a buffer (BatchNorm), AdamW and a StepLR scheduler; shardable by FSDP1 and FSDP2."""

    def __init__(self, width: int = 32, depth: int = 3, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 4))
        self.net = nn.Sequential(*layers)

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])
        self._sharded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, sync_dist=False)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]


def end_process(code: int = 0) -> NoReturn:
    """End a job's process after its work: destroy the process groups, flush, and exit without finalizing the
    interpreter.

    gloo's worker threads outlive ``destroy_process_group()`` while FSDP2/DeviceMesh (or DDP) still hold their
    groups; one that releases its last collective's work while Python finalizes aborts the process
    (``terminate called without an active exception``, see docs/troubleshooting.md). Nothing in these
    workloads needs the interpreter's own exit (atexit handlers, finalizers): files are closed, saves committed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        sys.exit(code)  # no process group, no gloo threads: the normal exit
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def data(n: int = 128, batch_size: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 0).long()) % 4
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def accelerator() -> str:
    """``cpu`` (the tests) or ``cuda`` (the GPU check: ``DISTCKPT_TEST_ACCELERATOR=cuda``)."""
    return os.environ.get("DISTCKPT_TEST_ACCELERATOR", "cpu")


def strategy(name: str) -> Any:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    cuda = accelerator() == "cuda"
    if name == "single":
        return SingleDeviceStrategy(device=torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"))
    if name == "ddp":
        return DDPStrategy(process_group_backend="nccl" if cuda else "gloo")
    if name == "mp":
        world = int(os.environ.get("WORLD_SIZE") or os.environ.get("DISTCKPT_TEST_WORLD", "1"))
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    if name == "fsdp":
        if cuda:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            return FSDPStrategy(use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
        return CPUFSDPStrategy()
    raise ValueError(name)


try:
    from lightning.pytorch.strategies import FSDPStrategy as _FSDP

    class CPUFSDPStrategy(_FSDP):
        """FSDPStrategy (FSDP1) on CPU: Lightning refuses the exact class on CPU; FSDP1 needs device_id=cpu."""

        def __init__(self) -> None:
            super().__init__(process_group_backend="gloo", use_orig_params=True)

        def _setup_model(self, model: nn.Module) -> nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                        use_orig_params=True)
except ImportError:  # pragma: no cover
    pass


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16] + f":{str(t.dtype)}:{list(t.shape)}"


def full_state_digest(trainer: L.Trainer) -> dict[str, Any]:
    """Digests of the full (unsharded) model and optimizer state; collective, result valid on rank 0."""
    model = trainer.strategy.model
    # cpu_offload=True makes FSDP1 return one reused buffer for every optimizer state of a parameter
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    msd = get_model_state_dict(model, options=opts)
    out: dict[str, Any] = {"model": {k: tensor_digest(v) for k, v in sorted(msd.items())}}
    for i, opt in enumerate(trainer.optimizers):
        osd = get_optimizer_state_dict(model, getattr(opt, "_optimizer", opt), options=opts)
        out[f"optim{i}"] = {
            f"{fqn}/{name}": tensor_digest(v) if torch.is_tensor(v) else v
            for fqn, st in sorted(osd.get("state", {}).items()) for name, v in sorted(st.items())
        }  # fmt: skip
        out[f"optim{i}_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in osd.get("param_groups", [])]
    out["global_step"] = trainer.global_step
    out["lr_schedulers"] = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
    return out


#: what every restored-state digest must hold (full_state_digest + the loops and epoch the restore read)
STATE_KEYS = {"model", "optim0", "optim0_groups", "global_step", "lr_schedulers", "loops", "epoch"}


def state_differences(saved: dict[str, Any], restored: dict[str, Any]) -> list[str]:
    """Keys of two state digests that are missing or differ; empty: bitwise the same state."""
    keys = set(saved) | set(restored)
    return sorted(STATE_KEYS - keys) + [k for k in sorted(keys) if saved.get(k) != restored.get(k)]


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


class DataModule(L.LightningDataModule):
    """The same data as :func:`data`, for LightningCLI configs."""

    def __init__(self, n: int = 128, batch_size: int = 16) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return data(self.n, self.batch_size)
