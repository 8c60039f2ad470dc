"""Scaling of save and load: 1, 2 and 4 processes at ~1 GiB, and 0.25 / 0.5 / 1 / 2 GiB at 2 processes
(DDP, CPU, local disk, plugin vs dd of the same bytes). Each point is one run of bench_save_load.py in
plugin-only mode; all points run back to back in one invocation.

    python benchmarks/bench_scaling.py          # writes benchmarks/results/scaling.json
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import RESULTS, environment, write_result  # noqa: E402


def width_for(gib: float, depth: int = 6) -> int:
    return int(math.sqrt(gib * 2**30 / (12 * depth)))


def point(nproc: int, gib: float) -> dict:
    name = f"_scaling_{nproc}_{gib}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29731",
           os.path.join(HERE, "bench_save_load.py"), "--strategy", "ddp", "--repeats", "2", "--plugin-only",
           "--width", str(width_for(gib)), "--name", name, "--dir", "/tmp/distckpt-bench-scaling"]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    path = os.path.join(RESULTS, f"{name}.json")
    r = json.load(open(path))
    os.remove(path)
    s = r["seconds"]
    return {"nproc": nproc, "gib": r["state_bytes"] / 2**30, "save_s": s["plugin_save"]["median"],
            "load_s": s["plugin_load_cold"]["median"], "dd_fsync_s": s["dd_fsync"]["median"],
            "read_files_s": s["read_files_cold"]["median"], "max_read_over_state": r["max_read_over_state"]}  # fmt: skip


def main() -> None:
    points = [point(n, 1.0) for n in (1, 2, 4)] + [point(2, g) for g in (0.25, 0.5, 2.0)]
    print(write_result("scaling", {"benchmark": "scaling", "env": environment(), "points": points}))


if __name__ == "__main__":
    main()
