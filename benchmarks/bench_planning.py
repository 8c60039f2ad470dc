"""Planning at scale, simulated: the real save planner, load planner and metadata code on synthetic local
plans of thousands of ranks, in one process (no torch.distributed, no data).

    python benchmarks/bench_planning.py                  # writes benchmarks/results/planning.json
    python benchmarks/bench_planning.py --ranks 64 256   # other sizes

The model is shaped like a 70B transformer (Llama-3-70B: 80 layers of q/k/v/o, gate/up/down and two norms,
embeddings, final norm, LM head: 723 tensors, 70.6 B parameters) with AdamW state (exp_avg, exp_avg_sq and
a 0-dim step per parameter). FSDP2 shards every parameter and moment on dim 0 over all ranks (torch.chunk
rule: ranks past the last row hold nothing); the step counters are replicated on every rank. DDP: every rank
holds everything whole.

Two forms of the metadata are measured (``--formats``): ``listed`` (version 1: every chunk of every rank listed in
``metadata.json``, planned from every rank's items) and ``compact`` (version 3, ``DistCheckpointIO(compact_metadata=
...)``, the default from 16 ranks: each rank sends a summary of its structure, the coordinator plans from the
sharding rule, each data file carries its own block index; see ``one_size_compact``).

For each world size N, in a fresh subprocess (so peak memory is that of one size), the listed form times:

* local plans: ``BalancedSavePlanner.set_up_planner`` + ``create_local_plan`` for every rank, on meta tensors;
* global plan: ``create_global_plan`` on all N local plans (balance, DCP's global plan, coverage checks);
* metadata: after giving every chunk the Location a writer would (one block each; untimed, the writers make
  them), what the coordinator does to write ``metadata.json`` (``from_dcp``, ``metadata_to_json``, ``dumps``),
  its bytes, and what opening a checkpoint does to parse it (``ondisk.loads``, ``metadata_from_json``,
  ``to_dcp``). These run with Python's cyclic garbage collector paused, as the package runs them
  (``lightning_distckpt.gcpause``);
* load plan: ``PieceLoadPlanner.create_local_plan`` for one rank loading with the same sharding.

The smallest size of each kind runs a second time with the package's garbage-collector pauses made no-ops
(``gc_paused: false`` in its row), so the report can show what the pauses save in the same run. Every stage's
time ends with a full collection (``gc.collect()``), so the work a pause only defers is counted where it arose;
what existed before a stage is frozen (``gc.freeze()``), so its collections walk only what the stage made (one
process simulates every rank here; a real rank does not hold the others' plans).

Peak memory is the subprocess's maximum RSS. A size that exceeds ``--max-gib`` of memory or ``--timeout``
seconds is recorded as such (with how far it got), never extrapolated into a number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VOCAB, HIDDEN, INTER, LAYERS, KV = 128256, 8192, 28672, 80, 1024


def model_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})  # fmt: skip
    shapes["norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def rank_state(shapes: dict[str, tuple[int, ...]], world: int, rank: int, kind: str) -> dict:
    """One rank's flat state as the plugin would pass it: {key: [Piece on the meta device]}."""
    import torch

    from lightning_distckpt.parallel.pieces import Piece

    out = {}
    for fqn, shape in shapes.items():
        size = torch.Size(shape)
        if kind == "fsdp2":
            per = -(-shape[0] // world)
            lo, hi = min(shape[0], rank * per), min(shape[0], (rank + 1) * per)
            local, offsets = (hi - lo, *shape[1:]), torch.Size([lo] + [0] * (len(shape) - 1))
        else:
            local, offsets = shape, torch.Size([0] * len(shape))
        piece = [Piece(torch.empty(local, dtype=torch.float32, device="meta"), offsets, size)]
        out[f"model/{fqn}"] = piece
        out[f"optim/0/{fqn}/exp_avg"] = piece
        out[f"optim/0/{fqn}/exp_avg_sq"] = piece
        out[f"optim/0/{fqn}/step"] = torch.empty((), dtype=torch.float32, device="meta")
    return out


def one_size(world: int, kind: str) -> dict:
    import torch  # noqa: F401

    from lightning_distckpt import ondisk
    from lightning_distckpt.engine.dcp_metadata import from_dcp, to_dcp
    from lightning_distckpt.ondisk.metadata import Block, Location, metadata_from_json, metadata_to_json
    from lightning_distckpt.parallel.planner import BalancedSavePlanner

    shapes = model_shapes()
    row: dict = {"ranks": world, "kind": kind, "format": "listed", "tensors": 4 * len(shapes),
                 "parameters": sum(torch.Size(s).numel() for s in shapes.values())}  # fmt: skip
    t0 = _start()
    plans, planners = [], []
    for r in range(world):
        pl = BalancedSavePlanner()
        pl.set_up_planner(rank_state(shapes, world, r, kind))
        plans.append(pl.create_local_plan())
        if r == 0:
            planners.append(pl)
    row["local_plans_s_all_ranks"] = _settled(t0)
    row["local_plan_items"] = sum(len(p.items) for p in plans)
    row["stage"] = "local plans"
    _progress(row)
    t0 = _start()
    global_plans, metadata = planners[0].create_global_plan(plans)
    row["global_plan_s"] = _settled(t0)
    row["written_items"] = sum(len(p.items) for p in global_plans)
    row["stage"] = "global plan"
    _progress(row)
    del plans
    # what the writers report back (untimed: each rank makes its own): every chunk at its place in its rank's
    # file, one block each
    storage = {}
    for r, plan in enumerate(global_plans):
        offset = 0
        for item in plan.items:
            n = item.tensor_data.chunk.sizes.numel() * 4
            storage[item.index] = Location(f"__{r}_0.distcp", offset, (Block(n, n, 0x9E3779B97F4A7C15),))
            offset += n
    metadata.storage_data = storage
    t0 = _start()  # what the coordinator does to write metadata.json (engine.saving._publish)
    doc = ondisk.dumps(metadata_to_json(from_dcp(metadata)))
    row["metadata_write_s"] = _settled(t0)
    row["metadata_bytes"] = len(doc)
    row["stage"] = "metadata"
    _progress(row)
    t0 = _start()
    parsed = to_dcp(metadata_from_json(ondisk.loads(doc, "metadata.json"), "metadata.json"))  # what opening a checkpoint does
    row["metadata_parse_s"] = _settled(t0)
    return _load_plan(row, rank_state(shapes, world, world // 2, kind), parsed)


def one_size_compact(world: int, kind: str) -> dict:
    """The compact format (metadata version 3, ``compact_metadata``): every rank sends a summary of its structure
    instead of its items, the coordinator plans from the rule, each data file carries its own block index.

    Every rank's summary is computed for a sample of ranks (the first, the last, the middle, and around the rank
    where pieces of the smallest sharded tensors become empty), checked equal, and the other ranks send equal
    summaries (one object each, as the gather delivers them): computing all N would time N ranks' own local work
    in one process. The local work is timed for one rank."""
    import torch  # noqa: F401

    from lightning_distckpt import ondisk
    from lightning_distckpt.engine.dcp_metadata import to_dcp
    from lightning_distckpt.engine.saving import compact_metadata
    from lightning_distckpt.engine.writer import FileWritten
    from lightning_distckpt.ondisk.metadata import Block
    from lightning_distckpt.parallel.planner import BalancedSavePlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import SavePlan

    shapes = model_shapes()
    row: dict = {"ranks": world, "kind": kind, "format": "compact", "tensors": 4 * len(shapes),
                 "parameters": sum(torch.Size(s).numel() for s in shapes.values())}  # fmt: skip
    mid = world // 2
    t0 = _start()
    planner = BalancedSavePlanner(rank=mid, world=world, regular=True)
    planner.set_up_planner(rank_state(shapes, world, mid, kind))
    mine = planner.create_local_plan()
    row["local_plan_s_one_rank"] = _settled(t0)
    row["local_plan_items"] = len(mine.items)  # items sent to the coordinator: none when the state is regular
    sample = sorted({0, 1, mid, world - 1, min(world - 1, KV - 1), min(world - 1, KV)})
    summaries = {}
    for r in sample:
        pl = BalancedSavePlanner(rank=r, world=world, regular=True)
        pl.set_up_planner(rank_state(shapes, world, r, kind))
        summaries[r] = pl.create_local_plan().planner_data
    assert len(set(summaries.values())) == 1, "ranks of a regular state summarise it differently"
    summary = summaries[0]
    plans = [SavePlan([], planner_data=type(summary)(**vars(summary))) for _ in range(world)]
    coordinator = BalancedSavePlanner(rank=0, world=world, regular=True)
    coordinator.set_up_planner(rank_state(shapes, world, 0, kind))
    row["stage"] = "local plans"
    _progress(row)
    t0 = _start()
    global_plans, metadata = coordinator.create_global_plan(plans)
    row["global_plan_s"] = _settled(t0)
    row["stage"] = "global plan"
    _progress(row)
    t0 = _start()  # one rank keeps the items it writes (finish_plan)
    final = planner.finish_plan(global_plans[mid])
    row["finish_plan_s_one_rank"] = _settled(t0)
    row["written_items_one_rank"] = len(final.items)
    # rank `mid`'s chunks in one data file's index, as its writer builds it (one block per chunk; with two files
    # each index holds about half of them), and what a reader parses
    tensors = [ondisk.RegularTensor(*t) for t in final.planner_data.tensors]
    number = {t.key: i for i, t in enumerate(tensors)}
    t0 = _start()
    chunks, blocks = [], []
    for item in final.items:
        t = number[item.index.fqn]
        n = item.tensor_data.chunk.sizes.numel() * 4
        chunks.append((t, tensors[t].chunk_number(tuple(item.index.offset), tuple(item.tensor_data.chunk.sizes)), 1))
        blocks.append(Block(n, n, 0x9E3779B97F4A7C15))
    tail = ondisk.index_tail(ondisk.data_file_name(mid, 0), "", chunks, blocks)
    row["index_write_s_one_rank"] = _settled(t0)
    row["index_bytes_one_rank"] = len(tail)  # all of one rank's chunks
    # what the writers report back: one result per data file (two per rank; sizes are not used for planning)
    metadata.storage_data = {MetadataIndex(ondisk.data_file_name(r, k)): FileWritten(ondisk.data_file_name(r, k), r,
                             1 << 30, r * 2 + k, 1 << 30, "") for r in range(world) for k in range(2)}  # fmt: skip
    t0 = _start()  # what the coordinator does to write metadata.json (engine.saving._publish_compact)
    md, _, _ = compact_metadata(metadata, {})
    doc = ondisk.dumps(ondisk.layout_to_json(md))
    row["metadata_write_s"] = _settled(t0)
    row["metadata_bytes"] = len(doc)
    row["stage"] = "metadata"
    _progress(row)
    t0 = _start()  # what opening a checkpoint does
    parsed_md = ondisk.parse_metadata(ondisk.loads(doc, "metadata.json"), "metadata.json")
    parsed = to_dcp(parsed_md)
    row["metadata_parse_s"] = _settled(t0)
    t0 = _start()  # a loading rank parses (and checks) the index of a file it reads from
    size = sum(b.stored for b in blocks) + len(tail)
    digest = ondisk.blocks_digest([b.digest for b in blocks] + [ondisk.digest(tail)])
    ondisk.parse_index(tail, ondisk.data_file_name(mid, 0), mid, parsed_md.layout, size, digest, "index")
    row["index_parse_s_one_rank"] = _settled(t0)
    return _load_plan(row, rank_state(shapes, world, mid, kind), parsed)


def _load_plan(row: dict, state: dict, parsed: object) -> dict:
    """The last stage of both forms: one rank (``state``) plans its load from the parsed metadata; ``row`` done."""
    from lightning_distckpt.parallel.planner import PieceLoadPlanner

    t0 = _start()
    lp = PieceLoadPlanner()
    lp.set_up_planner(state, parsed)
    load_plan = lp.create_local_plan()
    row["load_plan_s_one_rank"] = _settled(t0)
    row["load_plan_items_one_rank"] = len(load_plan.items)
    row["stage"] = "done"
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def _start() -> float:
    """Start a stage: collect, then freeze what exists (the simulation's other ranks, earlier stages), so the
    stage's collections walk only what it makes itself, as on a real rank; return the start time."""
    gc.collect()
    gc.freeze()
    return time.perf_counter()


def _settled(t0: float) -> float:
    """Seconds since ``t0``, after a full collection: what a stage leaves for the collector to do (more when the
    collector was paused through it) is counted in that stage, in both modes of the comparison."""
    gc.collect()
    return time.perf_counter() - t0


def _progress(row: dict) -> None:
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("PROGRESS " + json.dumps(row), flush=True)


#: the baseline: the package's collector pauses made no-ops (the pause is looked up at every call)
NO_GC_PAUSE = "import contextlib, lightning_distckpt.gcpause as g; g.gc_paused = contextlib.nullcontext; "


def run_size(world: int, kind: str, max_gib: float, timeout: float, gc_paused: bool = True, fmt: str = "listed") -> dict:
    """One size in a subprocess under a memory limit; the last progress line if it did not finish. With
    ``gc_paused=False``, the same code with the package's garbage-collector pauses turned into no-ops. ``fmt``:
    ``listed`` (metadata version 1, every chunk listed) or ``compact`` (version 3)."""
    fn = "one_size" if fmt == "listed" else "one_size_compact"
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import resource, json; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(max_gib * 2**30)}, {int(max_gib * 2**30)})); "
            + ("" if gc_paused else NO_GC_PAUSE) +
            f"from bench_planning import {fn}; print('RESULT ' + json.dumps({fn}({world}, {kind!r})))")  # fmt: skip
    last: dict = {"ranks": world, "kind": kind, "format": fmt, "stage": "start"}
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        out = p.stdout
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode}; memory limit {max_gib} GiB?)"
        tail = p.stderr[-400:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status, tail = f"timed out after {timeout:.0f} s", ""
    for line in out.splitlines():
        if line.startswith("PROGRESS "):
            last = json.loads(line[9:])
        if line.startswith("RESULT "):
            last = json.loads(line[7:])
    last["status"] = status
    last["gc_paused"] = gc_paused
    if status != "ok":
        last["error_tail"] = tail
    return last


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="*", default=[64, 256, 1024, 4096, 16384])
    p.add_argument("--ddp-ranks", type=int, nargs="*", default=[16, 64, 1024])
    p.add_argument("--max-gib", type=float, default=8.0, help="memory limit of each size's process")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--no-gc-baseline", dest="gc_baseline", action="store_false",
                   help="skip the second run of the smallest size of each kind without the collector pauses")
    p.add_argument("--formats", nargs="*", default=["listed", "compact"], choices=["listed", "compact"],
                   help="metadata forms to measure: listed (version 1) and compact (version 3, compact_metadata)")
    args = p.parse_args()
    from _common import environment, write_result

    rows = []
    for fmt in args.formats:
        for kind, sizes in (("fsdp2", args.ranks), ("ddp", args.ddp_ranks)):
            stop = False
            for n in sizes:
                if stop:  # a smaller size already exceeded the limits: the larger one cannot fit
                    rows.append({"ranks": n, "kind": kind, "format": fmt,
                                 "status": "not run: a smaller size exceeded the limits"})  # fmt: skip
                    continue
                row = run_size(n, kind, args.max_gib, args.timeout, fmt=fmt)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "error_tail"}, flush=True)
                stop = row["status"] != "ok"
            if fmt == "listed" and args.gc_baseline and sizes:  # the collector running through it, same run
                row = run_size(min(sizes), kind, args.max_gib, args.timeout, gc_paused=False)
                rows.append(row)
                print({k: v for k, v in row.items() if k != "error_tail"}, flush=True)
    result = {"benchmark": "planning", "env": environment(), "max_gib": args.max_gib, "timeout_s": args.timeout,
              "model": {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTER, "vocab": VOCAB},
              "rows": rows}  # fmt: skip
    print(write_result("planning", result))


if __name__ == "__main__":
    main()
