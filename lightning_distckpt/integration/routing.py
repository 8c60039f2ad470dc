"""How Lightning strategies are routed through `DistCheckpointIO`.

Lightning's sharded strategies bypass ``CheckpointIO`` (FSDP and ModelParallel call DCP themselves) and
DDP saves on rank 0 only. Routing gives the strategy instance a subclass of its own class whose
checkpoint methods call the plugin on every rank:

* ``save_checkpoint`` / ``load_checkpoint`` / ``remove_checkpoint`` -> the plugin (collective);
* ``lightning_module_state_dict`` / ``optimizer_state`` -> portable, FQN-keyed state
  (``torch.distributed.checkpoint.state_dict``), sharded tensors stay sharded;
* ``load_model_state_dict`` / ``load_optimizer_state_dict`` -> the plugin applies the state after
  Lightning's hooks ran (``LightningModule.load_state_dict`` unsharded, ``set_*_state_dict`` sharded).

Routing happens when a ``DistCheckpointIO`` is assigned to a strategy (``Trainer(plugins=[...])``), and
again (idempotently) in ``DistCheckpoint.setup``. A strategy that cannot be routed fails right there.
A routed strategy pickles as its base class and is routed again when unpickled (``ddp_spawn``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy

from lightning_distckpt.integration.adapters import model_state_dict, optimizer_state_dict

#: Strategies whose checkpoint methods we know how to replace; subclasses are routed too, unless they
#: override a checkpoint method themselves (then we cannot know what they need and refuse).
SUPPORTED: tuple[type[Strategy], ...] = (ModelParallelStrategy, FSDPStrategy, DDPStrategy, SingleDeviceStrategy)
_METHODS = ("save_checkpoint", "load_checkpoint", "remove_checkpoint", "load_model_state_dict",
            "load_optimizer_state_dict", "lightning_module_state_dict", "optimizer_state")  # fmt: skip


class RoutedIO:
    """What a routed strategy calls on every rank; `DistCheckpointIO` implements it.

    Defined here so that routing needs nothing from the plugin (the plugin depends on routing, not back).
    """

    def save_routed(self, strategy: Strategy, checkpoint: dict[str, Any], path: str, storage_options: Any = None) -> None:
        raise NotImplementedError

    def load_routed(self, strategy: Strategy, path: str, weights_only: bool | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def load_model_routed(self, strategy: Strategy, checkpoint: dict[str, Any], strict: bool = True) -> None:
        raise NotImplementedError

    def load_optimizers_routed(self, strategy: Strategy, checkpoint: dict[str, Any]) -> None:
        raise NotImplementedError

    def remove_routed(self, strategy: Strategy, path: str) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError


class _RoutedStrategy:
    """The methods a routed strategy class gets, copied into a direct subclass of the strategy's class.

    (A mixin base would be simpler, but Python refuses ``__class__`` assignment when the new class has an
    extra base.) ``self`` is a Lightning ``Strategy``; no zero-argument ``super()`` here.
    """

    _distckpt_routed = True
    _distckpt_io: RoutedIO

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        self._distckpt_io.save_routed(self, checkpoint, _as_url(filepath), storage_options)  # type: ignore[arg-type]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return self._distckpt_io.load_routed(self, _as_url(checkpoint_path), weights_only)  # type: ignore[arg-type]

    def remove_checkpoint(self, filepath: Any) -> None:
        self._distckpt_io.remove_routed(self, _as_url(filepath))  # type: ignore[arg-type]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return model_state_dict(self)  # type: ignore[arg-type]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer_state_dict(self, optimizer, init=False)  # type: ignore[arg-type]

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self._distckpt_io.load_model_routed(self, checkpoint, strict)  # type: ignore[arg-type]

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self._distckpt_io.load_optimizers_routed(self, checkpoint)  # type: ignore[arg-type]

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def teardown(self) -> None:
        # ModelParallelStrategy.teardown never calls CheckpointIO.teardown: wait for the save in flight here
        try:
            self._distckpt_io.teardown()
        finally:
            type(self).__mro__[1].teardown(self)  # type: ignore[attr-defined]

    def __reduce__(self) -> tuple[Any, ...]:
        # Routed classes are created at run time: pickle as the base class and route again on load (ddp_spawn).
        # The state goes through the base class's __getstate__/__setstate__ (Strategy drops its
        # LightningOptimizers), and as the third item, so that copy.deepcopy memoizes the new object before
        # copying the state that refers back to it.
        base = type(self).__mro__[1]
        getstate = getattr(base, "__getstate__", None)
        return _new_routed, (base,), getstate(self) if getstate is not None else self.__dict__.copy()


def _as_url(path: Any) -> str:
    return path if isinstance(path, str) else str(path)


def strategy_name(strategy: Strategy) -> str:
    """The user-facing class name of a (possibly routed) strategy."""
    cls = type(strategy)
    return cls.__mro__[1].__name__ if is_routed(strategy) else cls.__name__


def is_routed(strategy: Strategy) -> bool:
    return "_distckpt_routed" in type(strategy).__dict__


def route(strategy: Strategy, io: RoutedIO) -> None:
    """Make every checkpoint operation of ``strategy`` go through ``io`` on all ranks (idempotent).

    Raises ``TypeError`` naming the strategy when it is not one we can route.
    """
    cls = type(strategy)
    if is_routed(strategy):
        strategy._distckpt_io = io  # type: ignore[attr-defined]
        return
    base = next((s for s in SUPPORTED if isinstance(strategy, s)), None)
    overridden = [m for m in _METHODS if base is not None and getattr(cls, m) is not getattr(base, m)]
    if base is None or overridden:
        why = (f"it overrides {', '.join(overridden)}" if overridden
               else f"only {', '.join(s.__name__ for s in SUPPORTED)} and their subclasses are supported")
        raise TypeError(
            f"DistCheckpointIO cannot route checkpoints of {cls.__qualname__} ({why}); its checkpoints would "
            f"bypass the plugin. Use a supported strategy or remove DistCheckpointIO from the Trainer's plugins."
        )
    strategy.__class__ = routed_class(cls)
    strategy._distckpt_io = io  # type: ignore[attr-defined]


_ROUTED: dict[type, type] = {}


def routed_class(cls: type) -> type:
    """The routed subclass of ``cls`` (created once per class)."""
    if cls not in _ROUTED:
        methods = {k: v for k, v in vars(_RoutedStrategy).items() if k not in ("__dict__", "__weakref__", "__doc__")}
        _ROUTED[cls] = type(f"Routed{cls.__name__}", (cls,), {**methods, "__module__": cls.__module__})
    return _ROUTED[cls]


def _new_routed(base: type) -> Strategy:
    """An empty instance of the routed class of ``base``; pickle then calls its ``__setstate__``."""
    obj = base.__new__(base)
    obj.__class__ = routed_class(base)
    return obj


def install_hook() -> None:
    """Route a strategy as soon as a DistCheckpointIO is assigned to it (``Trainer(plugins=[...])``).

    Wraps the setter of ``Strategy.checkpoint_io`` once; other plugins are unaffected.
    """
    prop = Strategy.__dict__["checkpoint_io"]
    if getattr(prop.fset, "_distckpt", False):
        return

    def fset(self: Strategy, io: Any) -> None:
        prop.fset(self, io)
        if isinstance(io, RoutedIO):
            route(self, io)

    fset._distckpt = True  # type: ignore[attr-defined]
    Strategy.checkpoint_io = property(prop.fget, fset, prop.fdel, prop.__doc__)  # type: ignore[method-assign]
    _install_boundary_waits()


#: Lightning hooks at which a pipelined snapshot in flight is waited for, before any callback or the module
#: runs them: epoch and stage boundaries, where Lightning's own callbacks change weights in place
#: (StochasticWeightAveraging, WeightAveraging) and no training step is left to overlap the copy with
BOUNDARY_HOOKS = frozenset({
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_validation_start",
    "on_validation_end", "on_test_start", "on_predict_start", "on_sanity_check_start", "on_fit_end",
    "on_exception", "teardown",
})  # fmt: skip


def _install_boundary_waits() -> None:
    """Wrap Lightning's callback and module hook dispatch (``lightning.pytorch.trainer.call``) once so that, for
    a strategy routed through a plugin, a hook in `BOUNDARY_HOOKS` first waits for the snapshot of an
    asynchronous save in flight (``RoutedIO.wait_snapshot``). Other hooks, and other plugins, are untouched."""
    from lightning.pytorch.trainer import call

    for name in ("_call_callback_hooks", "_call_lightning_module_hook"):
        original = getattr(call, name)
        if getattr(original, "_distckpt", False):
            continue

        def wrapped(trainer: Any, hook_name: str, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            if hook_name in BOUNDARY_HOOKS:
                io = getattr(getattr(trainer, "strategy", None), "_checkpoint_io", None)
                wait = getattr(io, "wait_snapshot", None) if isinstance(io, RoutedIO) else None
                if wait is not None:
                    wait()
            return __original(trainer, hook_name, *args, **kwargs)

        wrapped._distckpt = True  # type: ignore[attr-defined]
        wrapped.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(call, name, wrapped)
