"""``distckpt ls``, ``info``, ``verify``, ``gc`` and ``copy`` never import torch (nor Lightning): they start in
well under a second. Each runs in a fresh interpreter on a real (lossless and int8) checkpoint, and
``python -X importtime`` lists every module the command imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import env

from lightning_distckpt import DistCheckpointIO

HEAVY = ("torch", "lightning", "lightning_fabric", "pytorch_lightning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("start") / "ckpts"
    state = {"state_dict": {"net.0.weight": torch.randn(128, 64), "net.0.bias": torch.randn(128)},
             "optimizer_states": [{"state": {"net.0.weight": {"exp_avg": torch.randn(128, 64), "exp_avg_sq": torch.rand(128, 64)}},
                                   "param_groups": [{"lr": 0.1, "params": ["net.0.weight"]}]}],
             "callbacks": {"EMA": {"shadow": torch.zeros(4)}}, "global_step": 5}  # fmt: skip
    for name, compression in (("a-lossless", "lossless"), ("b-int8", "int8"), ("c-bf16", "bf16")):
        DistCheckpointIO(compression=compression).save_checkpoint(state, str(d / name))
    return d


def imported_modules(*argv) -> tuple[int, set[str], str]:
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "lightning_distckpt.cli", *map(str, argv)],
                       capture_output=True, text=True, env=env(), timeout=300)  # fmt: skip
    mods = {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    return p.returncode, mods, p.stdout + p.stderr[-3000:]


@pytest.mark.parametrize("command", ["ls", "info", "verify", "gc", "copy"])
@pytest.mark.parametrize("ckpt", ["a-lossless", "b-int8", "c-bf16"])
def test_fast_commands_do_not_import_torch(root, tmp_path, command, ckpt):
    argv = {"ls": ["ls", root, "--verify"], "info": ["info", root / ckpt], "verify": ["verify", root / ckpt],
            "gc": ["gc", root, "--keep-last", 5], "copy": ["copy", root / ckpt, tmp_path]}[command]  # fmt: skip
    code, mods, out = imported_modules(*argv)
    assert code == 0, out
    assert len(mods) > 20 and "lightning_distckpt.catalog" in mods, "importtime output was not read"
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert not heavy, f"distckpt {command} imported {heavy[:10]}"


def test_export_does_import_torch(root, tmp_path):  # the check above can fail: torch shows when imported
    code, mods, out = imported_modules("export", root / "b-int8", tmp_path / "w.safetensors")
    assert code == 0 and "torch" in mods, out
