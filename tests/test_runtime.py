"""Runtime guarantees of issue 12: unreachable or misconfigured storage fails at setup within
``connect_timeout_s`` (before any training step, with the URL in the message); load decisions are collective
(ranks that list storage differently, or that are short of memory, still agree); blocks repaired from a
replica are reported."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings

import lightning as L
import pytest
import torch
from conftest import WORKLOADS, load_json, run, torchrun_cmd
from workloads.common import Net, data

from lightning_distckpt import (
    DistCheckpoint,
    DistCheckpointIO,
    HdfsOptions,
    InsufficientMemoryError,
    BackendUnavailableError,
    StorageError,
    StorageUnreachableError,
    list_checkpoints,
)
from lightning_distckpt.storage import BoundedFileSystem, StorageConfig, probe

TIMEOUT = 2.0  # connect_timeout_s in these tests
SLACK = 3.0  # what a check may take beyond it (thread start-up, a busy machine)


def closed_port() -> int:
    """A port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers (a hung NameNode or gateway)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
    yield s.getsockname()[1]
    s.close()


class StepSpy(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.steps += 1


def trainer(callback: DistCheckpoint, io: DistCheckpointIO | None = None, max_steps: int = 2, **kw) -> tuple[L.Trainer, StepSpy]:
    spy = StepSpy()
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[io or DistCheckpointIO(connect_timeout_s=TIMEOUT)],
                  callbacks=[callback, spy], **kw)  # fmt: skip
    return t, spy


# ---- item 5: unreachable storage fails fast, at setup ----------------------------------------------------------
@pytest.mark.parametrize("scheme", ["hdfs", "webhdfs"])
@pytest.mark.parametrize("server", ["refused", "silent"])
def test_unreachable_root_fails_at_setup_within_connect_timeout(scheme, server, request):
    if scheme == "hdfs" and importlib.util.find_spec("hdfs_native") is None:
        pytest.skip("hdfs:// needs hdfs-native (pip install 'lightning-distckpt[hdfs]')")
    port = closed_port() if server == "refused" else request.getfixturevalue("silent_port")
    url = f"{scheme}://127.0.0.1:{port}/ck"
    io = DistCheckpointIO(hdfs=HdfsOptions(connect_timeout_s=TIMEOUT))  # the HDFS setting applies to both schemes
    t, spy = trainer(DistCheckpoint(dirpath=url, every_n_train_steps=1), io)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as e:
        t.fit(Net(), data())
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + SLACK, elapsed
    assert url in str(e.value) and f"connect_timeout_s={TIMEOUT:g}" in str(e.value), str(e.value)
    assert spy.steps == 0  # before the first training step
    if server == "refused":  # what was tried, and what answered
        assert "tried listing" in str(e.value) and "refused" in str(e.value).lower(), str(e.value)


def test_model_checkpoint_filesystem_calls_are_bounded(silent_port):
    """ModelCheckpoint's own ``self._fs`` calls on a URL root go through the package's bounded client."""
    url = f"webhdfs://127.0.0.1:{silent_port}/ck"
    cb = DistCheckpoint(dirpath=url)
    cb._io = DistCheckpointIO(connect_timeout_s=TIMEOUT)
    assert isinstance(cb._fs, BoundedFileSystem)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=f"ls {url}|/ck"):
        cb._fs.ls(url)
    assert time.monotonic() - start < TIMEOUT + SLACK
    local = DistCheckpoint(dirpath="/tmp/somewhere")
    assert type(local._fs).__name__ == "LocalFileSystem"  # local paths keep fsspec's local filesystem


def test_probe_reports_reachable_roots_and_absent_ones(tmp_path):
    assert probe(str(tmp_path)).exists
    assert not probe(str(tmp_path / "not-yet")).exists  # a root the first save will create
    with pytest.raises(StorageError, match="is a file"):
        (tmp_path / "f").write_text("x")
        probe(str(tmp_path / "f"))
    with pytest.raises(ValueError, match="connect_timeout_s"):
        StorageConfig(connect_timeout_s=0)


def test_default_connect_timeout_is_at_most_30_s():
    assert DistCheckpointIO().storage.connect_timeout_s <= 30
    assert StorageConfig().connect_timeout("hdfs://nn:8020/x") <= 30
    assert StorageConfig(connect_timeout_s=7, hdfs=HdfsOptions(connect_timeout_s=3)).connect_timeout("hdfs://nn/x") == 3
    assert StorageConfig(connect_timeout_s=7, hdfs=HdfsOptions(connect_timeout_s=3)).connect_timeout("s3://b/x") == 7


