"""Unit tests of the on-disk format documents and of the balanced save planner."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan

from lightning_distckpt import ondisk as fmt
from lightning_distckpt.errors import CorruptCheckpointError, UnsafeCheckpointError
from lightning_distckpt.parallel.pieces import Piece
from lightning_distckpt.parallel.planner import BalancedSavePlanner, balance, item_bytes


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "", "x\\y", "a\x00"])
def test_file_names_cannot_escape(name):
    with pytest.raises(UnsafeCheckpointError):
        fmt.check_name(name, "manifest.json")


def test_location_with_escaping_file_is_refused():
    with pytest.raises(UnsafeCheckpointError, match=r"\.\./"):
        fmt.Location.from_json({"f": "../../etc/passwd", "o": 0, "b": [[4, 4, 1]]}, "metadata.json")


def _metadata_doc(size, chunks):
    return {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION,
            "tensors": {"model/w": {"dtype": "float32", "size": size, "chunks": chunks}}}  # fmt: skip


def test_metadata_checks_sizes_before_anything_is_allocated():
    ok = {"offsets": [0], "sizes": [4], "f": "__0_0.distcp", "o": 0, "b": [[16, 16, 1]]}
    fmt.metadata_from_json(_metadata_doc([4], [ok]), "m")
    with pytest.raises(CorruptCheckpointError, match="outside"):
        fmt.metadata_from_json(_metadata_doc([4], [dict(ok, offsets=[2])]), "m")
    with pytest.raises(CorruptCheckpointError, match="needs 16"):
        fmt.metadata_from_json(_metadata_doc([4], [dict(ok, b=[[8, 8, 1]])]), "m")
    with pytest.raises(CorruptCheckpointError, match="cover"):  # a huge tensor claimed by one tiny chunk
        fmt.metadata_from_json(_metadata_doc([10**12], [ok]), "m")
    with pytest.raises(CorruptCheckpointError, match="dtype"):
        fmt.metadata_from_json({**_metadata_doc([4], [ok]), "tensors": {"w": {"dtype": "evil", "size": [4], "chunks": []}}}, "m")


def test_unknown_format_version_is_a_clear_error():
    from lightning_distckpt.errors import NewerFormatError

    with pytest.raises(NewerFormatError, match="format version 99, newer than"):
        fmt.metadata_from_json({**_metadata_doc([4], []), "version": 99}, "m")
    with pytest.raises(CorruptCheckpointError, match="version 'x' is not supported"):
        fmt.metadata_from_json({**_metadata_doc([4], []), "version": "x"}, "m")


def test_marker_must_name_the_manifest():
    manifest = b'{"a": 1}'
    fmt.check_marker(fmt.marker_bytes(manifest), manifest, "COMMITTED")
    with pytest.raises(CorruptCheckpointError, match="does not match"):
        fmt.check_marker(fmt.marker_bytes(manifest), b'{"a": 2}', "COMMITTED")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        fmt.check_marker(fmt.marker_bytes(manifest)[:10], manifest, "COMMITTED")


@pytest.mark.parametrize("piece", [1, 1000, 65536, 1 << 20])
def test_block_digests_fed_in_pieces_equal_digests_of_whole_blocks(piece):
    data = bytes(range(256)) * 1500 + b"tail"
    sizes = [0, 7, 100_000, 0, 200_000, len(data) - 300_007]
    d = fmt.BlockDigests(sizes)
    for i in range(0, len(data), piece):
        d.update(data[i : i + piece])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert d.digests == [fmt.digest(data[s : s + n]) for s, n in zip(starts, sizes)]
    with pytest.raises(ValueError, match="1 bytes more"):
        d.update(b"x")


def _plans(world, tensors, replicated=lambda k: True, chunk=1 << 20):
    plans = []
    for _ in range(world):
        p = BalancedSavePlanner(chunk, replicated)
        p.set_up_planner(tensors)
        plans.append(p.create_local_plan())
    return plans


@pytest.mark.parametrize("world", [2, 3, 4])
def test_replicated_bytes_are_balanced(world):
    # a DDP-like model: one large embedding, mid-size layers, many small tensors
    tensors = {"model/emb": torch.zeros(3000, 512)}
    tensors.update({f"model/l{i}": torch.zeros(512, 512) for i in range(6)})
    tensors.update({f"model/b{i}": torch.zeros(512) for i in range(40)})
    out = balance(_plans(world, tensors))
    loads = [sum(item_bytes(it) for it in p.items) for p in out]
    total = sum(t.numel() * 4 for t in tensors.values())
    assert sum(loads) == total  # every byte exactly once
    assert max(loads) / (total / world) <= 1.10, loads
    seen = [it.index for p in out for it in p.items]
    assert len(seen) == len(set(seen))


def test_non_replicated_tensors_are_written_by_rank_zero():
    tensors = {"model/w": torch.zeros(64, 64), "model/bn.running_var": torch.zeros(64)}
    out = balance(_plans(2, tensors, replicated=lambda k: k == "model/w", chunk=4096))
    owners = {it.index.fqn: r for r, p in enumerate(out) for it in p.items if it.index.fqn == "model/bn.running_var"}
    assert owners == {"model/bn.running_var": 0}
    assert {r for r, p in enumerate(out) for it in p.items if it.index.fqn == "model/w"} == {0, 1}


def test_overlapping_parts_are_rejected():
    a = {"model/w": [Piece(torch.zeros(4, 2), torch.Size([0, 0]), torch.Size([6, 2]))]}
    b = {"model/w": [Piece(torch.zeros(4, 2), torch.Size([2, 0]), torch.Size([6, 2]))]}
    plans = []
    for sd in (a, b):
        p = BalancedSavePlanner(1 << 20)
        p.set_up_planner(sd)
        plans.append(p.create_local_plan())
    with pytest.raises(ValueError, match="overlapping"):
        BalancedSavePlanner().create_global_plan(plans)


def test_chunks_resolve_to_views_of_the_right_rows():
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    p = BalancedSavePlanner(chunk_bytes=3 * 16)
    p.set_up_planner({"k": t})
    items = p.create_local_plan().items
    assert [list(it.index.offset) for it in items] == [[0, 0], [3, 0], [6, 0], [9, 0]]
    assert torch.equal(p.resolve_data(items[1]), t[3:6])
    assert isinstance(items[0].index, MetadataIndex) and isinstance(SavePlan(items), SavePlan)


def test_plan_cache_skips_replanning_of_an_unchanged_structure():
    from lightning_distckpt.parallel.planner import PlanCache

    caches = [PlanCache(), PlanCache()]
    tensors = {"model/w": torch.zeros(64, 64), "model/b": torch.zeros(64)}

    def save(ts):
        planners = [BalancedSavePlanner(4096, cache=c) for c in caches]
        local = []
        for p in planners:
            p.set_up_planner(ts)
            local.append(p.create_local_plan())
        plans, md = planners[0].create_global_plan(local)  # rank 0 coordinates
        return [p.finish_plan(plan) for p, plan in zip(planners, plans)], md, local

    first, md1, local1 = save(tensors)
    second, md2, local2 = save(tensors)
    assert not local1[0].planner_data and all(p.planner_data for p in local2)  # ranks sent "unchanged" markers
    assert caches[0].hits == 1 and second == first and md2.state_dict_metadata == md1.state_dict_metadata
    third, md3, _ = save({**tensors, "model/c": torch.zeros(8, 8)})  # a changed structure is planned again
    assert caches[0].hits == 1 and "model/c" in md3.state_dict_metadata


def test_gc_pause_nests_overlaps_across_threads_and_restores_the_collector():
    """Metadata work runs with the cyclic collector off; afterwards it is exactly as before: on if it was on
    (also after an error inside, and when a pause in another thread overlaps), off if the program turned it off."""
    import gc
    import threading

    from lightning_distckpt.gcpause import gc_paused

    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        assert inside.wait(10)
        with gc_paused():
            assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause still lasts
    release.set()
    t.join(10)
    assert gc.isenabled()
    with pytest.raises(CorruptCheckpointError):
        fmt.metadata_from_json(fmt.loads(b'{"format": 1}', "metadata.json"), "metadata.json")
    assert gc.isenabled()
    gc.disable()
    try:
        fmt.metadata_from_json(_metadata_doc([2], [{"offsets": [0], "sizes": [2], "f": "__0_0.distcp", "o": 0,
                                                     "b": [[8, 8, 1]]}]), "metadata.json")
        assert not gc.isenabled()
    finally:
        gc.enable()
