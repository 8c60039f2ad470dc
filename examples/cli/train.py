"""LightningCLI with DistCheckpointIO and DistCheckpoint configured in YAML.

    torchrun --nproc_per_node=2 examples/cli/train.py fit --config examples/cli/config.yaml
    torchrun --nproc_per_node=2 examples/cli/train.py fit --config examples/cli/config.yaml --ckpt_path last

``save_config_kwargs={"overwrite": True}``: LightningCLI saves the resolved config into the log directory at
every ``fit``; a resumed run writes it again, which Lightning refuses by default (with ``logger: false`` the
log directory is ``default_root_dir``, the same for every run). See docs/lightning-cli.md.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from digits import Classifier, DigitsData  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

if __name__ == "__main__":
    LightningCLI(Classifier, DigitsData, save_config_kwargs={"overwrite": True})
