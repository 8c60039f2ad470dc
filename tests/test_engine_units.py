"""Unit tests of the engine, in this process (no subprocesses, no process groups):

* the reader's per-block fallback across the copies of a checkpoint (a faulty store in front of real files);
* balanced-read dealing (``deal``, ``rounds``) for several world sizes;
* which chunks the snapshotter copies for an async save (``owned`` from a real plan cache).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from faulty_store import Fault, FaultyStore

from lightning_distckpt import DistCheckpointIO
from lightning_distckpt.catalog import open_checkpoint, source_of
from lightning_distckpt.catalog.replication import copy_checkpoint
from lightning_distckpt.engine.balanced_read import deal, rounds
from lightning_distckpt.engine.loading import allocate, chunk_places, read_tensors, row_layout
from lightning_distckpt.engine.saving import WriteOptions
from lightning_distckpt.engine.snapshot import Snapshotter
from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.parallel.comm import SOLO
from lightning_distckpt.parallel.pieces import Piece, pieces, split_rows
from lightning_distckpt.parallel.planner import BalancedSavePlanner, PlanCache
from lightning_distckpt.storage import Source

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 256 * KiB  # 64 rows of W
W_ROWS, W_COLS = 1024, 1024  # float32: 4 MiB in 4 chunks of 1 MiB, each 4 blocks


# ---------------------------------------------------------------------------------------------------
# the reader's fallback across sources
# ---------------------------------------------------------------------------------------------------
def _state(compression: str | None) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "state_dict": {
            "w": torch.randn(W_ROWS, W_COLS, generator=g),
            "b": torch.randn(1000, generator=g),
            "steps": torch.arange(10),
            # compressible (small integers as float): lossless blocks differ in size from raw ones
            "m": torch.randint(0, 4, (512, 512), generator=g).float(),
        },
        "global_step": 3,
        "epoch": 0,
    }


@pytest.fixture(scope="module", params=[None, "lossless"])
def copies(request, tmp_path_factory):
    """A checkpoint written by DistCheckpointIO().save_checkpoint and a verified copy of it (copy_checkpoint).

    Chunks of 1 MiB, blocks of 256 KiB (the default 8 MiB blocks would make one block per chunk here), two
    data files. Yields (primary dir, replica dir, the saved state).
    """
    root = tmp_path_factory.mktemp(f"copies-{request.param}")
    io = DistCheckpointIO(chunk_mb=1, durable=False, compression=request.param)
    io.write_options = WriteOptions(threads=2, chunk_bytes=1 * MiB, block_bytes=BLOCK)
    saved = _state(request.param)
    io.save_checkpoint(saved, str(root / "primary"))
    copy_checkpoint(str(root / "primary"), str(root / "replica"))
    return str(root / "primary"), str(root / "replica"), saved


def _blocks(ckpt, key: str) -> list[tuple[str, int, int, int]]:
    """Every stored block of ``key``: (file, stored offset, stored size, first row), in row order."""
    out = []
    for index, loc in ckpt.metadata.storage_data.items():
        if index.fqn != key:
            continue
        row_bytes = W_COLS * 4 if key == "model/w" else 512 * 4
        pos, row = loc.offset, index.offset[0]
        for b in loc.blocks:
            out.append((loc.file, pos, b.stored, row))
            pos += b.stored
            row += b.raw // row_bytes
    return sorted(out, key=lambda x: x[3])


def _read(primary: str, replica: str, faults_primary=(), faults_replica=(), targets=None, threads: int = 2):
    """read_tensors over [primary, replica] through faulty stores; returns (targets, stats, stores)."""
    ckpt = open_checkpoint(source_of(primary))
    a, b = FaultyStore(faults=list(faults_primary)), FaultyStore(faults=list(faults_replica))
    if targets is None:
        targets = allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), primary)
    stats = read_tensors(ckpt, targets, sources=[Source(a, primary), Source(b, replica)], threads=threads, comm=SOLO)
    return targets, stats, (a, b), ckpt


def _expect_exact(targets: dict, saved: dict) -> None:
    for k, v in saved["state_dict"].items():
        got = targets[state.model_key(k)]
        assert torch.equal(got, v), f"{k}: bytes differ from what was saved"


def _file_sizes(ckpt) -> int:
    return sum(info["size"] for name, info in ckpt.manifest.files.items() if name.endswith(".distcp"))


def test_intact_primary_serves_every_byte(copies):
    primary, replica, saved = copies
    targets, stats, (a, b), ckpt = _read(primary, replica)
    _expect_exact(targets, saved)
    assert dict(stats.bytes_by_source) == {primary: _file_sizes(ckpt)}
    assert stats.fallbacks == {}
    assert not [op for op in b.ops if op[0] in ("open_read", "read")], "the replica was read although the primary is intact"


@pytest.mark.parametrize("kind", ["flip", "truncate", "raise"])
def test_a_bad_block_is_read_from_the_replica(copies, kind):
    """One bad block of W in the primary (W's second block): the load is exact, the bad bytes come from the
    replica, the other data file only from the primary. A wrong checksum replaces only the read that held
    the block (the chunk); a read error or a short file makes the rest of that file come from the replica."""
    primary, replica, saved = copies
    ckpt = open_checkpoint(source_of(primary))
    blocks = _blocks(ckpt, "model/w")
    file, offset, size, _ = blocks[1]  # rows 64..127: inside the first chunk
    fault = Fault(file, offset + 100, offset + 101 if kind != "truncate" else 0, kind)
    targets, stats, (a, b), _ = _read(primary, replica, [fault])
    _expect_exact(targets, saved)
    assert stats.fallbacks == {file: replica}
    from_replica = b.reads(file)
    assert any(o <= offset + 100 < o + n for o, n in from_replica), f"bad bytes not read from the replica: {from_replica}"
    files = {name: info["size"] for name, info in ckpt.manifest.files.items() if name.endswith(".distcp")}
    assert len(files) == 2
    for other in set(files) - {file}:
        assert not b.reads(other), "a file without faults was read from the replica"
        assert stats.bytes_by_source[primary] >= files[other]
    assert sum(stats.bytes_by_source.values()) == sum(files.values()), "some bytes were counted twice or never"
    assert stats.bytes_by_source[replica] <= files[file]
    if kind == "flip" and not ckpt.metadata.storage_data[next(iter(ckpt.metadata.storage_data))].codec:
        # adjacent raw chunks are read in one stream and checked chunk by chunk: only the bad one is re-read
        assert stats.bytes_by_source[replica] <= 1 * MiB


def test_no_good_copy_names_file_offset_and_tensor(copies):
    primary, replica, _ = copies
    ckpt = open_checkpoint(source_of(primary))
    file, offset, size, _ = _blocks(ckpt, "model/w")[2]
    fault = Fault(file, offset + size - 1, offset + size)  # the last byte of the block
    with pytest.raises(CorruptCheckpointError) as e:
        _read(primary, replica, [fault], [fault])
    msg = str(e.value)
    assert f"{primary}/{file}" in msg and f"{replica}/{file}" in msg, msg
    assert f"block at byte {offset}" in msg and "'model/w'" in msg, msg


def test_unreadable_file_in_every_copy_is_an_error_naming_it(copies):
    primary, replica, _ = copies
    ckpt = open_checkpoint(source_of(primary))
    file = _blocks(ckpt, "model/w")[0][0]
    with pytest.raises(CorruptCheckpointError) as e:
        _read(primary, replica, [Fault(file, 0, 1, "raise")], [Fault(file, 0, 0, "truncate")])
    msg = str(e.value)
    assert f"{primary}/{file}" in msg and "injected I/O error" in msg, msg
    assert f"{replica}/{file}" in msg and "file ends" in msg, msg


@pytest.mark.parametrize("primary_kind", ["flip", "raise"])
def test_each_block_from_whichever_copy_has_it_intact(copies, primary_kind):
    """Damage in both copies, never in the same block: every block has a good copy, so the load succeeds.

    The primary fails in W's first chunk, the replica in W's third chunk, which is later in the same data
    file: a copy that failed once for a file must still be tried for that file's other blocks when the
    other copy's are bad.
    """
    primary, replica, saved = copies
    ckpt = open_checkpoint(source_of(primary))
    blocks = _blocks(ckpt, "model/w")
    file, off1, _, _ = blocks[1]  # rows 64..127, chunk 0
    later = [blk for blk in blocks if blk[0] == file and blk[3] >= 256]
    assert later, "the test expects two chunks of W in one file"
    _, off2, size2, _ = later[1]
    targets, stats, _, _ = _read(primary, replica, [Fault(file, off1 + 7, off1 + 8, primary_kind)],
                                 [Fault(file, off2 + size2 - 8, off2 + size2)])
    _expect_exact(targets, saved)
    assert stats.fallbacks == {file: replica}


def test_blocks_of_one_read_from_different_copies(copies):
    primary, replica, saved = copies
    ckpt = open_checkpoint(source_of(primary))
    blocks = _blocks(ckpt, "model/w")
    file = blocks[0][0]
    (_, off1, _, _), (_, off3, _, _) = blocks[1], blocks[3]  # both in chunk 0 (rows 0..255)
    targets, _, _, _ = _read(primary, replica, [Fault(file, off1, off1 + 1)], [Fault(file, off3, off3 + 1)])
    _expect_exact(targets, saved)


def test_a_partial_read_reads_only_the_covering_blocks(copies):
    """Rows 100..199 of W (as a rank reads when resharding): only the blocks holding them are read."""
    primary, replica, saved = copies
    ckpt = open_checkpoint(source_of(primary))
    buf = torch.empty(100, W_COLS)
    targets = {"model/w": [Piece(buf, torch.Size([100, 0]), torch.Size([W_ROWS, W_COLS]))]}
    _, stats, (a, b), _ = _read(primary, replica, targets=targets)
    assert torch.equal(buf, saved["state_dict"]["w"][100:200])
    need = [(f, o, n) for f, o, n, row in _blocks(ckpt, "model/w") if row < 200 and row + 64 > 100]
    assert len(need) == 3  # the blocks starting at rows 64, 128 and 192, all in the first chunk's file
    assert len({f for f, _, _ in need}) == 1
    got = sorted((o, n) for o, n in a.reads(need[0][0]))
    lo, hi = min(o for _, o, _ in need), max(o + n for _, o, n in need)
    assert got and got[0][0] >= lo and max(o + n for o, n in got) <= hi, (got, lo, hi)
    assert sum(stats.bytes_by_source.values()) == sum(n for *_, n in need)


# ---------------------------------------------------------------------------------------------------
# balanced-read dealing
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeComm:
    """What deal() needs of a Comm."""

    rank: int = 0
    world_size: int = 1
    active: bool = True


def _synthetic(seed: int):
    """Plain CPU tensors of different row sizes with a stored layout (chunks of whole rows) and their places
    in two data files; plus tensors deal() must skip (non-contiguous) and take whole (scalar)."""
    rnd = random.Random(seed)
    targets, layout, places = {}, {}, {}
    offsets = {"__0_0.distcp": 0, "__1_0.distcp": 0}
    for i in range(12):
        cols = rnd.choice([1, 16, 256])
        rows = rnd.randint(1, 300)
        key = f"model/t{i:02d}"
        targets[key] = torch.empty(rows, cols)
        chunks, start = [], 0
        while start < rows:
            n = min(rows - start, rnd.randint(1, 120))
            chunks.append((start, n))
            file = rnd.choice(sorted(offsets))
            places[(key, start)] = (file, offsets[file])
            offsets[file] += n * cols * 4
            start += n
        layout[key] = chunks
    targets["extra/step"] = torch.tensor(7)  # scalar: one chunk, no layout, no place
    targets["extra/strided"] = torch.empty(8, 8).t()  # not balanceable: every rank reads it itself
    return targets, layout, places


def _check_deal(targets, layout, places, owned, world, extra=()):
    assert len(owned) == world
    dealt = [c for chunks in owned for c in chunks]
    # every chunk dealt exactly once, and each one is a stored chunk (no block is read by two ranks)
    expected = {(k, s, n) for k, chunks in layout.items() for s, n in chunks} | set(extra)
    assert sorted((c.key, c.start, c.rows) for c in dealt) == sorted(expected)
    for c in dealt:
        t = targets[c.key]
        assert c.nbytes == (t[0].numel() * t.element_size() * c.rows if t.dim() else t.element_size())
    # bytes balanced: every rank within one (the largest) chunk of an equal share
    total, biggest = sum(c.nbytes for c in dealt), max(c.nbytes for c in dealt)
    for r, chunks in enumerate(owned):
        assert abs(sum(c.nbytes for c in chunks) - total / world) <= biggest, (r, world)
    # file order: rank 0 takes the first run of the file-ordered chunks, rank 1 the next ...
    last = ("\uffff", 0)
    in_order = sorted(dealt, key=lambda c: (places.get((c.key, c.start), last), c.key, c.start))
    assert dealt == in_order


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deal_gives_every_stored_chunk_to_one_rank_balanced_in_file_order(world, seed):
    targets, layout, places = _synthetic(seed)
    owned = deal(targets, FakeComm(world_size=world), layout, places)  # type: ignore[arg-type]
    _check_deal(targets, layout, places, owned, world, extra=[("extra/step", 0, 1)])
    assert not any(c.key == "extra/strided" for chunks in owned for c in chunks)
    for n in (1, 2, 4):
        rs = rounds(owned, n)
        assert len(rs) == n
        for r in range(world):
            assert [c for rnd in rs for c in rnd[r]] == owned[r], "rounds reorder or lose a rank's chunks"
            mine = sum(c.nbytes for c in owned[r])
            biggest = max((c.nbytes for c in owned[r]), default=0)
            for rnd in rs:
                assert abs(sum(c.nbytes for c in rnd[r]) - mine / n) <= biggest


def test_deal_is_the_same_on_every_rank():
    targets, layout, places = _synthetic(5)
    deals = [deal(targets, FakeComm(rank=r, world_size=3), layout, places) for r in range(3)]  # type: ignore[arg-type]
    assert deals[0] == deals[1] == deals[2]


def test_deal_without_a_layout_cuts_rows_by_bytes():
    targets = {"model/a": torch.empty(1000, 256), "model/b": torch.empty(3, 256), "model/empty": torch.empty(0, 4)}
    owned = deal(targets, FakeComm(world_size=3), chunk_bytes=64 * KiB)  # type: ignore[arg-type]
    dealt = [c for chunks in owned for c in chunks]
    assert all(c.nbytes <= 64 * KiB for c in dealt)
    for key in ("model/a", "model/b"):  # rows covered exactly once, in order
        spans = sorted((c.start, c.rows) for c in dealt if c.key == key)
        assert [s for s, _ in spans] == [sum(n for _, n in spans[:i]) for i in range(len(spans))]
        assert sum(n for _, n in spans) == targets[key].shape[0]
    assert not any(c.key == "model/empty" for c in dealt)


def test_deal_on_a_real_checkpoint_layout(copies):
    """With the layout and places of a checkpoint written by the plugin: no stored chunk is split."""
    primary, _, _ = copies
    ckpt = open_checkpoint(source_of(primary))
    targets = allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), primary)
    layout, places = row_layout(ckpt.metadata), chunk_places(ckpt.metadata)
    for world in (2, 3, 5):
        owned = deal(targets, FakeComm(world_size=world), layout, places)  # type: ignore[arg-type]
        _check_deal(targets, layout, places, owned, world)


# ---------------------------------------------------------------------------------------------------
# snapshot chunk ownership
# ---------------------------------------------------------------------------------------------------
CHUNK = 64 * KiB


def _plan(rank_states: list[dict]) -> list[PlanCache]:
    """Plan one save of ``rank_states`` (one flat dict per rank) as DCP does, without processes: every rank's
    local plan, the coordinator's balanced global plan, each rank's final plan. Returns each rank's cache."""
    caches = [PlanCache() for _ in rank_states]
    planners = [BalancedSavePlanner(CHUNK, cache=c) for c in caches]
    for r, (p, sd) in enumerate(zip(planners, rank_states)):
        p.set_up_planner(sd, is_coordinator=r == 0)
    plans, _ = planners[0].create_global_plan([p.create_local_plan() for p in planners])
    for p, plan in zip(planners, plans):
        p.finish_plan(plan)
    return caches


def _ddp_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(256, 256, generator=g),  # 256 KiB: 4 chunks
            "model/b": torch.randn(256, generator=g),  # one chunk
            "optim/0/w/exp_avg": torch.randn(128, 256, generator=g),  # 2 chunks
            "optim/0/w/step": torch.tensor(5.0)}  # fmt: skip