def test_cli_on_an_unreachable_root_fails_within_connect_timeout():
    url = f"hdfs://127.0.0.1:{closed_port()}/ck"
    start = time.monotonic()
    proc = run([sys.executable, "-m", "lightning_distckpt.cli.main", "ls", url, "--connect-timeout", str(TIMEOUT)],
               check=False, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert url in proc.stderr and "unreachable" in proc.stderr, proc.stderr
    assert elapsed < TIMEOUT + 15, elapsed  # + interpreter start-up and imports on a busy machine


# ---- item 6: misconfiguration surfaces at setup ---------------------------------------------------------------
def test_dirpath_that_is_a_file_fails_at_setup(tmp_path):
    f = tmp_path / "ckpts"
    f.write_text("not a directory")
    t, spy = trainer(DistCheckpoint(dirpath=str(f), every_n_train_steps=1))
    with pytest.raises(StorageError, match=f"{f}.*is a file"):
        t.fit(Net(), data())
    assert spy.steps == 0
    assert f.read_text() == "not a directory"


def test_replica_without_backend_fails_at_setup(tmp_path):
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here: s3:// has a backend")
    t, spy = trainer(DistCheckpoint(dirpath=str(tmp_path / "p"), every_n_train_steps=1, replicas=["s3://bucket/ck"]))
    with pytest.raises(BackendUnavailableError, match=r"s3://bucket/ck.*s3fs"):
        t.fit(Net(), data())
    assert spy.steps == 0 and not (tmp_path / "p").exists()


def test_replica_down_at_setup_is_a_warning_and_a_metric(tmp_path):
    down = f"webhdfs://127.0.0.1:{closed_port()}/ck"
    cb = DistCheckpoint(dirpath=str(tmp_path / "p"), every_n_train_steps=2, replicas=[down], replication_timeout_s=1)
    t, spy = trainer(cb, max_steps=2)
    with pytest.warns(UserWarning, match=f"REPLICA UNREACHABLE AT SETUP: {down}"):
        t.fit(Net(), data())
    assert spy.steps == 2 and [c.name for c in list_checkpoints(str(tmp_path / "p"))] == ["epoch=0-step=2"]
    assert t.callback_metrics["distckpt/replicas_unreachable"] == 1


# ---- item 4: memory is its own error, never a fallback ---------------------------------------------------------
def test_memory_shortage_is_its_own_error_and_never_a_fallback(tmp_path, monkeypatch):
    t, _ = trainer(DistCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, keep_last=2), max_steps=4)
    t.fit(Net(), data())
    assert len(list_checkpoints(str(tmp_path))) == 2
    import psutil

    real = psutil.virtual_memory
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=1000))
    t, spy = trainer(DistCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2), max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InsufficientMemoryError, match=r"step=4.*rank 0 needs \d+ bytes, 1000 free"):
            t.fit(Net(), data(), ckpt_path="last")
    assert not [w for w in caught if "OLDER CHECKPOINT" in str(w.message)]
    assert spy.steps == 0


# ---- item 7: repairs are reported ------------------------------------------------------------------------------
def fit_replicated(dirpath, replicas, max_steps, resume=None) -> tuple[L.Trainer, DistCheckpoint]:
    torch.manual_seed(0)
    cb = DistCheckpoint(dirpath=str(dirpath), every_n_train_steps=2, replicas=[str(r) for r in replicas])
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[DistCheckpointIO()], callbacks=[cb])  # fmt: skip
    t.fit(Net(), data(), ckpt_path=resume)
    return t, cb


