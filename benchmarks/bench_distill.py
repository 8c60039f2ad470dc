"""Knowledge distillation where it is expected to pay: few labels, a teacher's soft targets for everything.

    python benchmarks/bench_distill.py                    # 3 seeds; writes benchmarks/results/distill.json
    python benchmarks/bench_distill.py --seeds 1 --student-steps 60 --teacher-steps 60 --out /tmp/d.json  # quick

The setting (scikit-learn's bundled 8x8 digits, no download; 1500 images to train on, 297 to validate on):

* the **teacher** (MLP, hidden 512) learns from all 1500 labels, under ``ModelParallelStrategy`` (FSDP2) on
  2 processes (``torchrun``), checkpointed with ``DistCheckpointIO(compression="int8")``;
* the **student** (MLP, hidden 32, 1 process, no strategy) sees the labels of a small random fraction of
  the training set (``--label-fraction``, 5 % by default: 75 images, drawn per seed);
* **without distillation** the student trains on those labeled images alone;
* **with distillation** it trains on all 1500 images: the labeled ones with the task loss, every one with
  the teacher's soft targets (``KnowledgeDistillation(train_on_unlabeled=True)``, the teacher loaded from the
  2-rank int8 checkpoint into a plain ``nn.Module``);
* both students take the same number of optimizer steps with the same batch size, seed and initialization.

Target: the distilled student at least 2 accuracy points above the student without distillation (mean
over seeds). The same comparison with every label given is reported too (there KD has little to add).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import environment, write_result  # noqa: E402

TRAIN, VAL = 1500, 297


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


class MLP(L.LightningModule):
    """An MLP over the 64 pixels. ``training_step`` learns from labeled examples only (label -1: unlabeled)
    and returns ``None`` for a batch without any label, after running the forward (the KD callback's case)."""

    def __init__(self, hidden: int = 32, depth: int = 2, lr: float = 3e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def configure_model(self) -> None:  # ModelParallelStrategy (FSDP2): shard every layer over the ranks
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh["data_parallel"])
            fully_shard(self, mesh=mesh["data_parallel"])
            self._sharded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        logits = self(x)
        labeled = y >= 0
        if not labeled.any():
            return None
        return nn.functional.cross_entropy(logits[labeled], y[labeled])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def loaders(labels: torch.Tensor, keep: torch.Tensor, seed: int, batch_size: int) -> tuple[Any, Any]:
    """Training examples ``keep`` (with ``labels``, -1 for unlabeled) and the 297 validation images."""
    x, y = digits()
    train = torch.utils.data.TensorDataset(x[:TRAIN][keep], labels[keep])
    val = torch.utils.data.TensorDataset(x[TRAIN:], y[TRAIN:])
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            torch.utils.data.DataLoader(val, batch_size=VAL))  # fmt: skip


