"""Vectorised kernels for the codecs: work cut into cache-sized chunks, run on a small thread pool.

Why chunks: a codec is a handful of element-wise passes (absolute maximum, scale, round, table look-up).
Over a whole tensor each pass streams it through main memory; over a chunk of :data:`CHUNK_ELEMENTS`
elements (256 KiB of float32) every pass after the first hits the CPU cache, so a codec costs about one
read of its input and one write of its output. numpy releases the GIL inside these passes, so chunks run
in parallel on :func:`pool` threads.

Thread safety: :func:`map_chunks` may be called from any number of threads at once (the writer's and the
reader's threads do); each call's chunks write disjoint parts of their outputs. The pool is created lazily
per process (a forked child makes its own) and its tasks never submit to it, so calls cannot deadlock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: elements per chunk (float32: 256 KiB, so a chunk and its temporaries stay in a core's L2 cache)
CHUNK_ELEMENTS = 1 << 16
#: below this many chunks the work runs on the calling thread (a pool hand-off costs ~50 µs)
MIN_PARALLEL_CHUNKS = 4

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def threads() -> int:
    """Threads the codecs use: the CPUs this process may run on, at most 8 (``DISTCKPT_CODEC_THREADS`` overrides)."""
    env = os.environ.get("DISTCKPT_CODEC_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def pool() -> ThreadPoolExecutor:
    """The process's codec thread pool (created on first use; a forked child gets its own)."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(threads(), thread_name_prefix="distckpt-codec")
            _pool_pid = os.getpid()
        return _pool


def spans(n: int, per: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of at most ``per`` items covering ``range(n)``."""
    per = max(1, per)
    return [(lo, min(n, lo + per)) for lo in range(0, n, per)]


def map_chunks(fn: Callable[[int, int], None], n: int, per: int) -> None:
    """Call ``fn(lo, hi)`` for chunks of at most ``per`` items of ``range(n)``, on the pool when that helps.

    Blocks until every chunk is done; re-raises the first error. ``fn`` must only write its own chunk.
    """
    parts = spans(n, per)
    if len(parts) < MIN_PARALLEL_CHUNKS or threads() == 1:
        for lo, hi in parts:
            fn(lo, hi)
        return
    k = min(threads(), len(parts))
    # one task per thread, each taking a run of consecutive chunks (few hand-offs, sequential memory access)
    groups = [parts[i * len(parts) // k : (i + 1) * len(parts) // k] for i in range(k)]

    def run(group: list[tuple[int, int]]) -> None:
        for lo, hi in group:
            fn(lo, hi)

    for f in [pool().submit(run, g) for g in groups if g]:
        f.result()
