"""The ``distckpt`` command against real checkpoints on local storage and on HDFS, failure paths included."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback

import lightning as L
import pytest
import torch
from conftest import env, make_idle
from workloads.common import Net, data

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, load_checkpoint
from lightning_distckpt import ondisk as fmt
from lightning_distckpt.cli.main import main
from lightning_distckpt.catalog.replication import copy_checkpoint
from lightning_distckpt.storage import HdfsOptions, StorageConfig

EXE = shutil.which("distckpt", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def distckpt(*args, check: int | None = 0, installed: bool = False) -> subprocess.CompletedProcess:
    """Run the command: in this process through ``cli.main`` (fast), or as the installed console script."""
    argv = [str(a) for a in args]
    if installed:
        assert EXE, "the distckpt console script is not installed (pip install -e .)"
        p = subprocess.run([EXE, *argv], capture_output=True, text=True, env=env(), timeout=120)
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except Exception:  # --debug re-raises: what a user would see is the traceback
                code = 1
                err.write(traceback.format_exc())
        p = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "ckpts"
    torch.manual_seed(0)
    t = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  plugins=[DistCheckpointIO(compression="lossless")],
                  callbacks=[DistCheckpoint(dirpath=str(d), every_n_train_steps=2, keep_last=3)])  # fmt: skip
    model = Net(width=128)
    t.fit(model, data())
    return d


def test_ls_info_verify(root):
    rows = json.loads(distckpt("ls", root, "--json", "--verify").stdout)
    assert [r["name"] for r in rows] == ["epoch=0-step=2", "epoch=0-step=4", "epoch=0-step=6"]
    assert all(r["committed"] and r["verified"] and r["compression"] == "lossless" for r in rows)
    text = distckpt("ls", root, installed=True).stdout  # the console script itself
    assert "epoch=0-step=6" in text and "committed" in text
    info = json.loads(distckpt("info", root / "epoch=0-step=6", "--json").stdout)
    names = {t["name"]: t for t in info["tensors"]}
    assert names["model/net.0.weight"]["shape"] == [128, 16] and names["model/net.0.weight"]["stored_bytes"] > 0
    assert "loops" in info["state_keys"] and info["manifest"]["global_step"] == 6
    out = distckpt("verify", root / "epoch=0-step=6")
    assert out.stdout.strip().endswith("(4 files)") and "OK:" in out.stdout
    assert distckpt("verify", root / "epoch=0-step=6", "--quiet").stdout == ""


def test_export_torch_and_safetensors_load_without_this_package(root, tmp_path):
    ck = root / "epoch=0-step=6"
    trained = load_checkpoint(str(ck))["state_dict"]
    distckpt("export", ck, tmp_path / "w.pt", "--weights-only")
    weights = torch.load(tmp_path / "w.pt", weights_only=True)["state_dict"]
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in trained)
    distckpt("export", ck, tmp_path / "w.safetensors", "--format", "safetensors", "--dtype", "bf16")
    from safetensors.torch import load_file

    st = load_file(tmp_path / "w.safetensors")
    assert st["net.0.weight"].dtype == torch.bfloat16 and torch.equal(st["net.0.weight"], trained["net.0.weight"].bfloat16())
    out = json.loads(distckpt("export", ck, tmp_path / "sharded", "--format", "safetensors", "--shard-size-mb", 1,
                              "--quantize", "int8", "--json").stdout)  # fmt: skip
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(out["files"]) >= 2 and set(index["weight_map"]) >= {"net.3.weight", "net.3.weight.scale"}


def test_copy_is_verified_and_resumes_after_an_interruption(root, tmp_path):
    src = root / "epoch=0-step=6"
    dst = tmp_path / "copy"

    class Interrupted(Exception):
        pass

    seen = {"n": 0}

    def stop_half_way(n):
        seen["n"] += n
        if seen["n"] > 20_000:
            raise Interrupted

    with pytest.raises(Interrupted):
        copy_checkpoint(str(src), str(dst), progress=stop_half_way)
    assert not dst.exists() and [p for p in os.listdir(tmp_path) if ".staging-" in p]  # only a staging dir
    out = distckpt("copy", src, dst)
    assert "verified" in out.stdout and not [p for p in os.listdir(tmp_path) if ".staging-" in p]
    assert distckpt("verify", dst).returncode == 0
    assert distckpt("copy", src, dst, check=6).stderr.count("already exists") == 1  # never overwritten


def test_gc_is_a_dry_run_unless_applied(root, tmp_path):
    work = tmp_path / "gc"
    shutil.copytree(root, work)
    (work / fmt.staging_name("epoch=0-step=8", "x")).mkdir()
    make_idle(work / fmt.staging_name("epoch=0-step=8", "x"))  # a save that crashed an hour ago
    (work / fmt.staging_name("epoch=0-step=9", "y")).mkdir()  # a save in flight: left alone
    dry = json.loads(distckpt("gc", work, "--keep-last", 1, "--json").stdout)
    assert dry["dry_run"] and len(dry["removed"]) == 3 and len(os.listdir(work)) == 5
    distckpt("gc", work, "--keep-last", 1, "--apply")
    assert sorted(os.listdir(work)) == [fmt.staging_name("epoch=0-step=9", "y"), "epoch=0-step=6"]


def test_failure_paths_have_exit_codes_and_no_tracebacks(root, tmp_path):
    missing = distckpt("info", tmp_path / "nope", check=3, installed=True)
    assert "no such checkpoint" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad"
    shutil.copytree(root / "epoch=0-step=6", bad)
    os.remove(bad / fmt.MARKER)
    assert "never committed" in distckpt("verify", bad, check=3).stderr
    shutil.rmtree(bad)
    shutil.copytree(root / "epoch=0-step=6", bad)
    with open(bad / "__0_0.distcp", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    report = json.loads(distckpt("verify", bad, "--json", check=1).stdout)
    assert not report["ok"] and [f["name"] for f in report["files"] if not f["ok"]] == ["__0_0.distcp"]
    assert "checksum" in distckpt("export", bad, tmp_path / "x.pt", check=4).stderr
    assert "Traceback" in distckpt("export", bad, tmp_path / "x.pt", "--debug", check=None, installed=True).stderr


@pytest.mark.hdfs
def test_every_command_on_hdfs(healthy_minidfs, root, tmp_path):
    url = f"{healthy_minidfs.namenode_url}/cli-{os.getpid()}"
    copy_checkpoint(str(root / "epoch=0-step=6"), f"{url}/epoch=0-step=6", StorageConfig(hdfs=HdfsOptions()))
    rows = json.loads(distckpt("ls", url, "--json", "--verify").stdout)
    assert [(r["name"], r["verified"]) for r in rows] == [("epoch=0-step=6", True)]
    assert json.loads(distckpt("info", f"{url}/epoch=0-step=6", "--json").stdout)["manifest"]["global_step"] == 6
    distckpt("verify", f"{url}/epoch=0-step=6")
    distckpt("copy", f"{url}/epoch=0-step=6", tmp_path / "local")  # HDFS -> local, verified
    distckpt("export", f"{url}/epoch=0-step=6", tmp_path / "w.pt", "--weights-only")
    assert torch.load(tmp_path / "w.pt", weights_only=True)["state_dict"].keys() == Net(width=128).state_dict().keys()
    gc = json.loads(distckpt("gc", url, "--keep-last", 1, "--json").stdout)
    assert gc["removed"] == [] and len(gc["kept"]) == 1
    assert distckpt("verify", f"{url}/missing", check=3).returncode == 3
