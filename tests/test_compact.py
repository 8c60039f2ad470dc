"""Compact metadata (version 3, ``DistCheckpointIO(compact_metadata=...)``): regular shardings described by their
rule, each data file carrying the index of its own blocks (docs/scaling.md). Exact resumes across strategies and
world sizes under torchrun, the fallback to the listed form when a state follows no rule, damaged indexes refused
with an error naming the file (and served by a replica), and the tools (verify, info, copy, export) on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORKLOADS, load_json, run, torchrun_cmd, train
from test_distributed import assert_same_state

from lightning_distckpt import CorruptCheckpointError, DistCheckpointIO, list_checkpoints, load_checkpoint, ondisk, verify
from lightning_distckpt.catalog import open_checkpoint, source_of
from lightning_distckpt.catalog.replication import copy_checkpoint
from lightning_distckpt.engine.loading import allocate, read_tensors
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.parallel.comm import SOLO
from lightning_distckpt.storage import Source, open_store


def version(ckpt: str | Path) -> int:
    return json.loads((Path(ckpt) / ondisk.METADATA).read_bytes())["version"]


def sample() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"state_dict": {"w": torch.randn(300, 40, generator=g), "b": torch.randn(40, generator=g),
                           "step": torch.tensor(3), "empty": torch.zeros(0, 4)},
            "global_step": 3, "note": "compact"}  # fmt: skip


@pytest.mark.parametrize("compression", [None, "lossless"])
def test_compact_round_trip_is_exact_and_the_tools_read_it(compression, tmp_path):
    io = DistCheckpointIO(compact_metadata=True, compression=compression, chunk_mb=1, durable=False)
    io.write_options = type(io.write_options)(threads=2, chunk_bytes=4096, block_bytes=2048)  # many chunks and blocks
    saved = sample()
    url = str(tmp_path / "ck")
    io.save_checkpoint(saved, url)
    assert version(url) == ondisk.LAYOUT_VERSION
    doc = json.loads((Path(url) / ondisk.METADATA).read_bytes())
    assert doc["tensors"] == {} and "chunks" not in json.dumps(doc)  # no chunk is listed in metadata.json
    loaded = load_checkpoint(url)
    assert loaded["global_step"] == 3 and loaded["note"] == "compact"
    for k, v in saved["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v), k
    report = verify(url)
    assert report.ok and {f.name for f in report.files} >= {"__0_0.distcp", "__0_1.distcp"}
    copy_checkpoint(url, str(tmp_path / "copy"))
    assert verify(str(tmp_path / "copy")).ok
    cli = [sys.executable, "-m", "lightning_distckpt.cli"]
    info = run(cli + ["info", url]).stdout
    assert "model/w" in info and "[300, 40]" in info
    run(cli + ["export", url, str(tmp_path / "plain.ckpt")])
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert torch.equal(plain["state_dict"]["w"], saved["state_dict"]["w"])


def damage_index(path: Path) -> None:
    """Flip one byte inside the block index at the end of data file ``path`` (its blocks stay intact)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[-16:-8], "little")
    data[len(data) - 16 - n // 2] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_damaged_index_names_the_file_and_a_replica_serves_it(tmp_path):
    io = DistCheckpointIO(compact_metadata=True, durable=False)
    io.write_options = type(io.write_options)(threads=2, chunk_bytes=4096, block_bytes=2048)
    saved = sample()
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    io.save_checkpoint(saved, str(primary))
    copy_checkpoint(str(primary), str(replica))
    damage_index(primary / "__0_1.distcp")
    with pytest.raises(CorruptCheckpointError, match=r"__0_1\.distcp"):
        load_checkpoint(str(primary))
    report = verify(str(primary))
    assert not report.ok and [f.name for f in report.files if not f.ok] == ["__0_1.distcp"]
    # the same load with the replica as a second source: the index (and the blocks) come from the replica
    ckpt = open_checkpoint(source_of(str(primary)))
    targets = allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), str(primary))
    store, _ = open_store(str(replica))
    read_tensors(ckpt, targets, sources=[ckpt.source, Source(store, str(replica))], comm=SOLO)
    for k, v in saved["state_dict"].items():
        assert torch.equal(targets[state.model_key(k)], v), k


def test_compact_and_incremental_do_not_mix():
    with pytest.raises(ValueError, match="compact_metadata=True cannot be combined with incremental=True"):
        DistCheckpointIO(compact_metadata=True, incremental=True)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_regular_mixed_and_irregular_states_under_torchrun(nproc, tmp_path):
    """Regular states are written compact; a state regular on some ranks only is planned again with items (and
    leaves nothing behind); every rank reads its rows back exactly, one process reads everything."""
    out = run(torchrun_cmd(WORKLOADS / "compact_ops.py", nproc, tmp_path / "root"), timeout=240).stdout
    assert "COMPACT OK" in out


# ModelParallel (FSDP2) on 2 ranks to 3, DDP (asynchronous saves, the pipelined snapshot), FSDP, one process, back
CHAIN = [("mp", 2, []), ("mp", 3, []), ("ddp", 2, ["--async-save"]), ("fsdp", 2, []), ("single", 1, []), ("mp", 2, [])]


@pytest.mark.slow
def test_compact_checkpoints_resume_exactly_across_strategies_and_world_sizes(tmp_path):
    ckpt = tmp_path / "ck"
    for hop, (strategy, n, extra) in enumerate(CHAIN):
        step = 4 + hop
        args = ["--max-steps", step, "--save-every", 4 if hop == 0 else 1, "--digest-dir", tmp_path,
                "--compact-metadata", "on", *extra]  # fmt: skip
        train(strategy, n, ckpt, *args, *([] if hop == 0 else ["--resume", "last"]))
        newest = list_checkpoints(str(ckpt))[-1]
        assert version(newest.url) == ondisk.LAYOUT_VERSION, f"{strategy} on {n}: not compact"
        assert verify(newest.url).ok
        if hop:
            try:
                assert_same_state(load_json(tmp_path / f"saved-{step - 1}.json"), load_json(tmp_path / f"restored-{step - 1}.json"))
            except AssertionError as e:
                prev = CHAIN[hop - 1]
                raise AssertionError(f"{prev[0]} on {prev[1]} -> {strategy} on {n}: {e}") from None


def test_the_default_turns_compact_on_from_sixteen_ranks():
    from types import SimpleNamespace

    from lightning_distckpt.engine.saving import COMPACT_FROM_RANKS

    assert COMPACT_FROM_RANKS == 16
    io = DistCheckpointIO()
    assert [io._compact(SimpleNamespace(world_size=n)) for n in (1, 2, 15, 16, 4096)] == [False] * 3 + [True] * 2
    assert DistCheckpointIO(compact_metadata=True)._compact(SimpleNamespace(world_size=1))
    assert not DistCheckpointIO(compact_metadata=False)._compact(SimpleNamespace(world_size=4096))
    assert not DistCheckpointIO(incremental=True)._compact(SimpleNamespace(world_size=4096))
