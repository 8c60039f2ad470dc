"""Single-process behaviour: resume, the plain CheckpointIO API, export, and every bad-input error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import rewrite_document, uncommitted_copy
from workloads.common import Net, data

from lightning_distckpt import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    CorruptCheckpointError,
    DistCheckpoint,
    DistCheckpointIO,
    NotACheckpointError,
    StateMismatchError,
    UncommittedCheckpointError,
    UnsafeCheckpointError,
    export_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify,
)
from lightning_distckpt import ondisk as fmt


def trainer(ckpt_dir, max_steps, **cb) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, plugins=[DistCheckpointIO()],
                     callbacks=[DistCheckpoint(dirpath=str(ckpt_dir), **({"every_n_train_steps": 2} | cb))])  # fmt: skip


def fit(ckpt_dir, max_steps, resume=None, model=None, **cb) -> tuple[L.Trainer, Net]:
    torch.manual_seed(0)
    model = model or Net()
    t = trainer(ckpt_dir, max_steps, **cb)
    t.fit(model, data(), ckpt_path=resume)
    return t, model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A directory with committed checkpoints at steps 2, 4, 6 (keep_last=3)."""
    d = tmp_path_factory.mktemp("saved") / "ckpts"
    fit(d, 6, keep_last=3)
    return d


def newest(d) -> str:
    return list_checkpoints(str(d))[-1].url


