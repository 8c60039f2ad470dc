"""Unit tests of the catalog, in this process (no subprocesses, no process groups): copies and replication
verify every block and commit last, removal and retention hide a checkpoint (its marker) before deleting it.

Stores that log every operation (tests/faulty_store.py) are put behind URLs through the public store
registry, so the code under test opens them exactly as it opens any other store.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from faulty_store import Fault, FaultyStore, register_faulty

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, ondisk
from lightning_distckpt.catalog import (
    clean_stale,
    committed,
    list_checkpoints,
    open_checkpoint,
    read_manifest,
    remove_checkpoint,
    source_of,
    verify,
)
from lightning_distckpt.catalog.replication import Replicator, copy_checkpoint
from lightning_distckpt.engine.loading import read_checkpoint
from lightning_distckpt.engine.saving import WriteOptions
from lightning_distckpt.errors import CorruptCheckpointError, DistCheckpointError
from lightning_distckpt.parallel.comm import SOLO

BLOCK = 64 << 10


def _io() -> DistCheckpointIO:
    io = DistCheckpointIO(chunk_mb=1, durable=False)
    io.write_options = WriteOptions(threads=2, chunk_bytes=1 << 20, block_bytes=BLOCK)  # several blocks per file
    return io


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"state_dict": {"w": torch.randn(1024, 512, generator=g), "b": torch.randn(256, generator=g)},
            "global_step": step, "epoch": 0}  # fmt: skip


def _mount(tmp_path: Path, what: str, faults: list[Fault] | None = None) -> tuple[FaultyStore, str, Path]:
    """A logging (and maybe faulty) store over a fresh local directory, as ``<scheme>://``; returns it, the
    URL prefix and the directory."""
    root = tmp_path / what
    root.mkdir(exist_ok=True)
    store = FaultyStore(faults=faults)
    return store, register_faulty(f"unit{what}{uuid.uuid4().hex[:6]}", store, str(root)), root


def _data_blocks(url: str) -> list[tuple[str, int, int]]:
    """(file, offset, stored size) of every block of the checkpoint's data files, by file then offset."""
    ckpt = open_checkpoint(source_of(url))
    out = []
    for loc in ckpt.metadata.storage_data.values():
        pos = loc.offset
        for b in loc.blocks:
            out.append((loc.file, pos, b.stored))
            pos += b.stored
    return sorted(out)


def _names(ops: list[tuple], kind: str) -> list[str]:
    return [op[1] for op in ops if op[0] == kind]


def _check_commit_order(ops: list[tuple], final: str) -> None:
    """Every file is written into a staging directory, which is renamed to ``final``; then the marker is
    written, as the very last change (reads may follow)."""
    ops = [op for op in ops if op[0] in ("write", "rename", "remove", "makedirs")]
    renames = [op for op in ops if op[0] == "rename"]
    assert len(renames) == 1 and renames[0][2] == final, renames
    i = ops.index(renames[0])
    staging = renames[0][1]
    assert Path(staging).name.startswith(".") and ondisk.STAGING_INFIX in Path(staging).name
    before = _names(ops[:i], "write")
    assert before and all(Path(p).parent == Path(staging) for p in before)
    assert ondisk.MARKER not in {Path(p).name for p in before}, "the marker was written before the rename"
    assert ops[-1] == ("write", f"{final}/{ondisk.MARKER}"), ops[i:]
    assert _names(ops[i + 1 :], "write") == [f"{final}/{ondisk.MARKER}"]


# ---------------------------------------------------------------------------------------------------
# copy_checkpoint
# ---------------------------------------------------------------------------------------------------
def test_copy_verifies_and_commits_last(tmp_path):
    src = str(tmp_path / "primary" / "ck")
    _io().save_checkpoint(_state(1), src)
    dst, prefix, root = _mount(tmp_path, "dst")
    copy_checkpoint(src, f"{prefix}ck")
    _check_commit_order(dst.ops, str(root / "ck"))
    written = {Path(p).name for p in _names(dst.ops, "write")}
    assert written == set(read_manifest(source_of(src)).files) | {ondisk.MANIFEST, ondisk.MARKER}
    assert verify(f"{prefix}ck").ok
    assert read_manifest(source_of(f"{prefix}ck")).to_json() == read_manifest(source_of(src)).to_json()
    got = read_checkpoint(f"{prefix}ck")
    assert torch.equal(got["state_dict"]["w"], _state(1)["state_dict"]["w"])


