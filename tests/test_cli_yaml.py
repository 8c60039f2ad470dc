"""The plugin and the callback configured from a LightningCLI YAML file, run under torchrun."""

from __future__ import annotations

import pytest
from conftest import WORKLOADS, run, torchrun_cmd

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