def _chunks_of(snap: dict[str, list[Piece]]) -> set[tuple[str, tuple[int, ...]]]:
    return {(k, tuple(p.offsets)) for k, ps in snap.items() for p in ps}


def test_snapshot_copies_only_the_chunks_this_rank_writes():
    sd = _ddp_state()
    caches = _plan([sd, {k: v.clone() for k, v in sd.items()}])  # DDP: the same state on both ranks
    owned = [c.owned() for c in caches]
    assert owned[0] is not None and owned[1] is not None
    mine = [o[1] for o in owned]
    assert mine[0] and mine[1] and not (mine[0] & mine[1]), "the plan should split the chunks between the ranks"
    all_chunks = {(k, tuple(o)) for k, v in sd.items() for o, _, _ in split_rows(pieces(v)[0], CHUNK)}
    assert mine[0] | mine[1] == all_chunks
    for r in (0, 1):
        snap = Snapshotter()
        out = snap.take(sd, owned[r], CHUNK)
        assert set(out) == set(sd)
        assert _chunks_of(out) == mine[r]
        for key, ps in out.items():
            for p in ps:
                src = sd[key] if sd[key].dim() == 0 else sd[key].narrow(0, p.offsets[0], p.local.shape[0])
                assert torch.equal(p.local, src) and p.local.data_ptr() != src.data_ptr()
                assert p.global_size == sd[key].shape
        assert snap.nbytes == sum(p.local.numel() * p.local.element_size() for ps in out.values() for p in ps)
        assert snap.nbytes < sum(v.numel() * v.element_size() for v in sd.values())


