"""Recovery: the 100-kill torture, the time an unreachable root takes to fail, and kill-to-resume times.

* ``torture``: a 2-rank DDP training job (Lightning + DistCheckpoint, ``ckpt_path="last"``, a save every step,
  ``keep_last=3``) is killed 100 times: at each named crash point of ``tests/crashing.py`` (``CRASH_POINTS``:
  the package's own crash points of the commit protocol, overwrites, clean-up and removals, and a rank dying
  mid-write; ``--repeats`` times each; ``save_last=True`` so that ``last`` is overwritten at every save) and,
  for the rest, with a replica root, by a SIGKILL of a random rank at a random moment (then the rest of the job,
  as a lost node). Each restart must resume from
  the newest committed checkpoint and restore it bit for bit (model, optimizer, scheduler, loops). Failures are
  counted, never assumed away: the fraction is restored-exactly / restarts-that-had-a-checkpoint.
* ``unreachable``: from ``Trainer.fit`` to the error, for a checkpoint root that cannot be reached (a closed port,
  a port that accepts and never answers; ``hdfs://`` via hdfs-native and ``webhdfs://``), each in a fresh process,
  with the default ``connect_timeout_s`` and a small one; the ``distckpt`` command on the same URL;
  ``--baseline-checkout DIR`` also times an older checkout of the package on the closed ``hdfs://`` port.
* ``resume``: seconds from starting a job to its first step with ~1 GiB of state: fresh, resumed from a healthy
  primary, and with every data file of the primary corrupted (read from the replica).

    python benchmarks/bench_recovery.py                                   # all parts
    python benchmarks/bench_recovery.py --parts torture --kills 100 --seed 2026
    python benchmarks/bench_recovery.py --parts unreachable --baseline-checkout /tmp/baseline
    # (the baseline: git archive 3c6323c | tar -x -C /tmp/baseline; its REV file names the commit in the report)

Results are merged into benchmarks/results/recovery.json (parts not run keep their last results, each with its
own date and command); ``python benchmarks/report.py`` renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from _common import environment, stats, write_result  # noqa: E402

WIDTH = 6700  # Net(width, depth=3): ~2 * WIDTH^2 parameters -> ~1 GiB with AdamW's two moments
RESULT = HERE / "results" / "recovery.json"


# ---- the torture -----------------------------------------------------------------------------------------------
def torture(work: Path, kills: int = 100, seed: int = 2026, repeats: int = 2, points: list[str] | None = None,
            max_delay: float = 2.0) -> dict[str, Any]:
    """``kills`` SIGKILLs: every named crash point ``repeats`` times (primary only: the points count store calls),
    the rest at random moments (with a replica root). Returns the counts, per crash point and in all."""
    from crashing import CRASH_POINTS, Torture

    names = list(points if points is not None else CRASH_POINTS)
    named = [n for _ in range(repeats) for n in names][:kills]
    parts: list[tuple[str, Torture]] = []
    t0 = time.monotonic()
    if named:
        a = Torture(work / "points", str(work / "points" / "ckpts"), seed=seed, strict=False, save_last=True)
        for name in named:
            a.cycle(crash=CRASH_POINTS[name], label=name)
        a.final_restart()
        parts.append(("crash points", a))
    if kills > len(named):
        b = Torture(work / "random", str(work / "random" / "primary"), replica_url=str(work / "random" / "replica"),
                    seed=seed + 1, strict=False)  # fmt: skip
        for _ in range(kills - len(named)):
            b.cycle(max_delay=max_delay)
        b.final_restart()
        parts.append(("random", b))
    by_how: dict[str, dict[str, Any]] = {}
    for _, t in parts:
        # a kill's outcome shows at the next start: did it resume from the newest committed checkpoint, exactly?
        for rec, nxt in zip(t.records, t.records[1:]):
            how = "random moment" if rec["how"] == "random" else rec["how"]
            row = by_how.setdefault(how, {"spec": CRASH_POINTS.get(how, ""), "kills": 0, "died_there": 0,
                                          "restarts_with_a_checkpoint": 0, "restored_newest_exactly": 0,
                                          "problems": []})  # fmt: skip
            row["kills"] += 1
            row["died_there"] += int(rec.get("hit", how == "random moment"))
            if "restored_exactly" in nxt:
                row["restarts_with_a_checkpoint"] += 1
                row["restored_newest_exactly"] += int(bool(nxt["restored_exactly"]))
            row["problems"] += rec.get("committed_problems", []) + nxt.get("restore_problems", [])
    attempted = sum(t.resumes_attempted for _, t in parts)
    exact = sum(t.resumes_checked for _, t in parts)
    return {
        "kills": sum(t.kills for _, t in parts),
        "seed": seed,
        "repeats_per_crash_point": repeats,
        "restarts_with_a_checkpoint": attempted,
        "restored_newest_exactly": exact,
        "recovered_fraction": exact / attempted if attempted else None,
        "problems": [p for _, t in parts for p in t.problems],
        "by_kill": by_how,
        "newest_step": {name: t.newest for name, t in parts},
        "seconds": round(time.monotonic() - t0, 1),
        "cycles": {name: t.records for name, t in parts},
    }


# ---- unreachable roots -----------------------------------------------------------------------------------------
JOB = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
import lightning as L
from lightning_distckpt import DistCheckpoint, DistCheckpointIO
from workloads.common import Net, data

url, timeout = sys.argv[1], sys.argv[2]
io = DistCheckpointIO() if timeout == "default" else DistCheckpointIO(connect_timeout_s=float(timeout))
steps = []

class Spy(L.Callback):
    def on_train_batch_start(self, *a, **k):
        steps.append(1)

trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, plugins=[io],
                    callbacks=[DistCheckpoint(dirpath=url, every_n_train_steps=1), Spy()])
t0 = time.monotonic()
try:
    trainer.fit(Net(), data())
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps({"fit_to_error_s": time.monotonic() - t0, "training_steps": len(steps), "error": error}))
"""


