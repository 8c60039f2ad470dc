"""Reading a checkpoint back: open and verify, match tensors to their targets, read through DCP.

``open_for_load`` and ``read_tensors`` are collective over ``group``: rank 0 reads and verifies the
documents and broadcasts them, so every rank sees the same checkpoint and the same error.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import Metadata

from lightning_distckpt.catalog import Checkpoint, open_checkpoint, read_manifest, source_of
from lightning_distckpt.engine.balanced_read import Broadcaster, SharedSegments, deal, is_balanceable, node_id, rounds
from lightning_distckpt.engine.reader import CheckpointReader, ReadStats
from lightning_distckpt.errors import CorruptCheckpointError, DistCheckpointError, StateMismatchError
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.ondisk.metadata import parse_dtype
from lightning_distckpt.parallel.comm import SOLO, Comm
from lightning_distckpt.parallel.pieces import Piece
from lightning_distckpt.parallel.planner import load_planner
from lightning_distckpt.storage import Source, StorageLike
from lightning_distckpt.transforms import PART, block_codec
from lightning_distckpt.transforms.compression import decode_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pending:
    """Stands for a tensor of the checkpoint that was not read (optimizer state outside ``fit``)."""

    key: str


def open_for_load(urls: str | list[str], comm: Comm, options: StorageLike = None) -> tuple[Checkpoint, list[Source]]:
    """Open and verify one checkpoint given the URLs of its copies (primary first); collective.

    Rank 0 reads the documents from the first copy whose documents verify, and keeps as sources every
    copy that is committed with the same manifest (a replica of exactly this checkpoint). Every rank gets
    the same result, or the same error (that of the first copy).
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    result: Any = None
    if comm.rank == 0:
        result = _open_copies(urls, options)
    result = comm.broadcast(result)
    if isinstance(result, BaseException):
        raise result
    ckpt, source_urls = result
    if comm.rank != 0:  # stores hold clients and belong to one process: build them here
        ckpt.source = source_of(ckpt.source.url(), options)
    return ckpt, [source_of(u, options) for u in source_urls]


def _open_copies(urls: list[str], options: StorageLike) -> Any:
    copies = [source_of(u, options) for u in urls]
    errors: list[DistCheckpointError] = []
    ckpt = None
    for source in copies:  # the documents of the first copy whose documents verify
        try:
            ckpt = open_checkpoint(source, check_sizes=len(copies) == 1)
            break
        except DistCheckpointError as e:
            errors.append(e)
    if ckpt is None:
        return errors[0]
    same = []  # every copy of exactly this checkpoint, in the given order (primary first)
    for source in copies:
        try:
            if source.url() == ckpt.url or read_manifest(source).to_json() == ckpt.manifest.to_json():
                same.append(source.url())
        except DistCheckpointError:
            continue
    return ckpt, same


def global_shape(t: Any) -> torch.Size:
    return t.size() if isinstance(t, ShardedTensor) else t.shape


def saved_tensors(metadata: Metadata) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of the checkpoint as the user sees it (encoded tensors by their own shape and dtype)."""
    out = {k: (m.size, m.properties.dtype) for k, m in metadata.state_dict_metadata.items() if PART not in k}  # type: ignore[union-attr]
    for k, e in (metadata.planner_data or {}).get("encodings", {}).items():
        out[k] = (torch.Size(e["size"]), parse_dtype(e["dtype"], k))
    return out


def row_layout(metadata: Metadata) -> dict[str, list[tuple[int, int]]]:
    """For every tensor stored in chunks of whole rows: the chunks' (first row, rows), as the user sees the
    tensor (an encoded tensor by the layout of its first part)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for key, md in metadata.state_dict_metadata.items():
        base = key.split(PART)[0]
        chunks = md.chunks  # type: ignore[union-attr]
        if base in out or not chunks or not len(md.size):  # type: ignore[union-attr]
            continue
        if all(list(c.offsets[1:]) == [0] * (len(c.offsets) - 1) and list(c.sizes[1:]) == list(md.size[1:]) for c in chunks):  # type: ignore[union-attr]
            out[base] = [(c.offsets[0], c.sizes[0]) for c in chunks]
    return out


