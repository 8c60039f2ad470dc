"""KnowledgeDistillation: the teacher stays frozen and out of the student's state, alpha=0 is exactly the
plain run, the KD term goes down with alpha=1, teachers load from a 2-rank int8 checkpoint into 1- and
3-process students, a KD run resumes exactly, and misuse fails at fit start."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import WORKLOADS, load_json, run, torchrun_cmd, train
from torch import nn
from workloads.common import Net, data

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, KnowledgeDistillation, load_checkpoint
from lightning_distckpt.engine.loading import load_weights


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher (width 64) trained 8 steps, saved by 1 process."""
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    t = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  plugins=[DistCheckpointIO()], callbacks=[DistCheckpoint(dirpath=str(d), every_n_train_steps=8)])
    t.fit(Net(width=64), data())
    return str(d / "epoch=0-step=8")


def run_student(kd: KnowledgeDistillation | None, steps: int = 8, seed: int = 0) -> tuple[L.Trainer, Net, list[float]]:
    torch.manual_seed(seed)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics.get("kd/kl", outputs["loss"])))

    student = Net(width=16)
    cbs = [Record()] + ([kd] if kd else [])
    t = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, callbacks=cbs)  # fmt: skip
    loader = torch.utils.data.DataLoader(data().dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    t.fit(student, loader)
    return t, student, losses


def test_teacher_is_frozen_and_outside_the_student(teacher_ckpt):
    kd = KnowledgeDistillation(teacher=lambda: Net(width=64), teacher_ckpt=teacher_ckpt, alpha=0.5)
    reference = Net(width=64)
    load_weights(teacher_ckpt, reference)
    t, student, _ = run_student(kd)
    assert all(not p.requires_grad and p.grad is None for p in kd.teacher.parameters())
    assert not kd.teacher.training
    for (k, a), (_, b) in zip(kd.teacher.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k  # bit-identical after training
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in kd.teacher.parameters()}
    assert all(k.startswith("net.") for k in student.state_dict())  # no teacher inside the student
    assert kd.steps == 8 and {"kd/loss", "kd/task", "kd/kl"} <= set(t.callback_metrics)


def test_alpha_zero_is_exactly_the_run_without_the_callback(teacher_ckpt):
    _, plain, plain_losses = run_student(None)
    kd = KnowledgeDistillation(teacher=lambda: Net(width=64), teacher_ckpt=teacher_ckpt, alpha=0.0)
    _, distilled, _ = run_student(kd)
    for (k, a), (_, b) in zip(plain.state_dict().items(), distilled.state_dict().items()):
        assert torch.equal(a, b), k


def test_alpha_one_drives_the_kd_term_down(teacher_ckpt):
    kd = KnowledgeDistillation(teacher=lambda: Net(width=64), teacher_ckpt=teacher_ckpt, alpha=1.0)
    _, _, kl = run_student(kd, steps=40)
    assert sum(kl[-5:]) / 5 < 0.7 * sum(kl[:5]) / 5, kl


class Manual(Net):
    def __init__(self) -> None:
        super().__init__(width=16)
        self.automatic_optimization = False


class NoLoss(Net):
    def training_step(self, batch, batch_idx):
        self(batch[0])


class Wide(Net):
    def __init__(self) -> None:
        super().__init__(width=16)
        self.net[-1] = nn.Linear(16, 7)


@pytest.mark.parametrize("student,match", [(Manual, "automatic optimization"), (NoLoss, "returned no loss"),
                                           (Wide, r"teacher output \[16, 4\] does not match the student output \[16, 7\]")])
def test_misuse_fails_at_fit_start(teacher_ckpt, student, match):
    kd = KnowledgeDistillation(teacher=lambda: Net(width=64), teacher_ckpt=teacher_ckpt)
    model = student() if student is not NoLoss else NoLoss(width=16)
    t = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, callbacks=[kd])  # fmt: skip
    with pytest.raises((RuntimeError, ValueError), match=match):
        t.fit(model, data())
    assert t.fit_loop.epoch_loop.batch_progress.total.ready == 0  # at fit start (the probe), before any batch ran