def test_a_copy_that_meets_a_bad_block_commits_nothing_and_resumes(tmp_path):
    (tmp_path / "p").mkdir()
    _io().save_checkpoint(_state(1), str(tmp_path / "p" / "ck"))
    blocks = _data_blocks(str(tmp_path / "p" / "ck"))
    files = sorted({f for f, _, _ in blocks})
    assert len(files) == 2 and len([b for b in blocks if b[0] == files[1]]) >= 3
    file, offset, size = [b for b in blocks if b[0] == files[1]][2]  # the second file: the first is copied whole
    src_store = FaultyStore(faults=[Fault(file, offset + size // 2, offset + size // 2 + 1)])
    src = register_faulty(f"unitsrc{uuid.uuid4().hex[:6]}", src_store, str(tmp_path / "p")) + "ck"
    dst, prefix, root = _mount(tmp_path, "dst")
    with pytest.raises(CorruptCheckpointError) as e:
        copy_checkpoint(src, f"{prefix}ck")
    assert f"{src}/{file}" in str(e.value) and f"block at byte {offset}" in str(e.value), str(e.value)
    assert not (root / "ck").exists()
    assert list_checkpoints(f"{prefix}") == []
    assert all(Path(p).name != ondisk.MARKER for p in _names(dst.ops, "write"))
    assert not [op for op in dst.ops if op[0] == "rename"]
    # fixed source: the next call resumes, keeping the file that was copied completely (not read again)
    src_store.faults.clear()
    src_store.ops.clear()
    dst.ops.clear()
    copy_checkpoint(src, f"{prefix}ck")
    assert not src_store.reads(files[0]), "a file copied completely before was copied again"
    assert src_store.reads(files[1])
    _check_commit_order(dst.ops, str(root / "ck"))
    assert verify(f"{prefix}ck").ok


def test_copy_refuses_to_overwrite(tmp_path):
    src = str(tmp_path / "a")
    _io().save_checkpoint(_state(1), src)
    copy_checkpoint(src, str(tmp_path / "b"))
    with pytest.raises(DistCheckpointError, match="already exists"):
        copy_checkpoint(src, str(tmp_path / "b"))


# ---------------------------------------------------------------------------------------------------
# Replicator (one process: a solo Comm)
# ---------------------------------------------------------------------------------------------------
def _replicator(targets: list[str], commits: list) -> Replicator:
    return Replicator(targets, None, SOLO, max_attempts=1, retry_delay_s=0.0,
                      after_replica_commit=lambda target, name: commits.append((target, name)))  # fmt: skip


def test_replicator_copies_verified_and_commits_last(tmp_path):
    primary = str(tmp_path / "primary")
    _io().save_checkpoint(_state(4), f"{primary}/step=4")
    dst, prefix, root = _mount(tmp_path, "replica")
    commits: list = []
    rep = _replicator([prefix], commits)
    rep.submit("step=4", f"{primary}/step=4")
    rep.submit("step=4", f"{primary}/step=4")  # already there with the same manifest: nothing is copied again
    assert rep.close(60)
    assert (rep.stats.copied, rep.stats.failures, rep.stats.pending) == (2, 0, 0)
    _check_commit_order(dst.ops, str(root / "step=4"))
    assert _names(dst.ops, "write").count(str(root / "step=4" / ondisk.MARKER)) == 1
    assert commits == [(prefix, "step=4")]  # retention hooks in once, when the replica commits
    assert verify(f"{prefix}step=4").ok
    assert rep.stats.bytes_copied == sum(i["size"] for n, i in read_manifest(source_of(f"{primary}/step=4")).files.items()
                                         if n.endswith(".distcp"))  # fmt: skip


def test_a_failed_replication_commits_nothing_and_keeps_older_replicas(tmp_path):
    (tmp_path / "p").mkdir()
    _io().save_checkpoint(_state(2), str(tmp_path / "p" / "step=2"))
    _io().save_checkpoint(_state(4), str(tmp_path / "p" / "step=4"))
    dst, prefix, root = _mount(tmp_path, "replica")
    copy_checkpoint(str(tmp_path / "p" / "step=2"), f"{prefix}step=2")  # an older replica, committed
    file, offset, _ = _data_blocks(str(tmp_path / "p" / "step=4"))[3]
    src_store = FaultyStore(faults=[Fault(file, offset, offset + 1)])
    src = register_faulty(f"unitsrc{uuid.uuid4().hex[:6]}", src_store, str(tmp_path / "p"))
    dst.ops.clear()
    commits: list = []
    rep = _replicator([prefix], commits)
    rep.submit("step=4", f"{src}step=4")
    assert rep.close(60)
    assert (rep.stats.copied, rep.stats.failures, rep.stats.pending) == (0, 1, 0)
    assert file in rep.stats.last_error and f"block at byte {offset}" in rep.stats.last_error, rep.stats.last_error
    assert commits == []
    assert [c.name for c in committed(prefix)] == ["step=2"]
    assert not (root / "step=4").exists()
    assert all(Path(p).name != ondisk.MARKER for p in _names(dst.ops, "write"))
    assert verify(f"{prefix}step=2").ok
    # what the failed copy left behind is provably garbage: clean-up removes it, and only it
    left = [p.name for p in root.iterdir() if p.name != "step=2"]
    assert left and all(n.startswith(".") for n in left)
    assert sorted(Path(u).name for u in clean_stale(prefix, older_than_s=0)) == sorted(left)
    assert [p.name for p in root.iterdir()] == ["step=2"]


# ---------------------------------------------------------------------------------------------------
# removal and retention
# ---------------------------------------------------------------------------------------------------
def _removal_order(ops: list[tuple], path: str) -> None:
    """``path`` was removed marker first, then its other files, the manifest last, then the directory."""
    mine = [op for op in ops if op[0] == "remove" and (op[1] == path or op[1].startswith(path + "/"))]
    assert mine[0] == ("remove", f"{path}/{ondisk.MARKER}", False) and mine[-1] == ("remove", path, True), mine
    files = [op[1].rsplit("/", 1)[1] for op in mine[1:-1]]
    assert ondisk.MANIFEST not in files and {ondisk.METADATA, ondisk.STATE} <= set(files), mine


def test_remove_checkpoint_hides_it_before_deleting(tmp_path):
    store, _, root = _mount(tmp_path, "r")
    _io().save_checkpoint(_state(1), str(root / "ck"))
    remove_checkpoint(store, str(root / "ck"))
    _removal_order(store.ops, str(root / "ck"))
    assert not (root / "ck").exists()


def test_a_removal_interrupted_after_the_marker_leaves_an_invisible_checkpoint(tmp_path):
    class Interrupted(FaultyStore):
        def remove(self, path: str, recursive: bool = False) -> None:
            if not path.endswith(ondisk.MARKER):
                raise KeyboardInterrupt  # the process dies right after the marker is gone
            super().remove(path, recursive)

    store = Interrupted()
    prefix = register_faulty(f"unitint{uuid.uuid4().hex[:6]}", store, str(tmp_path))
    io = _io()
    io.save_checkpoint(_state(1), str(tmp_path / "a"))
    io.save_checkpoint(_state(2), str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(store, str(tmp_path / "b"))
    assert [c.name for c in committed(prefix)] == ["a"]  # "last" can never pick the half-removed one
    assert [Path(u).name for u in clean_stale(str(tmp_path), older_than_s=0)] == ["b"]
    assert verify(str(tmp_path / "a")).ok


def _callback(keep_last: int, io: DistCheckpointIO, saved: list[str], tmp_path: Path) -> DistCheckpoint:
    """A DistCheckpoint wired to ``io`` without a Trainer, as after ``setup``, having saved ``saved``."""
    cb = DistCheckpoint(dirpath=str(tmp_path / "unused"), keep_last=keep_last)
    cb.dirpath = saved[0][: saved[0].rindex("/") + 1]  # where they are (a registered URL root)
    cb._io = io
    cb._saved = list(saved)
    cb._ever = {u.rstrip("/").rsplit("/", 1)[-1] for u in saved}
    return cb


def test_retention_removes_old_checkpoints_marker_first_and_never_the_newest(tmp_path):
    store, prefix, root = _mount(tmp_path, "ret")
    io = _io()
    urls = [f"{prefix}epoch=0-step={s}" for s in (2, 4, 6, 8, 10)]
    for s, url in zip((2, 4, 6, 8, 10), urls):
        io.save_checkpoint(_state(s), url)
    (root / "epoch=0-step=10" / ondisk.MARKER).unlink()  # the newest save has not committed (in flight or crashed)
    store.ops.clear()
    cb = _callback(2, io, urls, tmp_path)
    assert cb.apply_retention() == urls[:2]
    for name in ("epoch=0-step=2", "epoch=0-step=4"):
        _removal_order(store.ops, str(root / name))
    assert not [op for op in store.ops if op[0] == "remove" and any(n in op[1] for n in ("step=6", "step=8", "step=10"))]
    assert cb._saved == urls[2:]
    assert [c.name for c in committed(prefix)] == ["epoch=0-step=6", "epoch=0-step=8"]
    # keep_last=1: only the newest committed one stays, the uncommitted newer one is not touched
    cb.keep_last = 1
    assert cb.apply_retention() == [urls[2]]
    assert [c.name for c in committed(prefix)] == ["epoch=0-step=8"]
    assert (root / "epoch=0-step=10").exists()


def test_retention_on_a_replica_removes_only_this_runs_old_checkpoints(tmp_path):
    io = _io()
    primary = tmp_path / "p"
    for s in (2, 4, 6):
        io.save_checkpoint(_state(s), str(primary / f"step={s}"))
    store, prefix, root = _mount(tmp_path, "rep")
    for name in ("step=2", "step=4", "step=6"):
        copy_checkpoint(str(primary / name), f"{prefix}{name}")
    io.save_checkpoint(_state(1), f"{prefix}other-run")  # not this callback's: never removed
    store.ops.clear()
    cb = _callback(1, io, [str(primary / "step=6")], tmp_path)
    cb._ever = {"step=2", "step=4", "step=6"}
    cb._retain_replica(prefix, "step=6")
    for name in ("step=2", "step=4"):
        _removal_order(store.ops, str(root / name))
    assert sorted(c.name for c in committed(prefix)) == ["other-run", "step=6"]