def test_a_block_repaired_from_a_replica_is_reported(tmp_path):
    primary, replica = tmp_path / "p", tmp_path / "r"
    fit_replicated(primary, [replica], 2)
    victim = primary / "epoch=0-step=2" / "__0_0.distcp"
    data_ = bytearray(victim.read_bytes())
    data_[len(data_) // 2] ^= 0x10
    victim.write_bytes(bytes(data_))
    with pytest.warns(UserWarning, match=r"REPAIRED ON LOAD: __0_0\.distcp: the copy in .*/p/epoch=0-step=2 failed "
                                         r"verification \(.*checksum\); \d+ block\(s\) were read from the copy in "
                                         r".*/r/epoch=0-step=2"):  # fmt: skip
        t, cb = fit_replicated(primary, [replica], 2, resume="last")
    io = t.strategy.checkpoint_io
    assert t.callback_metrics["distckpt/repaired_blocks"] >= 1
    assert io.stats.repaired_blocks == t.callback_metrics["distckpt/repaired_blocks"]
    assert "__0_0.distcp" in io.stats.load_failures and "checksum" in io.stats.load_failures["__0_0.distcp"]
    [repair] = io.stats.load_repairs
    assert repair["file"] == "__0_0.distcp" and repair["bad"].endswith("p/epoch=0-step=2")
    assert repair["good"].endswith("r/epoch=0-step=2") and repair["blocks"] >= 1


def test_a_healthy_resume_reports_no_repair(tmp_path):
    fit_replicated(tmp_path / "p", [tmp_path / "r"], 2)
    t, _ = fit_replicated(tmp_path / "p", [tmp_path / "r"], 2, resume="last")
    io = t.strategy.checkpoint_io
    assert io.stats.load_repairs == [] and io.stats.repaired_blocks == 0
    assert t.callback_metrics["distckpt/repaired_blocks"] == 0


# ---- item 4 with two ranks -------------------------------------------------------------------------------------
def train2(ckpt: str, digests, *args, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return run(torchrun_cmd(WORKLOADS / "train.py", 2, "--strategy", "ddp", "--ckpt-dir", ckpt, "--digest-dir",
                            digests, *args), timeout=timeout, check=False, **env)  # fmt: skip


def flip(path) -> None:
    b = bytearray(open(path, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(path, "wb").write(bytes(b))


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    """Checkpoints at steps 2 and 4 written by 2 DDP ranks (with their saved-state digests)."""
    base = tmp_path_factory.mktemp("two-ranks")
    proc = train2(str(base / "ckpts"), base, "--max-steps", 4, "--save-every", 2, "--keep-last", 2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return base


@pytest.mark.slow
@pytest.mark.parametrize("hide_on", ["0", "1"])
def test_ranks_that_list_differently_still_load_the_same_checkpoint(two_rank_checkpoints, tmp_path, hide_on):
    """One rank's listing lacks the newest checkpoint; rank 0's view decides for both, and the newest copy is
    damaged so that a fallback is needed: both ranks take the same fallback, in time."""
    ckpts = tmp_path / "ckpts"
    shutil.copytree(two_rank_checkpoints / "ckpts", ckpts)
    for f in ("saved-2.json", "saved-4.json"):
        shutil.copy(two_rank_checkpoints / f, tmp_path / f)
    flip(ckpts / "epoch=0-step=4" / "__1_0.distcp")
    proc = train2(str(ckpts), tmp_path, "--max-steps", 2, "--save-every", 100, "--resume", "last",
                  "--final-digest", tmp_path / "restored.json", "--stats", tmp_path / "stats.json", timeout=180,
                  DISTCKPT_TEST_HIDE=f"{hide_on}:epoch=0-step=4")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = load_json(tmp_path / "stats.json")
    assert stats["loaded_from"].endswith("epoch=0-step=2"), stats
    if hide_on == "1":  # rank 0 saw the newest, found it damaged and fell back, with rank 1 following
        assert "falling back to the previous checkpoint" in out, out[-4000:]  # (warnings are off in workloads)
    saved, restored = load_json(tmp_path / "saved-2.json"), load_json(tmp_path / "restored.json")
    for key in ("model", "optim0", "global_step", "lr_schedulers", "loops"):
        assert saved[key] == restored[key], key


@pytest.mark.slow
def test_a_memory_shortage_on_one_rank_is_the_same_error_on_every_rank(two_rank_checkpoints, tmp_path):
    proc = train2(str(two_rank_checkpoints / "ckpts"), tmp_path, "--max-steps", 6, "--save-every", 100, "--resume",
                  "last", timeout=180, DISTCKPT_TEST_FREE_MEMORY="1:1000")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [ln for ln in out.splitlines() if "InsufficientMemoryError" in ln and "rank 1 needs" in ln]
    for rank in (0, 1):
        assert any(f"[rank{rank}]" in ln for ln in lines), out[-4000:]
    assert "rank 0 needs" not in out and "OLDER CHECKPOINT" not in out, out[-4000:]
    assert not os.path.exists(tmp_path / "started.json")  # no training step ran