def copy_ckpt(src: str, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_resume_restores_state_exactly(tmp_path):
    # one epoch is 8 steps; saving at its end makes the resumed data order identical
    t_ref, ref = fit(tmp_path / "a", 16, every_n_train_steps=8)
    fit(tmp_path / "b", 8, every_n_train_steps=8)
    t_res, res = fit(tmp_path / "b", 16, resume="last", every_n_train_steps=8)
    assert t_res.global_step == 16
    for (k, a), (_, b) in zip(ref.state_dict().items(), res.state_dict().items()):
        assert torch.equal(a, b), k
    a = t_ref.optimizers[0].state_dict()["state"]
    b = t_res.optimizers[0].state_dict()["state"]
    assert all(torch.equal(a[i][n], b[i][n]) for i in a for n in a[i])


def test_keep_last_keeps_newest_and_ckpt_last_ignores_uncommitted(tmp_path, saved):
    names = [c.name for c in list_checkpoints(str(saved))]
    assert names == ["epoch=0-step=2", "epoch=0-step=4", "epoch=0-step=6"]
    d = tmp_path / "c"
    fit(d, 8, keep_last=2)
    assert [c.name for c in list_checkpoints(str(d))] == ["epoch=0-step=6", "epoch=0-step=8"]
    # a later directory without a commit marker (a crashed save) is invisible to ckpt_path="last", and
    # the next fit's setup removes it
    uncommitted_copy(newest(d), d / "epoch=9-step=99")
    assert [c.name for c in list_checkpoints(str(d)) if c.committed] == ["epoch=0-step=6", "epoch=0-step=8"]
    t, _ = fit(d, 8, resume="last", keep_last=2)
    assert t.global_step == 8
    assert {c.name: c.committed for c in list_checkpoints(str(d))} == {"epoch=0-step=6": True, "epoch=0-step=8": True}


def test_plain_checkpoint_io_roundtrip_and_overwrite(tmp_path):
    io = DistCheckpointIO()
    ck = {"state_dict": {"w": torch.arange(10.0)}, "global_step": 3, "note": ("a", 1)}
    io.save_checkpoint(ck, str(tmp_path / "x"))
    ck["state_dict"]["w"] += 1
    io.save_checkpoint(ck, str(tmp_path / "x"))  # same name: replaced atomically
    back = io.load_checkpoint(str(tmp_path / "x"))
    assert torch.equal(back["state_dict"]["w"], torch.arange(10.0) + 1) and back["note"] == ("a", 1)
    assert sorted(os.listdir(tmp_path)) == ["x"]  # no staging or trash left behind
    io.remove_checkpoint(str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_export_loads_without_this_package(tmp_path, saved):
    url = newest(saved)
    out = export_checkpoint(url, str(tmp_path / "w.pt"), weights_only=True)
    weights = torch.load(out, weights_only=True)["state_dict"]
    assert set(weights) == set(Net().state_dict())
    assert torch.equal(weights["net.0.weight"], load_checkpoint(url)["state_dict"]["net.0.weight"])
    full = export_checkpoint(url, str(tmp_path / "full.ckpt"))
    stock = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False)
    stock.fit(Net(), data(), ckpt_path=full)  # Lightning's own loader resumes from the exported file
    assert stock.global_step == 8


def test_weights_only_export_reads_no_optimizer_state(tmp_path, saved):
    from lightning_distckpt.catalog import open_checkpoint, source_of

    url = copy_ckpt(newest(saved), tmp_path / "w")
    meta = open_checkpoint(source_of(url)).metadata
    index, loc = next((i, l) for i, l in meta.storage_data.items() if i.fqn.startswith("optim/") and l.stored > 64)
    with open(os.path.join(url, loc.file), "r+b") as f:  # damage only an optimizer tensor's bytes
        f.seek(loc.offset + 8)
        b = f.read(1)
        f.seek(loc.offset + 8)
        f.write(bytes([b[0] ^ 0xFF]))
    out = export_checkpoint(url, str(tmp_path / "w.safetensors"), format="safetensors")
    from safetensors.torch import load_file

    expected = load_checkpoint(newest(saved))["state_dict"]
    assert {k: torch.equal(v, expected[k]) for k, v in load_file(out).items()} == {k: True for k in expected}
    with pytest.raises(CorruptCheckpointError, match=loc.file):  # a full export reads the damaged bytes
        export_checkpoint(url, str(tmp_path / "full.ckpt"))


def test_verify_reports_each_file(tmp_path, saved):
    url = copy_ckpt(newest(saved), tmp_path / "v")
    report = verify(url)
    assert report.ok and {f.name for f in report.files} >= {fmt.METADATA, fmt.STATE, "__0_0.distcp"}
    with open(os.path.join(url, "__0_1.distcp"), "r+b") as f:
        f.seek(5)
        b = f.read(1)
        f.seek(5)
        f.write(bytes([b[0] ^ 0xFF]))
    report = verify(url)
    bad = [f for f in report.files if not f.ok]
    assert not report.ok and [f.name for f in bad] == ["__0_1.distcp"] and "checksum" in bad[0].problem


# ---- bad input: every one is a clear error naming the path, and nothing committed changes -----------
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "nope")):
        load_checkpoint(str(tmp_path / "nope"))


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hi")
    with pytest.raises(NotACheckpointError, match="junk"):
        load_checkpoint(str(tmp_path / "junk"))
    with pytest.raises(NotACheckpointError, match="is a file"):
        load_checkpoint(str(tmp_path / "junk" / "x.txt"))


def test_uncommitted_checkpoint(tmp_path, saved):
    url = copy_ckpt(newest(saved), tmp_path / "u")
    os.remove(os.path.join(url, fmt.MARKER))
    with pytest.raises(UncommittedCheckpointError, match="never committed"):
        load_checkpoint(url)


@pytest.mark.parametrize("victim", ["__0_0.distcp", fmt.METADATA, fmt.STATE, fmt.MANIFEST, fmt.MARKER])
def test_flipped_byte_is_detected_before_use(tmp_path, saved, victim):
    url = copy_ckpt(newest(saved), tmp_path / "f")
    path = os.path.join(url, victim)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=victim if victim != fmt.MANIFEST else fmt.MARKER):
        load_checkpoint(url)


@pytest.mark.parametrize("victim", ["__0_0.distcp", fmt.METADATA])
def test_truncated_or_deleted_file(tmp_path, saved, victim):
    url = copy_ckpt(newest(saved), tmp_path / "t")
    path = os.path.join(url, victim)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CorruptCheckpointError, match=victim):
        load_checkpoint(url)
    os.remove(path)
    with pytest.raises(CorruptCheckpointError, match=victim):
        load_checkpoint(url)


