"""Incremental checkpoints (issue 17): blocks already committed are referenced, not written again; loading,
verification, copies, replication, retention and gc work on them; crashes at every step of a save, a retention
removal and a gc leave every committed checkpoint loadable exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import WORKLOADS, env
from workloads.common import Net, data
from workloads.incremental_ops import name, sample

from lightning_distckpt import (
    CorruptCheckpointError,
    DistCheckpoint,
    DistCheckpointIO,
    catalog,
    list_checkpoints,
    load_checkpoint,
    ondisk,
    verify,
)
from lightning_distckpt.catalog.replication import copy_checkpoint
from lightning_distckpt.faults import CRASH_EXIT


# ---- helpers ------------------------------------------------------------------------------------------------------
def same(url: str, step: int) -> bool:
    got, want = load_checkpoint(url), sample(step)
    return got["global_step"] == step and got["state_dict"].keys() == want["state_dict"].keys() and all(
        torch.equal(got["state_dict"][k], v) for k, v in want["state_dict"].items())


def committed(root) -> dict[str, str]:
    return {c.name: c.url for c in catalog.committed(str(root))}


def block_dirs(root) -> set[str]:
    d = os.path.join(root, ondisk.BLOCKS)
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def referenced(root) -> set[str]:
    refs: set[str] = set()
    for c in catalog.list_checkpoints(str(root)):
        if c.manifest is not None:
            refs |= c.manifest.data_ids()
    return refs


def chain(root, first: int, last: int, keep: int, crash_at: str | None = None) -> subprocess.CompletedProcess:
    extra = {"DISTCKPT_CRASH_AT": crash_at} if crash_at else {}
    return subprocess.run([sys.executable, str(WORKLOADS / "incremental_ops.py"), "chain", str(root), str(first), str(last),
                           str(keep)], env=env(**extra), capture_output=True, text=True, timeout=300)  # fmt: skip


def assert_all_exact(root) -> dict[str, str]:
    """Every committed checkpoint loads exactly and verifies; returns them."""
    found = committed(root)
    assert found, os.listdir(root)
    for n, url in found.items():
        step = int(n.split("-")[1])
        assert same(url, step), n
        report = verify(url)
        assert report.ok, (n, [(f.name, f.problem) for f in report.files if not f.ok])
    return found


# ---- the format ---------------------------------------------------------------------------------------------------
def test_a_chain_borrows_unchanged_blocks_and_loads_exactly(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    written, borrowed = [], []
    for step in range(1, 7):
        io.save_checkpoint(sample(step), str(tmp_path / name(step)))
        written.append(io.stats.last_save.bytes_written)
        borrowed.append(io.stats.last_save.bytes_borrowed)
    assert borrowed[0] == 0 and all(b > 0 for b in borrowed[1:])
    assert all(w < written[0] / 4 for w in written[1:]), written  # only the head (and a changed emb part) is written
    for step in range(1, 7):
        assert same(str(tmp_path / name(step)), step) and verify(str(tmp_path / name(step))).ok
    m = json.load(open(tmp_path / name(6) / ondisk.MANIFEST))
    assert m["version"] == 2 and m["data_id"] and m["borrows"]  # the manifest lists the checkpoints it borrows from
    assert set(m["borrows"].values()) <= {name(s) for s in range(1, 6)}
    md = json.load(open(tmp_path / name(6) / ondisk.METADATA))
    assert "incremental" in md and all("/" not in c["f"] for t in md["tensors"].values() for c in t["chunks"])
    # the checkpoint directory holds documents only; the data is in the root's block store
    docs = [ondisk.MANIFEST, ondisk.METADATA, ondisk.STATE, ondisk.MARKER, ondisk.BORROWS]  # BORROWS: what it relied on
    assert sorted(os.listdir(tmp_path / name(6))) == sorted(docs)


def test_a_plain_save_stays_format_1(tmp_path):
    DistCheckpointIO().save_checkpoint(sample(1), str(tmp_path / "a"))
    m = json.load(open(tmp_path / "a" / ondisk.MANIFEST))
    assert m["version"] == 1 and "data_id" not in m and not (tmp_path / ondisk.BLOCKS).exists()


def test_a_digest_match_is_borrowed_only_when_the_strong_hash_agrees(tmp_path, monkeypatch):
    """Every lookup answers every candidate (as if all xxh3 collided): only blocks whose SHA-256 agrees are borrowed,
    and every checkpoint still holds exactly its own bytes."""
    from lightning_distckpt.engine.incremental import BlockIndex

    monkeypatch.setattr(BlockIndex, "lookup", lambda self, xh, n, codec: [c for cs in self.candidates.values() for c in cs])
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    io.save_checkpoint(sample(1), str(tmp_path / name(1)))
    io.save_checkpoint(sample(2), str(tmp_path / name(2)))
    assert 0 < io.stats.last_save.bytes_borrowed and same(str(tmp_path / name(2)), 2)
    # a base whose strong hashes disagree: nothing is borrowed
    base = io._base
    for fqn, t in base.metadata.tensors.items():
        for c in t.chunks:
            object.__setattr__(c.location, "fps", tuple((fp[0], "0" * 32) for fp in c.location.fps))
    io.save_checkpoint(sample(3), str(tmp_path / name(3)))
    assert io.stats.last_save.bytes_borrowed == 0 and same(str(tmp_path / name(3)), 3)


@pytest.mark.parametrize("compression", ["lossless", "int8", "bf16"])
def test_compression_presets_and_incremental_combine(tmp_path, compression):
    io = DistCheckpointIO(incremental=True, compression=compression, chunk_mb=1)
    for step in (1, 2):
        io.save_checkpoint(sample(step), str(tmp_path / name(step)))
    assert io.stats.last_save.bytes_borrowed > 0
    plain = DistCheckpointIO(compression=compression, chunk_mb=1)
    plain.save_checkpoint(sample(2), str(tmp_path / "plain"))
    got, want = load_checkpoint(str(tmp_path / name(2))), load_checkpoint(str(tmp_path / "plain"))
    assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])
    assert verify(str(tmp_path / name(2))).ok


def test_info_shows_owned_and_borrowed_bytes(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    for step in (1, 2):
        io.save_checkpoint(sample(step), str(tmp_path / name(step)))
    out = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "info", str(tmp_path / name(2)), "--json"],
                         env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    d = json.loads(out.stdout)["data"]
    assert d["incremental"] and d["owned_bytes"] > 0 and d["borrowed_bytes"] > d["owned_bytes"]
    assert [b["checkpoint"] for b in d["borrowed_from"]] == [name(1)]
    text = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "info", str(tmp_path / name(2))], env=env(),
                          capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert f"from {name(1)}" in text and "borrows" in text


def test_copy_moves_only_what_the_destination_lacks(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    for step in (1, 2, 3):
        io.save_checkpoint(sample(step), str(tmp_path / "src" / name(step)))
    (tmp_path / "dst").mkdir()
    moved = []
    copy_checkpoint(str(tmp_path / "src" / name(2)), str(tmp_path / "dst" / name(2)), progress=moved.append)
    first = sum(moved)
    moved.clear()
    copy_checkpoint(str(tmp_path / "src" / name(3)), str(tmp_path / "dst" / name(3)))
    assert same(str(tmp_path / "dst" / name(2)), 2) and same(str(tmp_path / "dst" / name(3)), 3)
    assert verify(str(tmp_path / "dst" / name(3))).ok
    # the second copy found the borrowed files at the destination: only its own data and documents were written
    own3 = json.load(open(tmp_path / "src" / name(3) / ondisk.MANIFEST))["data_id"]
    written = {f for f in block_dirs(tmp_path / "dst")}
    assert own3 in written and first > 0
    # and the source's oldest checkpoint, that the copies borrow from, was never copied as a checkpoint
    assert sorted(committed(tmp_path / "dst")) == [name(2), name(3)]


# ---- retention, gc, crashes ---------------------------------------------------------------------------------------
def test_removing_the_oldest_of_a_chain_keeps_what_newer_ones_borrow(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    for step in range(1, 6):
        io.save_checkpoint(sample(step), str(tmp_path / name(step)))
    for step in range(1, 5):  # oldest first: each removal leaves the blocks the newer ones borrow
        io.remove_checkpoint(str(tmp_path / name(step)))
        assert_all_exact(tmp_path)
        assert block_dirs(tmp_path) == referenced(tmp_path)  # and deletes what nothing references
    io.remove_checkpoint(str(tmp_path / name(5)))
    assert block_dirs(tmp_path) == set()


def test_gc_keep_last_and_the_block_store(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    for step in range(1, 6):
        io.save_checkpoint(sample(step), str(tmp_path / name(step)))
    before = block_dirs(tmp_path)
    dry = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "gc", str(tmp_path), "--keep-last", "1",
                          "--json"], env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dry.returncode == 0 and block_dirs(tmp_path) == before, dry.stdout + dry.stderr
    would = json.loads(dry.stdout)["removed"]
    run = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "gc", str(tmp_path), "--keep-last", "1", "--apply",
                          "--json"], env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(json.loads(run.stdout)["removed"]) == sorted(would)
    assert committed(tmp_path).keys() == {name(5)} and same(str(tmp_path / name(5)), 5)
    assert block_dirs(tmp_path) == referenced(tmp_path) < before


def test_clean_up_never_deletes_blocks_it_cannot_prove_unreferenced(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    for step in (1, 2):
        io.save_checkpoint(sample(step), str(tmp_path / name(step)))
    io.remove_checkpoint(str(tmp_path / name(1)))
    (tmp_path / ondisk.BLOCKS / "abc123").mkdir()  # an unreferenced leftover (a crashed save's)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / ondisk.MANIFEST).write_text('{"format": "lightning-distckpt", "version": 1}')  # unreadable
    assert catalog.clean_stale(str(tmp_path), older_than_s=0) == []
    assert "abc123" in block_dirs(tmp_path)
    (tmp_path / "odd" / ondisk.MANIFEST).unlink()
    removed = catalog.clean_stale(str(tmp_path), older_than_s=0)
    assert [os.path.basename(r) for r in removed] == ["abc123"] and same(str(tmp_path / name(2)), 2)


def test_gc_keeps_the_blocks_of_a_committed_checkpoint_with_a_hidden_name(tmp_path):
    """A checkpoint named ".x" (as Lightning's tuner names its own) is committed and loadable: its blocks are
    referenced like any other's, so gc and clean-up keep them."""
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    io.save_checkpoint(sample(1), str(tmp_path / ".lr_find_1.ckpt"))
    kept = block_dirs(tmp_path)
    assert kept
    run = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "gc", str(tmp_path), "--older-than", "0",
                          "--apply", "--json"], env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert catalog.clean_stale(str(tmp_path), older_than_s=0) == []
    assert block_dirs(tmp_path) == kept and same(str(tmp_path / ".lr_find_1.ckpt"), 1)