def test_snapshot_buffers_are_reused_and_refreshed():
    sd = _ddp_state()
    owned = _plan([sd, sd])[0].owned()
    snap = Snapshotter()
    first = snap.take(sd, owned, CHUNK)
    ptrs = {(k, tuple(p.offsets)): p.local.data_ptr() for k, ps in first.items() for p in ps}
    for v in sd.values():
        v.add_(1)  # training goes on
    second = snap.take(sd, owned, CHUNK)
    assert {(k, tuple(p.offsets)): p.local.data_ptr() for k, ps in second.items() for p in ps} == ptrs
    for key, ps in second.items():
        for p in ps:
            src = sd[key] if sd[key].dim() == 0 else sd[key].narrow(0, p.offsets[0], p.local.shape[0])
            assert torch.equal(p.local, src), f"{key}: the reused buffer holds old values"


def test_snapshot_drops_stale_buffers_and_copies_a_new_key_whole():
    sd = _ddp_state()
    owned = _plan([sd, sd])[0].owned()
    snap = Snapshotter()
    snap.take(sd, owned, CHUNK)
    before = snap.nbytes
    # a key disappears, a new one appears (not held in the planned save): the new one is copied whole
    new = dict(sd)
    del new["model/b"]
    new["model/new"] = torch.randn(300, 256)
    out = snap.take(new, owned, CHUNK)
    assert len(out["model/new"]) == 1 and torch.equal(out["model/new"][0].local, new["model/new"])
    assert out["model/new"][0].offsets == torch.Size([0, 0])
    b_bytes = sd["model/b"].numel() * 4 if ("model/b", (0,)) in owned[1] else 0  # if this rank wrote model/b
    assert snap.nbytes == before - b_bytes + 300 * 256 * 4
    # without a plan (e.g. after a failed save cleared the cache) everything is copied whole, chunk buffers go
    out = snap.take(sd, None, CHUNK)
    assert all(len(ps) == 1 and torch.equal(ps[0].local, sd[k]) for k, ps in out.items())
    assert snap.nbytes == sum(v.numel() * v.element_size() for v in sd.values())
    # a shape change gets a new buffer of the new shape
    sd["model/w"] = torch.randn(128, 256)
    out = snap.take(sd, None, CHUNK)
    assert out["model/w"][0].local.shape == (128, 256)
    assert snap.nbytes == sum(v.numel() * v.element_size() for v in sd.values())


def test_snapshot_of_sharded_pieces_keeps_their_offsets():
    """A rank's shard (pieces with offsets, as DTensor/ShardedTensor give): owned chunks keep global offsets."""
    full = torch.randn(512, 128)
    shards = [[Piece(full[:256], torch.Size([0, 0]), full.shape)], [Piece(full[256:], torch.Size([256, 0]), full.shape)]]
    caches = _plan([{"model/w": shards[0]}, {"model/w": shards[1]}])
    for r in (0, 1):
        owned = caches[r].owned()
        out = Snapshotter().take({"model/w": shards[r]}, owned, CHUNK)
        offsets = sorted(p.offsets[0] for p in out["model/w"])
        assert offsets == list(range(256 * r, 256 * (r + 1), CHUNK // (128 * 4)))
        for p in out["model/w"]:
            assert torch.equal(p.local, full.narrow(0, p.offsets[0], p.local.shape[0]))
