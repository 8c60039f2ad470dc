"""Two torchrun agents as two nodes on this machine (static rendezvous on localhost, ``--nnodes=2``). Each
agent sees its own node id (``DISTCKPT_NODE_ID``), which is what the plugin uses to tell hosts apart
(balanced reads, the shared-root check); both share this machine's filesystem, except where a test gives
one agent a private mount (a tmpfs in its own mount namespace) to make a path truly node-local."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WORKLOADS, env, free_port, load_json
from test_distributed import assert_same_state

from lightning_distckpt import HdfsOptions, list_checkpoints, verify
from lightning_distckpt.storage import StorageConfig

pytestmark = pytest.mark.slow
ROOT_CFG = StorageConfig(hdfs=HdfsOptions(user="root"))


def agents(nnodes: int, nproc: int, strategy: str, ckpt: str, *args, wrap=None, timeout: float = 420,
           check: bool = True) -> list[subprocess.CompletedProcess]:
    """Run tests/workloads/train.py as ``nnodes`` torchrun agents of ``nproc`` processes each, concurrently."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node}",
               f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(WORKLOADS / "train.py"), "--strategy", strategy, "--ckpt-dir", ckpt, *map(str, args)]  # fmt: skip
        if wrap is not None:
            cmd = wrap(node, cmd)
        procs.append(subprocess.Popen(cmd, env=env(DISTCKPT_NODE_ID=f"node{node}"), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    if check:
        for node, r in enumerate(out):
            assert r.returncode == 0, f"node {node} failed ({r.returncode}):\n{r.stdout[-6000:]}"
    return out


@pytest.mark.hdfs
def test_two_nodes_save_to_hdfs_with_a_replica_and_resume_on_other_layouts(healthy_minidfs, tmp_path):
    base = f"{healthy_minidfs.namenode_url}/multinode-{time.monotonic_ns()}"
    primary, replica = f"{base}/primary", f"{base}/replica"
    user = ["--hdfs-user", "root"]
    # 2 nodes x 2 processes, DDP: every rank writes its share of the replicated state; a replica on the same HDFS
    agents(2, 2, "ddp", primary, "--max-steps", 4, "--save-every", 2, "--digest-dir", tmp_path, "--replicas", replica,
           *user)
    ckpts = list_checkpoints(primary, ROOT_CFG)
    newest = ckpts[-1].name
    assert newest.endswith("step=4") and all(c.committed for c in ckpts)
    assert verify(ckpts[-1].url, ROOT_CFG).ok
    assert verify(f"{replica}/{newest}", ROOT_CFG).ok  # the replica is complete too
    saved = load_json(tmp_path / "saved-4.json")

    # one node, 3 processes, ModelParallel (FSDP2): resharded from the 4-rank DDP checkpoint
    from conftest import train

    train("mp", 3, primary, "--max-steps", 4, "--resume", "last", "--final-digest", tmp_path / "one-node.json", *user)
    assert_same_state(saved, load_json(tmp_path / "one-node.json"))

    # two nodes, 1 process each, DDP: balanced reads per host (each node reads and holds everything)
    agents(2, 1, "ddp", primary, "--max-steps", 4, "--resume", "last", "--final-digest", tmp_path / "two-nodes.json",
           *user)
    assert_same_state(saved, load_json(tmp_path / "two-nodes.json"))


def _private_mount(root: Path):
    """Agent 1 runs in its own mount namespace with a tmpfs over ``root``: a node-local directory."""
    def wrap(node: int, cmd: list[str]) -> list[str]:
        if node == 0:
            return cmd
        script = f'mount -t tmpfs none "{root}" && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]

    return wrap


def _can_unshare(tmp_path: Path) -> bool:
    d = tmp_path / "probe-mount"
    d.mkdir()
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f'mount -t tmpfs none "{d}"'],
                       capture_output=True)
    return r.returncode == 0


def test_a_node_local_root_is_refused_at_setup_unless_declared(tmp_path):
    if not _can_unshare(tmp_path):
        pytest.skip("needs root and unshare(1) to give one agent a private mount")
    root = tmp_path / "local"
    root.mkdir()
    results = agents(2, 1, "ddp", str(root / "ckpts"), "--max-steps", 2, "--save-every", 1, wrap=_private_mount(root),
                     check=False)
    assert all(r.returncode != 0 for r in results)
    text = results[0].stdout + results[1].stdout
    assert "NodeLocalRootError" in text and "is not shared between the nodes" in text and "node1" in text
    assert not (root / "ckpts").exists() or list_checkpoints(str(root / "ckpts")) == []  # refused before any save

    # told that the root is node-local on purpose: no check (no save here; see DistCheckpointIO(node_local=True))
    agents(2, 1, "ddp", str(root / "ckpts2"), "--max-steps", 2, "--save-every", 1000, "--node-local",
           wrap=_private_mount(root))


def test_a_shared_root_passes_the_check(tmp_path):
    agents(2, 1, "ddp", str(tmp_path / "ck"), "--max-steps", 2, "--save-every", 2, "--digest-dir", tmp_path)
    (ck,) = list_checkpoints(str(tmp_path / "ck"))
    assert ck.committed and verify(ck.url).ok
