"""A fixed, seeded subset of benchmarks/bench_recovery.py, so that CI runs the benchmark's own code: kills at two
named crash points and one at a random moment (with a replica), each restart checked, and an unreachable root
timed from ``Trainer.fit`` to its error. The 100-kill run is ``test_the_100_kill_torture`` (marker ``long``, not run
by default: ``pytest -m long``; benchmarks/bench_recovery.py records it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_recovery  # noqa: E402
from crashing import CRASH_POINTS  # noqa: E402


@pytest.mark.slow
def test_seeded_torture_subset_restores_the_newest_checkpoint_every_time(tmp_path):
    points = ["publish: renamed into place, before COMMITTED", "overwrite of last: old copy moved aside"]
    r = bench_recovery.torture(tmp_path, kills=3, seed=12, repeats=1, points=points)
    assert r["kills"] == 3
    assert set(r["by_kill"]) == {*points, "random moment"}
    assert r["problems"] == [], r["problems"]
    assert r["restarts_with_a_checkpoint"] >= 2, r["cycles"]  # the final restarts at least
    assert r["restored_newest_exactly"] == r["restarts_with_a_checkpoint"]


def test_crash_points_name_what_the_workload_injects():
    import re

    from lightning_distckpt import faults

    steps = set(re.findall(r"``([a-z]+:[a-z-]+)``", faults.__doc__ or ""))
    for name, spec in CRASH_POINTS.items():
        if spec.count(":") == 2:  # rank:LocalStore method:n
            rank, method, n = spec.split(":")
            assert rank in ("0", "1") and int(n) >= 1 and method in ("makedirs", "open_write", "write_bytes",
                                                                     "rename", "remove"), (name, spec)  # fmt: skip
        else:  # the package's own crash points
            step, _, n = spec.partition("#")
            assert step in steps and (not n or int(n) >= 1), (name, spec, steps)
    assert len(set(CRASH_POINTS.values())) == len(CRASH_POINTS)


def test_unreachable_root_timed_from_fit_to_error():
    r = bench_recovery.unreachable(cases=[("hdfs", "refused", "2")], cli_timeouts=("2",))
    [row] = r["jobs"]
    assert row["training_steps"] == 0, row
    assert row["error"].startswith("StorageUnreachableError") and "hdfs://127.0.0.1" in row["error"], row
    assert row["fit_to_error_s"] < 2 + 3, row  # connect_timeout_s plus setup on a busy machine
    assert all(c["exit_code"] == 5 and "unreachable" in c["error"] for c in r["cli"]), r["cli"]


@pytest.mark.slow
@pytest.mark.long  # deselected by default (pyproject addopts): pytest -m long tests/test_bench_recovery.py
def test_the_100_kill_torture(tmp_path):
    r = bench_recovery.torture(tmp_path, kills=100, seed=2026, repeats=2)
    assert r["kills"] == 100 and r["problems"] == [], r["problems"]
    assert r["restored_newest_exactly"] == r["restarts_with_a_checkpoint"] > 50
