"""LightningCLI entry point for the YAML tests: ``python cli.py fit --config cfg.yaml``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DataModule, Net, end_process  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

if __name__ == "__main__":
    cli = LightningCLI(Net, DataModule, save_config_kwargs={"overwrite": True})
    if cli.trainer.is_global_zero:
        print(f"DONE global_step={cli.trainer.global_step}")
    end_process()
