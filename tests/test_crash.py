"""SIGKILL at random moments of 2-rank saves, and at every step of the commit protocol; each followed by
an automatic resume (``ckpt_path="last"``) that must pick the newest committed checkpoint and restore it
exactly. No committed checkpoint may be lost or damaged."""

from __future__ import annotations

import os

import pytest
from conftest import subset_by_default
from crashing import Torture

pytestmark = pytest.mark.slow

# Crash points (rank:LocalStore method:n-th call) inside the second save of a run: data streams opened,
# the staging directory renamed into place, the documents/marker written.
INJECTED = ["0:open_write:3", "1:open_write:3", "0:write_bytes:5", "0:write_bytes:7", "0:write_bytes:8",
            "0:rename:2", "0:makedirs:2"]  # fmt: skip
# CI's fixed subset: a stream opened (on rank 1), a write, the rename into place;
# ``pytest -m long`` runs all of INJECTED (each cycle is a 2-rank training job)
INJECTED_CI = ["1:open_write:3", "0:write_bytes:7", "0:rename:2"]


@subset_by_default("points", INJECTED_CI, INJECTED)
def test_random_kills_then_resume(tmp_path, points):
    cycles = int(os.environ.get("DISTCKPT_TORTURE_CYCLES", "2"))
    t = Torture(tmp_path, str(tmp_path / "ckpts"), seed=int(os.environ.get("DISTCKPT_TORTURE_SEED", "0")))
    for crash in points:
        t.cycle(crash=crash)
    for _ in range(cycles):
        t.cycle()
    t.cycle(max_delay=0.5)  # one more start: checks the restore after the last kill
    assert t.kills >= cycles + len(points)
    assert t.resumes_checked >= cycles // 2, t.log  # most cycles resumed from a checkpoint and were verified
    assert t.newest > 0
    print("\n".join(t.log))


def test_torture_kills_with_replication(tmp_path):
    """SIGKILLs at random (seeded) moments of 2-rank saves and replications, each followed by an automatic resume
    from the newest committed copy (primary or replica). CI runs 6 (``DISTCKPT_TORTURE_RAW_CYCLES`` sets
    more); the 100-kill torture of ``benchmarks/bench_recovery.py`` runs the long version."""
    cycles = int(os.environ.get("DISTCKPT_TORTURE_RAW_CYCLES", "6"))
    t = Torture(tmp_path, str(tmp_path / "primary"), driver="raw", replica_url=str(tmp_path / "replica"), seed=11)
    for _ in range(cycles):
        t.cycle(max_delay=1.5)
    t.cycle(max_delay=0.3)
    assert t.kills >= cycles
    assert t.resumes_checked >= cycles * 2 // 3, t.log
    print("\n".join(t.log))


# ---- deterministic crash points (lightning_distckpt/faults.py): every step, not random moments ---------------
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from conftest import ROOT, WORKLOADS, env  # noqa: E402
from workloads.crash_ops import sample  # noqa: E402

from lightning_distckpt import catalog, list_checkpoints, load_checkpoint, verify  # noqa: E402
from lightning_distckpt.faults import CRASH_EXIT  # noqa: E402

# every step of an overwrite, in order (the last two: the old copy's trash directory being removed)
OVERWRITE_STEPS = ["save:staged", "save:documents", "publish:old-moved", "publish:renamed", "publish:committed",
                   "remove:unmarked", "remove:emptied"]  # fmt: skip


class Done:
    """A finished operation: its exit status and output."""

    def __init__(self, p: subprocess.Popen) -> None:
        self.stdout, _ = p.communicate(timeout=300)
        self.returncode = p.returncode


