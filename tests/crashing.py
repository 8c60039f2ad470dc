"""Kill-and-resume harness shared by the crash tests (local here, HDFS in test_hdfs.py).

A cycle starts a 2-rank training job that resumes from ``"last"`` and saves every step, waits until it
trains, SIGKILLs one rank at a random moment (or lets an injected crash point kill it), then kills what
is left of the job, as a lost node would. Between cycles it checks the invariants: every committed
checkpoint still verifies, the newest committed step never goes back, and the next run restores exactly
the state that was saved at the step it resumed from.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from conftest import WORKLOADS, env, free_port, load_json, torchrun_cmd

from lightning_distckpt import list_checkpoints, verify

#: Named crash points for the Lightning driver with ``save_last=True`` (each step saves ``epoch=..-step=N`` and
#: overwrites ``last``). ``<step>#<n>``: the package's own crash points (`lightning_distckpt.faults`,
#: ``DISTCKPT_CRASH_AT``): the process ends the n-th time it passes that step. ``<rank>:<LocalStore method>:<n>``:
#: that rank SIGKILLs itself at the n-th call (``DISTCKPT_TEST_CRASH``, tests/workloads/train.py). A resumed run
#: publishes the step checkpoint (#1), then overwrites ``last`` (#2), and so on; a fresh run's first ``last`` is
#: new. The clean-up's own points (``clean:aside``, ``clean:restored``) are not here: clean-up at setup leaves
#: leftovers younger than its idle age alone, so cycles seconds apart never reach them (tests/test_safety.py does).
CRASH_POINTS = {
    "save: staging made, nothing written": "save:staged#2",
    "save: rank 1 dies opening its data file": "1:open_write:3",
    "save: documents written, before publishing": "save:documents#3",
    "publish: renamed into place, before COMMITTED": "publish:renamed#3",
    "publish: just committed": "publish:committed#3",
    "overwrite of last: old copy moved aside": "publish:old-moved#1",
    "overwrite of last: new copy renamed, before COMMITTED": "publish:renamed#2",
    "removal: marker removed": "remove:unmarked#1",
    "removal: files deleted, manifest left": "remove:emptied#1",
}


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL a job's process and every process under it, then reap it. The ranks that torchrun starts run in
    sessions of their own: killing torchrun's process group alone (or torchrun) would leave them training."""
    try:
        tree = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for q in tree:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    p.wait()
    psutil.wait_procs(tree, timeout=30)


def crash_env(spec: str) -> dict[str, str]:
    """The environment that makes a job crash at ``spec`` (a `CRASH_POINTS` value)."""
    parts = spec.split(":")
    if len(parts) == 3 and parts[0].isdigit():
        return {"DISTCKPT_TEST_CRASH": spec}
    return {"DISTCKPT_CRASH_AT": spec}


