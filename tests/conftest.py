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


def subset_by_default(name: str, subset: list, full: list) -> pytest.MarkDecorator:
    """Parametrize ``name`` with ``subset`` (id ``ci``, the default run) and ``full`` (id ``all``, marked ``long``:
    ``pytest -m long``), for matrices too slow to run in full within the suite's 25 minutes. The full set may take
    several times the default 600 s per test on a busy 2-core machine: its limit is an hour."""
    full_set = pytest.param(full, marks=[pytest.mark.long, pytest.mark.timeout(3600)])
    return pytest.mark.parametrize(name, [subset, full_set], ids=["ci", "all"])


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


def rewrite_document(url: str, name: str, data: bytes) -> None:
    """Replace a checkpoint document and recompute the manifest and marker, as a malicious author would."""
    from lightning_distckpt import ondisk as fmt

    open(os.path.join(url, name), "wb").write(data)
    manifest = json.load(open(os.path.join(url, fmt.MANIFEST)))
    manifest["files"][name] = {"size": len(data), "xxh3": fmt.digest(data)}
    mbytes = fmt.dumps(manifest)
    open(os.path.join(url, fmt.MANIFEST), "wb").write(mbytes)
    open(os.path.join(url, fmt.MARKER), "wb").write(fmt.marker_bytes(mbytes))


def make_idle(path: Path | str, seconds: float = 3600.0) -> None:
    """Set the times of a directory and of everything directly in it ``seconds`` into the past, as if the
    save that left it had crashed that long ago (clean-up leaves recent leftovers alone)."""
    import time

    when = time.time() - seconds
    for name in os.listdir(path):
        os.utime(os.path.join(path, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when))


def uncommitted_copy(src: Path | str, dst: Path | str, idle: bool = True) -> str:
    """A copy of the committed checkpoint ``src`` at ``dst`` as a save that crashed between its rename and its
    commit marker leaves it: its manifest names ``dst``, there is no marker (idle for an hour by default)."""
    import shutil

    from lightning_distckpt import ondisk as fmt

    shutil.copytree(src, dst)
    manifest = json.load(open(os.path.join(dst, fmt.MANIFEST)))
    manifest["name"] = os.path.basename(str(dst).rstrip("/"))
    open(os.path.join(dst, fmt.MANIFEST), "wb").write(fmt.dumps(manifest))
    os.remove(os.path.join(dst, fmt.MARKER))
    if idle:
        make_idle(dst)
    return str(dst)


def load_json(path: Path | str) -> Any:
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


# ---- the test HDFS: one MiniDFSCluster (1 NameNode, 4 DataNodes) for the whole session ----------------
@pytest.fixture(scope="session")
def minidfs(tmp_path_factory):
    from hdfs_cluster import MiniDfs, java_home_or_none

    java_home, reason = java_home_or_none()
    if java_home is None:
        pytest.skip(f"HDFS tests need Java 17 (Hadoop 3.5 breaks on Java 23+): {reason}")
    with MiniDfs.start(tmp_path_factory.mktemp("minidfs"), datanodes=4, java_home=java_home) as dfs:
        yield dfs


@pytest.fixture
def healthy_minidfs(minidfs):
    """The cluster with every DataNode and the NameNode up (tests that stop nodes restart them)."""
    status = minidfs.status()
    for i in status.get("stopped_datanodes", []):
        minidfs.restart_datanode(i)
    if not status.get("namenode_up", True):
        minidfs.restart_namenode()
    return minidfs


# ---- the test HBase: one mini HBase (ZooKeeper, master, region server, Thrift gateway) for the session ----
@pytest.fixture(scope="session")
def minihbase(tmp_path_factory):
    from hbase_cluster import MiniHBase, java_home_or_none

    java_home, reason = java_home_or_none()
    if java_home is None:
        pytest.skip(f"HBase tests need Java 17 (HBase 2.6 breaks on Java 23+): {reason}")
    pytest.importorskip("happybase", reason="HBase tests need happybase: pip install 'lightning-distckpt[hbase]'")
    with MiniHBase.start(tmp_path_factory.mktemp("minihbase"), java_home=java_home) as hb:
        yield hb


@pytest.fixture
def healthy_minihbase(minihbase):
    """The mini HBase with its Thrift gateway up (tests that stop it start it again)."""
    if not minihbase.status().get("thrift_up", True):
        minihbase.start_thrift()
    return minihbase
