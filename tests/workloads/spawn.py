"""``strategy="ddp_spawn"`` with the plugin and the callback: fit, results handed back, pickling, resume.

    python spawn.py ROOT      prints "SPAWN OK" when everything held
"""

from __future__ import annotations

import copy
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Net, data  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, list_checkpoints, load_checkpoint  # noqa: E402


def trainer(root: str, max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=max_steps,
                     plugins=[DistCheckpointIO()], callbacks=[DistCheckpoint(dirpath=os.path.join(root, "ck"),
                                                                              every_n_train_steps=2)],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)  # fmt: skip


def main(root: str) -> None:
    torch.manual_seed(0)
    model = Net()
    t = trainer(root, 4)
    t.fit(model, data())
    names = [c.name for c in list_checkpoints(os.path.join(root, "ck"))]
    assert names[-1] == "epoch=0-step=4", names
    # rank 0 handed its weights back through checkpoint_io.save_checkpoint(".temp.ckpt"), then removed it
    saved = load_checkpoint(os.path.join(root, "ck", "epoch=0-step=4"))["state_dict"]
    live = model.state_dict()
    assert all(torch.equal(live[k], v) for k, v in saved.items()), "main process did not get rank 0's weights"
    assert not os.path.exists(os.path.join(root, ".temp.ckpt")), os.listdir(root)
    torch.save(t, os.path.join(root, "trainer.pt"))  # the routed strategy pickles through Strategy.__getstate__
    copy.deepcopy(t.callbacks)
    t2 = trainer(root, 6)
    t2.fit(Net(), data(), ckpt_path="last")
    names = [c.name for c in list_checkpoints(os.path.join(root, "ck"))]
    assert names[-1].endswith("-step=6"), names  # resumed from step 4
    print("SPAWN OK")


if __name__ == "__main__":
    main(sys.argv[1])