@dataclass
class Torture:
    """``driver="lightning"``: tests/workloads/train.py (Trainer + DistCheckpoint, ckpt_path="last");
    ``driver="raw"``: tests/workloads/raw_train.py (the package's core without Lightning, half the start-up
    time), with ``replica_url`` receiving a copy of every checkpoint."""

    root: Path
    ckpt_url: str
    strategy: str = "ddp"
    width: int = 384
    seed: int = 0
    driver: str = "lightning"
    replica_url: str | None = None
    save_last: bool = False  # lightning driver: also save (overwrite) "last" at every save
    storage_env: dict[str, str] = field(default_factory=dict)
    #: True: a broken invariant raises AssertionError at once (tests). False: it is counted in ``problems`` and
    #: ``records`` and the torture goes on (the benchmark reports the fraction, never assumes it)
    strict: bool = True
    newest: int = -1
    kills: int = 0
    resumes_attempted: int = 0  # restarts that found a committed checkpoint to resume from
    resumes_checked: int = 0  # ... and restored exactly the newest one
    log: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per cycle: how it was killed, what resumed
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.digests = self.root / "digests"
        self.digests.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        if self.driver == "raw":
            replica = ["--replica", self.replica_url] if self.replica_url else []
            return torchrun_cmd(WORKLOADS / "raw_train.py", 2, "--primary", self.ckpt_url, *replica,
                                "--digest-dir", self.digests, "--width", self.width)  # fmt: skip
        replica = ["--replicas", self.replica_url] if self.replica_url else []
        return torchrun_cmd(WORKLOADS / "train.py", 2, "--strategy", self.strategy, "--ckpt-dir", self.ckpt_url,
                            "--max-steps", "100000", "--save-every", "1", "--keep-last", "3", "--resume", "last",
                            "--width", self.width, "--digest-dir", self.digests, *replica,
                            *(["--save-last"] if self.save_last else []))  # fmt: skip

    @property
    def roots(self) -> list[str]:
        return [self.ckpt_url] + ([self.replica_url] if self.replica_url else [])

    def _start(self, extra: dict[str, str], out: Any) -> list[subprocess.Popen]:
        """The job's processes: torchrun (its agent starts the ranks) or, for the raw driver, the two
        ranks started directly (no agent: a cycle starts ~3 s sooner)."""
        if self.driver != "raw":
            return [subprocess.Popen(self.command(), env=env(**self.storage_env, **extra), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)]  # fmt: skip
        port = str(free_port())
        cmd = self.command()[self.command().index(str(WORKLOADS / "raw_train.py")) :]
        return [subprocess.Popen([sys.executable, *cmd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=env(**self.storage_env, **extra, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                for r in range(2)]  # fmt: skip

    def cycle(self, crash: str | None = None, max_delay: float = 2.0, timeout: float = 120, min_delay: float = 0.0,
              label: str | None = None, crash_at: str | None = None) -> None:
        """Start the job (it resumes from "last"), check what it restored, kill it (``crash``: at that crash point,
        else at a random moment), then check the committed checkpoints. ``label`` names the kill in ``records``."""
        crash = crash or crash_at  # a named crash point of the package (lightning_distckpt/faults.py)
        started = self.digests / "started.json"
        started.unlink(missing_ok=True)
        extra = crash_env(crash) if crash else {}
        out = open(self.root / f"cycle-{self.kills}.log", "w")
        record: dict[str, Any] = {"kill": self.kills, "how": label or crash or "random", "newest_before": self.newest}
        t0 = time.monotonic()
        procs = self._start(extra, out)
        alive = lambda: all(p.poll() is None for p in procs)  # noqa: E731
        try:
            deadline = time.monotonic() + timeout
            while not started.exists():
                if not alive():
                    break  # an injected crash may end the job before training starts
                if time.monotonic() > deadline:
                    self._fail(record, f"job did not start training within {timeout:.0f} s; see {out.name}")
                    break
                time.sleep(0.05)
            self._check_restore(record)
            if alive():
                if crash:
                    procs[0].wait(timeout=timeout)  # the injected crash point kills a rank; the rest ends
                else:
                    record["delay_s"] = round(self.rng.uniform(min_delay, max_delay), 3)
                    time.sleep(record["delay_s"])
                    ranks = procs if len(procs) > 1 else [
                        p for p in psutil.Process(procs[0].pid).children(recursive=True)
                        if "train.py" in " ".join(p.cmdline())]  # fmt: skip
                    self.rng.choice(ranks).send_signal(signal.SIGKILL)
                    time.sleep(self.rng.uniform(0.0, 0.3))  # the other rank may be mid-save as well
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:  # what is left of the job dies too, as with a lost node
                _kill_tree(p)
            out.close()
        if crash:  # did it die there? (torchrun reports the rank's exit: 86 from a crash point, -9 from a SIGKILL)
            log = open(out.name, errors="replace").read()
            record["hit"] = "exitcode  : 86" in log or "exitcode  : -9" in log
        self.kills += 1
        self._check_committed(record)
        record["seconds"] = round(time.monotonic() - t0, 2)
        self.records.append(record)

    def final_restart(self, timeout: float = 120) -> None:
        """Start the job once more only to check what it restores after the last kill (not counted as a kill)."""
        self.cycle(max_delay=0.0, timeout=timeout, label="final restart")
        self.kills -= 1
        self.records[-1]["kill"] = None

    def _fail(self, record: dict[str, Any], problem: str, when: str = "restore") -> None:
        """A broken invariant: raised (``strict``) or counted. ``when``: found at the start ("restore", blamed on
        the previous kill) or after this kill ("committed")."""
        record.setdefault(f"{when}_problems", []).append(problem)
        self.problems.append(f"kill {record['kill']} ({record['how']}): {problem}")
        if self.strict:
            raise AssertionError(problem)

    def _check_restore(self, record: dict[str, Any] | None = None) -> None:
        record = record if record is not None else {"kill": self.kills, "how": "?"}
        s = load_json(self.digests / "started.json")["step"] if (self.digests / "started.json").exists() else None
        record["started_step"] = s
        if self.newest > 0 and s is not None:
            self.resumes_attempted += 1
            record["restored_exactly"] = False
        if s is None:
            return
        if s != max(self.newest, 0):  # a restart from scratch despite a checkpoint fails too
            self._fail(record, f"started at step {s}, but the newest committed checkpoint is step {self.newest}")
            return
        if s == 0:
            return
        saved, restored = load_json(self.digests / f"saved-{s}.json"), load_json(self.digests / f"restored-{s}.json")
        keys = ("model", "optim") if self.driver == "raw" else ("model", "optim0", "global_step", "lr_schedulers", "loops")
        differ = [key for key in keys if saved[key] != restored[key]]
        if differ:
            self._fail(record, f"step {s}: restored {', '.join(differ)} differ from what was saved")
            return
        self.resumes_checked += 1
        record["restored_exactly"] = True

    def _check_committed(self, record: dict[str, Any] | None = None) -> None:
        record = record if record is not None else {"kill": self.kills, "how": "?"}
        committed = [c for root in self.roots for c in list_checkpoints(root) if c.committed]
        steps = [c.manifest.global_step for c in committed if c.manifest]
        newest = max(steps, default=-1)
        if newest < self.newest:
            self._fail(record, f"newest committed step went back from {self.newest} to {newest}", "committed")
        for c in committed:
            if c.manifest and c.manifest.global_step is not None and c.manifest.global_step >= newest - 3:
                report = verify(c.url)  # (older replica copies are not re-read every cycle)
                if not report.ok:
                    self._fail(record, f"committed checkpoint {c.url} no longer verifies: {report}", "committed")
        self.log.append(f"kill {self.kills}: newest committed step {newest} ({len(committed)} committed copies)")
        record["newest_after"] = newest
        self.newest = newest

    def summary(self) -> dict[str, Any]:
        return {"kills": self.kills, "resumes_checked": self.resumes_checked, "newest": self.newest}
