"""Pipelined snapshots (async_save): the save call returns before parameters and optimizer state are
copied; the next optimizer step waits for the copy; the checkpoint holds exactly the state at the save's
step, bit for bit, although the next step's forward and backward ran during the copy. A control run
without the optimizer hook shows the test catches a leak."""

from __future__ import annotations

import threading
import time

import lightning as L
import pytest
import torch
from torch import nn

from lightning_distckpt import DistCheckpointIO, list_checkpoints, load_checkpoint
from lightning_distckpt.errors import CheckpointSaveError
from lightning_distckpt.engine import snapshot as snapshot_mod

SAVE_AT = 3


class BNNet(L.LightningModule):
    """Parameters, a BatchNorm (buffers that every forward changes) and AdamW state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
        self.copy_done_at_forward: list[bool | None] = []  # per step: was the last save's copy done at its forward?
        self.backward_done = threading.Event()  # set after the backward of the step after the save

    def training_step(self, batch, batch_idx):
        io = self.trainer.strategy.checkpoint_io
        snap = getattr(io, "_snapshot", None)
        self.copy_done_at_forward.append(None if snap is None else snap.done)
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def on_after_backward(self):
        if self.trainer.global_step == SAVE_AT:  # the step after the save (global_step counts optimizer steps)
            self.backward_done.set()


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class SaveAt(L.Callback):
    """Saves at step SAVE_AT (async) and records the state as it is at that moment."""

    def __init__(self, path: str, io: DistCheckpointIO) -> None:
        self.path, self.io = path, io
        self.expected = None
        self.done_after_call = None
        self.blocked = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.expected = {"state_dict": _clone(checkpoint["state_dict"]),
                         "optimizer_states": _clone(checkpoint["optimizer_states"])}  # fmt: skip

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == SAVE_AT:
            t0 = time.perf_counter()
            trainer.save_checkpoint(self.path)
            self.blocked = time.perf_counter() - t0
            self.done_after_call = self.io._snapshot.done


def _train(tmp_path, monkeypatch, delay: float):
    original = snapshot_mod.PendingSnapshot.run
    model = BNNet()

    def slow_run(self):  # the copy starts only after the next step's backward, then takes a while
        model.backward_done.wait(timeout=60)
        time.sleep(delay)
        return original(self)

    monkeypatch.setattr(snapshot_mod.PendingSnapshot, "run", slow_run)
    torch.manual_seed(0)
    io = DistCheckpointIO(async_save=True)
    cb = SaveAt(str(tmp_path / "ckpt"), io)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16)), batch_size=8)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=SAVE_AT + 3, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, plugins=[io], callbacks=[cb])  # fmt: skip
    t.fit(model, data)
    return io, cb, model


def _differences(expected, back) -> list[str]:
    out = []
    for k, v in expected["state_dict"].items():
        if not torch.equal(back["state_dict"][k], v):
            out.append(f"model {k}")
    for (fqn, st) in expected["optimizer_states"][0]["state"].items():
        for name, v in st.items():
            got = back["optimizer_states"][0]["state"][fqn][name]
            if isinstance(v, torch.Tensor) and not torch.equal(got, v):
                out.append(f"optimizer {fqn}/{name}")
    return out


def test_optimizer_step_during_the_copy_does_not_leak_into_the_checkpoint(tmp_path, monkeypatch):
    io, cb, model = _train(tmp_path, monkeypatch, delay=0.3)
    assert cb.done_after_call is False  # the save returned before the copy ran: pipelined
    assert io.stats.step_wait_s > 0.2  # the next optimizer step (after its backward) waited for the copy
    # the next step's forward (and backward) ran while the copy was still going, not after it
    assert model.copy_done_at_forward[SAVE_AT] is False, model.copy_done_at_forward
    back = load_checkpoint(str(tmp_path / "ckpt"))
    assert _differences(cb.expected, back) == []
    # training went on after the save: the live state is not the saved one (the test compares something)
    assert not torch.equal(model.net[0].weight.detach(), cb.expected["state_dict"]["net.0.weight"])


def test_without_the_optimizer_hook_the_next_step_is_caught_not_saved(tmp_path, monkeypatch):
    """Control: with the hook disabled the next step changes the parameters before the copy. The version check
    catches it: the save fails naming a tensor, and nothing is committed (never a mix of two steps)."""
    monkeypatch.setattr(DistCheckpointIO, "_before_step", lambda self, *a: None)
    with pytest.raises(CheckpointSaveError, match=r"changed in place after the save call.*pipelined_snapshot=False"):
        _train(tmp_path, monkeypatch, delay=0.3)
    assert list_checkpoints(str(tmp_path)) == []  # nor its placeholder (the name reserved by the async save)


def test_blocking_snapshot_when_not_pipelined(tmp_path):
    torch.manual_seed(0)
    io = DistCheckpointIO(async_save=True, pipelined_snapshot=False)
    cb = SaveAt(str(tmp_path / "ckpt"), io)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 16)), batch_size=8)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=SAVE_AT + 2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, plugins=[io], callbacks=[cb])  # fmt: skip
    t.fit(BNNet(), data)
    assert cb.done_after_call is True
    assert _differences(cb.expected, load_checkpoint(str(tmp_path / "ckpt"))) == []


def test_snapshot_buffers_are_reused_and_pieces_exact():
    s = snapshot_mod.Snapshotter()
    a, b = torch.randn(100, 10), torch.randn(5)
    p = s.start({"model/a": a, "extra/b": b}, now=lambda k: not k.startswith("model/"))
    assert torch.equal(p.pieces["extra/b"][0].local, b) and not p.done  # "model/a": a buffer, not filled yet
    before = a.clone()
    p.run()
    assert p.done and torch.equal(p.pieces["model/a"][0].local, a)
    a.add_(1.0)  # after the copy: the snapshot keeps the old values
    assert torch.equal(p.pieces["model/a"][0].local, before)
    buf = p.pieces["model/a"][0].local
    p2 = s.start({"model/a": a, "extra/b": b}, now=lambda k: True)
    assert p2.done and p2.pieces["model/a"][0].local.data_ptr() == buf.data_ptr()  # the same host buffer
    assert not torch.equal(before, a)


def test_a_tensor_changed_in_place_before_its_deferred_copy_fails_the_snapshot():
    """Lightning's ModelCheckpoint under manual optimization swaps weights in place around the save call and
    restores them right after it returns: the deferred copy would see the restored values. It is caught."""
    s = snapshot_mod.Snapshotter()
    a, b = torch.randn(100, 10), torch.randn(5)
    p = s.start({"model/a": a, "extra/b": b}, now=lambda k: not k.startswith("model/"))
    a[3].mul_(2.0)  # through a view: the counter is shared with the base
    p.run()
    assert p.done and "'model/a'" in p.problem  # waiters are released; the save reports the error
    with pytest.raises(CheckpointSaveError, match=r"rank 1: tensor 'model/a' was changed in place"):
        p.check(lambda mine: ["", mine])  # as rank 1 of two: every rank raises the same
    p2 = s.start({"model/a": a, "extra/b": b}, now=lambda k: not k.startswith("model/"))
    p2.run()
    p2.check(lambda mine: [mine, mine])  # unchanged: nothing to report


class PlainNet(L.LightningModule):
    """BNNet without its test events (SWA deep-copies the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Captures(L.Callback):
    """Records the model weights as each save sees them (on_save_checkpoint), by checkpoint step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.at[trainer.global_step] = _clone(checkpoint["state_dict"])


def test_stochastic_weight_averaging_with_async_saves_keeps_each_checkpoint_exact(tmp_path, monkeypatch):
    """SWA changes the weights in place in on_train_epoch_start / on_train_end, right after an epoch-end save:
    the snapshot is waited for at such boundary hooks, so every save commits exactly what it saw (the copy is
    slowed down so that, without the wait, SWA's change would come first)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging

    original = snapshot_mod.PendingSnapshot.run

    def slow_run(self):
        time.sleep(0.2)
        return original(self)

    monkeypatch.setattr(snapshot_mod.PendingSnapshot, "run", slow_run)

    torch.manual_seed(0)
    io = DistCheckpointIO(async_save=True)
    cap = Captures()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 16)), batch_size=8)
    t = L.Trainer(accelerator="cpu", devices=1, max_epochs=4, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[io], callbacks=[StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=2), cap, ckpt])  # fmt: skip
    t.fit(PlainNet(), data)
    saved = sorted((tmp_path / "ck").iterdir())
    assert len(saved) >= 4 and all((p / "COMMITTED").exists() for p in saved), saved  # SWA+BN adds an epoch
    for p in saved:
        back = load_checkpoint(str(p))
        step = back["global_step"]
        assert all(torch.equal(back["state_dict"][k], v) for k, v in cap.at[step].items()), p.name


