"""Randomly mutated documents (manifest, metadata, skeleton, marker, and the block index at the end of a compact
checkpoint's data files) fed to load, verify, ls and gc: exact data or
one of the package's own errors; no other exception, no hang, no allocation from a declared size
(tests/fuzzing.py says how). The default run takes a fixed subset (200 cases, seed 0, about 10 s); the long run
is ``pytest -m fuzz`` (``DISTCKPT_FUZZ_CASES`` cases per seed, ``DISTCKPT_FUZZ_SEEDS`` seeds). A ``-m`` given on the
command line replaces the default ``-m 'not fuzz'`` of pyproject.toml: add ``and not fuzz`` to keep it out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, env


def fuzz(seed: int, cases: int, tmp_path, timeout: float) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzzing.py"), "--seed", str(seed), "--cases", str(cases),
                        "--work", str(tmp_path / f"fuzz-{seed}")], capture_output=True, text=True, timeout=timeout,
                       env=env(MALLOC_ARENA_MAX="2"))  # fmt: skip
    assert p.returncode == 0, f"fuzz seed {seed} failed (exit {p.returncode}):\n{p.stderr[-8000:]}"
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    print(summary)
    return summary


def test_fuzzed_documents_give_exact_data_or_a_package_error(tmp_path):
    summary = fuzz(0, 200, tmp_path, timeout=600)
    outcomes = summary["outcomes"]
    assert sum(outcomes.values()) == 200
    # the cases reach every document, and both ways out: loads that succeed and refusals
    assert {k.split(":")[0] for k in outcomes} == {"manifest.json", "metadata.json", "state.json", "COMMITTED", "index"}
    assert any(k.endswith("loaded") for k in outcomes) and any(k.endswith("Error") for k in outcomes)


@pytest.mark.fuzz
@pytest.mark.timeout(0)  # minutes per seed; each fuzz process has its own bound below
def test_long_fuzz(tmp_path):
    cases = int(os.environ.get("DISTCKPT_FUZZ_CASES", "5000"))
    seeds = int(os.environ.get("DISTCKPT_FUZZ_SEEDS", "4"))
    for seed in range(1, seeds + 1):
        fuzz(seed, cases, tmp_path, timeout=max(600.0, cases * 0.5))
