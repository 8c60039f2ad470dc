"""Checkpoints on a real HDFS (MiniDFSCluster, 4 DataNodes) through hdfs-native and webhdfs: 2-rank
save and resume under DDP and ModelParallel, another world size, DataNodes lost during a save and during
a load, a NameNode that is down, and SIGKILLs during saves."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import WORKLOADS, env, load_json, torchrun_cmd, train
from crashing import Torture
from test_distributed import assert_same_state

from lightning_distckpt import CheckpointSaveError, DistCheckpointIO, HdfsOptions, list_checkpoints, verify
from lightning_distckpt.catalog import clean_stale
from lightning_distckpt.storage import StorageConfig

pytestmark = [pytest.mark.hdfs, pytest.mark.slow]
ROOT_CFG = StorageConfig(hdfs=HdfsOptions(user="root"))


def url_for(dfs, scheme: str, name: str) -> str:
    base = dfs.namenode_url if scheme == "hdfs" else dfs.webhdfs_url
    return f"{base}/{name}-{time.monotonic_ns()}"


# DDP and ModelParallel both save and resume, over both clients, and each resume changes the world size
CASES = [("hdfs", "ddp", 2, "mp", 3), ("webhdfs", "mp", 2, "ddp", 3)]


@pytest.mark.parametrize("scheme,src,n_src,dst,n_dst", CASES, ids=[f"{c[0]}-{c[1]}{c[2]}-to-{c[3]}{c[4]}" for c in CASES])
def test_two_rank_save_and_resume(healthy_minidfs, tmp_path, scheme, src, n_src, dst, n_dst):
    url = url_for(healthy_minidfs, scheme, "ck")
    user = ["--hdfs-user", "root"]
    train(src, n_src, url, "--max-steps", 4, "--save-every", 2, "--keep-last", 2, "--digest-dir", tmp_path, *user,
          "--hdfs-replication", 2, "--compression", "lossless", "--async-save")  # composes with HDFS
    ckpts = list_checkpoints(url, ROOT_CFG)
    assert [c.name for c in ckpts] == ["epoch=0-step=2", "epoch=0-step=4"] and all(c.committed for c in ckpts)
    assert all(verify(c.url, ROOT_CFG).ok for c in ckpts)
    train(dst, n_dst, url, "--max-steps", 4, "--save-every", 2, "--resume", "last", "--final-digest",
          tmp_path / "restored.json", *user)
    assert_same_state(load_json(tmp_path / "saved-4.json"), load_json(tmp_path / "restored.json"))


def test_viewfs_urls_go_through_the_mount_table_to_the_cluster(healthy_minidfs):
    from urllib.parse import urlparse

    target = url_for(healthy_minidfs, "hdfs", "vfs")  # where the mount table points
    mount = {"fs.viewfs.mounttable.ckpts.link./ckpt": target,  # what core-site.xml would hold
             "fs.viewfs.mounttable.ckpts.linkFallback": healthy_minidfs.namenode_url + "/elsewhere"}
    io = DistCheckpointIO(hdfs=HdfsOptions(user="root", config=mount))
    io.save_checkpoint({"w": torch.arange(1000.0)}, "viewfs://ckpts/ckpt/first")
    assert torch.equal(io.load_checkpoint("viewfs://ckpts/ckpt/first")["w"], torch.arange(1000.0))
    (ckpt,) = list_checkpoints(target, ROOT_CFG)  # the checkpoint lives on the mounted cluster
    assert ckpt.name == "first" and ckpt.committed and urlparse(ckpt.url).path.endswith("/first")


def test_replication_factor_is_applied(healthy_minidfs):
    url = url_for(healthy_minidfs, "hdfs", "repl")
    DistCheckpointIO(hdfs=HdfsOptions(replication=2, block_size_mb=1)).save_checkpoint({"w": torch.randn(600_000)}, url)
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    infos = [fs.client.get_file_info(f) for f in fs.ls(path, detail=False) if f.endswith(".distcp")]
    assert infos and all(i.replication == 2 and i.blocksize == 1 << 20 for i in infos), infos


def _run_paused(dfs, tmp_path: Path, pause: str, args: list, during) -> subprocess.CompletedProcess:
    """Run a 2-rank job that pauses at ``pause``; call ``during()`` while it waits; let it finish."""
    folder = tmp_path / "pause"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_cmd(WORKLOADS / "train.py", 2, *args)
    proc = subprocess.Popen(cmd, env=env(DISTCKPT_TEST_PAUSE=f"{pause}:{folder}"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not (folder / "paused").exists():
        assert proc.poll() is None, f"job ended before pausing:\n{''.join(out)[-4000:]}"
        assert time.monotonic() < deadline, "job never paused"
        time.sleep(0.05)
    during()
    (folder / "resume").touch()
    proc.wait(timeout=240)
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(out)[-6000:]
    return proc


def test_datanodes_lost_during_save_and_during_load(healthy_minidfs, tmp_path):
    dfs = healthy_minidfs
    url = url_for(dfs, "hdfs", "dn")
    base = ["--strategy", "ddp", "--ckpt-dir", url, "--width", 512, "--save-every", 4, "--digest-dir", tmp_path]
    # rank 0 pauses inside the second data stream of the first save; two of four DataNodes go away
    _run_paused(dfs, tmp_path / "save", "0:open_write:2", [*base, "--max-steps", 4],
                lambda: (dfs.stop_datanode(0), dfs.stop_datanode(1)))
    (ckpt,) = list_checkpoints(url)
    report = verify(ckpt.url)
    assert report.ok, report
    dfs.restart_datanode(0)
    dfs.restart_datanode(1)
    # What was written while 0 and 1 were away lives on 2 and 3 only until the NameNode re-replicates it, and a
    # DataNode that came back with a stale replica of a block is no target for it: a real cluster does the
    # same (losing both holders of a block loses it: see the test below). So the resume loses two of the four
    # DataNodes: 2 and 3 if the NameNode has re-replicated by now, else one that was away and one that was not,
    # whichever pair the replicas survive (read from the NameNode's block locations, not assumed).
    lost = dfs.wait_losable(url, [(2, 3), (0, 2), (0, 3), (1, 2), (1, 3)])
    print(f"DataNodes lost during the resume: {lost}")
    # the resume pauses at its second read (listing "last"); the two DataNodes go away meanwhile
    _run_paused(dfs, tmp_path / "load", "0:open_read:2",
                [*base, "--max-steps", 4, "--resume", "last", "--final-digest", tmp_path / "restored.json"],
                lambda: [dfs.stop_datanode(i) for i in lost])
    assert_same_state(load_json(tmp_path / "saved-4.json"), load_json(tmp_path / "restored.json"))


def test_last_refuses_to_start_over_while_no_datanode_can_serve_the_newest_marker(healthy_minidfs, tmp_path):
    """The NameNode lists the checkpoints, but no DataNode can serve their blocks: ``ckpt_path="last"``
    fails naming the file, after the store's retries, instead of training from scratch; once the DataNodes are
    back the same call resumes the newest checkpoint."""
    import lightning as L
    from workloads.common import Net, data

    from lightning_distckpt import DistCheckpoint, StorageError

    dfs = healthy_minidfs
    url = url_for(dfs, "hdfs", "nodn")
    io = lambda: DistCheckpointIO(hdfs=HdfsOptions(retries=2, backoff_s=0.1))  # noqa: E731
    trainer = lambda steps: L.Trainer(  # noqa: E731
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[io()], callbacks=[DistCheckpoint(dirpath=url, every_n_train_steps=2, keep_last=2)])
    torch.manual_seed(0)
    trainer(4).fit(Net(), data())
    assert [c.name for c in list_checkpoints(url)] == ["epoch=0-step=2", "epoch=0-step=4"]
    stopped = []
    try:
        for i in range(4):
            dfs.stop_datanode(i)
            stopped.append(i)
        t = trainer(6)
        with pytest.raises(StorageError, match=r"(?s)epoch=0-step=.*refusing to pass it over"):
            t.fit(Net(), data(), ckpt_path="last")
        assert t.global_step == 0
        assert {c.status for c in list_checkpoints(url)} == {"unreadable"}
    finally:
        for i in stopped:
            dfs.restart_datanode(i)
    t = trainer(6)
    t.fit(Net(), data(), ckpt_path="last")
    assert t.global_step == 6 and [c.name for c in list_checkpoints(url)][-1] == "epoch=0-step=6"


def test_namenode_down_gives_a_clear_error_and_loses_nothing(healthy_minidfs):
    dfs = healthy_minidfs
    root = url_for(dfs, "hdfs", "nn")
    io = DistCheckpointIO(hdfs=HdfsOptions(retries=3, backoff_s=0.2))
    io.save_checkpoint({"w": torch.arange(1000.0)}, f"{root}/first")
    dfs.stop_namenode()
    try:
        t0 = time.monotonic()
        with pytest.raises(CheckpointSaveError, match=r"(?s)second.*failed 3 times.*(refused|Connection)"):
            io.save_checkpoint({"w": torch.zeros(1000)}, f"{root}/second")
        assert time.monotonic() - t0 < 30  # bounded: three fast attempts with backoff
    finally:
        dfs.restart_namenode()
    assert [c.name for c in list_checkpoints(root)] == ["first"]
    assert verify(f"{root}/first").ok
    assert torch.equal(io.load_checkpoint(f"{root}/first")["w"], torch.arange(1000.0))
    assert clean_stale(root) == []  # nothing half-written was left behind


def test_kills_during_saves_to_hdfs(healthy_minidfs, tmp_path):
    t = Torture(tmp_path, url_for(healthy_minidfs, "hdfs", "torture"), width=256, seed=7, driver="raw")
    for _ in range(4):
        t.cycle(min_delay=1.0, max_delay=4.0)
    t.cycle(max_delay=0.5)
    assert t.newest > 0 and t.resumes_checked >= 2, t.log


def test_pyarrow_client_where_hadoop_is_installed(healthy_minidfs):
    """pyarrow's HadoopFileSystem needs a Hadoop installation (JVM, libhdfs.so, CLASSPATH)."""
    import glob

    libdirs = [os.environ.get("ARROW_LIBHDFS_DIR", ""), os.path.join(os.environ.get("HADOOP_HOME", "/nonexistent"), "lib", "native")]
    if not any(glob.glob(os.path.join(d, "libhdfs.so*")) for d in libdirs if d):
        pytest.skip("pyarrow's HDFS client needs libhdfs.so from a Hadoop installation (set ARROW_LIBHDFS_DIR or "
                    "HADOOP_HOME); none is installed here and no reachable registry ships one")  # fmt: skip
    url = url_for(healthy_minidfs, "hdfs", "pyarrow")
    io = DistCheckpointIO(hdfs=HdfsOptions(client="pyarrow"))
    io.save_checkpoint({"w": torch.arange(10.0)}, url)
    assert torch.equal(io.load_checkpoint(url)["w"], torch.arange(10.0)) and verify(url).ok