@pytest.mark.slow
def test_teacher_from_a_2_rank_int8_checkpoint_into_1_and_3_processes(tmp_path):
    train("mp", 2, tmp_path / "teacher", "--max-steps", 4, "--save-every", 4, "--width", 64, "--compression", "int8")
    url = str(tmp_path / "teacher" / "epoch=0-step=4")
    expected = Net(width=64)
    load_weights(url, expected)  # the decoded int8 weights
    decoded = load_checkpoint(url)["state_dict"]
    assert all(torch.equal(expected.state_dict()[k], decoded[k]) for k in decoded)
    for strategy, n in (("single", 1), ("ddp", 3)):
        out = tmp_path / f"{strategy}{n}"
        out.mkdir()
        args = ["--strategy", strategy, "--teacher-ckpt", url, "--out", out]
        run(torchrun_cmd(WORKLOADS / "distill.py", 0 if strategy == "single" else n, *args))
        r = load_json(out / "kd.json")
        from workloads.common import tensor_digest

        assert r["teacher"] == {k: tensor_digest(v) for k, v in sorted(expected.state_dict().items())}
        assert not any(r["teacher_grads"]) and r["kd_steps"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["mp", "ddp"])
def test_kd_run_resumes_exactly_with_2_processes(teacher_ckpt, tmp_path, strategy):
    base = ["--strategy", strategy, "--teacher-ckpt", teacher_ckpt]
    run(torchrun_cmd(WORKLOADS / "distill.py", 2, *base, "--max-steps", 8, "--out", tmp_path))
    ref = load_json(tmp_path / "kd.json")
    (tmp_path / "r").mkdir()
    run(torchrun_cmd(WORKLOADS / "distill.py", 2, *base, "--max-steps", 4, "--ckpt-dir", tmp_path / "ck", "--out", tmp_path / "r"))
    run(torchrun_cmd(WORKLOADS / "distill.py", 2, *base, "--max-steps", 8, "--ckpt-dir", tmp_path / "ck",
                     "--resume", "last", "--out", tmp_path / "r"))  # fmt: skip
    res = load_json(tmp_path / "r" / "kd.json")
    for key in ("model", "optim0", "global_step"):
        assert ref[key] == res[key], key
    assert res["kd_steps"] == 8  # the callback's counter was restored with the checkpoint


class HalfLabeled(Net):
    """Labels below 0 mean "unlabeled": the task loss covers the labeled examples; a batch without any returns None."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        labeled = y >= 0
        if not labeled.any():
            return None
        return nn.functional.cross_entropy(logits[labeled], y[labeled])


def unlabeled_loader(labeled_batches: set[int]) -> torch.utils.data.DataLoader:
    x, y = data().dataset.tensors
    y = y.clone()
    for b in range(len(y) // 16):
        if b not in labeled_batches:
            y[b * 16 : (b + 1) * 16] = -1
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def test_train_on_unlabeled_distils_batches_without_labels(teacher_ckpt):
    """Batches 0 and 1 have no label: with train_on_unlabeled they train on alpha * KL alone (the task term
    is 0), and the other batches on the usual mix; every step moves the student."""
    torch.manual_seed(0)
    kd = KnowledgeDistillation(teacher=lambda: Net(width=64), teacher_ckpt=teacher_ckpt, alpha=0.5, train_on_unlabeled=True)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            seen.append((batch_idx, float(m["kd/task"]), float(m["kd/kl"]), float(outputs["loss"])))

    student = HalfLabeled(width=16)
    before = [p.detach().clone() for p in student.parameters()]
    t = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, callbacks=[Record(), kd])  # fmt: skip
    t.fit(student, unlabeled_loader(labeled_batches={2, 3}))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and kd.steps == 4
    for idx, task, kl, loss in seen:
        if idx < 2:
            assert task == 0.0 and kl > 0 and loss == pytest.approx(0.5 * kl)
        else:
            assert task > 0 and loss == pytest.approx(0.5 * task + 0.5 * kl)
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_a_none_loss_without_train_on_unlabeled_fails_before_any_step(teacher_ckpt):
    kd = KnowledgeDistillation(teacher=lambda: Net(width=64), teacher_ckpt=teacher_ckpt)
    student = HalfLabeled(width=16)
    before = [p.detach().clone() for p in student.parameters()]
    t = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, callbacks=[kd])  # fmt: skip
    with pytest.raises(RuntimeError, match="train_on_unlabeled=True"):
        t.fit(student, unlabeled_loader(labeled_batches=set()))
    assert t.global_step == 0 and all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