def chunk_places(metadata: Metadata) -> dict[tuple[str, int], tuple[str, int]]:
    """Where each stored chunk of whole rows lives: (key as the user sees it, first row) -> (file, offset)."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for index, loc in (metadata.storage_data or {}).items():
        base = index.fqn.split(PART)[0]
        if index.offset is not None and len(index.offset):
            out.setdefault((base, int(index.offset[0])), (loc.file, loc.offset))
    return out


def match(metadata: Metadata, targets: dict[str, Any], prefix: str, strict: bool, what: str, url: str) -> dict[str, Any]:
    """Targets that the checkpoint can fill; raise `StateMismatchError` naming the first bad keys."""
    saved = {k: size for k, (size, _) in saved_tensors(metadata).items() if k.startswith(prefix)}
    missing = [k[len(prefix):] for k in targets if k not in saved]
    unexpected = [k[len(prefix):] for k in saved if k not in targets]
    shapes = [
        f"{k[len(prefix):]}: checkpoint {list(saved[k])} vs {what} {list(global_shape(t))}"
        for k, t in targets.items()
        if k in saved and saved[k] != global_shape(t)
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing in checkpoint: {_first(missing)}")
        if unexpected:
            parts.append(f"not in the {what}: {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_first(shapes)}")
        raise StateMismatchError(f"{url} does not match the {what}: " + "; ".join(parts))
    return {k: t for k, t in targets.items() if k in saved}


def _first(keys: list[str], n: int = 5) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def allocate(metadata: Metadata, keys: list[str], url: str) -> dict[str, torch.Tensor]:
    """Empty CPU tensors for ``keys``, shaped by the metadata, after checking the total fits in memory."""
    saved = saved_tensors(metadata)
    total = sum(saved[k][0].numel() * saved[k][1].itemsize for k in keys)
    available = psutil.virtual_memory().available
    if total > available:
        raise CorruptCheckpointError(
            f"{url}: metadata asks for {total} bytes of tensors, more than the {available} bytes of free memory"
        )
    return {k: torch.empty(saved[k][0], dtype=saved[k][1]) for k in keys}


def read_tensors(
    ckpt: Checkpoint,
    targets: dict[str, Any],
    *,
    sources: list[Source] | None = None,
    threads: int = 2,
    comm: Comm,
    balanced: bool = True,
    progress: Callable[[int], None] | None = None,
    shared_memory: bool = True,
) -> ReadStats:
    """Fill ``targets`` (plain, DTensor or ShardedTensor; any placement) from the checkpoint's blocks.

    With ``balanced`` (and several ranks), plain CPU tensors that every rank loads are read once, split
    over the ranks, and broadcast (``lightning_distckpt.engine.balanced_read``); with ``shared_memory``,
    read once per host and shared through shared memory instead of broadcasts. ``progress`` is called
    (from reader threads) with the stored bytes of every verified read.
    """
    start = time.perf_counter()
    reader = CheckpointReader(sources or [ckpt.source], ckpt.metadata, threads=threads, codecs=block_codec)
    reader.stats.progress = progress
    encodings = (ckpt.metadata.planner_data or {}).get("encodings", {})
    if not (balanced and comm.active):
        _load_round(reader, encodings, targets, comm)
        reader.stats.read_s = time.perf_counter() - start
        return reader.stats
    layout, places = row_layout(ckpt.metadata), chunk_places(ckpt.metadata)
    others = {k: v for k, v in targets.items() if not is_balanceable(v)}  # read by every rank that has them
    if shared_memory:
        hosts = comm.all_gather(node_id())
        local = [r for r, h in enumerate(hosts) if h == hosts[comm.rank]]
        owned = [[] for _ in range(comm.world_size)]
        for host in dict.fromkeys(hosts):  # deal over the ranks of each host
            ranks = [r for r, h in enumerate(hosts) if h == host]
            for r, chunks in enumerate(deal(targets, comm, layout, places, ranks=ranks)):
                owned[r] += chunks
        segments = SharedSegments(comm, owned, local)
        if segments.ok:
            try:
                _read_shared(reader, encodings, targets, others, owned, local, segments, comm)
            finally:
                segments.close()
            reader.stats.read_s = time.perf_counter() - start - reader.stats.broadcast_s
            return reader.stats
    owned = deal(targets, comm, layout, places)
    sender = Broadcaster(targets, comm)
    most = max(sum(c.nbytes for c in chunks) for chunks in owned)
    for i, round_owned in enumerate(rounds(owned, max(1, min(ROUNDS, most // ROUND_MIN_BYTES)))):
        part = dict(others) if i == 0 else {}
        for c in round_owned[comm.rank]:
            t = targets[c.key]
            view = t if t.dim() == 0 else t.narrow(0, c.start, c.rows)  # type: ignore[union-attr]
            offsets = torch.Size([c.start] + [0] * (t.dim() - 1)) if t.dim() else torch.Size([])  # type: ignore[union-attr]
            part.setdefault(c.key, []).append(Piece(view, offsets, t.shape))  # type: ignore[union-attr]
        _load_round(reader, encodings, part, comm)
        sender.send(round_owned)  # runs while the next round is read
    reader.stats.read_s = time.perf_counter() - start
    reader.stats.bytes_broadcast = sender.wait()
    reader.stats.broadcast_s = time.perf_counter() - start - reader.stats.read_s
    return reader.stats


def _read_shared(reader: CheckpointReader, encodings: dict[str, Any], targets: dict[str, Any], others: dict[str, Any],
                 owned: list[list[Any]], local: list[int], segments: SharedSegments, comm: Comm) -> None:
    """Balanced reads through shared memory: each round, every rank reads its chunks into its segment; after a
    barrier, a helper thread copies the round's chunks of every rank of this host into the targets while the
    next round is read."""
    most = max(sum(c.nbytes for c in chunks) for chunks in owned)
    received = 0

    def copy(chunks: list[Any]) -> None:
        for c in chunks:
            segments.copy_into(c, targets[c.key])

    with ThreadPoolExecutor(1, thread_name_prefix="distckpt-shm-copy") as copier:
        pending = []
        # fewer rounds than broadcasts use: a copy is cheaper than a collective on a busy machine
        for i, round_owned in enumerate(rounds(owned, max(1, min(SHARED_ROUNDS, most // ROUND_MIN_BYTES)))):
            part = dict(others) if i == 0 else {}
            for c in round_owned[comm.rank]:
                t = targets[c.key]
                offsets = torch.Size([c.start] + [0] * (t.dim() - 1)) if t.dim() else torch.Size([])
                part.setdefault(c.key, []).append(Piece(segments.view(c, t), offsets, t.shape))
            _load_round(reader, encodings, part, comm)
            comm.barrier()  # every rank's chunks of this round are in its segment
            pending.append(copier.submit(copy, [c for r in local for c in round_owned[r]]))
            received += sum(c.nbytes for r in local if r != comm.rank for c in round_owned[r])
        wait_start = time.perf_counter()
        for f in pending:
            f.result()
        reader.stats.broadcast_s = time.perf_counter() - wait_start
    reader.stats.bytes_broadcast = received
    reader.stats.shared_memory = True


ROUNDS = 4  # balanced reads: broadcast one round while reading the next
SHARED_ROUNDS = 2  # through shared memory: copy one round while reading the next
ROUND_MIN_BYTES = 32 << 20  # fewer rounds when a rank reads less than ROUNDS of these (each round costs a collective)


def _load_round(reader: CheckpointReader, encodings: dict[str, Any], targets: dict[str, Any], comm: Comm) -> None:
    """One collective DCP load of ``targets`` (decoding encoded tensors into them)."""
    read, decode = decode_plan(encodings, targets)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(read, storage_reader=reader, planner=load_planner(), process_group=comm.group,
                     no_dist=not comm.active)
    except BaseException as e:
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for exc in failures.values():
                inner = exc[0] if isinstance(exc, tuple) else exc
                if isinstance(inner, DistCheckpointError):
                    raise type(inner)(str(inner)) from e
        raise
    decode()


def read_checkpoint(url: str, options: StorageLike = None, safe_globals: list[str] | None = None,
                    threads: int = 2, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The whole checkpoint at ``url`` as a plain dict of CPU tensors, read by this process alone.

    Works for any world size and strategy that wrote it. Optimizer state is keyed by parameter FQN.
    Never executes code from the checkpoint. ``progress`` gets the stored bytes read as they verify.
    """
    ckpt = open_checkpoint(source_of(url, options))
    tensors = allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), url)
    read_tensors(ckpt, tensors, threads=threads, comm=SOLO, progress=progress)
    return state.join(ckpt.skeleton, tensors.__getitem__, safe_globals or ())


