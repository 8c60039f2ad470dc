"""KnowledgeDistillation: train a student against a frozen teacher loaded from any checkpoint of this package.

    KnowledgeDistillation(teacher=build_teacher, teacher_ckpt="hdfs://nn/teacher/last", temperature=2.0, alpha=0.5)

The callback wraps the LightningModule's ``training_step`` for the duration of ``fit``: the user's step
runs unchanged, a forward hook captures the student's output (the LightningModule's ``forward``, or the
module named by ``student_output``) and its input, the teacher runs on that input without gradients, and
the returned loss becomes ``(1 - alpha) * task + alpha * (T^2 * KL(teacher_T || student_T) + features)``.
The terms are logged as ``kd/loss``, ``kd/task``, ``kd/kl`` and ``kd/features``.

The teacher is read through this package's loader from any checkpoint it wrote (other world size, other
strategy, compressed); only its model weights are read. It is frozen (``requires_grad_(False)``, eval
mode, no autograd), is not part of the LightningModule (so it is in no optimizer and no checkpoint of the
student), and is placed on the student's device: one local copy per rank, or sharded like the student
under ModelParallelStrategy when it is larger than ``shard_above_mb``.

Unlabeled data (``train_on_unlabeled=True``): the teacher's soft targets need no labels, so the student can
learn from examples that have none. The KL term always covers every example of the batch; the
``training_step`` computes the task loss on the labeled examples only, and returns ``None`` for a batch that
has no labeled example at all (after calling the student's forward). Such a batch then trains on
``alpha * distillation`` alone. Without the flag a ``None`` loss is an error (it usually is a bug).

Checks at fit start, on the first training batch without changing any state: manual optimization, a
``training_step`` that returns no loss (unless ``train_on_unlabeled``), a student output that is never
produced, and teacher/student outputs of different shapes are errors before the first step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_distckpt.storage import HdfsOptions, StorageConfig

KDLoss = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class KnowledgeDistillation(Callback):
    """Distil a frozen teacher into the LightningModule being trained.

    Args:
        teacher: The teacher ``nn.Module``, or a callable that builds it (called once, on every rank).
        teacher_ckpt: A checkpoint written by this package (any world size, strategy, compression) whose
            model weights are loaded into the teacher; ``None`` keeps the teacher's weights as they are.
        temperature: Softmax temperature ``T`` of the KL term (scaled by ``T^2``).
        alpha: Weight of the distillation terms; ``1 - alpha`` weighs the task loss.
        student_output: Name of the student submodule whose output are the logits (default: the
            LightningModule's own ``forward``).
        features: Pairs ``{student module name: teacher module name}`` whose outputs are matched.
        feature_loss: ``"mse"`` or ``"cosine"`` for the feature pairs.
        feature_weight: Weight of the feature terms inside the distillation part.
        loss_fn: A custom distillation loss ``(student_logits, teacher_logits, batch) -> tensor`` that
            replaces the KL term.
        teacher_prefix: Prefix of the teacher's keys inside ``teacher_ckpt`` (e.g. ``"net."`` when the
            checkpoint is of a LightningModule holding the teacher as ``self.net``).
        shard_above_mb: Under ModelParallelStrategy, shard the teacher (FSDP2, on the student's mesh) when its
            parameters exceed this size; smaller teachers are replicated.
        train_on_unlabeled: Accept ``None`` from ``training_step`` (a batch without labels) and train that
            step on ``alpha`` times the distillation terms alone.
        storage_options: fsspec options for ``teacher_ckpt``.
        hdfs: HDFS settings for ``teacher_ckpt``.
    """

    def __init__(
        self,
        teacher: nn.Module | Callable[[], nn.Module],
        teacher_ckpt: str | None = None,
        temperature: float = 2.0,
        alpha: float = 0.5,
        student_output: str | None = None,
        features: dict[str, str] | None = None,
        feature_loss: Literal["mse", "cosine"] = "mse",
        feature_weight: float = 1.0,
        loss_fn: KDLoss | None = None,
        teacher_prefix: str = "",
        shard_above_mb: float = 1024.0,
        train_on_unlabeled: bool = False,
        storage_options: dict[str, Any] | None = None,
        hdfs: HdfsOptions | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"KnowledgeDistillation(temperature={temperature}): must be positive")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"KnowledgeDistillation(alpha={alpha}): must be in [0, 1]")
        if feature_loss not in ("mse", "cosine"):
            raise ValueError(f"KnowledgeDistillation(feature_loss={feature_loss!r}): 'mse' or 'cosine'")
        self._teacher_spec = teacher
        self.teacher_ckpt = teacher_ckpt
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.student_output = student_output
        self.features = dict(features or {})
        self.feature_loss = feature_loss
        self.feature_weight = float(feature_weight)
        self.loss_fn = loss_fn
        self.teacher_prefix = teacher_prefix
        self.shard_above_mb = shard_above_mb
        self.train_on_unlabeled = bool(train_on_unlabeled)
        self.storage = StorageConfig(options=dict(storage_options or {}), hdfs=hdfs)
        self.teacher: nn.Module | None = None
        self.steps = 0  # distillation steps taken (restored with the student's checkpoint)
        self._captured: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._original_step: Any = None
        self._probing = False

    # -- state (saved with the student's checkpoint) ----------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "temperature": self.temperature, "alpha": self.alpha,
                "feature_weight": self.feature_weight, "teacher_ckpt": self.teacher_ckpt}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self.temperature = float(state_dict.get("temperature", self.temperature))
        self.alpha = float(state_dict.get("alpha", self.alpha))
        self.feature_weight = float(state_dict.get("feature_weight", self.feature_weight))

    # -- setup ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("KnowledgeDistillation needs automatic optimization (the LightningModule sets "
                               "automatic_optimization = False)")  # fmt: skip
        if self.teacher is None:
            spec = self._teacher_spec
            self.teacher = spec if isinstance(spec, nn.Module) else spec()
            if not isinstance(self.teacher, nn.Module):
                raise TypeError(f"KnowledgeDistillation(teacher=...) built a {type(self.teacher).__name__}, not an nn.Module")
            if self.teacher_ckpt is not None:
                from lightning_distckpt.engine.loading import load_weights

                load_weights(self.teacher_ckpt, self.teacher, self.storage, prefix=self.teacher_prefix)
            self.teacher.requires_grad_(False).eval()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        self._place_teacher(trainer, pl_module)
        self._install(pl_module)
        self._probe(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._original_step is not None:
            del pl_module.training_step  # the instance attribute; the class method shows through again
            self._original_step = None

    def _place_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        device = pl_module.device
        from lightning.pytorch.strategies import ModelParallelStrategy

        size_mb = sum(p.numel() * p.element_size() for p in self.teacher.parameters()) / 2**20
        mesh = getattr(trainer.strategy, "device_mesh", None) if isinstance(trainer.strategy, ModelParallelStrategy) else None
        self.teacher.to(device)
        if mesh is not None and size_mb > self.shard_above_mb:
            from torch.distributed.fsdp import fully_shard

            for m in self.teacher.modules():
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh["data_parallel"])
            fully_shard(self.teacher, mesh=mesh["data_parallel"])
        self.teacher.requires_grad_(False).eval()

    # -- the wrapped training step ---------------------------------------------------------------
    def _install(self, pl_module: pl.LightningModule) -> None:
        assert self.teacher is not None
        student = pl_module.get_submodule(self.student_output) if self.student_output else pl_module

        def capture(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if torch.is_grad_enabled() or self._probing:
                self._captured["student"] = (output, args, kwargs)

        self._hooks.append(student.register_forward_hook(capture, with_kwargs=True))
        for s_name, t_name in self.features.items():
            self._hooks.append(pl_module.get_submodule(s_name).register_forward_hook(
                lambda m, a, o, n=s_name: self._captured.__setitem__(f"s:{n}", o)))  # fmt: skip
            self._hooks.append(self.teacher.get_submodule(t_name).register_forward_hook(
                lambda m, a, o, n=t_name: self._captured.__setitem__(f"t:{n}", o)))  # fmt: skip
        original = type(pl_module).training_step.__get__(pl_module)
        self._original_step = original

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._captured.clear()
            out = original(*args, **kwargs)
            return self._combine(pl_module, out, args[0] if args else kwargs.get("batch"))

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _combine(self, pl_module: pl.LightningModule, out: Any, batch: Any) -> Any:
        task = out["loss"] if isinstance(out, dict) else out
        if task is None and not self.train_on_unlabeled:
            raise RuntimeError("KnowledgeDistillation: training_step returned no loss (None); it must return the "
                               "task loss as a tensor or a dict with 'loss' (or pass train_on_unlabeled=True for "
                               "batches without labels)")  # fmt: skip
        if "student" not in self._captured:
            where = f"module {self.student_output!r}" if self.student_output else "the LightningModule's forward"
            raise RuntimeError(f"KnowledgeDistillation: training_step never called {where}, so there are no student "
                               f"logits to distil into; call self(x) in training_step or pass student_output=...")
        s_out, args, kwargs = self._captured["student"]
        assert self.teacher is not None
        with torch.no_grad():
            t_out = self.teacher(*args, **kwargs)
        s_logits, t_logits = _logits(s_out), _logits(t_out)
        if s_logits.shape != t_logits.shape:
            raise RuntimeError(f"KnowledgeDistillation: teacher output {list(t_logits.shape)} does not match the student "
                               f"output {list(s_logits.shape)}")  # fmt: skip
        if self.loss_fn is not None:
            kd = self.loss_fn(s_logits, t_logits, batch)
        else:
            T = self.temperature
            kd = F.kl_div(F.log_softmax(s_logits.float() / T, dim=-1), F.log_softmax(t_logits.float() / T, dim=-1),
                          reduction="batchmean", log_target=True) * (T * T)  # fmt: skip
        if task is None:  # a batch without labels (train_on_unlabeled): distillation alone
            task = torch.zeros((), device=s_logits.device)
        feat = torch.zeros((), device=task.device)
        for s_name, t_name in self.features.items():
            s, t = _logits(self._captured[f"s:{s_name}"]), _logits(self._captured[f"t:{t_name}"]).detach()
            if s.shape != t.shape:
                raise RuntimeError(f"KnowledgeDistillation: feature {s_name!r} {list(s.shape)} does not match "
                                   f"teacher feature {t_name!r} {list(t.shape)}")  # fmt: skip
            feat = feat + (F.mse_loss(s.float(), t.float()) if self.feature_loss == "mse"
                           else (1 - F.cosine_similarity(s.flatten(1).float(), t.flatten(1).float(), dim=1)).mean())
        loss = (1 - self.alpha) * task + self.alpha * (kd + self.feature_weight * feat)
        if not self._probing:
            self.steps += 1
            pl_module.log_dict({"kd/loss": loss.detach(), "kd/task": task.detach(), "kd/kl": kd.detach(),
                                "kd/features": feat.detach()}, on_step=True, prog_bar=False)  # fmt: skip
        if isinstance(out, dict):
            return {**out, "loss": loss}
        return loss

    # -- checks at fit start ---------------------------------------------------------------------
    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the wrapped step once on the first batch, changing nothing, so that errors come now."""
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        if loader is None:
            return
        was_training = pl_module.training
        generators = _generators(loader)
        states = [g.get_state() for g in generators]
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _no_logging(pl_module):
            batch = next(iter(loader))
            for g, s in zip(generators, states):  # the real epoch shuffles exactly as without the probe
                g.set_state(s)
            batch = trainer.strategy.batch_to_device(batch)
            pl_module.eval()
            self._probing = True
            try:
                pl_module.training_step(batch, 0)
            finally:
                self._probing = False
                pl_module.train(was_training)
                self._captured.clear()


def _generators(loader: Any) -> list[torch.Generator]:
    """Random generators a DataLoader's iteration advances (its own, its sampler's)."""
    found = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and g not in found:
            found.append(g)
    return found


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise RuntimeError(f"KnowledgeDistillation: cannot find logits in a {type(out).__name__} output")


@contextlib.contextmanager
def _no_logging(pl_module: pl.LightningModule):
    pl_module.log = lambda *a, **k: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict  # the class methods show through again
