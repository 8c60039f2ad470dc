"""Compression presets: round trips per dtype, quality of resumed training, self-description, resharding
of quantized state, corrupted compressed blocks, pruning and quantized export."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from conftest import load_json, rewrite_document, train
from workloads.common import Net, data

from lightning_distckpt import CorruptCheckpointError, DistCheckpoint, DistCheckpointIO, export_checkpoint, load_checkpoint
from lightning_distckpt import ondisk as fmt
from lightning_distckpt.transforms import CompressionConfig
from lightning_distckpt.transforms.tensor_codecs import dynamic_map
from lightning_distckpt.transforms.registry import tensor_codec
from lightning_distckpt.transforms.lossless import ShuffleZstd
from lightning_distckpt.transforms.prune import prune, quantize_int8, sparsity


def state(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 64, generator=g).to(dtype)
    sparse = torch.randn(128, 64, generator=g).to(dtype) * (torch.rand(128, 64, generator=g) > 0.8)
    return {"state_dict": {"l.weight": w, "l.bias": torch.randn(256, generator=g).to(dtype), "s.weight": sparse},
            "optimizer_states": [{"state": {"l.weight": {"step": torch.tensor(7.0),
                                                         "exp_avg": (w.float() * 1e-3).to(dtype),
                                                         "exp_avg_sq": (w.float() ** 2 * 1e-6).to(dtype)}},
                                  "param_groups": [{"lr": 0.1, "params": ["l.weight"]}]}]}  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("preset", [None, "lossless", "bf16", "int8"])
def test_round_trip(tmp_path, preset, dtype):
    ck = state(dtype)
    DistCheckpointIO(compression=preset).save_checkpoint(ck, str(tmp_path / "c"))
    back = load_checkpoint(str(tmp_path / "c"))  # no flag: the checkpoint describes itself
    w, bw = ck["state_dict"]["l.weight"], back["state_dict"]["l.weight"]
    m = ck["optimizer_states"][0]["state"]["l.weight"]
    bm = back["optimizer_states"][0]["state"]["l.weight"]
    assert bw.dtype == dtype and bm["exp_avg"].dtype == dtype  # restored to the training dtype
    assert torch.equal(back["state_dict"]["l.bias"], ck["state_dict"]["l.bias"])  # 1-D: always exact
    assert torch.equal(bm["step"], m["step"])
    lossy = preset in ("bf16", "int8") and dtype == torch.float32  # half-precision state is kept as it is
    if not lossy:
        assert torch.equal(bw, w) and torch.equal(bm["exp_avg"], m["exp_avg"]) and torch.equal(bm["exp_avg_sq"], m["exp_avg_sq"])
        assert torch.equal(back["state_dict"]["s.weight"], ck["state_dict"]["s.weight"])
    else:
        bound = {"bf16": 0.005, "int8": 0.01}[preset]
        assert 0 < rel(bw, w) < bound
        assert rel(bm["exp_avg"], m["exp_avg"]) < 5 * bound and rel(bm["exp_avg_sq"], m["exp_avg_sq"]) < 10 * bound
        assert (bm["exp_avg_sq"] > 0).all()  # a positive second moment never becomes zero


def test_sizes_follow_the_presets(tmp_path):
    ck = {"state_dict": {f"l{i}.weight": torch.randn(256, 256) for i in range(4)},
          "optimizer_states": [{"state": {f"l{i}.weight": {"exp_avg": torch.randn(256, 256) * 1e-3,
                                                          "exp_avg_sq": torch.rand(256, 256) * 1e-6} for i in range(4)},
                                "param_groups": [{"params": [f"l{i}.weight" for i in range(4)]}]}]}  # fmt: skip
    size = {}
    for preset in (None, "lossless", "bf16", "int8"):
        d = tmp_path / str(preset)
        DistCheckpointIO(compression=preset).save_checkpoint(ck, str(d))
        size[preset] = sum(os.path.getsize(d / f) for f in os.listdir(d) if f.endswith(".distcp"))
        manifest = json.load(open(d / fmt.MANIFEST))
        assert (manifest["compression"] or {}).get("preset") == (preset if preset != "lossless" else "lossless") or preset is None
    assert size["lossless"] < size[None]
    assert size["bf16"] <= 0.55 * size[None] and size["int8"] <= 0.30 * size[None], size


def test_lossless_codec_handles_sparse_and_incompressible_blocks():
    c = ShuffleZstd()
    for data in (torch.zeros(1000), torch.randn(1000), torch.where(torch.rand(4096) > 0.9, torch.randn(4096), 0.0),
                 torch.randint(0, 255, (333,), dtype=torch.uint8)):
        raw = memoryview(data.numpy().view("uint8"))
        assert c.decode(memoryview(c.encode(raw, data.element_size())), len(raw)) == bytes(raw)


def test_dynamic_maps_are_sorted_and_span_zero_to_one():
    for signed in (True, False):
        m = dynamic_map(signed)
        assert len(m) == 256 and bool((m[1:] >= m[:-1]).all()) and m[-1] == 1.0 and 0.0 in m
    assert dynamic_map(True)[0] == -1.0 and dynamic_map(False)[0] == 0.0
    assert all(tensor_codec(n) is not None for n in ("int8-rows", "dyn8", "dyn8-sqrt"))


def test_unknown_codec_version_is_a_clear_error(tmp_path):
    url = str(tmp_path / "c")
    DistCheckpointIO(compression="int8").save_checkpoint(state(torch.float32), url)
    md = json.load(open(os.path.join(url, fmt.METADATA)))
    md["encodings"]["model/l.weight"]["version"] = 99
    rewrite_document(url, fmt.METADATA, fmt.dumps(md))
    with pytest.raises(CorruptCheckpointError, match=r"int8-rows.*version 99.*upgrade lightning-distckpt"):
        load_checkpoint(url)


def test_unknown_block_codec_is_a_clear_error(tmp_path):
    url = str(tmp_path / "c")
    DistCheckpointIO(compression="lossless").save_checkpoint(state(torch.float32), url)
    md = json.load(open(os.path.join(url, fmt.METADATA)))
    for t in md["tensors"].values():
        for c in t["chunks"]:
            c["c"] = "brotli-9"
    rewrite_document(url, fmt.METADATA, fmt.dumps(md))
    with pytest.raises(CorruptCheckpointError, match="brotli-9.*not supported"):
        load_checkpoint(url)


@pytest.mark.parametrize("preset", ["lossless", "int8"])
def test_corrupted_compressed_block_is_a_checksum_error_not_garbage(tmp_path, preset):
    url = str(tmp_path / "c")
    DistCheckpointIO(compression=preset).save_checkpoint(state(torch.float32), url)
    path = os.path.join(url, "__0_0.distcp")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_checkpoint(url)


def test_exact_every_k_saves(tmp_path):
    io = DistCheckpointIO(compression=CompressionConfig(preset="int8", exact_every=2))
    ck = state(torch.float32)
    for i in range(4):
        io.save_checkpoint(ck, str(tmp_path / f"c{i}"))
    exact = [torch.equal(load_checkpoint(str(tmp_path / f"c{i}"))["state_dict"]["l.weight"], ck["state_dict"]["l.weight"])
             for i in range(4)]  # fmt: skip
    assert exact == [False, True, False, True]


def test_pruning_and_quantized_export(tmp_path):
    w = torch.randn(100, 50)
    p = prune(w, fraction=0.3)
    assert abs(sparsity(p) - 0.3) < 1e-9 and torch.equal(p[p != 0], w[p != 0])
    assert (prune(w, threshold=0.5).abs() >= 0.5).sum() == (w.abs() >= 0.5).sum()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and rel(q.float() * scale[:, None], w) < 0.01
    url = str(tmp_path / "c")
    DistCheckpointIO().save_checkpoint(state(torch.float32), url)
    out = export_checkpoint(url, str(tmp_path / "w.safetensors"), format="safetensors", prune=0.5, quantize="int8")
    from safetensors.torch import load_file

    t = load_file(out)
    assert t["l.weight"].dtype == torch.int8 and t["l.weight.scale"].shape == (256,)
    assert 0.45 < sparsity(t["l.weight"]) and t["l.bias"].dtype == torch.float32
    # the training checkpoint itself was not touched by the pruning
    assert sparsity(load_checkpoint(url)["state_dict"]["l.weight"]) == 0


def _fit(dirpath, steps, preset=None, resume=None, seed=0):
    torch.manual_seed(seed)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    t = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  plugins=[DistCheckpointIO(compression=preset)],
                  callbacks=[DistCheckpoint(dirpath=str(dirpath), every_n_train_steps=16), Record()])  # fmt: skip
    t.fit(Net(width=128), data(512, 32), ckpt_path=resume)
    return losses


def test_resumed_training_stays_on_track(tmp_path):
    """Small-scale version of the quality benchmark: resume from each preset for 16 steps."""
    _fit(tmp_path / "base", 16)
    base = str(tmp_path / "base" / "epoch=0-step=16")
    exact = None
    for preset in (None, "lossless", "bf16", "int8"):
        d = tmp_path / str(preset)
        _fit(d, 16, preset=None)  # identical first half
        if preset:  # re-save the step-16 state with the preset
            ck = load_checkpoint(base)
            DistCheckpointIO(compression=preset).save_checkpoint(ck, str(d / "epoch=0-step=16"))
        after = _fit(d, 32, preset=preset, resume="last")
        if preset is None:
            exact = after
        elif preset == "lossless":
            assert after == exact  # bit-identical resumed run
        else:
            assert all(abs(a - b) <= 0.05 * b for a, b in zip(after[:5], exact[:5])), (preset, after[:5], exact[:5])
            assert abs(after[-1] - exact[-1]) <= 0.05 * exact[-1] + 0.02


@pytest.mark.slow
def test_int8_state_reshards_2_to_3_and_to_1(tmp_path):
    train("mp", 2, tmp_path / "ck", "--max-steps", 4, "--save-every", 4, "--compression", "int8", "--async-save", "--width", 128,
          "--digest-dir", tmp_path)  # fmt: skip
    train("mp", 3, tmp_path / "ck", "--max-steps", 4, "--save-every", 4, "--resume", "last", "--width", 128,
          "--final-digest", tmp_path / "mp3.json")  # fmt: skip
    train("single", 1, tmp_path / "ck", "--max-steps", 4, "--save-every", 4, "--resume", "last", "--width", 128,
          "--final-digest", tmp_path / "one.json")  # fmt: skip
    saved, mp3, one = (load_json(tmp_path / n) for n in ("saved-4.json", "mp3.json", "one.json"))
    assert mp3["model"] == one["model"] and mp3["optim0"] == one["optim0"]  # the same decoded bytes
    quantized = [k for k in saved["model"] if saved["model"][k] != mp3["model"][k]]
    assert quantized and all(k.endswith("weight") for k in quantized)  # lossy only where the preset says
    assert mp3["global_step"] == saved["global_step"] and mp3["loops"] == saved["loops"]
