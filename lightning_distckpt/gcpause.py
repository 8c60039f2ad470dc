"""Pausing Python's cyclic garbage collector while large acyclic structures are built.

Planning a save, writing ``metadata.json`` and parsing it back build hundreds of thousands of small containers
(one per chunk of every tensor on every rank). Each allocation counts towards the collector's thresholds, so the
collector runs over and over, traversing every container built so far, and finds nothing: these structures hold
no reference cycles. `gc_paused` turns the collector off around such work and back on afterwards;
``benchmarks/bench_planning.py`` measures the difference.

Thread safety: the collector is process-wide. Pauses nest and may overlap across threads (a background save
thread and the training thread): a counter under a lock turns the collector off at the first entry and back on
at the last exit, and only if it was on at the first entry (a program that turned it off keeps it off). While a
pause lasts, cycles made by other threads are collected later, not lost.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

_lock = threading.Lock()
_depth = 0
_was_enabled = False

F = TypeVar("F", bound=Callable[..., object])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the body with the cyclic garbage collector off (see the module docstring); any thread."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def without_gc(fn: F) -> F:
    """Decorator: ``fn`` runs under `gc_paused`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        with gc_paused():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
