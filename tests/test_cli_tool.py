"""The ``distckpt`` command against real checkpoints on local storage and on HDFS, failure paths included."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import time
import subprocess
import sys
import traceback

import lightning as L
import pytest
import torch
from conftest import ROOT, env, make_idle
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
        p = subprocess.run([EXE, *argv], capture_output=True, text=True, env=env(), timeout=600)
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


# ---- exit codes: one table (docs/cli.md, cli.common.EXIT_CODES), every command, every error class -----------
from lightning_distckpt.cli import common as C  # noqa: E402


def corrupt_manifest(src, dst):
    shutil.copytree(src, dst)
    with open(dst / fmt.MANIFEST, "r+b") as f:
        f.seek(10)
        f.write(b"#")


@pytest.fixture(scope="module")
def cases(root, tmp_path_factory):
    """One path per error class, each made from a real checkpoint."""
    d = tmp_path_factory.mktemp("cases")
    good = root / "epoch=0-step=6"
    afile = d / "a-file"
    afile.write_text("not a checkpoint")
    uncommitted = d / "uncommitted"
    shutil.copytree(good, uncommitted)
    os.remove(uncommitted / fmt.MARKER)
    corrupt_manifest(good, d / "bad-manifest")
    return {"good": good, "missing": d / "nope", "file": afile, "uncommitted": uncommitted,
            "bad_manifest": d / "bad-manifest", "dir": d}  # fmt: skip


def argv_for(command, path, tmp_path):
    return {"ls": ["ls", path], "info": ["info", path], "verify": ["verify", path],
            "export": ["export", path, tmp_path / "out.pt"], "copy": ["copy", path, tmp_path / "copied"],
            "gc": ["gc", path]}[command]  # fmt: skip


COMMANDS = ["ls", "info", "verify", "export", "copy", "gc"]
CKPT_COMMANDS = ["info", "verify", "export", "copy"]


@pytest.mark.parametrize("command", COMMANDS)
def test_not_found_is_3_with_one_line_and_json_on_stdout(command, cases, tmp_path):
    p = distckpt(*argv_for(command, cases["missing"], tmp_path), check=C.EXIT_NOT_FOUND)
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and str(cases["missing"]) in p.stderr
    j = distckpt(*argv_for(command, cases["missing"], tmp_path), "--json", check=C.EXIT_NOT_FOUND)
    err = json.loads(j.stdout)["error"]
    assert err["exit_code"] == 3 and err["type"] == "CheckpointNotFoundError" and str(cases["missing"]) in err["message"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_plain_file_is_3_not_a_checkpoint_for_every_command(command, cases, tmp_path):
    p = distckpt(*argv_for(command, cases["file"], tmp_path), "--json", check=C.EXIT_NOT_FOUND)
    assert json.loads(p.stdout)["error"]["type"] == "NotACheckpointError" and "Errno" not in p.stderr


def test_ls_on_a_checkpoint_itself_is_3_and_points_to_info(cases):
    assert "distckpt info" in distckpt("ls", cases["good"], check=C.EXIT_NOT_FOUND).stderr


@pytest.mark.parametrize("command", CKPT_COMMANDS)
def test_uncommitted_is_3(command, cases, tmp_path):
    assert "never committed" in distckpt(*argv_for(command, cases["uncommitted"], tmp_path), check=3).stderr


@pytest.mark.parametrize("command,code", [("verify", C.EXIT_FAILED), ("info", C.EXIT_CORRUPT), ("export", C.EXIT_CORRUPT),
                                          ("copy", C.EXIT_CORRUPT)])  # fmt: skip
def test_corrupt_manifest_verify_reports_1_others_4(command, code, cases, tmp_path):
    p = distckpt(*argv_for(command, cases["bad_manifest"], tmp_path), "--json", check=code)
    obj = json.loads(p.stdout)
    if command == "verify":  # a check that ran and failed: a report, not an error
        assert obj["ok"] is False and "manifest" in obj["error"].lower() or "marker" in obj["error"].lower()
    else:
        assert obj["error"]["type"] == "CorruptCheckpointError"
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "copied").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_s3_without_s3fs_is_a_storage_error_5(command, tmp_path):
    assert importlib.util.find_spec("s3fs") is None, "this test expects s3fs not to be installed"
    p = distckpt(*argv_for(command, "s3://bucket/ckpts/x", tmp_path), "--json", check=C.EXIT_STORAGE)
    err = json.loads(p.stdout)["error"]
    assert err["type"] == "BackendUnavailableError" and "s3://bucket" in err["message"] and "s3fs" in err["message"]


def test_usage_errors_are_2_also_in_json(cases, tmp_path):
    assert distckpt("ls", check=C.EXIT_USAGE).stderr.startswith("distckpt ls: ")
    assert distckpt("frobnicate", check=C.EXIT_USAGE).returncode == 2
    j = json.loads(distckpt("gc", cases["dir"], "--keep-last", "x", "--json", check=C.EXIT_USAGE).stdout)
    assert j["error"]["exit_code"] == 2 and "keep-last" in j["error"]["message"]
    assert "cannot tell the format" in distckpt("export", cases["good"], tmp_path / "w.data", check=2).stderr
    assert "--format torch" in distckpt("export", cases["good"], tmp_path / "w.safetensors", "--format", "torch", check=2).stderr
    assert distckpt("gc", cases["dir"], "--keep-last", "-1", check=2).returncode == 2


def test_usage_found_by_a_command_is_one_prefix_and_a_hint(cases, tmp_path):
    for got in (distckpt("ls", check=2), distckpt("export", cases["good"], tmp_path / "p.pt", "--prune", "0.5",
                                                  "--prune-threshold", "0.1", check=2),
                distckpt("export", cases["good"], tmp_path / "s", "--shard-size-mb", "0", "--format", "safetensors",
                         check=2)):  # fmt: skip
        first, hint = got.stderr.splitlines()
        assert first.count("distckpt ") == 1 and hint.startswith("run 'distckpt "), got.stderr
    assert not (tmp_path / "s").exists()


def test_outputs_inside_the_source_or_under_a_file_are_refused_naming_them(cases, tmp_path):
    """A copy or export into the checkpoint it is made from would go when that checkpoint is removed: refused (exit
    6); a destination whose directory is missing or is a file: one line naming what the user typed (exit 3)."""
    good = cases["good"]
    before = sorted(os.listdir(good))
    for cmd in (("copy", good, f"{good}/sub"), ("export", good, f"{good}/model.pt")):
        got = distckpt(*cmd, check=6)
        assert "inside the checkpoint" in got.stderr and cmd[2] in got.stderr, got.stderr
    assert sorted(os.listdir(good)) == before
    plain = tmp_path / "plain"
    plain.write_text("x")
    got = distckpt("copy", good, plain / "sub", check=3)
    assert f"{plain} is a file" in got.stderr and ".staging-" not in got.stderr, got.stderr
    got = distckpt("export", good, tmp_path / "nodir" / "x.pt", check=3)
    assert str(tmp_path / "nodir") in got.stderr and ".partial" not in got.stderr, got.stderr


def test_gc_on_a_checkpoint_and_ls_with_a_missing_replica_are_errors_not_silence(cases, tmp_path):
    assert "is a checkpoint" in distckpt("gc", cases["good"], check=3).stderr
    got = distckpt("ls", cases["dir"], "--replica", tmp_path / "typo", check=3)
    assert str(tmp_path / "typo") in got.stderr and "--replica" in got.stderr


def test_exit_code_table_in_the_docs_matches_the_code():
    doc = (ROOT / "docs" / "cli.md").read_text()
    rows = {int(line.split("|")[1]) for line in doc.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert rows == set(C.EXIT_CODES), f"docs/cli.md lists {sorted(rows)}, the code {sorted(C.EXIT_CODES)}"


def test_version_and_every_argument_of_every_command_has_help():
    from lightning_distckpt import __version__
    from lightning_distckpt.cli.main import parser

    assert distckpt("--version", installed=True).stdout.strip().endswith(__version__)
    missing = []

    def walk(p, prefix):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    help_of = {c.dest: c.help for c in a._choices_actions}
                    if not help_of.get(name):
                        missing.append(f"{prefix} {name} (the command)")
                    walk(sp, f"{prefix} {name}")
            elif not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"{prefix} {'/'.join(a.option_strings) or a.dest}")

    walk(parser(), "distckpt")
    assert not missing, f"arguments without help: {missing}"


# ---- export: format from the suffix, no silent overwrite, the user's umask, progress ---------------------
def test_export_infers_the_format_and_refuses_to_overwrite(root, tmp_path):
    ck = root / "epoch=0-step=6"
    from safetensors.torch import load_file

    out = json.loads(distckpt("export", ck, tmp_path / "w.safetensors", "--json").stdout)
    assert out["format"] == "safetensors" and "net.0.weight" in load_file(tmp_path / "w.safetensors")
    for suffix in (".pt", ".pth", ".ckpt"):
        distckpt("export", ck, tmp_path / f"full{suffix}")
        assert torch.load(tmp_path / f"full{suffix}", weights_only=True)["global_step"] == 6
    before = (tmp_path / "w.safetensors").read_bytes()
    p = distckpt("export", ck, tmp_path / "w.safetensors", "--dtype", "bf16", check=C.EXIT_REFUSED)
    assert "--force" in p.stderr and (tmp_path / "w.safetensors").read_bytes() == before
    distckpt("export", ck, tmp_path / "w.safetensors", "--dtype", "bf16", "--force")
    assert load_file(tmp_path / "w.safetensors")["net.0.weight"].dtype == torch.bfloat16
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_export_files_get_the_users_umask(root, tmp_path, umask):
    ck = root / "epoch=0-step=6"
    old = os.umask(umask)
    try:
        distckpt("export", ck, tmp_path / "w.safetensors")
        distckpt("export", ck, tmp_path / "w.pt", "--weights-only")
        distckpt("export", ck, tmp_path / "shards", "--shard-size-mb", 1)
    finally:
        os.umask(old)
    files = [tmp_path / "w.safetensors", tmp_path / "w.pt", *(tmp_path / "shards").iterdir()]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


def in_a_terminal(*args: str) -> str:
    """Run the installed command under a pseudo-terminal (util-linux ``script``) and return what it printed."""
    if not shutil.which("script"):
        pytest.skip("util-linux 'script' is not installed: no pseudo-terminal to show a progress bar in")
    cmd = " ".join(shlex.quote(str(a)) for a in [EXE, *args])
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, env={**env(), "COLUMNS": "120"},
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_progress_bars_in_a_terminal_count_binary_units(root, tmp_path):
    ck = root / "epoch=0-step=6"
    for args in (["export", ck, tmp_path / "w.pt"], ["verify", ck], ["copy", ck, tmp_path / "c"]):
        text = in_a_terminal(*args)
        assert re.search(r"\d B / [\d.]+ KiB", text), text  # the bar drew: bytes done / total, binary units
        assert not re.search(r"\d ?(kB|MB|GB)\b", text), text


# ---- copy into an existing directory, like cp -----------------------------------------------------------
def test_copy_into_an_existing_directory_keeps_the_name(root, tmp_path):
    src = root / "epoch=0-step=6"
    (tmp_path / "backup").mkdir()
    out = json.loads(distckpt("copy", src, tmp_path / "backup", "--json").stdout)
    assert out["dst"] == str(tmp_path / "backup" / "epoch=0-step=6")
    assert distckpt("verify", tmp_path / "backup" / "epoch=0-step=6").returncode == 0
    distckpt("copy", src, f"{tmp_path}/new/")  # a trailing slash names a directory to copy into, made if needed
    assert (tmp_path / "new" / "epoch=0-step=6" / fmt.MARKER).exists()
    again = distckpt("copy", src, tmp_path / "backup", check=C.EXIT_REFUSED)
    assert "already exists" in again.stderr
    refused = distckpt("copy", src, tmp_path / "backup" / "epoch=0-step=6", check=C.EXIT_REFUSED)
    assert "remove it first" in refused.stderr  # a checkpoint is never a folder to copy into


# ---- info: codecs per tensor, what extra/N holds ---------------------------------------------------------
@pytest.fixture(scope="module")
def with_extra(tmp_path_factory):
    d = tmp_path_factory.mktemp("info")
    torch.manual_seed(0)
    state = {"state_dict": {"net.0.weight": torch.randn(128, 64), "net.0.bias": torch.randn(128)},
             "callbacks": {"EMA": {"shadow": [torch.ones(3), torch.zeros(2)]}}, "global_step": 3}  # fmt: skip
    for c in ("lossless", "int8"):
        DistCheckpointIO(compression=c).save_checkpoint(state, str(d / c))
    return d


def test_info_shows_tensor_and_block_codecs_and_what_extra_holds(with_extra):
    lossless = json.loads(distckpt("info", with_extra / "lossless", "--json").stdout)
    by = {t["name"]: t for t in lossless["tensors"]}
    assert all(t["tensor_codec"] is None and t["block_codec"] == "shuffle-zstd-1" for t in lossless["tensors"])
    assert by["extra/0"]["path"] == "callbacks/EMA/shadow[0]" and by["extra/1"]["path"] == "callbacks/EMA/shadow[1]"
    text = distckpt("info", with_extra / "lossless").stdout
    assert "int8" not in text and "exact/shuffle-zstd-1" in text and "callbacks/EMA/shadow[1]" in text
    assert lossless["manifest"]["compression"]["tensor_codecs"] == {}
    int8 = {t["name"]: t for t in json.loads(distckpt("info", with_extra / "int8", "--json").stdout)["tensors"]}
    assert int8["model/net.0.weight"]["tensor_codec"] == "int8-rows" and int8["model/net.0.weight"]["block_codec"] == "raw"
    assert int8["model/net.0.bias"]["tensor_codec"] is None and int8["model/net.0.weight"]["chunks"] == 1
    assert "int8-rows/raw" in distckpt("info", with_extra / "int8").stdout


# ---- Ctrl-C and a closed pipe end quietly ----------------------------------------------------------------
def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    """A command waiting on a store that never answers (a local socket that accepts and stays silent) is
    interrupted: exit 130, nothing printed."""
    import socket

    pytest.importorskip("requests", reason="webhdfs:// (the silent store used here) needs requests")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(120)
    port = server.getsockname()[1]
    # as in a terminal: SIGINT at its default (a test run started in the background, `cmd &` or nohup, has it
    # ignored, and a child inherits that), set by a small launcher that then execs the command (no preexec_fn:
    # forking a threaded pytest and running Python before exec can deadlock). Output goes to files, and the
    # test waits for the process itself: a pipe would also wait for anything that inherited it
    launcher = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    out_f, err_f = open(tmp_path / "out", "w"), open(tmp_path / "err", "w")
    p = subprocess.Popen([sys.executable, "-c", launcher, EXE, "ls", f"webhdfs://127.0.0.1:{port}/ckpts",
                          "--connect-timeout", "600"], stdout=out_f, stderr=err_f, text=True, env=env())  # fmt: skip
    try:
        conn, _ = server.accept()  # the command is inside its work, waiting for an answer
        time.sleep(0.5)  # its main thread is waiting on the call, not still starting it
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
        conn.close()
    finally:
        server.close()
        out_f.close()
        err_f.close()
        if p.poll() is None:
            p.kill()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert p.returncode == C.EXIT_INTERRUPTED and out == "" and err == "", (p.returncode, out, err)


def test_a_closed_pipe_exits_141_quietly(tmp_path):
    for i in range(1500):  # enough rows to fill a pipe's buffer
        (tmp_path / f"crashed-save-{i:04d}").mkdir()
        (tmp_path / f"crashed-save-{i:04d}" / "__0_0.distcp").write_bytes(b"")
    p = subprocess.run(["bash", "-c", f"{shlex.quote(EXE)} ls {shlex.quote(str(tmp_path))} | head -n 2; "
                                      "echo \"status=${PIPESTATUS[0]}\" >&2"],
                       capture_output=True, text=True, env=env(), timeout=300)  # fmt: skip
    assert len(p.stdout.splitlines()) == 2 and "UNCOMMITTED" in p.stdout
    assert p.stderr.strip() == f"status={C.EXIT_PIPE}", p.stderr
