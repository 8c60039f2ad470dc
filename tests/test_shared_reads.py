"""Same-host balanced reads through shared memory (``shared_memory_reads=True``; broadcasts are the default): DDP resumes exactly with the bytes shared through
/dev/shm-style segments (no broadcast), segments never outlive a load (also when it fails), stale ones of
dead processes are removed, and a rank that cannot map shared memory makes every rank fall back to
broadcasts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import load_json, train
from test_distributed import assert_same_state

from lightning_distckpt import list_checkpoints
from lightning_distckpt.engine import balanced_read as br
from lightning_distckpt.parallel.comm import Comm


def leftovers(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith("distckpt-")] if d.exists() else []


@pytest.mark.slow
def test_ddp_resume_shares_bytes_through_shared_memory_and_leaves_nothing(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("DISTCKPT_SHM_DIR", str(shm))
    ck = tmp_path / "ck"
    train("ddp", 2, ck, "--max-steps", 4, "--save-every", 2, "--keep-last", 2, "--digest-dir", tmp_path, "--width", 128)
    train("ddp", 2, ck, "--max-steps", 4, "--resume", "last", "--final-digest", tmp_path / "restored.json",
          "--stats", tmp_path / "stats.json", "--width", 128, "--shared-memory-reads")
    assert_same_state(load_json(tmp_path / "saved-4.json"), load_json(tmp_path / "restored.json"))
    stats = load_json(tmp_path / "stats.json")
    assert stats["shared_memory"] is True and stats["bytes_received"] > 0
    assert leftovers(shm) == []

    # a load that fails halfway (every data file of the newest checkpoint corrupted): no segment survives,
    # and the run falls back to the previous checkpoint, exactly
    newest = list_checkpoints(str(ck))[-1].url
    for f in os.listdir(newest):
        if f.endswith(".distcp"):
            data = bytearray(open(os.path.join(newest, f), "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(os.path.join(newest, f), "wb").write(bytes(data))
    train("ddp", 2, ck, "--max-steps", 2, "--resume", "last", "--final-digest", tmp_path / "older.json",
          "--stats", tmp_path / "stats2.json", "--width", 128, "--shared-memory-reads")
    assert load_json(tmp_path / "stats2.json")["loaded_from"].endswith("step=2")
    assert_same_state(load_json(tmp_path / "saved-2.json"), load_json(tmp_path / "older.json"))
    assert leftovers(shm) == []


@pytest.mark.slow
def test_without_shared_memory_every_rank_falls_back_to_broadcasts(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_SHM_DIR", str(tmp_path / "does-not-exist"))
    ck = tmp_path / "ck"
    train("ddp", 2, ck, "--max-steps", 2, "--save-every", 2, "--digest-dir", tmp_path, "--width", 128)
    train("ddp", 2, ck, "--max-steps", 2, "--resume", "last", "--final-digest", tmp_path / "restored.json",
          "--stats", tmp_path / "stats.json", "--width", 128, "--shared-memory-reads")
    assert_same_state(load_json(tmp_path / "saved-2.json"), load_json(tmp_path / "restored.json"))
    stats = load_json(tmp_path / "stats.json")
    assert stats["shared_memory"] is False and stats["bytes_received"] > 0  # broadcasts did the sharing


def test_segments_map_views_and_are_unlinked_at_once(tmp_path):
    t = {"a": torch.arange(100.0).reshape(10, 10), "s": torch.tensor(3.0)}
    owned = br.deal(t, Comm(), chunk_bytes=80)
    seg = br.SharedSegments(Comm(), owned, [0], directory=str(tmp_path))
    assert seg.ok and leftovers(tmp_path) == []  # mapped, and the name is already gone
    for c in owned[0]:
        v = seg.view(c, t[c.key])
        v.copy_(t[c.key] if t[c.key].dim() == 0 else t[c.key].narrow(0, c.start, c.rows))
    for c in owned[0]:
        assert torch.equal(seg.view(c, t[c.key]), t[c.key] if t[c.key].dim() == 0 else t[c.key].narrow(0, c.start, c.rows))
    seg.close()


def test_a_directory_that_cannot_hold_segments_is_reported_not_fatal(tmp_path):
    seg = br.SharedSegments(Comm(), [[br._Chunk("a", 0, 1, 8)]], [0], directory=str(tmp_path / "missing"))
    assert not seg.ok


def test_stale_segments_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f"distckpt-abc-{pid}-0").write_bytes(b"x")
    (tmp_path / f"distckpt-abc-{os.getpid()}-1").write_bytes(b"x")  # alive: kept
    (tmp_path / "other-file").write_bytes(b"x")
    assert br.clean_stale_segments(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([f"distckpt-abc-{os.getpid()}-1", "other-file"])
