"""The GPU check, as one script for a lent GPU machine (one GPU): correctness first, then timings.

    python benchmarks/gpu_check.py --out "$OUT"                     # on the GPU machine
    python benchmarks/gpu_check.py --accelerator cpu --small --out /tmp/x   # dry run of the driver here

1. Exact resume on the GPU through a chain of strategies (ModelParallel/FSDP2 -> FSDPStrategy -> DDP ->
   single device -> ModelParallel on 2 CPU processes (gloo) -> back to the GPU), with async (pipelined)
   saves, twice: with lossless compression (``chain``) and uncompressed (``chain_uncompressed``, reads
   straight into GPU memory through pinned buffers): every hop checks that the restored state is bitwise
   the saved one (the digests of tests/workloads/train.py).
2. ``bench_async.py`` on the GPU: training stall of async vs sync vs stock saves (the snapshot is a
   device-to-pinned-host copy).
3. ``bench_save_load.py`` on the GPU: save and load time vs Lightning's stock checkpointing and ``dd``.

Each step writes its JSON as soon as it ends (into ``--out`` and benchmarks/results/), so a run cut short
still returns what it finished; ``gpu_check.json`` sums up and holds every key ``report.py`` reads from it:
``gpu``, ``torch``, ``chain``, ``chain_ok``, ``chain_compression``, ``chain_uncompressed``,
``chain_uncompressed_ok`` and, per timing part, its return code and ratios. It is written to
benchmarks/results/ too, so the report reads exactly what this run produced (never a file assembled by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tests" / "workloads" / "train.py"
sys.path.insert(0, str(TRAIN.parent))
from common import state_differences  # noqa: E402


def sh(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tempfile.mkdtemp())
    return p.returncode, (p.stdout + p.stderr)[-4000:], time.perf_counter() - t0


def launch(nproc: int, script: Path, *args: Any) -> list[str]:
    if nproc == 0:
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
            *map(str, args)]  # fmt: skip


def chain(work: Path, accel: str, env: dict[str, str], width: int, compression: str) -> list[dict[str, Any]]:
    hops = [("mp", 1, accel), ("fsdp", 1, accel), ("ddp", 1, accel), ("single", 1, accel), ("mp", 2, "cpu"),
            ("mp", 1, accel)]
    ckpt, digests = work / "chain", work / "digests"
    digests.mkdir(parents=True, exist_ok=True)
    out = []
    for hop, (strategy, n, device) in enumerate(hops):
        step = 4 + hop
        args = ["--strategy", strategy, "--ckpt-dir", ckpt, "--max-steps", step, "--save-every", 4 if hop == 0 else 1,
                "--digest-dir", digests, "--width", width, "--async-save",
                *(["--compression", compression] if compression != "none" else []),
                *([] if hop == 0 else ["--resume", "last"])]  # fmt: skip
        rc, log, secs = sh(launch(0 if strategy == "single" else n, TRAIN, *args),
                           {**env, "DISTCKPT_TEST_ACCELERATOR": device}, timeout=180)  # fmt: skip
        row: dict[str, Any] = {"hop": hop, "strategy": strategy, "procs": n, "device": device, "rc": rc,
                               "seconds": round(secs, 1)}  # fmt: skip
        if rc == 0 and hop:
            saved = json.loads((digests / f"saved-{step - 1}.json").read_text())
            restored = json.loads((digests / f"restored-{step - 1}.json").read_text())
            row["differs"] = state_differences(saved, restored)
        row["ok"] = rc == 0 and not row.get("differs")
        if not row["ok"]:
            row["log_tail"] = log
        out.append(row)
        print("chain", {k: v for k, v in row.items() if k != "log_tail"}, flush=True)
        if rc != 0:
            print(log, flush=True)
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny sizes (a dry run of this driver)")
    p.add_argument("--skip-chain", action="store_true", help="timings only (the chain's result stays as it was)")
    p.add_argument("--skip-bench", action="store_true", help="the chain only")
    p.add_argument("--compression", default="lossless", help="of the chain's saves (none: uncompressed)")
    p.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="distckpt-gpu-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    summary: dict[str, Any] = {"accelerator": args.accelerator}

    def save_summary() -> None:
        text = json.dumps(summary, indent=1, sort_keys=True)
        (out / "gpu_check.json").write_text(text)
        (ROOT / "benchmarks" / "results" / "gpu_check.json").write_text(text)

    import torch

    summary["torch"] = torch.__version__
    summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    summary["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if not args.skip_chain:
        summary["chain"] = chain(work / args.compression, args.accelerator, env, 32, args.compression)
        summary["chain_compression"] = args.compression
        summary["chain_ok"] = all(r["ok"] for r in summary["chain"]) and len(summary["chain"]) == 6
        save_summary()
        summary["chain_uncompressed"] = chain(work / "none", args.accelerator, env, 32, "none")
        summary["chain_uncompressed_ok"] = all(r["ok"] for r in summary["chain_uncompressed"]) and len(summary["chain_uncompressed"]) == 6
        save_summary()

    width, depth = (256, 2) if args.small else (8192, 4)  # 8192x8192x4: 1.07 GB of fp32 weights, 3.2 GB with AdamW
    summary["model"] = {"width": width, "depth": depth}
    benches = [
        ("async_gpu_mp", "bench_async.py", ["--strategy", "mp", "--reps", 3, "--rss-saves", 4]),
        ("save_load_gpu_mp", "bench_save_load.py", ["--strategy", "mp", "--repeats", 2]),
    ]
    for name, script, extra in [] if args.skip_bench else benches:
        cmd = launch(1, ROOT / "benchmarks" / script, "--accelerator", args.accelerator, "--width", width,
                     "--depth", depth, "--dir", work / name, "--name", name, *extra)  # fmt: skip
        rc, log, secs = sh(cmd, env, timeout=300)
        summary[name] = {"rc": rc, "seconds": round(secs, 1), "log_tail": log[-1500:]}
        result = ROOT / "benchmarks" / "results" / f"{name}.json"
        if rc == 0 and result.exists():
            shutil.copy(result, out / result.name)
            summary[name]["ratios"] = json.loads(result.read_text()).get("ratios")
        print(name, "rc", rc, f"{secs:.0f}s", summary[name].get("ratios"), flush=True)
        if rc:
            print(log, flush=True)
        save_summary()
        shutil.rmtree(work / name, ignore_errors=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "chain"}, indent=1, default=str)[-3000:])


if __name__ == "__main__":
    main()
