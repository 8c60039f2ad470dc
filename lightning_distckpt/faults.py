"""Deterministic crash and pause points, for the crash tests (``tests/test_crash.py``).

The commit protocol, removals, clean-up and copies call `crash_point()` with the name of the step they
just finished. Nothing happens unless the environment names that step:

* ``DISTCKPT_CRASH_AT=<step>[#<n>]``: the process ends at once (``os._exit``, no clean-up, no ``finally``)
  the n-th time (default: the first) it reaches ``step``; as if the machine had died there.
* ``DISTCKPT_PAUSE_AT=<step>[#<n>]@<dir>``: the process creates ``<dir>/paused``, then waits until
  ``<dir>/resume`` exists (another process acts meanwhile, e.g. a ``distckpt gc`` racing the save).

Steps (see docs/fault-tolerance.md, "Crash points tested"): ``save:staged``, ``save:documents``,
``publish:old-moved``, ``publish:renamed``, ``publish:committed``, ``remove:unmarked``, ``remove:emptied``,
``remove:link``, ``remove:file``, ``clean:aside``, ``clean:restored``, ``copy:file``, ``sweep:removed`` (a block
directory of incremental checkpoints deleted by the block store's sweep).
"""

from __future__ import annotations

import os
import threading
import time

CRASH_ENV = "DISTCKPT_CRASH_AT"
PAUSE_ENV = "DISTCKPT_PAUSE_AT"
#: the exit status of a process that died at a crash point
CRASH_EXIT = 86

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _hit(spec: str, step: str) -> bool:
    want, _, nth = spec.partition("#")
    if want != step:
        return False
    with _lock:
        _counts[spec] = _counts.get(spec, 0) + 1
        return _counts[spec] == (int(nth) if nth else 1)


def crash_point(step: str) -> None:
    """End the process here if ``DISTCKPT_CRASH_AT`` names ``step`` (and this is its n-th time); pause if
    ``DISTCKPT_PAUSE_AT`` does. A no-op otherwise (one environment lookup)."""
    crash = os.environ.get(CRASH_ENV)
    if crash and _hit(crash, step):
        os._exit(CRASH_EXIT)
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        spec, _, folder = pause.partition("@")
        if _hit(spec, step):
            open(os.path.join(folder, "paused"), "w").close()
            while not os.path.exists(os.path.join(folder, "resume")):
                time.sleep(0.02)
