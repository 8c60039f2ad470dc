"""The vectorised codec kernels against the torch formulation they replace: same format, same decoding,
int8 bytes identical, 8-bit map codes at most one step apart and only near a decision boundary; blocks
written by the previous lossless compressor still decode; the chunked thread pool covers every element."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

from lightning_distckpt.transforms import vector
from lightning_distckpt.transforms.lossless import ShuffleZstd
from lightning_distckpt.transforms.registry import tensor_codec
from lightning_distckpt.transforms.tensor_codecs import _code_index, code_table, dynamic_map


def tensors(shape=(300, 1000)):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 0.02
    w[-1, :7] = torch.tensor([1e-30, -1e-30, 0.0, -0.0, 5.0, -5.0, 1e-8])
    if shape[0] > 3:
        w[3] = 0.0  # an all-zero row (scale 0)
    return {"int8-rows": w, "dyn8": w * 1e-3, "dyn8-sqrt": (w.abs() ** 2) * 1e-4}


@pytest.mark.parametrize("shape", [(300, 1000), (7, 256), (64, 3, 5, 5), (1, 70000)], ids=str)
@pytest.mark.parametrize("name", ["int8-rows", "dyn8", "dyn8-sqrt"])
def test_fast_kernels_match_the_torch_formulation(name, shape, monkeypatch):
    monkeypatch.setattr(vector, "CHUNK_ELEMENTS", 4096)  # many chunks: the thread pool runs
    c = tensor_codec(name)
    x = tensors((shape[0], int(np.prod(shape[1:]))))[name].reshape(shape)
    fast, ref = c.encode(x, 256), c.encode_torch(x, 256)
    assert fast.keys() == ref.keys()
    for k in fast:
        assert fast[k].shape == ref[k].shape and fast[k].dtype == ref[k].dtype
    if name == "int8-rows":  # identical bytes
        assert all(torch.equal(fast[k], ref[k]) for k in fast)
    else:
        torch.testing.assert_close(fast["absmax"], ref["absmax"], rtol=1e-6, atol=0)
        step = (fast["q"].int() - ref["q"].int()).abs()
        assert int(step.max()) <= 1 and float((step > 0).float().mean()) < 0.05
        # where the codes differ the value lies near the boundary between them (within the table's 2^-7 grid)
        m = dynamic_map(name == "dyn8")
        dec_f = c.decode(fast, x.shape, torch.float32, 256).reshape(-1)
        dec_r = c.decode(ref, x.shape, torch.float32, 256).reshape(-1)
        d = step.reshape(-1) > 0
        if d.any():
            xs = x.reshape(-1)[d].double().abs()
            lo, hi = torch.minimum(dec_f[d].abs(), dec_r[d].abs()).double(), torch.maximum(dec_f[d].abs(), dec_r[d].abs()).double()
            mid = (lo * hi).sqrt()  # the log-scale midpoint of the two codes
            near = ((xs - mid).abs() / mid)[lo > 0]
            assert float(near.max()) < 0.02, float(near.max())
            assert not bool((lo == 0).any() and (hi == 0).any())  # a zero code only ever for a (tiny) value
        if name == "dyn8-sqrt":  # a positive second moment never becomes zero; zero stays zero
            qf, xf = fast["q"].reshape(-1), x.reshape(-1)
            assert bool((qf[xf > 0] > 0).all()) and bool((qf[xf == 0] == 0).all())
        assert len(m) == 256
    for parts in (fast, ref):  # decoding: the same arithmetic on both paths, bit for bit
        assert torch.equal(c.decode(parts, x.shape, torch.float32, 256), c.decode_torch(parts, x.shape, torch.float32, 256))


def test_code_tables_agree_with_the_arithmetic_codes_away_from_boundaries():
    for signed, sqrt in ((True, False), (False, True)):
        table = code_table(signed, sqrt)
        x = torch.linspace(-1 if signed else 0, 1, 200001)
        y = x.clamp(min=0).sqrt() if sqrt else x
        ref = _code_index(y, signed).numpy()
        lifted = x.numpy() * (np.float32(1) if signed else np.float32(2.0**64))
        hi = (lifted.view(np.uint32) >> 16).astype(np.int64)
        got = table[hi]
        assert (np.abs(got.astype(int) - ref.astype(int)) <= 1).all()
        assert (got == ref).mean() > 0.95


def test_lossless_round_trips_dense_sparse_raw_and_odd_sizes():
    c = ShuffleZstd()
    g = torch.Generator().manual_seed(2)
    cases = [torch.randn(100_003, generator=g), torch.randn(4096, generator=g).to(torch.bfloat16),
             torch.where(torch.rand(50_000, generator=g) > 0.9, torch.randn(50_000, generator=g), 0.0),
             torch.randint(0, 255, (12_345,), dtype=torch.uint8, generator=g), torch.zeros(777, dtype=torch.float64),
             torch.randn(999, generator=g).double()]
    for t in cases:
        raw = memoryview(t.view(torch.uint8).numpy()) if t.dtype == torch.bfloat16 else memoryview(t.numpy().view(np.uint8))
        for itemsize in (t.element_size(), 1, 3):  # a wrong element size still round-trips
            assert bytes(c.decode(memoryview(c.encode(raw, itemsize)), len(raw))) == bytes(raw)


def _frame_declaring(size: int) -> bytes:
    """A zstd frame header that declares ``size`` bytes of content (8-byte size field), then one empty raw block."""
    return (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little")  # single segment, 8-byte size
            + (1).to_bytes(3, "little"))  # last block, raw, 0 bytes  # fmt: skip


def test_crafted_frames_declaring_huge_sizes_are_corrupt_blocks_not_allocations():
    """Frame headers are checked against the size a plane must have before zstandard allocates anything (a limit of
    0, for an empty plane or mask, means none to zstandard)."""
    from lightning_distckpt.errors import CorruptCheckpointError

    c = ShuffleZstd()
    huge = _frame_declaring(1 << 62)
    dense = bytes([0 << 4 | 4]) + b"".join(bytes([1]) + len(huge).to_bytes(4, "little") + huge for _ in range(4))
    head = (0).to_bytes(8, "little") + huge  # a sparse block with no values: its mask is what is decompressed
    sparse = bytes([1 << 4 | 4]) + len(head).to_bytes(4, "little") + head
    for block, raw_len in ((dense, 4096), (sparse, 0), (sparse, 4096)):
        with pytest.raises(CorruptCheckpointError, match="declares|does not decompress|disagree"):
            c.decode(memoryview(block), raw_len)


def test_blocks_of_the_previous_compressor_still_decode():
    """shuffle-zstd-1 blocks written with zstd level 1's own parameters (before the tuning) decode unchanged."""
    old = ShuffleZstd()
    old._local.c = zstandard.ZstdCompressor(level=1)  # what the codec used before
    t = torch.randn(1 << 18) * 1e-3
    raw = memoryview(t.numpy().view(np.uint8))
    stored = old.encode(raw, 4)
    new = ShuffleZstd()
    assert new.encode(raw, 4) != stored  # the bytes differ ...
    assert bytes(new.decode(memoryview(stored), len(raw))) == bytes(raw)  # ... the format does not


def test_map_chunks_covers_every_item_once_and_raises_errors():
    seen = np.zeros(10_000, np.int64)

    def fn(lo, hi):
        seen[lo:hi] += 1

    vector.map_chunks(fn, 10_000, 97)
    assert (seen == 1).all()

    def boom(lo, hi):
        if lo > 5000:
            raise ValueError("chunk failed")

    with pytest.raises(ValueError, match="chunk failed"):
        vector.map_chunks(boom, 10_000, 97)
