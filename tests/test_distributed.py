"""Multi-process (gloo, CPU) checkpointing under every strategy: exact resume across strategies and world
sizes, bitwise-identical continued training, balanced bytes per rank. Each run is a real torchrun job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_json, subset_by_default, train
from workloads.common import state_differences

from lightning_distckpt import list_checkpoints

pytestmark = pytest.mark.slow

# Every hop resumes the previous hop's checkpoint ("last"), checks that the restored state is exactly the
# saved one, trains one step and saves: ModelParallel on 2 ranks to and from every other strategy/size.
CHAIN = [("mp", 2), ("mp", 3), ("mp", 2), ("ddp", 2), ("mp", 2), ("fsdp", 2), ("mp", 2), ("single", 1), ("mp", 2)]
# CI's shorter chain (each hop is a training job): every strategy and size is saved from and
# resumed into at least once, three of its hops (ddp -> mp on 3 -> one process -> fsdp) are not in CHAIN;
# ``pytest -m long`` runs CHAIN
CHAIN_CI = [("mp", 2), ("ddp", 2), ("mp", 3), ("single", 1), ("fsdp", 2), ("mp", 2)]


def assert_same_state(saved: dict, restored: dict) -> None:
    diffs = state_differences(saved, restored)
    detail = {k: [kk for kk in saved[k] if saved[k][kk] != restored.get(k, {}).get(kk)] for k in diffs
              if isinstance(saved.get(k), dict)}  # fmt: skip
    assert not diffs, f"state differs in {diffs}: {detail}"


@subset_by_default("chain", CHAIN_CI, CHAIN)
def test_exact_resume_across_strategies_and_world_sizes(tmp_path, chain):
    ckpt = tmp_path / "ck"
    for hop, (strategy, n) in enumerate(chain):
        step = 4 + hop
        args = ["--max-steps", step, "--save-every", 4 if hop == 0 else 1, "--digest-dir", tmp_path]
        train(strategy, n, ckpt, *args, *([] if hop == 0 else ["--resume", "last"]))
        if hop:
            saved = load_json(tmp_path / f"saved-{step - 1}.json")
            restored = load_json(tmp_path / f"restored-{step - 1}.json")
            prev = chain[hop - 1]
            try:
                assert_same_state(saved, restored)
            except AssertionError as e:
                raise AssertionError(f"{prev[0]} on {prev[1]} -> {strategy} on {n}: {e}") from None


@pytest.mark.parametrize("strategy,async_save", [("ddp", True), ("mp", False)], ids=["ddp-async", "mp"])
def test_continued_training_is_bitwise_identical(strategy, async_save, tmp_path):
    """8 steps in one run == 4 steps, save, new processes resume from "last", 4 more steps.

    Saves every 2 steps: from the second save on, async DDP snapshots only the chunks its rank writes.
    """
    flag = ["--async-save", "--save-every", 2] if async_save else []
    train(strategy, 2, tmp_path / "ref", "--max-steps", 8, "--final-digest", tmp_path / "ref.json", *flag)
    train(strategy, 2, tmp_path / "ck", "--max-steps", 4, *flag)
    train(strategy, 2, tmp_path / "ck", "--max-steps", 8, "--resume", "last", "--final-digest", tmp_path / "res.json", *flag)
    ref, res = load_json(tmp_path / "ref.json"), load_json(tmp_path / "res.json")
    for key in ("model", "optim0", "optim0_groups", "global_step", "lr_schedulers"):
        assert ref[key] == res[key], key
    # the resumed-from checkpoint is kept (ModelCheckpoint never deletes the checkpoint a run resumed from)
    assert [c.name for c in list_checkpoints(str(tmp_path / "ck"))][-2:] == ["epoch=0-step=4", "epoch=1-step=8"]
    per_rank = bytes_per_rank(list_checkpoints(str(tmp_path / "ck"))[-1].url)
    assert sorted(per_rank) == [0, 1] and max(per_rank.values()) / (sum(per_rank.values()) / 2) <= 1.10


def bytes_per_rank(ckpt: str) -> dict[int, int]:
    manifest = json.load(open(Path(ckpt) / "manifest.json"))
    out: dict[int, int] = {}
    for name, info in manifest["files"].items():
        if name.endswith(".distcp"):
            rank = int(name[2:].split("_")[0])
            out[rank] = out.get(rank, 0) + info["size"]
    return out


@pytest.mark.parametrize("nproc", [3])
def test_ddp_writes_replicated_state_once_balanced_over_ranks(nproc, tmp_path):
    train("ddp", nproc, tmp_path / "ck", "--max-steps", 2, "--save-every", 2, "--width", 256)
    ckpt = list_checkpoints(str(tmp_path / "ck"))[-1]
    per_rank = bytes_per_rank(ckpt.url)
    assert sorted(per_rank) == list(range(nproc))  # every rank writes: no rank-0-only save
    mean = sum(per_rank.values()) / nproc
    assert max(per_rank.values()) / mean <= 1.10, per_rank
    # replicated tensors are written once: stored bytes equal the state's bytes, not nproc times it
    assert sum(per_rank.values()) == ckpt.manifest.tensor_bytes
