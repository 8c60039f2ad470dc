"""DCP planners: which rank writes which bytes, and how loads are planned.

Save planning works on *pieces*: the part of each tensor a rank holds (a DTensor's local shard, a
ShardedTensor's local shards, or a whole plain tensor) with its offsets in the global tensor. Pieces are
cut along their first dimension into chunks of at most ``chunk_bytes``. A chunk that several ranks hold
(a replicated tensor: DDP weights, Adam step counters, callback state) is written by exactly one of them,
chosen by longest-processing-time-first over bytes, so every rank writes about the same number of bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import (
    _create_chunk_list,
    _create_read_items,
    create_read_items_for_chunk_list,
)

from lightning_distckpt.errors import UnsafeCheckpointError
from lightning_distckpt.gcpause import without_gc
from lightning_distckpt.parallel.pieces import DEFAULT_CHUNK_BYTES, pieces, split_rows
from lightning_distckpt.parallel.regular import (
    REGULAR_PLAN,
    Assignment,
    RegularLocal,
    Structure,
    Summary,
    keep_items,
    local_tensors,
    plan_regular,
    structure,
)


def item_bytes(item: WriteItem) -> int:
    assert item.tensor_data is not None
    return item.tensor_data.chunk.sizes.numel() * item.tensor_data.properties.dtype.itemsize


def balance(plans: list[SavePlan], replicated: Callable[[str], bool] = lambda key: True) -> list[SavePlan]:
    """Keep each chunk in exactly one plan, giving shared chunks to the least-loaded holder (largest first).

    Chunks held by one rank stay there. A chunk held by several ranks is *replicated* when every holder has
    the same bytes (``replicated(key)``: parameters and optimizer state under DDP); those are spread so
    that every rank writes about the same number of bytes. Others (buffers such as BatchNorm statistics,
    which ranks update on their own) are written by their lowest rank, as Lightning's rank-0 saves do.
    """
    holders: dict[MetadataIndex, list[int]] = {}
    first: dict[MetadataIndex, WriteItem] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            holders.setdefault(item.index, []).append(rank)
            first.setdefault(item.index, item)
    load = [0] * len(plans)
    owner: dict[MetadataIndex, int] = {}
    for index, ranks in holders.items():
        if len(ranks) == 1:
            owner[index] = ranks[0]
            load[ranks[0]] += item_bytes(first[index])
    shared = []
    for index, ranks in holders.items():
        if len(ranks) > 1 and not replicated(index.fqn):
            owner[index] = min(ranks)
            load[owner[index]] += item_bytes(first[index])
        elif len(ranks) > 1:
            shared.append(index)
    for index in sorted(shared, key=lambda i: -item_bytes(first[i])):
        rank = min(holders[index], key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += item_bytes(first[index])
    return [
        dataclasses.replace(plan, items=[it for it in plan.items if owner[it.index] == rank])
        for rank, plan in enumerate(plans)
    ]


_SAME = "distckpt:same-plan"


@dataclasses.dataclass
class PlanCache:
    """The last successful plans of a series of saves of the same structure (one per DistCheckpointIO).

    When a rank's local plan is unchanged it sends a marker instead of its items; when every rank's is
    unchanged the coordinator reuses the balanced global plan and metadata instead of planning again, and
    sends markers back. Any failed save clears it (on every rank, since failures are collective).
    """

    local: SavePlan | None = None
    central: SavePlan | None = None
    all_plans: list[SavePlan] | None = None
    metadata: Metadata | None = None
    known: set[str] = dataclasses.field(default_factory=set)  # every key this rank held since the last clear
    hits: int = 0
    #: regular saves (`lightning_distckpt.parallel.regular`): False once a save found the ranks' states neither all
    #: regular nor all irregular, so that later saves plan with items at once (kept by `clear`)
    regular: bool = True
    #: the coordinator's last regular plan: (every rank's summary, the plan), reused while the summaries are equal
    regular_plan: tuple[list[Any], Any] | None = None

    def clear(self) -> None:
        self.local = self.central = self.all_plans = self.metadata = None
        self.known = set()
        self.regular_plan = None

    def owned(self) -> tuple[set[str], set[tuple[str, tuple[int, ...]]]] | None:
        """Of the last successful save: the keys this rank held, and the chunks (key, offsets) it wrote."""
        if self.central is None:
            return None
        return (set(self.known),
                {(it.index.fqn, tuple(it.index.offset or ())) for it in self.central.items})


class BalancedSavePlanner(SavePlanner):
    """Plans a save of a flat ``{key: tensor}`` dict (plain, DTensor or ShardedTensor values).

    Not thread-safe to plan with; one instance per save. ``resolve_data`` (called from the writer's threads)
    returns views of the caller's tensors, which must not change until the write completes (take a snapshot
    first for asynchronous saves); for a piece with a ``source`` it calls the source (thread-safe) first.
    """

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 replicated: Callable[[str], bool] = lambda key: True, cache: PlanCache | None = None,
                 *, rank: int = 0, world: int = 1, regular: bool = False) -> None:
        self.chunk_bytes = chunk_bytes
        self.replicated = replicated
        self.cache = cache or PlanCache()
        #: plan a regular state from summaries (`lightning_distckpt.parallel.regular`); ``rank``/``world``: this
        #: rank's place in the save's process group
        self.regular, self.rank, self.world = regular, rank, world
        self._structure: Structure | None = None
        self._pending_local: SavePlan | None = None
        self._views: dict[MetadataIndex, torch.Tensor] = {}
        self._items: list[WriteItem] = []

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: Any = None, is_coordinator: bool = False) -> None:
        self._views.clear()
        self._items = []
        if self.regular and self.cache.regular:
            self._structure = structure(state_dict, self.rank, self.world)
        for key, value in state_dict.items():
            for piece in pieces(value):
                props = TensorProperties(dtype=piece.local.dtype)
                for offsets, sizes, view in split_rows(piece, self.chunk_bytes):
                    index = MetadataIndex(key, offsets)
                    # a piece produced on demand is resolved when a writer asks for its bytes (resolve_data)
                    self._views[index] = view if piece.source is None else (piece, offsets, sizes)  # type: ignore[assignment]
                    self._items.append(
                        WriteItem(
                            index=index,
                            type=WriteItemType.SHARD,
                            tensor_data=TensorWriteData(
                                chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                properties=props,
                                size=piece.global_size,
                            ),
                        )
                    )

    def create_local_plan(self) -> SavePlan:
        plan = SavePlan(self._items)
        self._pending_local = plan
        if self._structure is not None:  # regular: a summary instead of the items (which go only if irregular)
            summary = self._structure.summary()
            return SavePlan([] if summary.regular else self._items, planner_data=summary)
        if self.cache.local is not None and self.cache.local.items == plan.items:
            return SavePlan([], planner_data=_SAME)
        return plan

    @without_gc
    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        c = self.cache
        if all_plans and all(isinstance(p.planner_data, Summary) for p in all_plans):
            summaries = [p.planner_data for p in all_plans]
            if any(s.regular for s in summaries):
                return self._regular_global_plan(summaries)
            all_plans = [dataclasses.replace(p, planner_data=None) for p in all_plans]  # every rank sent its items
        if c.all_plans is not None and len(c.all_plans) == len(all_plans):
            if all(p.planner_data == _SAME for p in all_plans) and c.metadata is not None:
                c.hits += 1
                metadata = dataclasses.replace(c.metadata, storage_data=None)
                return [SavePlan([], planner_data=_SAME) for _ in all_plans], metadata
            all_plans = [c.all_plans[i] if p.planner_data == _SAME else p for i, p in enumerate(all_plans)]
        elif any(p.planner_data == _SAME for p in all_plans):
            raise RuntimeError("internal error: a rank reused a save plan the coordinator does not have")
        plans, metadata = create_default_global_save_plan(balance(all_plans, self.replicated), rewrite_index_hints=False)
        for key, tmd in metadata.state_dict_metadata.items():
            covered = sum(c.sizes.numel() for c in tmd.chunks)  # type: ignore[union-attr]
            if covered != tmd.size.numel():  # type: ignore[union-attr]
                raise ValueError(f"state key {key!r}: ranks hold overlapping or incomplete parts ({covered} of "
                                 f"{tmd.size.numel()} elements)")  # type: ignore[union-attr]
        c.all_plans, c.metadata = all_plans, dataclasses.replace(metadata, storage_data=None)
        return plans, metadata

    def _regular_global_plan(self, summaries: list[Summary]) -> tuple[list[SavePlan], Metadata]:
        """O(tensors + ranks): see `lightning_distckpt.parallel.regular`. Raises `NotRegular` when only some
        ranks are regular (or they disagree about the structure)."""
        assert self._structure is not None
        c = self.cache
        if c.regular_plan is not None and c.regular_plan[0] == summaries:
            plan = c.regular_plan[1]
            c.hits += 1
        else:
            plan = plan_regular(self._structure, summaries, self.chunk_bytes, self.replicated)
            c.regular_plan = (summaries, plan)
        plans = [SavePlan([], planner_data=Assignment(plan.digest, plan.sharded, chunks)) for chunks in plan.assignments]
        return plans, Metadata(state_dict_metadata={}, planner_data={REGULAR_PLAN: plan})

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        if isinstance(new_plan.planner_data, Assignment):  # a regular save: keep the items this rank writes
            a, mine = new_plan.planner_data, self._structure
            if mine is None or a.digest != mine.digest:
                raise RuntimeError("internal error: a regular plan for another structure")
            items = keep_items(self._items, mine, a, self.rank, self.world, self.chunk_bytes)
            local = RegularLocal(self.rank, self.world, tuple(local_tensors(mine, a.sharded, self.world, self.chunk_bytes)))
            plan = dataclasses.replace(new_plan, items=items, planner_data=local)  # keeps the writer's storage_data
            self.cache.central, self.cache.local = plan, None
            self.cache.known |= set(mine.keys)
            return plan
        if isinstance(new_plan.planner_data, Summary):  # planned from items (every rank was irregular)
            new_plan = dataclasses.replace(new_plan, planner_data=None)
        if new_plan.planner_data == _SAME:
            assert self.cache.central is not None
            return self.cache.central
        self.cache.central = new_plan
        self.cache.local = self._pending_local
        if self._pending_local is not None:
            self.cache.known |= {it.index.fqn for it in self._pending_local.items}
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        view = self._views[write_item.index]
        if isinstance(view, tuple):  # (piece with a source, chunk offsets, chunk sizes)
            piece, offsets, sizes = view
            data = piece.source()
            return data if data.dim() == 0 else data.narrow(0, offsets[0] - piece.offsets[0], sizes[0])
        return view


class PieceLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner on a flat dict whose values may also be lists of `Piece` (any row
    range of a tensor into any buffer): reads every overlap of stored chunks and local targets.

    Never loads byte items (this format has none; DCP would unpickle them).
    """

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        # not the default's: it walks into lists (our pieces) to initialize meta tensors
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    @without_gc
    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        requests = []
        layout = (self.metadata.planner_data or {}).get("layout")
        for fqn, obj in self.state_dict.items():
            if fqn not in self.metadata.state_dict_metadata:
                raise KeyError(f"state key {fqn!r} is not in the checkpoint")
            md = self.metadata.state_dict_metadata[fqn]
            if layout is not None:  # compact: the stored chunks that overlap the targets, from the tensor's rule
                if isinstance(obj, list):
                    local = [ChunkStorageMetadata(offsets=p.offsets, sizes=p.local.shape) for p in obj]
                else:
                    local = _create_chunk_list(obj)
                stored = overlapping_chunks(layout.tensors[layout.number[fqn]], local)
                requests += create_read_items_for_chunk_list(fqn, dataclasses.replace(md, chunks=stored), local)
            elif isinstance(obj, list):
                chunks = [ChunkStorageMetadata(offsets=p.offsets, sizes=p.local.shape) for p in obj]
                requests += create_read_items_for_chunk_list(fqn, md, chunks)
            else:
                requests += _create_read_items(fqn, md, obj)
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, list):
            piece = obj[index.index or 0]
            if piece.offsets != index.offset:
                raise AssertionError(f"internal error: piece of {index.fqn} at {piece.offsets}, read for {index.offset}")
            return piece.local
        return super().lookup_tensor(index)

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise UnsafeCheckpointError(f"refusing to unpickle state item {read_item.dest_index.fqn!r}")


def overlapping_chunks(tensor: Any, local: list[ChunkStorageMetadata]) -> list[ChunkStorageMetadata]:
    """The stored chunks of a rule-described tensor (`lightning_distckpt.ondisk.RegularTensor`) whose rows meet any
    of the ``local`` chunks' rows, each once: O(chunks found), whatever the number of stored chunks."""
    if tensor.single or not len(tensor.size):
        offsets, sizes = tensor.chunk(0)
        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))]
    wanted: set[int] = set()
    for ch in local:
        if ch.sizes.numel():
            wanted.update(tensor.chunk_range(ch.offsets[0], ch.offsets[0] + ch.sizes[0]))
    out = []
    for c in sorted(wanted):
        offsets, sizes = tensor.chunk(c)
        out.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
    return out


def load_planner() -> PieceLoadPlanner:
    return PieceLoadPlanner()
