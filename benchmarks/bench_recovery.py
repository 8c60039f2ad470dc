"""Kill-to-resume recovery time for ~1 GiB of state on 2 ranks (DDP): from starting the new job to its first
training step, with the primary healthy, and with every data file of the primary's newest checkpoint
corrupted (everything is read from the replica). A fresh start with no checkpoint is the baseline (process
start-up and setup). Plus the fraction of torture runs recovered: 30 SIGKILLs at random moments of 2-rank
saves and replications, each followed by a resume that must restore the newest committed state exactly.

    python benchmarks/bench_recovery.py        # writes benchmarks/results/recovery.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import environment, stats, write_result  # noqa: E402

WIDTH = 6700  # Net(width, depth=3): ~2 * WIDTH^2 parameters -> ~1 GiB with AdamW's two moments


def job(work: Path, *extra: str) -> float:
    """Start a 2-rank job that resumes from "last" and stops after one step; seconds to its first step."""
    from conftest import WORKLOADS, env, torchrun_cmd

    digests = work / "digests"
    digests.mkdir(exist_ok=True)
    (digests / "started.json").unlink(missing_ok=True)
    cmd = torchrun_cmd(WORKLOADS / "train.py", 2, "--strategy", "ddp", "--ckpt-dir", work / "primary", "--replicas",
                       work / "replica", "--width", WIDTH, "--digest-dir", digests, "--timing-only", *extra)  # fmt: skip
    t0 = time.time()
    subprocess.run(cmd, env=env(), check=True, capture_output=True, cwd=work)
    return json.loads((digests / "started.json").read_text())["time"] - t0


def corrupt_newest_primary(work: Path) -> str:
    from lightning_distckpt import list_checkpoints

    newest = [c for c in list_checkpoints(str(work / "primary")) if c.committed][-1]
    for f in os.listdir(newest.url):
        if f.endswith(".distcp"):
            with open(os.path.join(newest.url, f), "r+b") as fh:
                fh.seek(1000)
                fh.write(b"\x00corrupt\x00")
    return newest.name


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    try:
        rows: dict[str, list[float]] = {"fresh_start": [], "resume_primary": [], "resume_from_replica": []}
        for rep in range(3):
            shutil.rmtree(work / "primary", ignore_errors=True)
            shutil.rmtree(work / "replica", ignore_errors=True)
            rows["fresh_start"].append(job(work, "--max-steps", "2", "--save-every", "2"))  # also writes the checkpoint
            rows["resume_primary"].append(job(work, "--max-steps", "3", "--save-every", "100", "--resume", "last"))
            corrupt_newest_primary(work)
            rows["resume_from_replica"].append(job(work, "--max-steps", "3", "--save-every", "100", "--resume", "last"))
        from lightning_distckpt import list_checkpoints

        state_bytes = list_checkpoints(str(work / "replica"))[-1].manifest.tensor_bytes
        from crashing import Torture

        t = Torture(work / "torture", str(work / "torture" / "primary"), driver="raw",
                    replica_url=str(work / "torture" / "replica"), seed=2026)  # fmt: skip
        cycles = 30
        for _ in range(cycles):
            t.cycle(max_delay=1.5)
        t.cycle(max_delay=0.3)
        med = {k: statistics.median(v) for k, v in rows.items()}
        result = {
            "benchmark": "recovery", "env": environment() | {"world_size": 2}, "state_bytes": state_bytes,
            "seconds_to_first_step": {k: stats(v) for k, v in rows.items()},
            "recovery_overhead_s": {"primary": med["resume_primary"] - med["fresh_start"],
                                    "replica": med["resume_from_replica"] - med["fresh_start"]},
            "torture": {"kills": t.kills, "restarts_with_a_checkpoint": t.resumes_attempted,
                        "restored_newest_exactly": t.resumes_checked,
                        "recovered_fraction": t.resumes_checked / max(1, t.resumes_attempted), "newest_step": t.newest},
        }  # fmt: skip
        print(write_result("recovery", result))
        print(json.dumps(result["recovery_overhead_s"]), result["torture"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