def test_a_block_store_that_is_a_link_is_never_swept(tmp_path):
    """Two roots whose block stores link to one shared directory: gc of one root deletes nothing there (the other
    root's references are not counted), so the other's checkpoint still loads; nor anything else the link reaches."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "deadbeef0001").mkdir()  # a block-directory-like name beyond the link
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        os.symlink(shared, tmp_path / run / ondisk.BLOCKS)
    DistCheckpointIO(incremental=True, chunk_mb=1).save_checkpoint(sample(1), str(tmp_path / "b" / name(1)))
    before = set(os.listdir(shared))
    run = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "gc", str(tmp_path / "a"), "--older-than",
                          "0", "--apply"], env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(os.listdir(shared)) == before and same(str(tmp_path / "b" / name(1)), 1)


@pytest.mark.parametrize("broken", ["a file", "a loop of links"])
def test_a_broken_block_store_is_a_package_error_naming_the_file(tmp_path, broken):
    url = str(tmp_path / name(1))
    DistCheckpointIO(incremental=True, chunk_mb=1).save_checkpoint(sample(1), url)
    import shutil

    shutil.rmtree(tmp_path / ondisk.BLOCKS)
    if broken == "a file":
        (tmp_path / ondisk.BLOCKS).write_text("x")
    else:
        os.symlink(ondisk.BLOCKS, tmp_path / ondisk.BLOCKS)
    for load in (load_checkpoint, DistCheckpointIO().load_checkpoint):
        with pytest.raises(CorruptCheckpointError, match=str(tmp_path / ondisk.BLOCKS)):
            load(url)


@pytest.mark.parametrize("first", ["epoch=1 step=3.ckpt", "a@b", ".lr_find_x.ckpt"])
def test_borrowing_from_a_checkpoint_with_any_valid_name_commits_a_loadable_checkpoint(tmp_path, first):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    io.save_checkpoint(sample(1), str(tmp_path / first))
    io.save_checkpoint(sample(1), str(tmp_path / "second"))  # borrows every block of the first
    assert list(catalog.open_checkpoint(catalog.source_of(str(tmp_path / "second"))).manifest.borrows.values()) == [first]
    assert same(str(tmp_path / "second"), 1)


def test_a_copy_reads_the_blocks_the_destination_already_has_and_refuses_damaged_ones(tmp_path):
    io = DistCheckpointIO(incremental=True, chunk_mb=1)
    io.save_checkpoint(sample(1), str(tmp_path / "src" / name(1)))
    io.save_checkpoint(sample(1), str(tmp_path / "src" / name(2)))  # borrows the blocks of the first
    copy_checkpoint(str(tmp_path / "src" / name(1)), str(tmp_path / "dst" / name(1)))
    (shared,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "dst" / ondisk.BLOCKS) for f in fs
                 if f.endswith(".distcp")][:1]  # fmt: skip
    with open(shared, "r+b") as f:  # bit rot, same size
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match=re.escape(shared)):
        copy_checkpoint(str(tmp_path / "src" / name(2)), str(tmp_path / "dst" / name(2)))
    assert name(2) not in committed(tmp_path / "dst")


def test_chain_of_10_with_keep_last_2(tmp_path):
    p = chain(tmp_path, 1, 10, 2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(assert_all_exact(tmp_path)) == [name(9), name(10)]
    assert block_dirs(tmp_path) == referenced(tmp_path)
    for victim, other in ((9, 10), (10, 9)):  # either one removed: the other still loads exactly
        root = tmp_path / f"copy-{victim}"
        import shutil

        shutil.copytree(tmp_path, root, symlinks=True)
        DistCheckpointIO().remove_checkpoint(str(root / name(victim)))
        assert committed(root).keys() == {name(other)} and same(str(root / name(other)), other)
        assert verify(str(root / name(other))).ok and block_dirs(root) == referenced(root)


# every step of an incremental save, of a retention removal (with its sweep of the block store) and of a gc
CHAIN_CRASHES = ["save:staged#4", "save:documents#4", "publish:renamed#4", "publish:committed#4",
                 "remove:unmarked#2", "remove:emptied#2", "sweep:removed#1", "sweep:removed#3"]  # fmt: skip


@pytest.mark.parametrize("crash_at", CHAIN_CRASHES)
def test_a_crash_at_each_step_of_a_chain_with_retention(tmp_path, crash_at):
    p = chain(tmp_path, 1, 10, 2, crash_at=crash_at)
    assert p.returncode == CRASH_EXIT, p.stdout + p.stderr
    before = assert_all_exact(tmp_path)  # right after the crash: everything committed is intact
    catalog.clean_stale(str(tmp_path), older_than_s=0)
    assert assert_all_exact(tmp_path).keys() >= {n for n in before if n in committed(tmp_path)}
    assert block_dirs(tmp_path) == referenced(tmp_path)  # clean-up left exactly the referenced blocks
    last = max(int(n.split("-")[1]) for n in committed(tmp_path))
    p = chain(tmp_path, last + 1, 10, 2)  # the run goes on (a new process: its first save is a full one)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(assert_all_exact(tmp_path)) == [name(9), name(10)]


@pytest.mark.parametrize("crash_at", ["remove:unmarked", "remove:emptied", "sweep:removed"])
def test_a_crash_at_each_step_of_gc(tmp_path, crash_at):
    assert chain(tmp_path, 1, 6, 6).returncode == 0
    p = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "gc", str(tmp_path), "--keep-last", "2",
                        "--apply", "--older-than", "0"], env=env(DISTCKPT_CRASH_AT=crash_at), capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == CRASH_EXIT, p.stdout + p.stderr
    assert {name(5), name(6)} <= set(assert_all_exact(tmp_path))
    p = subprocess.run([sys.executable, "-m", "lightning_distckpt.cli", "gc", str(tmp_path), "--keep-last", "2",
                        "--apply", "--older-than", "0"], env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(assert_all_exact(tmp_path)) == [name(5), name(6)] and block_dirs(tmp_path) == referenced(tmp_path)


# ---- Lightning: retention, resume, damaged borrowed blocks ---------------------------------------------------------
class Frozen(Net):
    """Net with everything but its last layer frozen: most of each checkpoint is unchanged."""

    def __init__(self) -> None:
        super().__init__(width=64, depth=3)
        for p in self.net[:-1].parameters():
            p.requires_grad_(False)
        self.net[1].eval()

    def on_train_epoch_start(self) -> None:
        self.net[1].eval()  # frozen BatchNorm statistics too


class Record(L.Callback):
    def __init__(self) -> None:
        self.saved: dict[int, dict] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved[checkpoint["global_step"]] = {
            "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optim": {i: {n: t.clone() for n, t in st.items() if torch.is_tensor(t)}
                      for i, st in trainer.optimizers[0].state_dict()["state"].items()},
        }  # fmt: skip


def fit(root, steps: int, resume=None, replicas=None, **kw):
    torch.manual_seed(0)
    model, rec = Frozen(), Record()
    io = DistCheckpointIO(incremental=True, full_every=kw.pop("full_every", None))
    cb = DistCheckpoint(dirpath=str(root), every_n_train_steps=1, keep_last=kw.pop("keep_last", 2), replicas=replicas)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[io], callbacks=[cb, rec])  # fmt: skip
    t.fit(model, data(), ckpt_path=resume)
    return t, model, io, rec


def restored_exactly(model, t, want) -> bool:
    ok = all(torch.equal(v, want["model"][k]) for k, v in model.state_dict().items())
    st = t.optimizers[0].state_dict()["state"]
    return ok and all(torch.equal(st[i][n], v) for i, d in want["optim"].items() for n, v in d.items())


def test_training_chain_of_10_resumes_exactly_from_every_kept_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    _, _, io, rec = fit(root, 10)
    kept = list_checkpoints(str(root))
    assert [c.manifest.global_step for c in kept] == [9, 10]
    assert kept[-1].manifest.borrows and kept[-1].manifest.data_ids() - {kept[-1].manifest.data_id}
    for c in kept:
        t, model, _, _ = fit(root, c.manifest.global_step, resume=c.url)
        assert t.global_step == c.manifest.global_step and restored_exactly(model, t, rec.saved[c.manifest.global_step])
    DistCheckpointIO().remove_checkpoint(kept[-1].url)  # the newest removed: the other one still resumes exactly
    t, model, _, _ = fit(root, 9, resume="last")
    assert t.global_step == 9 and restored_exactly(model, t, rec.saved[9])
    assert block_dirs(root) == referenced(root)


def _damage_borrowed(root) -> str:
    newest = list_checkpoints(str(root))[-1]
    m = newest.manifest
    key = next(k for k in sorted(m.files) if (p := ondisk.parse_blocks_key(k)) and p[0] != m.data_id)
    path = os.path.join(root, key)
    with open(path, "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    return key


def test_a_damaged_borrowed_block_is_read_from_a_replica(tmp_path):
    root, replica = tmp_path / "ckpts", tmp_path / "replica"
    _, _, _, rec = fit(root, 4, replicas=[str(replica)])
    assert block_dirs(replica) == referenced(replica)  # replication carried the block store too
    key = _damage_borrowed(root)
    assert not verify(list_checkpoints(str(root))[-1].url).ok
    t, model, io, _ = fit(root, 4, resume="last", replicas=[str(replica)])
    assert t.global_step == 4 and restored_exactly(model, t, rec.saved[4])
    assert any(r["file"] == key for r in io.stats.load_repairs), io.stats.load_repairs


def test_a_damaged_borrowed_block_falls_back_to_the_previous_checkpoint(tmp_path):
    """full_every=2, keep_last=3: steps 2 (borrows from 1), 3 (full), 4 (borrows from 3). A damaged block of 3 that 4
    borrows makes 4 and 3 unusable; "last" falls back to 2, which does not use it."""
    root = tmp_path / "ckpts"
    _, _, _, rec = fit(root, 4, keep_last=3, full_every=2)
    kept = list_checkpoints(str(root))
    assert [c.manifest.global_step for c in kept] == [2, 3, 4] and not kept[1].manifest.borrows
    _damage_borrowed(root)
    with pytest.warns(UserWarning, match="RESUMED FROM AN OLDER CHECKPOINT"):
        t, model, _, _ = fit(root, 2, resume="last", keep_last=3)
    assert t.global_step == 2 and restored_exactly(model, t, rec.saved[2])


def test_an_explicit_path_with_a_damaged_borrowed_block_names_the_file(tmp_path):
    root = tmp_path / "ckpts"
    fit(root, 3)
    key = _damage_borrowed(root)
    with pytest.raises(CorruptCheckpointError, match=key.split("/")[-1]):
        fit(root, 3, resume=list_checkpoints(str(root))[-1].url)


# ---- several ranks: the index is broadcast, each rank borrows for the chunks it writes; resharded resume ---------------
@pytest.mark.slow
def test_two_ranks_async_incremental_saves_resume_exactly_on_three(tmp_path):
    from conftest import load_json, train
    from test_distributed import assert_same_state

    ck = tmp_path / "ck"
    flags = ["--save-every", 1, "--keep-last", 2, "--incremental", "--freeze-first", "--digest-dir", tmp_path]
    train("mp", 2, ck, "--max-steps", 6, "--async-save", *flags)
    kept = list_checkpoints(str(ck))
    assert [c.manifest.global_step for c in kept] == [5, 6] and kept[-1].manifest.borrows
    assert all(verify(c.url).ok for c in kept) and block_dirs(ck) == referenced(ck)
    train("mp", 3, ck, "--max-steps", 7, "--resume", "last", *flags)
    assert_same_state(load_json(tmp_path / "saved-6.json"), load_json(tmp_path / "restored-6.json"))
    assert [c.manifest.global_step for c in list_checkpoints(str(ck))] == [6, 7] and block_dirs(ck) == referenced(ck)


@pytest.mark.parametrize("crash_at", ["copy:file#2", "publish:renamed"])
def test_a_killed_copy_of_an_incremental_checkpoint_resumes(tmp_path, crash_at):
    assert chain(tmp_path / "src", 1, 3, 3).returncode == 0
    (tmp_path / "dst").mkdir()
    cmd = [sys.executable, "-m", "lightning_distckpt.cli", "copy", str(tmp_path / "src" / name(3)), str(tmp_path / "dst") + "/"]
    p = subprocess.run(cmd, env=env(DISTCKPT_CRASH_AT=crash_at), capture_output=True, text=True, timeout=120)
    assert p.returncode == CRASH_EXIT, p.stdout + p.stderr
    assert not committed(tmp_path / "dst") and assert_all_exact(tmp_path / "src")  # nothing half-copied is visible
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert committed(tmp_path / "dst").keys() == {name(3)} and same(str(tmp_path / "dst" / name(3)), 3)
    assert verify(str(tmp_path / "dst" / name(3))).ok
    catalog.clean_stale(str(tmp_path / "dst"), older_than_s=0)
    assert block_dirs(tmp_path / "dst") == referenced(tmp_path / "dst")


def test_clean_up_removes_a_stale_partial_copy_inside_a_referenced_block_directory(tmp_path):
    assert chain(tmp_path, 1, 2, 2).returncode == 0
    d = tmp_path / ondisk.BLOCKS / sorted(referenced(tmp_path))[0]
    (d / ".__0_0.distcp.part-abc123").write_bytes(b"x" * 10)
    removed = catalog.clean_stale(str(tmp_path), older_than_s=0)
    assert [os.path.basename(r) for r in removed] == [".__0_0.distcp.part-abc123"]
    assert_all_exact(tmp_path)
