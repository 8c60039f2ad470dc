"""Replicas, verified resume with per-file fallback to a replica, fallback to the previous checkpoint,
retention per target, cleanup of crashed saves, a failing replica target, and a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import lightning as L
import pytest
import torch
from conftest import load_json, make_idle, train, uncommitted_copy
from workloads.common import Net, data

from lightning_distckpt import CorruptCheckpointError, DistCheckpoint, DistCheckpointIO, list_checkpoints, verify
from lightning_distckpt import ondisk as fmt


def fit(dirpath, max_steps, resume=None, **cb) -> tuple[L.Trainer, Net, DistCheckpoint]:
    torch.manual_seed(0)
    model = Net()
    callback = DistCheckpoint(dirpath=str(dirpath), every_n_train_steps=2, **cb)
    # compressed and asynchronous: replication, verification and fallback compose with both
    io = DistCheckpointIO(compression="lossless", async_save=True)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[io], callbacks=[callback])  # fmt: skip
    t.fit(model, data(), ckpt_path=resume)
    return t, model, callback


def names(root) -> list[str]:
    return [c.name for c in list_checkpoints(str(root)) if c.committed]


def damage(path: str, how: str) -> None:
    if how == "delete":
        os.remove(path)
    elif how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x10
        open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """Checkpoints at steps 4, 6 (keep_last=2) on a primary and two replicas."""
    base = tmp_path_factory.mktemp("replicated")
    _, model, cb = fit(base / "primary", 6, keep_last=2, replicas=[str(base / "r1"), f"file://{base / 'r2'}"])
    # final counts after fit: the saves at steps 2, 4 and 6, each copied to both replicas
    assert cb.replication == {"copied": 3, "failures": 0, "pending": 0}
    return base, {k: v.clone() for k, v in model.state_dict().items()}


def test_every_target_gets_a_verified_copy_and_its_own_retention(replicated):
    base, _ = replicated
    for root in ("primary", "r1", "r2"):
        assert names(base / root) == ["epoch=0-step=4", "epoch=0-step=6"], root
        for c in list_checkpoints(str(base / root)):
            assert verify(c.url).ok and os.path.exists(os.path.join(c.url, fmt.MARKER))
    assert not [n for n in os.listdir(base / "r1") if n.startswith(".")]  # no staging left


VICTIMS = ["__0_0.distcp", fmt.METADATA, fmt.MANIFEST, fmt.MARKER]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("victim", VICTIMS)
def test_damaged_primary_is_read_from_a_replica(replicated, tmp_path, victim, how):
    src, saved = replicated
    for root in ("primary", "r1", "r2"):
        shutil.copytree(src / root, tmp_path / root)
    damage(str(tmp_path / "primary" / "epoch=0-step=6" / victim), how)
    t, model, _ = fit(tmp_path / "primary", 6, resume="last", keep_last=2,
                      replicas=[str(tmp_path / "r1"), str(tmp_path / "r2")])  # fmt: skip
    assert t.global_step == 6
    io = t.strategy.checkpoint_io
    assert io.stats.loaded_from.endswith("epoch=0-step=6")
    if victim.endswith(".distcp"):
        assert io.stats.load_fallbacks == {victim: str(tmp_path / "r1" / "epoch=0-step=6")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_no_complete_copy_anywhere_falls_back_to_the_previous_checkpoint(replicated, tmp_path):
    src, _ = replicated
    for root in ("primary", "r1"):
        shutil.copytree(src / root, tmp_path / root)
        damage(str(tmp_path / root / "epoch=0-step=6" / "__0_1.distcp"), "flip")
    with pytest.warns(UserWarning, match="RESUMED FROM AN OLDER CHECKPOINT.*step=4"):
        t, _, _ = fit(tmp_path / "primary", 4, resume="last", replicas=[str(tmp_path / "r1")])
    assert t.global_step == 4


def test_an_explicit_path_is_never_silently_substituted(replicated, tmp_path):
    src, _ = replicated
    shutil.copytree(src / "primary", tmp_path / "primary")
    bad = str(tmp_path / "primary" / "epoch=0-step=6")
    damage(os.path.join(bad, "__0_0.distcp"), "flip")
    with pytest.raises(CorruptCheckpointError, match=r"__0_0\.distcp.*checksum"):
        fit(tmp_path / "primary", 6, resume=bad)
    with pytest.warns(UserWarning, match="RESUMED FROM AN OLDER CHECKPOINT"):
        t, _, _ = fit(tmp_path / "primary", 4, resume=bad, fallback_to_previous=True)
    assert t.global_step == 4


def test_a_failing_replica_never_fails_training(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    t, _, cb = fit(tmp_path / "primary", 4, replicas=[str(blocker / "replica")], replication_timeout_s=60)
    assert t.global_step == 4 and names(tmp_path / "primary") == ["epoch=0-step=4"]
    assert t.callback_metrics["distckpt/replica_failures"] >= 1


def test_crashed_saves_are_cleaned_up_and_committed_ones_kept(replicated, tmp_path):
    src, _ = replicated
    shutil.copytree(src / "primary", tmp_path / "p")
    p = tmp_path / "p"
    (p / fmt.staging_name("epoch=0-step=8", "abc")).mkdir()  # a save killed while writing
    make_idle(p / fmt.staging_name("epoch=0-step=8", "abc"))
    uncommitted_copy(p / "epoch=0-step=4", p / "epoch=0-step=9")  # killed after the rename, before the marker
    os.rename(p / "epoch=0-step=6", p / fmt.trash_name("epoch=0-step=6", "def"))  # killed mid-overwrite
    fit(p, 6, resume="last", keep_last=5)
    left = sorted(os.listdir(p))
    assert left == ["epoch=0-step=4", "epoch=0-step=6"], left  # trash restored, garbage removed
    assert all(verify(str(p / n)).ok for n in left)


def test_full_disk_is_a_clear_error_on_every_rank_and_loses_nothing(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill up: {r.stderr.strip()}")
    try:
        ckpt = mnt / "ckpts"
        # each checkpoint takes ~1.6 MB: the first fits in 2 MB, the second cannot while the first is kept
        proc = train("ddp", 2, ckpt, "--max-steps", 4, "--save-every", 2, "--keep-last", 2, "--width", 256, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        for rank in (0, 1):
            assert any(f"[rank{rank}]" in line and "CheckpointSaveError" in line and "No space left" in line
                       for line in out.splitlines()), out[-3000:]  # fmt: skip
        assert names(ckpt) == ["epoch=0-step=2"] and verify(str(ckpt / "epoch=0-step=2")).ok
        assert sorted(os.listdir(ckpt)) == ["epoch=0-step=2"]  # no half-written save left visible or behind
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_two_ranks_read_a_damaged_file_from_the_replica(tmp_path):
    base = tmp_path / uuid.uuid4().hex[:6]
    train("ddp", 2, base / "primary", "--max-steps", 4, "--save-every", 4, "--digest-dir", tmp_path,
          "--replicas", base / "replica")  # fmt: skip
    assert names(base / "replica") == ["epoch=0-step=4"]
    damage(str(base / "primary" / "epoch=0-step=4" / "__1_0.distcp"), "flip")
    train("ddp", 2, base / "primary", "--max-steps", 4, "--save-every", 4, "--resume", "last", "--replicas",
          base / "replica", "--final-digest", tmp_path / "restored.json", "--stats", tmp_path / "stats.json")
    stats = load_json(tmp_path / "stats.json")
    saved, restored = load_json(tmp_path / "saved-4.json"), load_json(tmp_path / "restored.json")
    for key in ("model", "optim0", "global_step", "lr_schedulers", "loops"):
        assert saved[key] == restored[key], key
    assert stats["loaded_from"].endswith("epoch=0-step=4")
    # rank 0 starts at the primary and needed the replica for the damaged file (if it read from it)
    assert set(stats["fallbacks"]) <= {"__1_0.distcp"}
