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
    set_optimizer_state_dict,
)

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


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


def model_state_dict(strategy: Strategy) -> dict[str, Any]:
    """The model's state keyed by FQN relative to the LightningModule; sharded tensors stay sharded, no copy."""
    return get_model_state_dict(_model(strategy), options=_OPTIONS)


def optimizer_state_dict(strategy: Strategy, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state keyed by parameter FQN (``{"state": {fqn: {...}}, "param_groups": [...]}``).

    Creates the optimizer's state if it has none yet (DCP's ``_init_optim_state``), so that a load has
    targets of the right shape and placement.
    """
    return get_optimizer_state_dict(_model(strategy), unwrap_optimizer(optimizer), options=_OPTIONS)


def set_optimizer_state(strategy: Strategy, optimizer: Any, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(_model(strategy), unwrap_optimizer(optimizer), state, options=_OPTIONS)