def _port(listening: bool) -> tuple[int, socket.socket | None]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    if listening:  # accepts connections (the kernel completes the handshake) and never answers
        s.listen(64)
        return s.getsockname()[1], s
    port = s.getsockname()[1]
    s.close()
    return port, None


def _job(url: str, timeout: str, pythonpath: str | None = None, limit_s: float = 900) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [pythonpath or str(ROOT), env.get("PYTHONPATH", "")] if p)
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", JOB, url, timeout, str(ROOT / "tests")], env=env,
                           capture_output=True, text=True, timeout=limit_s, cwd=tempfile.mkdtemp(prefix="unreach-"))  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"url": url, "connect_timeout_s": timeout, "fit_to_error_s": None, "training_steps": None,
                "error": f"no error within {limit_s:.0f} s (killed)", "process_s": limit_s}  # fmt: skip
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[-1][7:]) if line else {"fit_to_error_s": None, "training_steps": None,
                                                 "error": f"exit {p.returncode}: {(p.stdout + p.stderr)[-300:]}"}
    if out["error"]:
        out["error"] = out["error"][:400]
    return {"url": url, "connect_timeout_s": timeout, **out, "process_s": round(time.monotonic() - t0, 2)}


def _cli(url: str, timeout: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [] if timeout == "default" else ["--connect-timeout", timeout]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli.main", "ls", url, *args], env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    return {"url": url, "connect_timeout_s": timeout, "exit_code": p.returncode, "process_s": round(time.monotonic() - t0, 2),
            "error": p.stderr.strip().splitlines()[-1][:400] if p.stderr.strip() else ""}  # fmt: skip


