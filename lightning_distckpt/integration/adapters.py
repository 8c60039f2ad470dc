"""State-dict adapters: a strategy's model and optimizer state as portable, FQN-keyed state dicts.

Keys are fully qualified names relative to the LightningModule (wrappers such as DDP's ``module.`` or FSDP's
``_fsdp_wrapped_module.`` removed); sharded tensors stay sharded and nothing is copied
(``torch.distributed.checkpoint.state_dict``). Collective only where DCP's helpers are (FSDP1 may gather).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lightning_distckpt.errors import StateMismatchError

_OPTIONS = StateDictOptions(full_state_dict=False, cpu_offload=False)


def _model(strategy: Strategy) -> torch.nn.Module:
    model = strategy.model if strategy.model is not None else strategy.lightning_module
    if model is None:
        raise RuntimeError("the strategy has no model yet; checkpoints are saved and loaded after setup")
    return model


_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def parameter_fqns(strategy: Strategy) -> set[str]:
    """FQNs (as in `model_state_dict()`) of the model's parameters, without buffers."""
    module = strategy.lightning_module
    if module is None:
        return set()
    names = set()
    for name, _ in module.named_parameters():
        for wrapper in _WRAPPER_NAMES:
            name = name.replace(wrapper, "")
        names.add(name)
    return names


def parameter_fqn_map(strategy: Strategy) -> dict[int, str]:
    """``id(parameter)`` -> its FQN (as in `model_state_dict()`), for every parameter of the module."""
    module = strategy.lightning_module
    out: dict[int, str] = {}
    if module is None:
        return out
    for name, p in module.named_parameters(remove_duplicate=False):
        for wrapper in _WRAPPER_NAMES:
            name = name.replace(wrapper, "")
        out.setdefault(id(p), name)
    return out


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


def model_state_dict(strategy: Strategy) -> dict[str, Any]:
    """The model's state keyed by FQN relative to the LightningModule; sharded tensors stay sharded, no copy."""
    return get_model_state_dict(_model(strategy), options=_OPTIONS)


def optimizer_state_dict(strategy: Strategy, optimizer: Any, init: bool = True) -> dict[str, Any]:
    """The optimizer's state keyed by parameter FQN (``{"state": {fqn: {...}}, "param_groups": [...]}``).

    With ``init``, creates the optimizer's state if it has none yet (DCP's ``_init_optim_state`` takes a
    step with zero gradients), so that a load has targets of the right shape and placement. Without, an
    optimizer that has not stepped yet gives an empty ``state``, as ``optimizer.state_dict()`` does (a save
    must not change what the next training step computes).
    """
    opt = unwrap_optimizer(optimizer)
    if not init and not opt.state:
        try:
            fqns = iter(index_fqns(strategy, optimizer))
        except StateMismatchError:  # FSDP1 flat parameters: only DCP knows their FQNs
            pass
        else:
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [next(fqns) for _ in g["params"]]}
                      for g in opt.param_groups]  # fmt: skip
            return {"state": {}, "param_groups": groups}
    return get_optimizer_state_dict(_model(strategy), opt, options=_OPTIONS)


def set_optimizer_state(strategy: Strategy, optimizer: Any, state: dict[str, Any], full: bool = False,
                        where: str = "checkpoint") -> None:
    """Apply an optimizer state keyed by parameter FQN or by parameter index (``optimizer.state_dict()``).

    Unsharded strategies call ``optimizer.load_state_dict`` with the state keyed by index, exactly like stock
    Lightning. Sharded ones go through ``set_optimizer_state_dict`` with the state keyed by FQN; ``full``: its
    tensors are whole (a stock file), not shaped like the live sharded state.
    """
    opt = unwrap_optimizer(optimizer)
    fqns = index_fqns(strategy, optimizer) if not _sharded(_model(strategy)) or is_index_keyed(state) else []
    if not _sharded(_model(strategy)):
        opt.load_state_dict(state if is_index_keyed(state) else by_index(state, fqns, where))
        return
    if is_index_keyed(state):
        state = by_fqn(state, fqns, where)
    options = StateDictOptions(full_state_dict=True, cpu_offload=False) if full else _OPTIONS
    set_optimizer_state_dict(_model(strategy), opt, state, options=options)


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


def by_index(optimizer_state: dict[str, Any], fqns: list[str], where: str) -> dict[str, Any]:
    """An FQN-keyed optimizer state keyed by index instead (``fqns[i]`` is parameter ``i`` of the live
    optimizer), as ``optimizer.load_state_dict`` takes it."""
    index = {fqn: i for i, fqn in enumerate(fqns)}
    groups = optimizer_state.get("param_groups", [])
    unknown = [f for g in groups for f in g["params"] if f not in index]
    if unknown:
        raise StateMismatchError(f"{where}: optimizer state for parameters the model does not have: {unknown[:5]}")
    return {"state": {index[f]: v for f, v in optimizer_state.get("state", {}).items() if f in index},
            "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in groups]}


def set_model_state(strategy: Strategy, state: dict[str, Any], strict: bool, full: bool = False) -> None:
    """Apply a model state dict keyed by FQN (relative to the LightningModule).

    Unsharded strategies call ``LightningModule.load_state_dict(state, strict=strict)``, exactly like stock
    Lightning (a module's own ``load_state_dict`` override runs). Sharded ones go through
    ``set_model_state_dict``; ``full``: the tensors are whole (a stock file) and are sharded here.
    """
    module = strategy.lightning_module
    if module is not None and not _sharded(_model(strategy)):
        module.load_state_dict(state, strict=strict)
        return
    set_model_state_dict(_model(strategy), state, options=StateDictOptions(full_state_dict=full, strict=strict))


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(isinstance(t, DTensor) for t in model.parameters())
