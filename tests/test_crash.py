"""SIGKILL at random moments of 2-rank saves, and at every step of the commit protocol; each followed by
an automatic resume (``ckpt_path="last"``) that must pick the newest committed checkpoint and restore it
exactly. No committed checkpoint may be lost or damaged."""

from __future__ import annotations

import os

import pytest
from crashing import Torture

pytestmark = pytest.mark.slow

# Crash points (rank:LocalStore method:n-th call) inside the second save of a run: data streams opened,
# the staging directory renamed into place, the documents/marker written.
INJECTED = ["0:open_write:3", "1:open_write:3", "0:write_bytes:5", "0:write_bytes:7", "0:write_bytes:8",
            "0:rename:2", "0:makedirs:2"]  # fmt: skip


def test_random_kills_then_resume(tmp_path):
    cycles = int(os.environ.get("DISTCKPT_TORTURE_CYCLES", "3"))
    t = Torture(tmp_path, str(tmp_path / "ckpts"), seed=int(os.environ.get("DISTCKPT_TORTURE_SEED", "0")))
    for crash in INJECTED:
        t.cycle(crash=crash)
    for _ in range(cycles):
        t.cycle()
    t.cycle(max_delay=0.5)  # one more start: checks the restore after the last kill
    assert t.kills >= cycles + len(INJECTED)
    assert t.resumes_checked >= cycles // 2, t.log  # most cycles resumed from a checkpoint and were verified
    assert t.newest > 0
    print("\n".join(t.log))


def test_torture_kills_with_replication(tmp_path):
    """At least 30 SIGKILLs at random moments of 2-rank saves and replications, each followed by an
    automatic resume from the newest committed copy (primary or replica)."""
    cycles = int(os.environ.get("DISTCKPT_TORTURE_RAW_CYCLES", "30"))
    t = Torture(tmp_path, str(tmp_path / "primary"), driver="raw", replica_url=str(tmp_path / "replica"), seed=11)
    for _ in range(cycles):
        t.cycle(max_delay=1.5)
    t.cycle(max_delay=0.3)
    assert t.kills >= 30 or cycles < 30
    assert t.resumes_checked >= cycles * 2 // 3, t.log
    print("\n".join(t.log))