def unreachable(small: str = "5", baseline: str | None = None, cases: list[tuple[str, str, str]] | None = None,
                cli_timeouts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Time from ``Trainer.fit`` to the error for roots that cannot be reached; each case in a fresh process."""
    refused, _ = _port(False)
    silent, server = _port(True)
    ports = {"refused": refused, "silent": silent}
    cases = cases or [("hdfs", "refused", "default"), ("hdfs", "refused", small), ("hdfs", "silent", small),
                      ("webhdfs", "refused", small), ("webhdfs", "silent", small)]  # fmt: skip
    try:
        rows = [dict(_job(f"{scheme}://127.0.0.1:{ports[server_kind]}/ck", timeout), scheme=scheme, server=server_kind)
                for scheme, server_kind, timeout in cases]  # fmt: skip
        cli = [dict(_cli(f"hdfs://127.0.0.1:{refused}/ck", t), scheme="hdfs", server="refused")
               for t in (cli_timeouts or ("default", small))]
        before = None
        if baseline:
            before = dict(_job(f"hdfs://127.0.0.1:{refused}/ck", "default", pythonpath=baseline), scheme="hdfs",
                          server="refused", checkout=_describe(baseline))  # fmt: skip
    finally:
        if server is not None:
            server.close()
    return {"jobs": rows, "cli": cli, "baseline": before}


def _describe(checkout: str) -> str:
    """The checkout's commit (``git log``, or a ``REV`` file beside an exported tree), else its path."""
    rev = Path(checkout) / "REV"
    if rev.exists():
        return rev.read_text().strip()[:100]
    try:
        out = subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        return out.stdout.strip()[:100] or checkout
    except OSError:
        return checkout


# ---- kill-to-resume times with ~1 GiB ----------------------------------------------------------------------------
def job(work: Path, *extra: str) -> float:
    """Start a 2-rank job that resumes from "last" and stops after one step; seconds to its first step."""
    from conftest import WORKLOADS, env, torchrun_cmd

    digests = work / "digests"
    digests.mkdir(parents=True, exist_ok=True)
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


def resume_times(work: Path, repeats: int = 3) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"fresh_start": [], "resume_primary": [], "resume_from_replica": []}
    for _ in range(repeats):
        shutil.rmtree(work / "primary", ignore_errors=True)
        shutil.rmtree(work / "replica", ignore_errors=True)
        rows["fresh_start"].append(job(work, "--max-steps", "2", "--save-every", "2"))  # also writes the checkpoint
        rows["resume_primary"].append(job(work, "--max-steps", "3", "--save-every", "100", "--resume", "last"))
        corrupt_newest_primary(work)
        rows["resume_from_replica"].append(job(work, "--max-steps", "3", "--save-every", "100", "--resume", "last"))
    from lightning_distckpt import list_checkpoints

    state_bytes = list_checkpoints(str(work / "replica"))[-1].manifest.tensor_bytes
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"state_bytes": state_bytes, "seconds_to_first_step": {k: stats(v) for k, v in rows.items()},
            "recovery_overhead_s": {"primary": med["resume_primary"] - med["fresh_start"],
                                    "replica": med["resume_from_replica"] - med["fresh_start"]}}  # fmt: skip


def _previous() -> dict[str, Any]:
    """The parts of the results file, read when writing (parts not run this time keep their last results)."""
    result: dict[str, Any] = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    if "seconds_to_first_step" in result:  # the layout before the parts: its resume times, kept as measured
        result["resume"] = {"env": result["env"], "command": "python benchmarks/bench_recovery.py",
                            **{k: result[k] for k in ("state_bytes", "seconds_to_first_step", "recovery_overhead_s")}}
        result.pop("torture", None)  # 30 random kills of the raw driver: replaced by this torture
    return {k: v for k, v in result.items() if k in ("torture", "unreachable", "resume")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="torture,unreachable,resume", help="comma-separated: torture, unreachable, resume")
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--repeats", type=int, default=2, help="kills at each named crash point")
    p.add_argument("--connect-timeout", default="5", help="the small connect_timeout_s timed beside the default")
    p.add_argument("--baseline-checkout", default=None, help="also time this checkout on the unreachable hdfs:// root")
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    result: dict[str, Any] = {}
    command = "python benchmarks/bench_recovery.py " + " ".join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))

    def save() -> None:  # after each part: a part that fails later does not lose what was measured before it
        print(write_result("recovery", {**_previous(), **result, "benchmark": "recovery"}))

    try:
        if "unreachable" in parts:
            result["unreachable"] = {"env": environment(), "command": command,
                                     **unreachable(args.connect_timeout, args.baseline_checkout)}  # fmt: skip
            print(json.dumps({k: v for k, v in result["unreachable"].items() if k != "env"}, indent=1))
            save()
        if "torture" in parts:
            result["torture"] = {"env": environment() | {"world_size": 2}, "command": command,
                                 **torture(work / "torture", args.kills, args.seed, args.repeats)}  # fmt: skip
            t = result["torture"]
            print({k: t[k] for k in ("kills", "restarts_with_a_checkpoint", "restored_newest_exactly", "recovered_fraction",
                                     "problems", "seconds")})  # fmt: skip
            save()
        if "resume" in parts:
            result["resume"] = {"env": environment() | {"world_size": 2}, "command": command, **resume_times(work / "resume")}
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