def test_model_mismatch_names_the_keys(tmp_path, saved):
    with pytest.raises(StateMismatchError, match=r"net\.0\.weight.*\[32, 16\] vs model \[48, 16\]"):
        fit(tmp_path / "m", 8, resume=newest(saved), model=Net(width=48))
    with pytest.raises(StateMismatchError, match="missing in checkpoint: 'net.9.weight'"):
        fit(tmp_path / "m", 8, resume=newest(saved), model=Net(depth=4))


def test_unwritable_target_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointSaveError, match=str(blocker)):
        DistCheckpointIO().save_checkpoint({"w": torch.ones(1)}, str(blocker / "ckpt"))


def test_crafted_pickle_in_a_consistent_checkpoint_is_refused(tmp_path, saved):
    import base64
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    url = copy_ckpt(newest(saved), tmp_path / "evil")
    skeleton = json.load(open(os.path.join(url, fmt.STATE)))
    skeleton["hyper_parameters"] = {"__pickle__": base64.b64encode(pickle.dumps(Boom())).decode()}
    rewrite_document(url, fmt.STATE, fmt.dumps(skeleton))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_checkpoint(url)
    with pytest.raises(UnsafeCheckpointError):
        fit(tmp_path / "r", 8, resume=url)
    assert not (tmp_path / "pwned").exists()


def test_manifest_with_escaping_path_is_refused(tmp_path, saved):
    url = copy_ckpt(newest(saved), tmp_path / "esc")
    md = json.load(open(os.path.join(url, fmt.METADATA)))
    md["tensors"]["model/net.0.weight"]["chunks"][0]["f"] = "../../../etc/passwd"
    rewrite_document(url, fmt.METADATA, fmt.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match="etc/passwd"):
        load_checkpoint(url)


def test_saving_over_a_plain_file_replaces_it(tmp_path):
    target = tmp_path / "model.ckpt"
    torch.save({"old": 1}, target)  # e.g. a checkpoint of Lightning's own format at the same path
    DistCheckpointIO().save_checkpoint({"w": torch.ones(3)}, str(target))
    assert torch.equal(load_checkpoint(str(target))["w"], torch.ones(3)) and sorted(os.listdir(tmp_path)) == ["model.ckpt"]


def test_a_strategy_that_cannot_be_routed_fails_at_setup():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    class OwnSaving(FSDPStrategy):  # a sharded strategy with its own checkpoint code: we cannot route it
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            raise AssertionError("never reached")

    with pytest.raises(TypeError, match="cannot route checkpoints of .*OwnSaving.*overrides save_checkpoint"):
        L.Trainer(accelerator="cpu", strategy=OwnSaving(), plugins=[DistCheckpointIO()])

    class Unknown(DDPStrategy.__mro__[1]):  # ParallelStrategy: not one of the supported ones
        pass

    Unknown.__abstractmethods__ = frozenset()  # instantiable without implementing the collectives

    with pytest.raises(TypeError, match="only ModelParallelStrategy, FSDPStrategy, DDPStrategy, SingleDeviceStrategy"):
        from lightning_distckpt.integration.routing import route

        route(Unknown.__new__(Unknown), DistCheckpointIO())


def test_a_failed_background_save_is_raised_not_lost(tmp_path):
    root = tmp_path / "ckpts"

    class BreakStorage(L.Callback):  # after setup checked the root: the root turns into a file
        def on_train_start(self, trainer, pl_module):
            if root.exists():
                root.rmdir()
            root.write_text("x")

    torch.manual_seed(0)
    t = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  plugins=[DistCheckpointIO(async_save=True)],
                  callbacks=[DistCheckpoint(dirpath=str(root), every_n_train_steps=2), BreakStorage()])  # fmt: skip
    with pytest.raises(CheckpointSaveError, match=r"ckpts/epoch=0-step=2.*cannot create"):
        t.fit(Net(), data())  # raised by the next save (step 4) or at teardown, on the training thread
