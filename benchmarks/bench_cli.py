"""Start-up time of the ``distckpt`` command, per subcommand, on a small local checkpoint.

    python benchmarks/bench_cli.py                  # 7 runs per command; writes benchmarks/results/cli.json
    python benchmarks/bench_cli.py --repeats 3 --out /tmp/cli.json

Each run is the installed console script in a fresh process (what a user types), timed from spawn to exit
(wall) and by the CPU time it used (user + system: what start-up costs, whatever else runs on the machine);
the checkpoint is tiny, so the time is the command's start-up plus a few small reads. The machine's load
average is recorded: on a shared machine wall times grow with it. For each command the
result also says whether torch (and Lightning) got imported (checked in one extra run through
``python -c``). References in the same run: a bare interpreter and ``import torch``.
Target: ``ls``, ``info``, ``verify``, ``gc`` and ``copy`` under 1 s (median).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import environment, write_result  # noqa: E402

FAST = ("ls", "info", "verify", "gc", "copy")  # must start without torch, in under 1 s


def make_checkpoint(root: str) -> str:
    import torch

    from lightning_distckpt import DistCheckpointIO

    torch.manual_seed(0)
    state = {"state_dict": {f"layer{i}.weight": torch.randn(256, 256) for i in range(4)}, "global_step": 10,
             "callbacks": {"EMA": {"shadow": torch.zeros(16)}}}  # fmt: skip
    url = os.path.join(root, "ckpts", "epoch=0-step=10")
    DistCheckpointIO(compression="lossless").save_checkpoint(state, url)
    return url


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, of the process and its children) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imported(argv: list[str], env: dict[str, str]) -> dict[str, bool]:
    """Which heavy modules running ``distckpt argv`` imports (in a fresh interpreter)."""
    code = ("import sys, json\nfrom lightning_distckpt.cli.main import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code or 0\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'lightning': 'lightning' in sys.modules}))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    last = p.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    if out.pop("rc") != 0:
        raise SystemExit(f"distckpt {' '.join(argv)} failed: {p.stderr[-2000:]}")
    return out


def stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "samples": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="runs per command")
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/cli.json)")
    args = ap.parse_args()
    exe = shutil.which("distckpt", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise SystemExit("the distckpt console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    work = tempfile.mkdtemp(prefix="bench-cli-")
    try:
        ckpt = make_checkpoint(work)
        root = os.path.dirname(ckpt)
        commands: dict[str, list[str]] = {
            "--version": ["--version"], "ls": ["ls", root], "info": ["info", ckpt], "verify": ["verify", ckpt],
            "gc": ["gc", root], "copy": ["copy", ckpt, os.path.join(work, "copies", "{i}")],
        }  # fmt: skip
        refs = {"python -c pass": [sys.executable, "-c", "pass"], "python -c 'import torch'": [sys.executable, "-c", "import torch"]}
        samples: dict[str, list[float]] = {k: [] for k in [*commands, *refs]}
        cpu: dict[str, list[float]] = {k: [] for k in [*commands, *refs]}
        loads = [os.getloadavg()[0]]
        for i in range(args.repeats):  # interleaved, so that a busy moment hits every command alike
            for name, argv in commands.items():
                wall, used = timed([exe, *[a.replace("{i}", str(i)) for a in argv]], env)
                samples[name].append(wall)
                cpu[name].append(used)
            for name, cmd in refs.items():
                wall, used = timed(cmd, env)
                samples[name].append(wall)
                cpu[name].append(used)
            loads.append(os.getloadavg()[0])
        heavy = {name: imported([a.replace("{i}", "probe") for a in argv], env) for name, argv in commands.items()}
        rows = {name: {"seconds": stats(samples[name]), "cpu_seconds": stats(cpu[name]), **heavy.get(name, {})}
                for name in samples}  # fmt: skip
        result = {
            "benchmark": "cli", "env": environment(), "repeats": args.repeats,
            "command": "python benchmarks/bench_cli.py " + " ".join(sys.argv[1:]),
            "checkpoint_bytes": sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)),
            "commands": rows, "target_s": 1.0, "load_average_1min": {"min": min(loads), "max": max(loads)},
            "target_met": all(rows[c]["seconds"]["median"] < 1.0 and not rows[c]["torch"] for c in FAST),
            "cpu_target_met": all(rows[c]["cpu_seconds"]["median"] < 1.0 and not rows[c]["torch"] for c in FAST),
        }  # fmt: skip
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, sort_keys=True)
        else:
            write_result("cli", result)
        for name, r in rows.items():
            s = r["seconds"]
            flag = "" if "torch" not in r else f"  torch {'imported' if r['torch'] else 'not imported'}"
            print(f"{name:<28} {s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f}), cpu "
                  f"{r['cpu_seconds']['median']:.3f} s{flag}")  # fmt: skip
        print(f"load average during the run: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
        print(f"target (ls/info/verify/gc/copy < 1 s, no torch): {'met' if result['target_met'] else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