def test_a_save_inside_inference_mode_leaves_buffers_a_later_save_can_fill():
    s = snapshot_mod.Snapshotter()
    a = torch.randn(64, 8)
    with torch.inference_mode():
        p = s.start({"model/a": a}, now=lambda k: False)
    p.run()
    assert not p.problem and torch.equal(p.pieces["model/a"][0].local, a)
    a.add_(1.0)
    p2 = s.start({"model/a": a}, now=lambda k: False)  # outside inference mode, the same buffer reused
    p2.run()
    assert not p2.problem and torch.equal(p2.pieces["model/a"][0].local, a)


class ManualNet(PlainNet):
    """Manual optimization that also writes a parameter in place outside optimizer.step() (weight clipping)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        with torch.no_grad():  # right after the previous step's save returned, before any optimizer.step()
            self.net[0].weight.clamp_(-0.05, 0.05)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.net(batch[0]).pow(2).mean())
        opt.step()


def test_manual_optimization_saves_are_snapshot_inside_the_call(tmp_path):
    """Under manual optimization training_step may change parameters anywhere, so an async save copies them
    before returning (no pipelined copy to race with the clamp): every checkpoint commits, holding exactly the
    weights its save saw."""
    io = DistCheckpointIO(async_save=True)
    seen = Captures()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1, save_top_k=-1)
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 16)), batch_size=8)
    L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
              plugins=[io], callbacks=[ckpt, seen]).fit(ManualNet(), data)  # fmt: skip
    rows = list_checkpoints(str(tmp_path))
    assert len(rows) == 4 and all(r.committed for r in rows), rows
    for r in rows:
        back = load_checkpoint(r.url)
        want = seen.at[back["global_step"]]
        assert want.keys() == back["state_dict"].keys()
        assert all(torch.equal(back["state_dict"][k], v) for k, v in want.items()), r.name
