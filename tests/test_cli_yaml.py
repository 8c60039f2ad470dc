"""The plugin and the callback configured from a LightningCLI YAML file: under torchrun, and the documented
commands of docs/lightning-cli.md as written, in one working directory, with and without a logger."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import ROOT, WORKLOADS, run, torchrun_cmd

from lightning_distckpt import list_checkpoints

pytestmark = pytest.mark.slow

CONFIG = """
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 4
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  plugins:
    - class_path: lightning_distckpt.DistCheckpointIO
      init_args:
        async_save: true
        write_threads: 2
  callbacks:
    - class_path: lightning_distckpt.DistCheckpoint
      init_args:
        dirpath: {dirpath}
        every_n_train_steps: 2
        keep_last: 2
model:
  width: 32
"""


def test_yaml_config_saves_and_resumes_with_ckpt_path_last(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(dirpath=tmp_path / "ckpts"))
    first = run(torchrun_cmd(WORKLOADS / "cli.py", 2, "fit", "--config", cfg))
    assert "DONE global_step=4" in first.stdout
    assert [c.name for c in list_checkpoints(str(tmp_path / "ckpts"))] == ["epoch=0-step=2", "epoch=0-step=4"]
    second = run(torchrun_cmd(WORKLOADS / "cli.py", 2, "fit", "--config", cfg, "--ckpt_path", "last",
                              "--trainer.max_steps", "8"))  # fmt: skip
    assert "DONE global_step=8" in second.stdout
    assert "Restoring states from the checkpoint path at" in second.stdout + second.stderr
    assert "epoch=0-step=4" in second.stdout + second.stderr
    assert [c.name for c in list_checkpoints(str(tmp_path / "ckpts"))] == ["epoch=1-step=6", "epoch=1-step=8"]


def documented_config(tmp_path, logger: bool) -> str:
    """examples/cli/config.yaml (the docs' example), on one process, short, writing under ``tmp_path``."""
    text = (ROOT / "examples" / "cli" / "config.yaml").read_text()
    text = text.replace("./cli-ckpts", str(tmp_path / "ckpts")).replace("devices: 2 ", "devices: 1 ")
    text = text.replace("strategy: ddp", "strategy: auto").replace("max_steps: 120", "max_steps: 20")
    text = text.replace("val_check_interval: 40", "val_check_interval: 10").replace("every_n_train_steps: 40", "every_n_train_steps: 10")
    text = text.replace("async_save: true ", "async_save: false")
    if logger:
        text = text.replace("logger: false", "logger: true")
    assert ("logger: true" in text) == logger and "default_root_dir: ./runs" in text
    return text


@pytest.mark.parametrize("logger", [False, True], ids=["no-logger", "logger"])
def test_documented_resume_commands_work_as_written(tmp_path, logger):
    """``python train.py fit --config config.yaml`` then ``... --ckpt_path last``, in the directory that holds
    config.yaml: the second run resumes, and the user's config.yaml is left as it was."""
    for f in ("train.py",):
        shutil.copy(ROOT / "examples" / "cli" / f, tmp_path / f)
    shutil.copy(ROOT / "examples" / "digits.py", tmp_path / "digits.py")  # train.py imports it from its parent too
    (tmp_path / "config.yaml").write_text(documented_config(tmp_path, logger))
    mine = (tmp_path / "config.yaml").read_bytes()
    first = run([sys.executable, "train.py", "fit", "--config", "config.yaml"], cwd=tmp_path)
    assert "save_last=True" not in first.stdout + first.stderr
    second = run([sys.executable, "train.py", "fit", "--config", "config.yaml", "--ckpt_path", "last",
                  "--trainer.max_steps", "40"], cwd=tmp_path)  # fmt: skip
    out = second.stdout + second.stderr
    assert "Restoring states from the checkpoint path at" in out and "step=20" in out.split("Restoring states")[1]
    assert [c.name.split("-")[1] for c in list_checkpoints(str(tmp_path / "ckpts"))][-1] == "step=40"
    assert (tmp_path / "config.yaml").read_bytes() == mine  # the saved copy went to default_root_dir
    saved = list((tmp_path / "runs").rglob("config.yaml"))
    assert saved and (len(saved) == 2) == logger  # a logger: one copy per version directory


def test_last_on_an_empty_folder_says_so_without_lightnings_save_last_hint(tmp_path):
    shutil.copy(ROOT / "examples" / "cli" / "train.py", tmp_path / "train.py")
    shutil.copy(ROOT / "examples" / "digits.py", tmp_path / "digits.py")
    (tmp_path / "config.yaml").write_text(documented_config(tmp_path, False).replace("max_steps: 20", "max_steps: 2"))
    p = run([sys.executable, "train.py", "fit", "--config", "config.yaml", "--ckpt_path", "last"], cwd=tmp_path)
    out = p.stdout + p.stderr
    assert "save_last=True" not in out and "no last checkpoint available" not in out, out[-3000:]
    assert f'ckpt_path="last" found no committed checkpoint under {tmp_path / "ckpts"}' in out
    assert "training starts from scratch" in out
