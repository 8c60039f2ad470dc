"""Stock Lightning checkpoints (one ``torch.save`` file) and Lightning's loading rules, for the plugin.

* :func:`kind` tells a checkpoint of this package (a directory) from a stock file, without reading either;
* :func:`load_file` reads a stock file through the plugin's storage (any URL), unpickling it by Lightning's
  own ``weights_only`` rule (``torch.load``: ``None`` is the torch default, restricted unless
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set; ``torch.serialization.add_safe_globals`` is honoured);
* :func:`trusted` applies the same rule to the objects this package's ``state.json`` pickles;
* :func:`by_fqn` re-keys an optimizer state saved by parameter index (what ``optimizer.state_dict()`` and
  stock files hold) by parameter FQN, using the live optimizer's parameter order, as
  ``torch.optim.Optimizer.load_state_dict`` does.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import Strategy

from lightning_distckpt.errors import StateMismatchError
from lightning_distckpt.integration.adapters import parameter_fqn_map, unwrap_optimizer
from lightning_distckpt.ondisk.skeleton import torch_safe_globals as safe_globals
from lightning_distckpt.ondisk.skeleton import weights_only_trusted as trusted
from lightning_distckpt.storage import StorageLike, open_store


def kind(url: str, storage: StorageLike = None) -> Literal["ours", "file", "missing"]:
    """``"ours"`` for a directory (a checkpoint of this package, committed or not), ``"file"`` for a file
    (a stock Lightning checkpoint), ``"missing"`` when nothing is there."""
    store, path = open_store(url, storage)
    if store.isdir(path):
        return "ours"
    return "file" if store.exists(path) else "missing"


def load_file(url: str, storage: StorageLike = None, weights_only: bool | None = None,
              map_location: Any = "cpu") -> dict[str, Any]:
    """A stock Lightning checkpoint file at ``url`` (local path or any URL the plugin's storage reaches), read
    with ``torch.load`` exactly as Lightning would (``weights_only`` as given, so ``None`` is torch's
    default). Tensors land on ``map_location`` (CPU by default)."""
    store, path = open_store(url, storage)
    data = store.read_bytes(path)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)


def is_index_keyed(optimizer_state: Any) -> bool:
    """True when an optimizer state is keyed by parameter index (``optimizer.state_dict()``), not by FQN."""
    groups = optimizer_state.get("param_groups", []) if isinstance(optimizer_state, dict) else []
    return any(isinstance(p, int) for g in groups for p in g.get("params", []))


def index_fqns(strategy: Strategy, optimizer: Any) -> list[str]:
    """The FQN of every parameter of ``optimizer`` in its ``state_dict()`` numbering (groups in order)."""
    names = parameter_fqn_map(strategy)
    out = []
    for group in unwrap_optimizer(optimizer).param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise StateMismatchError("an optimizer parameter is not a parameter of the LightningModule; "
                                         "cannot map a checkpoint's optimizer state saved by index onto it")
            out.append(names[id(p)])
    return out


def by_fqn(optimizer_state: dict[str, Any], fqns: list[str], where: str) -> dict[str, Any]:
    """``optimizer_state`` keyed by parameter index, re-keyed by FQN (``fqns[i]`` is parameter ``i``)."""
    groups = optimizer_state.get("param_groups", [])
    n = sum(len(g["params"]) for g in groups)
    if n != len(fqns):
        raise StateMismatchError(f"{where}: the checkpoint's optimizer has {n} parameters, the live one {len(fqns)}")
    order = [p for g in groups for p in g["params"]]
    index = {p: fqns[i] for i, p in enumerate(order)}  # saved ids in saved order -> live parameter in live order
    state = {index[int(k)]: v for k, v in optimizer_state.get("state", {}).items() if int(k) in index}
    return {"state": state, "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in groups]}
