"""Shared fixtures: running workloads under torchrun, free ports, the repository root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ROOT / "tests" / "workloads"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONWARNINGS"] = "ignore"
    e.update(extra)
    return e


def torchrun_cmd(script: str | Path, nproc: int, *args: Any) -> list[str]:
    if nproc == 0:  # one plain process, no torch.distributed
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(script), *map(str, args)]  # fmt: skip


def run(cmd: list[str], timeout: float = 240, check: bool = True, cwd: Path | None = None,
        **env_extra: str) -> subprocess.CompletedProcess:
    """Run a command with the package importable; the default working directory is a throwaway one."""
    if cwd is None:
        import tempfile

        cwd = Path(tempfile.mkdtemp(prefix="distckpt-run-"))
    proc = subprocess.run(cmd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- output ---\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def train(strategy: str, nproc: int, ckpt_dir: Path | str, *args: Any, timeout: float = 240,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/workloads/train.py with ``strategy`` on ``nproc`` processes (single: one plain process)."""
    n = 0 if strategy == "single" else nproc
    return run(torchrun_cmd(WORKLOADS / "train.py", n, "--strategy", strategy, "--ckpt-dir", ckpt_dir, *args),
               timeout=timeout, check=check)


def load_json(path: Path | str) -> Any:
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