def labeled_subset(fraction: float, seed: int) -> torch.Tensor:
    """Indices of the training images whose labels the student sees: ``fraction`` of each class (at least 1)."""
    _, y = digits()
    g = torch.Generator().manual_seed(1000 + seed)
    picked = []
    for c in range(10):
        idx = (y[:TRAIN] == c).nonzero().flatten()
        n = max(1, round(fraction * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def trainer(steps: int, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kwargs)  # fmt: skip


# ---- the teacher: 2 processes, ModelParallelStrategy, int8 checkpoint (run under torchrun) -----------------
def train_teacher(args: argparse.Namespace) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_distckpt import DistCheckpoint, DistCheckpointIO

    world = int(os.environ.get("WORLD_SIZE", "1"))
    L.seed_everything(100, verbose=False)
    _, y = digits()
    train, val = loaders(y[:TRAIN], torch.arange(TRAIN), 100, args.batch_size)
    t = trainer(args.teacher_steps, [DistCheckpoint(dirpath=args.teacher_dir, every_n_train_steps=args.teacher_steps)],
                accelerator="cpu", devices=world, strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                plugins=[DistCheckpointIO(compression="int8")])  # fmt: skip
    model = MLP(hidden=args.teacher_hidden)
    t.fit(model, train)
    acc = t.validate(model, val, verbose=False)[0]["val_acc"]
    if t.is_global_zero:
        with open(os.path.join(args.teacher_dir, "teacher.json"), "w") as f:
            json.dump({"val_acc": acc, "world_size": world, "strategy": "ModelParallelStrategy (FSDP2)"}, f)
    torch.distributed.destroy_process_group()  # without it, a rank can abort at exit (see the integrator note)


# ---- the students: 1 process ----------------------------------------------------------------------------
def train_student(args: argparse.Namespace, seed: int, fraction: float, teacher_url: str | None) -> float:
    from lightning_distckpt import KnowledgeDistillation

    _, y = digits()
    labeled = labeled_subset(fraction, seed)
    labels = torch.full((TRAIN,), -1, dtype=torch.long)
    labels[labeled] = y[:TRAIN][labeled]
    keep = torch.arange(TRAIN) if teacher_url else labeled  # without a teacher, unlabeled images teach nothing
    train, val = loaders(labels, keep, seed, args.batch_size)
    callbacks = []
    if teacher_url:
        callbacks.append(KnowledgeDistillation(teacher=lambda: MLP(hidden=args.teacher_hidden), teacher_ckpt=teacher_url,
                                               temperature=args.temperature, alpha=args.alpha, train_on_unlabeled=True))  # fmt: skip
    L.seed_everything(seed, verbose=False)
    model = MLP(hidden=args.student_hidden)
    t = trainer(args.student_steps, callbacks, accelerator="cpu", devices=1, enable_checkpointing=False)
    t.fit(model, train)
    return float(t.validate(model, val, verbose=False)[0]["val_acc"])


def summary(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "min": min(xs), "max": max(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="students per setting (seeds 0..N-1)")
    p.add_argument("--label-fraction", type=float, default=0.05, help="fraction of training labels the student sees")
    p.add_argument("--teacher-steps", type=int, default=1500, help="teacher optimizer steps")
    p.add_argument("--student-steps", type=int, default=600, help="student optimizer steps (with and without KD)")
    p.add_argument("--teacher-hidden", type=int, default=512, help="teacher MLP width")
    p.add_argument("--student-hidden", type=int, default=32, help="student MLP width")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of teacher and students")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight (1 - alpha on the task loss)")
    p.add_argument("--no-full-labels", action="store_true", help="skip the comparison with every label given")
    p.add_argument("--teacher-dir", default=None, help=argparse.SUPPRESS)  # internal: the torchrun teacher run
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/distill.json)")
    args = p.parse_args()
    if args.teacher_dir:
        return train_teacher(args)

    work = tempfile.mkdtemp(prefix="bench-distill-")
    try:
        teacher_dir = os.path.join(work, "teacher")
        t0 = time.perf_counter()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               os.path.abspath(__file__), "--teacher-dir", teacher_dir, *sys.argv[1:]]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"teacher run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        teacher = json.load(open(os.path.join(teacher_dir, "teacher.json")))
        (name,) = [n for n in os.listdir(teacher_dir) if n.startswith("epoch=")]
        teacher_url = os.path.join(teacher_dir, name)
        teacher_bytes = sum(os.path.getsize(os.path.join(teacher_url, f)) for f in os.listdir(teacher_url))
        print(f"teacher: val_acc {teacher['val_acc']:.4f}, int8 checkpoint {teacher_bytes / 1024:.0f} KiB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        settings = [args.label_fraction] + ([] if args.no_full_labels else [1.0])
        results = []
        for fraction in settings:
            runs = []
            for seed in range(args.seeds):
                plain = train_student(args, seed, fraction, None)
                kd = train_student(args, seed, fraction, teacher_url)
                runs.append({"seed": seed, "student_acc": plain, "student_kd_acc": kd, "gain": kd - plain})
                print(f"labels {fraction:.0%} seed {seed}: student {plain:.4f}, with KD {kd:.4f} ({100 * (kd - plain):+.1f} points)",
                      flush=True)  # fmt: skip
            results.append({"label_fraction": fraction, "labeled": len(labeled_subset(fraction, 0)), "runs": runs,
                            "student_acc": summary([r["student_acc"] for r in runs]),
                            "student_kd_acc": summary([r["student_kd_acc"] for r in runs]),
                            "gain_points": summary([100 * r["gain"] for r in runs])})  # fmt: skip
        main_gain = results[0]["gain_points"]["mean"]
        result = {
            "benchmark": "distill", "env": environment(), "seeds": args.seeds,
            "command": "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:]),
            "settings": {k: getattr(args, k) for k in ("label_fraction", "teacher_steps", "student_steps", "teacher_hidden",
                                                       "student_hidden", "batch_size", "temperature", "alpha")},
            "teacher": {"params": MLP(hidden=args.teacher_hidden).n_params, "val_acc": teacher["val_acc"],
                        "strategy": teacher["strategy"], "world_size": teacher["world_size"], "compression": "int8",
                        "ckpt_bytes": teacher_bytes},
            "student": {"params": MLP(hidden=args.student_hidden).n_params, "strategy": "single device", "world_size": 1},
            "results": results, "target_points": 2.0, "target_met": main_gain >= 2.0,
        }  # fmt: skip
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, sort_keys=True)
        else:
            write_result("distill", result)
        print(f"gain with {args.label_fraction:.0%} labels: {main_gain:+.1f} points (target +2.0): "
              f"{'met' if result['target_met'] else 'NOT met'}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
