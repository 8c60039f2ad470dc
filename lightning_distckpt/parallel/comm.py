"""Who takes part in a checkpoint operation, and the few collectives it needs.

A `Comm` is either the ranks of a process group (every rank must make the same calls in the same
order) or ``solo``: one process acting alone, e.g. a plain ``CheckpointIO`` call on rank 0, a CLI tool.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Comm:
    group: dist.ProcessGroup | None = None
    solo: bool = False
    #: a second group of the same ranks for bulk transfers that run while ``group`` coordinates
    bulk: dist.ProcessGroup | None = None

    @property
    def active(self) -> bool:
        """True when collectives are needed (several ranks take part)."""
        return not self.solo and is_dist() and dist.get_world_size(self.group) > 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.active:
            return obj
        box: list[Any] = [obj]
        src_global = dist.get_global_rank(self.group, src) if self.group is not None else src
        dist.broadcast_object_list(box, src=src_global, group=self.group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def decide(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only, its result broadcast: every rank gets the same value, or raises the same
        error (rank 0's). Collective: every rank calls it; ranks other than 0 never call ``fn``."""
        result: Any = None
        if self.rank == 0:
            try:
                result = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                result = ("error", portable(e))
        kind, value = self.broadcast(result)
        if kind == "error":
            raise value
        return value

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed; if any did, every rank raises the same error (the lowest failing
        rank's). Collective; returns on every rank only when no rank failed."""
        for e in self.all_gather(None if error is None else portable(error)):
            if e is not None:
                raise e


SOLO = Comm(solo=True)


def portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to be sent to other ranks), else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return RuntimeError(f"{type(e).__name__}: {e}")