def op(*args, crash_at: str | None = None, pause_at: str | None = None, wait: bool = True) -> Done | subprocess.Popen:
    extra = {}
    if crash_at:
        extra["DISTCKPT_CRASH_AT"] = crash_at
    if pause_at:
        extra["DISTCKPT_PAUSE_AT"] = pause_at
    cmd = [sys.executable, *map(str, args)] if str(args[0]).endswith(".py") or args[0] == "-m" else None
    p = subprocess.Popen(cmd or [sys.executable, str(WORKLOADS / "crash_ops.py"), *map(str, args)], env=env(**extra),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return Done(p) if wait else p


def same(url: str, step: int) -> bool:
    got, want = load_checkpoint(url), sample(step)
    return got["global_step"] == step and all(torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())


def listed(root) -> dict[str, str]:
    return {c.name: c.url for c in catalog.list_checkpoints(str(root)) if c.committed}


def committed_root(tmp_path, compact: bool = False):
    """A root with two committed checkpoints: ``a`` (step 1) and ``X`` (step 1); ``compact``: with compact metadata."""
    root = tmp_path / "root"
    from lightning_distckpt import DistCheckpointIO

    DistCheckpointIO(compact_metadata=compact).save_checkpoint(sample(1), str(root / "a"))
    DistCheckpointIO(compact_metadata=compact).save_checkpoint(sample(1), str(root / "X"))
    return root


def assert_recovers(root, x_steps: tuple[int, ...]) -> None:
    """Right after a crash and after clean-up: ``a`` and ``X`` listed as committed and loadable exactly (X holds
    one of ``x_steps``); after clean-up nothing else is left and X is under its own name."""
    found = listed(root)
    assert set(found) == {"a", "X"}, found
    assert same(found["a"], 1) and any(same(found["X"], s) for s in x_steps)
    catalog.clean_stale(str(root), older_than_s=0)
    found = listed(root)
    assert sorted(os.listdir(root)) == ["X", "a"] and found == {"a": str(root / "a"), "X": str(root / "X")}
    assert verify(found["X"]).ok and any(same(found["X"], s) for s in x_steps)


@pytest.mark.parametrize("step", OVERWRITE_STEPS)
def test_a_same_name_overwrite_killed_at_each_step(tmp_path, step):
    root = committed_root(tmp_path)
    p = op("save", root / "X", 2, crash_at=step)
    assert p.returncode == CRASH_EXIT, p.stdout
    # before the marker the old copy is what counts; from the marker on, the new one
    assert_recovers(root, (1,) if OVERWRITE_STEPS.index(step) < 4 else (2,))


@pytest.mark.parametrize("step", ["save:documents", "publish:old-moved", "publish:committed", "remove:emptied"])
def test_a_compact_overwrite_killed_at_steps_of_each_phase(tmp_path, step):
    """Compact metadata (version 3: no chunk list, block indexes in the data files) goes through the same commit
    protocol: a kill before the marker keeps the old copy, from the marker on the new one, both loadable."""
    root = committed_root(tmp_path, compact=True)
    assert catalog.open_checkpoint(catalog.source_of(str(root / "X"))).metadata.layout is not None  # compact
    p = op("save", root / "X", 2, "compact", crash_at=step)
    assert p.returncode == CRASH_EXIT, p.stdout
    assert_recovers(root, (1,) if OVERWRITE_STEPS.index(step) < 4 else (2,))
    assert catalog.open_checkpoint(catalog.source_of(str(root / "X"))).metadata.layout is not None


@pytest.mark.parametrize("step", ["clean:aside", "clean:restored"])
def test_clean_up_killed_while_restoring_a_crashed_overwrite(tmp_path, step):
    root = committed_root(tmp_path)
    assert op("save", root / "X", 2, crash_at="publish:renamed").returncode == CRASH_EXIT
    assert op("clean", root, crash_at=step).returncode == CRASH_EXIT
    assert_recovers(root, (1,))


@pytest.mark.parametrize("step", ["remove:unmarked", "remove:emptied"])
def test_a_retention_removal_killed_at_each_step(tmp_path, step):
    root = committed_root(tmp_path)
    assert op("remove", root / "a", crash_at=step).returncode == CRASH_EXIT
    assert listed(root) == {"X": str(root / "X")}  # a is gone from view at once, X untouched
    catalog.clean_stale(str(root), older_than_s=0)
    assert sorted(os.listdir(root)) == ["X"] and same(str(root / "X"), 1)


def test_a_link_removal_killed_right_after_it(tmp_path):
    root = committed_root(tmp_path)
    os.symlink("X", root / "last")
    assert op("remove", root / "last", crash_at="remove:link").returncode == CRASH_EXIT
    assert not os.path.lexists(root / "last")
    catalog.clean_stale(str(root), older_than_s=0)
    assert listed(root) == {"a": str(root / "a"), "X": str(root / "X")} and same(str(root / "X"), 1)


@pytest.mark.parametrize("step", ["publish:old-moved", "publish:renamed", "publish:committed", "remove:unmarked"])
def test_a_replication_killed_at_each_step_keeps_the_replica_committed(tmp_path, step):
    """A checkpoint replicated again after it changed (same name): the replica's old copy stays committed until
    the new one commits (it is never deleted first)."""
    root = committed_root(tmp_path)
    replica = tmp_path / "replica"
    assert op("replicate", root / "X", replica).returncode == 0
    assert op("save", root / "X", 2).returncode == 0  # the primary's X changes
    p = op("replicate", root / "X", replica, crash_at=step)
    assert p.returncode == CRASH_EXIT, p.stdout
    found = listed(replica)
    assert set(found) == {"X"} and any(same(found["X"], s) for s in (1, 2))
    catalog.clean_stale(str(replica), older_than_s=0)
    assert sorted(os.listdir(replica)) == ["X"] and verify(str(replica / "X")).ok
    assert op("replicate", root / "X", replica).returncode == 0 and same(str(replica / "X"), 2)


@pytest.mark.parametrize("step", ["copy:file", "publish:renamed"])
def test_a_killed_copy_resumes(tmp_path, step):
    root = committed_root(tmp_path)
    dst = tmp_path / "elsewhere" / "X"
    dst.parent.mkdir()
    p = op("-m", "lightning_distckpt.cli", "copy", root / "X", dst, crash_at=step)
    assert p.returncode == CRASH_EXIT, p.stdout
    assert listed(root) == {"a": str(root / "a"), "X": str(root / "X")}  # the source is never touched
    assert not listed(dst.parent)  # nothing half-copied is visible
    p = op("-m", "lightning_distckpt.cli", "copy", root / "X", dst)
    assert p.returncode == 0, p.stdout
    assert listed(dst.parent) == {"X": str(dst)} and verify(str(dst)).ok and same(str(dst), 1)
    assert sorted(os.listdir(dst.parent)) == ["X"]  # the staging directory of the first try was used up


@pytest.mark.parametrize("step", ["save:staged", "save:documents", "publish:old-moved", "publish:renamed"])
def test_gc_racing_a_save_at_each_step(tmp_path, step):
    """A save of X paused at ``step`` while ``distckpt gc --apply`` runs: gc leaves the live save alone, the
    save then commits, and nothing committed before is lost."""
    root = committed_root(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    saver = op("save", root / "X", 2, pause_at=f"{step}@{gate}", wait=False)
    deadline = time.monotonic() + 240
    while not (gate / "paused").exists():
        assert saver.poll() is None, saver.stdout.read()
        assert time.monotonic() < deadline, "the save never reached its pause point"
        time.sleep(0.05)
    assert listed(root).keys() == {"a", "X"} and same(listed(root)["X"], 1)  # X (maybe from trash) still there
    gc = op("-m", "lightning_distckpt.cli", "gc", root, "--apply")
    assert gc.returncode == 0, gc.stdout
    (gate / "resume").touch()
    assert saver.wait(timeout=300) == 0, saver.stdout.read()
    assert listed(root) == {"a": str(root / "a"), "X": str(root / "X")}
    assert sorted(os.listdir(root)) == ["X", "a"] and same(str(root / "X"), 2) and same(str(root / "a"), 1)


def test_a_forced_gc_during_a_save_costs_that_save_only(tmp_path):
    """``--older-than 0`` (documented as unsafe while a job writes) deletes the live staging directory: that
    save fails, and every committed checkpoint survives."""
    root = committed_root(tmp_path)
    gate = tmp_path / "gate"
    gate.mkdir()
    saver = op("save", root / "X", 2, pause_at=f"save:documents@{gate}", wait=False)
    deadline = time.monotonic() + 240
    while not (gate / "paused").exists():
        assert saver.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert op("-m", "lightning_distckpt.cli", "gc", root, "--apply", "--older-than", "0").returncode == 0
    (gate / "resume").touch()
    assert saver.wait(timeout=300) != 0 and "CheckpointSaveError" in saver.stdout.read()
    assert_recovers(root, (1,))


# Same-name overwrites inside 2-rank training: save_last=True overwrites "last" at every save (even crash point
# counts fall on "last": each step saves its own checkpoint, then "last"); each kill is followed by a resume
# from "last" that must restore the newest committed state exactly.
# CI runs the first two (the old copy moved aside; the new one renamed into place, not yet committed); every step
# of an overwrite is also crashed outside training (test_a_same_name_overwrite_killed_at_each_step); -m long: all four
OVERWRITE_IN_TRAINING = ["publish:old-moved#2", "publish:renamed#4", "publish:committed#4", "remove:emptied#3"]


@subset_by_default("points", OVERWRITE_IN_TRAINING[:2], OVERWRITE_IN_TRAINING)
def test_same_name_overwrite_crash_points_in_training_then_resume(tmp_path, points):
    t = Torture(tmp_path, str(tmp_path / "ckpts"), save_last=True, seed=3)
    while t.newest <= 0 and t.kills < 3:  # a first run leaves checkpoints, "last" among them (a busy machine may
        t.cycle(min_delay=1.0, max_delay=4.0)  # kill it before its first commit: then it runs again)
    assert t.newest > 0, t.log
    for point in points:
        t.cycle(crash_at=point)
    t.cycle(max_delay=0.3)
    assert t.resumes_checked >= len(points), t.log
    assert "last" in {c.name for c in list_checkpoints(str(tmp_path / "ckpts")) if c.committed}
    print("\n".join(t.log))


def test_every_named_crash_point_exists_in_the_package():
    """The torture's named crash points (tests/crashing.py) are steps the package really reaches: a renamed
    step would silently turn a crash test into a plain run."""
    import re

    from crashing import CRASH_POINTS

    source = "".join(p.read_text() for p in (ROOT / "lightning_distckpt").rglob("*.py"))
    steps = set(re.findall(r'crash_point\(\s*"([a-z-]+:[a-z-]+)"', source))
    steps |= {s for a, b in re.findall(r'crash_point\("([a-z:-]+)" if [^"]+ else "([a-z:-]+)"\)', source) for s in (a, b)}
    named = {spec.split("#")[0] for spec in CRASH_POINTS.values() if not spec[0].isdigit()}
    assert named and named <= steps, f"crash points no code reaches: {sorted(named - steps)} (known: {sorted(steps)})"