def read_model_weights(url: str, options: StorageLike = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Only the model weights of the checkpoint at ``url``, ``{FQN: CPU tensor}``, read by this process alone
    (the optimizer state, often twice the weights' bytes, is not read). Any world size, strategy, compression.
    ``progress`` gets the stored bytes read as they verify."""
    ckpt = open_checkpoint(source_of(url, options))
    tensors = allocate(ckpt.metadata, [k for k in state.tensor_refs(ckpt.skeleton) if k.startswith(state.MODEL)], url)
    read_tensors(ckpt, tensors, comm=SOLO, progress=progress)
    return {k[len(state.MODEL) :]: v for k, v in tensors.items()}


def load_weights(url: str, module: torch.nn.Module, options: StorageLike = None, prefix: str = "",
                 strict: bool = True) -> None:
    """Read only the model weights of the checkpoint at ``url`` into ``module`` (in place), in this process.

    ``prefix`` is prepended to ``module``'s keys to find them in the checkpoint (``"net."`` for a
    LightningModule that held the module as ``self.net``). Any world size, strategy or compression.
    ``strict=False`` tolerates missing and unexpected keys; a shape mismatch is always a
    `StateMismatchError`.
    """
    ckpt = open_checkpoint(source_of(url, options))
    targets = {state.model_key(prefix + k): v for k, v in module.state_dict().items()}
    read_tensors(ckpt, match(ckpt.metadata, targets, state.MODEL + prefix, strict, "module", url), comm=SOLO)
