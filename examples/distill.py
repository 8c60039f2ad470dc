"""Knowledge distillation on digits, mechanics only: a teacher, then a >=4x smaller student with and without KD.

    python examples/distill.py --seeds 1 --steps 60 --out /tmp/distill.json

Every label is given here, so distillation has little to add (it is the setting where it does not pay).
The benchmark where it does, with few labels, is ``benchmarks/bench_distill.py`` (docs/distillation.md).

The teacher is checkpointed with DistCheckpointIO (int8-compressed, to show that any checkpoint of this
package can be a teacher) and loaded back by KnowledgeDistillation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import Classifier, DigitsData  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, KnowledgeDistillation  # noqa: E402


def train(model: Classifier, steps: int, seed: int, callbacks: list, ckpt: str | None = None, compression=None) -> float:
    L.seed_everything(seed, verbose=False)
    if ckpt:
        callbacks = [*callbacks, DistCheckpoint(dirpath=ckpt, every_n_train_steps=steps)]
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(ckpt), num_sanity_val_steps=0,
                        val_check_interval=steps, check_val_every_n_epoch=None,
                        plugins=[DistCheckpointIO(compression=compression)],
                        callbacks=callbacks)  # fmt: skip
    trainer.fit(model, DigitsData(seed=seed))
    return float(trainer.callback_metrics["val_acc"])


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs if f.endswith(".distcp"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="distill-example-")
    try:
        teacher = Classifier(hidden=512)
        teacher_acc = train(teacher, args.steps, 100, [], ckpt=os.path.join(work, "teacher"), compression="int8")
        (name,) = os.listdir(os.path.join(work, "teacher"))
        teacher_url = os.path.join(work, "teacher", name)
        rows = []
        for seed in range(args.seeds):
            plain = Classifier(hidden=64)
            acc_plain = train(plain, args.steps, seed, [], ckpt=os.path.join(work, f"plain{seed}"))
            kd = KnowledgeDistillation(teacher=lambda: Classifier(hidden=512), teacher_ckpt=teacher_url,
                                       temperature=4.0, alpha=0.7)  # fmt: skip
            acc_kd = train(Classifier(hidden=64), args.steps, seed, [kd], ckpt=os.path.join(work, f"kd{seed}"))
            rows.append({"seed": seed, "student_acc": acc_plain, "student_kd_acc": acc_kd})
            print(f"seed {seed}: student {acc_plain:.4f}, student with KD {acc_kd:.4f}")
        student = Classifier(hidden=64)
        result = {
            "steps": args.steps, "seeds": args.seeds,
            "teacher": {"params": teacher.n_params, "val_acc": teacher_acc, "ckpt_bytes_int8": dir_bytes(os.path.join(work, "teacher"))},
            "student": {"params": student.n_params, "ckpt_bytes": dir_bytes(os.path.join(work, "plain0"))},
            "size_ratio": teacher.n_params / student.n_params,
            "student_acc_mean": statistics.mean(r["student_acc"] for r in rows),
            "student_kd_acc_mean": statistics.mean(r["student_kd_acc"] for r in rows),
            "student_acc_std": statistics.stdev(r["student_acc"] for r in rows) if len(rows) > 1 else 0.0,
            "student_kd_acc_std": statistics.stdev(r["student_kd_acc"] for r in rows) if len(rows) > 1 else 0.0,
            "runs": rows,
        }  # fmt: skip
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"example": "distill", **result}, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
