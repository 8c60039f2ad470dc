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
from typing import Any, TypeVar

import psutil
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from lightning_distckpt.catalog import Checkpoint, open_checkpoint, read_manifest, source_of
from lightning_distckpt.engine import across_hosts
from lightning_distckpt.engine.attach import Peers, chunk_address, copy_from, host_key
from lightning_distckpt.engine.balanced_read import (
    Broadcaster,
    SharedSegments,
    clean_stale_segments,
    deal,
    is_balanceable,
    node_id,
    rounds,
)
from lightning_distckpt.engine.dcp_metadata import to_dcp
from lightning_distckpt.engine.reader import CheckpointReader, ReadStats
from lightning_distckpt.errors import (
    CorruptCheckpointError,
    DistCheckpointError,
    InsufficientMemoryError,
    StateMismatchError,
)
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.ondisk.metadata import CheckpointMetadata, parse_dtype
from lightning_distckpt.ondisk.names import data_file_name
from lightning_distckpt.parallel.comm import SOLO, Comm
from lightning_distckpt.parallel.pieces import Piece
from lightning_distckpt.parallel.planner import load_planner
from lightning_distckpt.storage import Source, StorageLike
from lightning_distckpt.transforms import PART, block_codec
from lightning_distckpt.transforms.compression import decode_plan

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def saved_tensors(metadata: CheckpointMetadata) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of the checkpoint as the user sees it (encoded tensors by their own shape and dtype)."""
    out = {k: (torch.Size(t.size), parse_dtype(t.dtype, k)) for k, t in metadata.tensors.items() if PART not in k}
    for k, e in metadata.encodings.items():
        out[k] = (torch.Size(e["size"]), parse_dtype(e["dtype"], k))
    return out


def row_layout(metadata: CheckpointMetadata) -> dict[str, list[tuple[int, int]]]:
    """For every tensor stored in chunks of whole rows: the chunks' (first row, rows), as the user sees the
    tensor (an encoded tensor by the layout of its first part)."""
    out: dict[str, list[tuple[int, int]]] = {}
    if metadata.layout is not None:  # compact: tensors every rank held whole (those balanced reads share)
        for t in metadata.layout.tensors:
            base = t.key.split(PART)[0]
            if base not in out and t.parts == 1 and len(t.size) and not t.single:
                out[base] = [(offsets[0], sizes[0]) for offsets, sizes in map(t.chunk, range(t.count))]
        return out
    for key, t in metadata.tensors.items():
        base = key.split(PART)[0]
        chunks = t.chunks
        if base in out or not chunks or not len(t.size):
            continue
        if all(all(o == 0 for o in c.offsets[1:]) and c.sizes[1:] == t.size[1:] for c in chunks):
            out[base] = [(c.offsets[0], c.sizes[0]) for c in chunks]
    return out


def chunk_places(metadata: CheckpointMetadata) -> dict[tuple[str, int], tuple[str, int]]:
    """Where each stored chunk of whole rows lives: (key as the user sees it, first row) -> (file, offset)."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    if metadata.layout is not None:  # compact: offsets are in the files' indexes; order by writer, then chunk
        for t in metadata.layout.tensors:
            if t.parts == 1 and len(t.size) and not t.single:
                for c in range(t.count):
                    out.setdefault((t.key.split(PART)[0], t.chunk(c)[0][0]), (data_file_name(t.writer(c), 0), c))
        return out
    for fqn, c in metadata.chunks():
        if c.offsets:
            out.setdefault((fqn.split(PART)[0], c.offsets[0]), (c.location.file, c.location.offset))
    return out


def match(metadata: CheckpointMetadata, targets: dict[str, Any], prefix: str, strict: bool, what: str, url: str) -> dict[str, Any]:
    """Targets that the checkpoint can fill; raise `StateMismatchError` naming the first bad keys."""
    saved = {k: size for k, (size, _) in saved_tensors(metadata).items() if k.startswith(prefix)}
    missing = [k[len(prefix):] for k in targets if k not in saved]
    unexpected = [k[len(prefix):] for k in saved if k not in targets]
    shapes = [
        f"{k[len(prefix):]}: checkpoint {list(saved[k])} vs {what} {list(global_shape(t))}"
        for k, t in targets.items()
        if k in saved and saved[k] != global_shape(t)
    ]
    dtypes = saved_tensors(metadata)
    kinds = [
        f"{k[len(prefix):]}: checkpoint {dtypes[k][1]} vs {what} {t.dtype}"
        for k, t in targets.items()
        if k in dtypes and not _convertible(dtypes[k][1], t.dtype)
    ]
    if shapes or kinds or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing in checkpoint: {_first(missing)}")
        if unexpected:
            parts.append(f"not in the {what}: {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {_first(shapes)}")
        if kinds:
            parts.append(f"dtype mismatch: {_first(kinds)}")
        raise StateMismatchError(f"{url} does not match the {what}: " + "; ".join(parts))
    return {k: t for k, t in targets.items() if k in saved}


def _convertible(saved: torch.dtype, target: torch.dtype) -> bool:
    """Whether a tensor stored as ``saved`` may be read into one of ``target``: the same dtype, or two
    floating-point dtypes (converted by value, as ``load_state_dict`` does; e.g. a bf16-true resume).
    Anything else (an integer read as a float, a bool as bytes) would silently change what the bits mean."""
    return saved == target or (saved.is_floating_point and target.is_floating_point)


def _first(keys: list[str], n: int = 5) -> str:
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def host_bytes(metadata: CheckpointMetadata, keys: list[str], url: str) -> int:
    """Bytes of host memory that tensors ``keys`` of the checkpoint take once read; a key the metadata does not
    hold is a `CorruptCheckpointError` (the same on every rank: the documents are rank 0's, broadcast)."""
    saved = saved_tensors(metadata)
    missing = [k for k in keys if k not in saved]
    if missing:
        raise CorruptCheckpointError(f"{url}: state.json refers to tensors that metadata.json does not hold: {_first(missing)}")
    return sum(saved[k][0].numel() * saved[k][1].itemsize for k in keys)


def check_memory(needed: int, comm: Comm, url: str) -> None:
    """Collective (every rank of ``comm`` calls it): do all ranks have ``needed`` bytes of free host memory?

    Every rank's need and free memory are gathered and judged the same way everywhere, so either every rank
    returns or every rank raises the same `InsufficientMemoryError` naming the ranks that are short.
    A shortage is never a reason to try another checkpoint: the loader raises it as it is.
    """
    verdicts = comm.all_gather((int(needed), int(psutil.virtual_memory().available)))
    short = [(rank, n, free) for rank, (n, free) in enumerate(verdicts) if n > free]
    if short:
        who = "; ".join(f"rank {r} needs {n} bytes, {free} free" for r, n, free in short)
        raise InsufficientMemoryError(
            f"{url}: not enough free host memory to load this checkpoint ({who}). Free memory on "
            f"{'those hosts' if len(short) > 1 else 'that host'} or load with fewer ranks per host; no other "
            "checkpoint was tried"
        )


def allocate(metadata: CheckpointMetadata, keys: list[str], url: str, comm: Comm = SOLO) -> dict[str, torch.Tensor]:
    """Empty CPU tensors for ``keys``, shaped by the metadata, after `check_memory` (collective over
    ``comm``: with several ranks every rank must call it, each with its own keys)."""
    saved = saved_tensors(metadata)
    check_memory(host_bytes(metadata, keys, url), comm, url)
    return {k: torch.empty(saved[k][0], dtype=saved[k][1]) for k in keys}


SAME_HOST = ("auto", "attach", "segments", "broadcast")


def read_tensors(
    ckpt: Checkpoint,
    targets: dict[str, Any],
    *,
    sources: list[Source] | None = None,
    threads: int = 2,
    comm: Comm,
    balanced: bool = True,
    progress: Callable[[int], None] | None = None,
    same_host: str = "auto",
) -> ReadStats:
    """Fill ``targets`` (plain, DTensor or ShardedTensor; any placement) from the checkpoint's blocks.

    With ``balanced`` (and several ranks), plain CPU tensors that every rank loads are read once, split
    over the ranks, and shared (``lightning_distckpt.engine.balanced_read``). ``same_host`` says how:
    ``"attach"``: read once per host, each rank copying its peers' chunks straight out of their memory
    (``lightning_distckpt.engine.attach``); ``"segments"``: read once per host into shared-memory segments;
    ``"broadcast"``: read once per job and broadcast over the process group; ``"auto"``: attach when every
    rank runs on one host and the kernel allows it; on several hosts, one of them with several ranks, read once
    per job, send each rank's part to one rank of every other host and attach inside each host
    (``"attach+send"``, `lightning_distckpt.engine.across_hosts`); else broadcast. Attach and segments fall back to
    broadcasts (the same on every rank) when any rank cannot use them. ``progress`` is called (from reader
    threads) with the stored bytes of every verified read.
    """
    if same_host not in SAME_HOST:
        raise ValueError(f"same_host must be one of {', '.join(SAME_HOST)}, not {same_host!r}")
    start = time.perf_counter()
    sources = sources or [ckpt.source]
    indexes = None
    if ckpt.metadata.layout is not None:  # compact: chunks are located through their data files' indexes
        from lightning_distckpt.catalog.compact import Indexes

        indexes = Indexes(ckpt.metadata.layout, ckpt.manifest, sources)
    reader = CheckpointReader(sources, to_dcp(ckpt.metadata), threads=threads, codecs=block_codec, indexes=indexes)
    reader.stats.progress = progress
    encodings = ckpt.metadata.encodings
    if not (balanced and comm.active):
        _load_round(reader, encodings, targets, comm)
        reader.stats.read_s = time.perf_counter() - start
        return reader.stats
    clean_stale_segments()  # what a load killed in between left in shared memory, whichever way this one shares
    layout, places = row_layout(ckpt.metadata), chunk_places(ckpt.metadata)
    others = {k: v for k, v in targets.items() if not is_balanceable(v)}  # read by every rank that has them
    if same_host != "broadcast":
        hosts = comm.all_gather(host_key(node_id()))
        local = [r for r, h in enumerate(hosts) if h == hosts[comm.rank]]
        if same_host == "auto" and len(local) < len(hosts):  # several hosts
            if across_hosts.applies(hosts):  # some host runs several ranks (the same verdict on every rank)
                dealt = deal(targets, comm, layout, places)  # read once per job
                holds = across_hosts.held(dealt, hosts, local)  # this host's ranks: all that is fetched from
                peers = Peers(comm, holds, targets, hosts)
                if peers.ok:
                    _read_shared(reader, encodings, targets, others, dealt, local, comm, None, _puller(peers, targets),
                                 1, exchange=lambda: across_hosts.exchange(targets, comm, dealt, hosts), holds=holds)
                    return _shared_stats(reader.stats, "attach+send", start)
                log.info("balanced reads fall back to broadcasts: %s", peers.why)
        else:
            owned: list[list[Any]] = [[] for _ in range(comm.world_size)]
            for host in dict.fromkeys(hosts):  # deal over the ranks of each host
                ranks = [r for r, h in enumerate(hosts) if h == host]
                for r, chunks in enumerate(deal(targets, comm, layout, places, ranks=ranks)):
                    owned[r] += chunks
            if same_host == "segments":
                segments = SharedSegments(comm, owned, local)
                if segments.ok:
                    try:
                        _read_shared(reader, encodings, targets, others, owned, local, comm, segments.view,
                                     lambda c: segments.copy_into(c, targets[c.key]), SHARED_ROUNDS)
                    finally:
                        segments.close()
                    return _shared_stats(reader.stats, "segments", start)
            else:
                peers = Peers(comm, owned, targets, hosts)
                if peers.ok:
                    _read_shared(reader, encodings, targets, others, owned, local, comm, None,
                                 _puller(peers, targets), ATTACH_ROUNDS)
                    return _shared_stats(reader.stats, "attach", start)
                (log.warning if same_host == "attach" else log.info)(
                    "balanced reads fall back to broadcasts: %s (the kernel allows this copy where it would allow "
                    "ptrace between the ranks: see docs/torchrun.md, same-host reads)", peers.why)
    owned = deal(targets, comm, layout, places)
    sender = Broadcaster(targets, comm)
    most = max(sum(c.nbytes for c in chunks) for chunks in owned)
    for i, round_owned in enumerate(rounds(owned, max(1, min(ROUNDS, most // ROUND_MIN_BYTES)))):
        part = dict(others) if i == 0 else {}
        for c in round_owned[comm.rank]:
            _add_piece(part, c, targets[c.key])
        _load_round(reader, encodings, part, comm)
        sender.send(round_owned)  # runs while the next round is read
    reader.stats.same_host = "broadcast"
    reader.stats.read_s = time.perf_counter() - start
    reader.stats.bytes_broadcast = reader.stats.bytes_process_group = sender.wait()
    reader.stats.broadcast_s = time.perf_counter() - start - reader.stats.read_s
    return reader.stats


def _puller(peers: Peers, targets: dict[str, Any]) -> Callable[[Any], None]:
    """Copies a chunk out of the local peer that holds it (on the helper thread: a failure reaches every rank at the
    end of the load). The peers' address tables are read at the first copy, after the read's barrier."""
    where: dict[tuple[str, int], tuple[int, int]] = {}

    def pull(c: Any) -> None:
        if not where:
            where.update(peers.addresses())
        copy_from(*where[(c.key, c.start)], chunk_address(targets, c), c.nbytes)

    return pull


def _shared_stats(stats: ReadStats, how: str, start: float) -> ReadStats:
    stats.same_host = how
    stats.read_s = time.perf_counter() - start - stats.broadcast_s
    return stats


def _add_piece(part: dict[str, Any], c: Any, t: torch.Tensor, into: torch.Tensor | None = None) -> None:
    """Add chunk ``c`` of target ``t`` to the round ``part``, to be read into ``into`` (default: its rows of ``t``)."""
    if into is None:
        into = t if t.dim() == 0 else t.narrow(0, c.start, c.rows)
    offsets = torch.Size([c.start] + [0] * (t.dim() - 1)) if t.dim() else torch.Size([])
    part.setdefault(c.key, []).append(Piece(into, offsets, t.shape))


def _read_shared(reader: CheckpointReader, encodings: dict[str, Any], targets: dict[str, Any], others: dict[str, Any],
                 owned: list[list[Any]], local: list[int], comm: Comm,
                 staged: Callable[[Any, torch.Tensor], torch.Tensor] | None, fetch: Callable[[Any], None],
                 max_rounds: int, exchange: Callable[[], int] | None = None,
                 holds: list[list[Any]] | None = None) -> None:
    """Balanced reads shared inside each host. Each round, every rank reads its chunks (into ``staged(chunk,
    target)`` when given, else straight into its targets); after a barrier, a helper thread ``fetch``-es the
    round's chunks this rank needs (the other local ranks', and its own when staged) while the next round is
    read. Returns after a last collective, so that no rank goes on (and changes its tensors) while another
    still fetches from it; a failed fetch on any rank is then the same error on every rank.

    Across hosts (one round): ``exchange`` runs after the read (ranks send their chunks to other hosts) and
    returns the bytes it received; ``holds[r]`` is what local rank ``r`` then holds, and is fetched from."""
    assert exchange is None or max_rounds == 1
    url = reader.sources[0].url()
    most = max(sum(c.nbytes for c in chunks) for chunks in owned)
    needed = [r for r in local if staged is not None or r != comm.rank]
    received = 0

    def fetch_all(chunks: list[Any]) -> None:
        for c in chunks:
            fetch(c)

    with ThreadPoolExecutor(1, thread_name_prefix="distckpt-same-host") as helper:
        pending = []
        try:
            for i, round_owned in enumerate(rounds(owned, max(1, min(max_rounds, most // ROUND_MIN_BYTES)))):
                part = dict(others) if i == 0 else {}
                for c in round_owned[comm.rank]:
                    t = targets[c.key]
                    _add_piece(part, c, t, None if staged is None else staged(c, t))
                _load_round(reader, encodings, part, comm)
                if exchange is not None:
                    got = _lost_peer(url, exchange)  # from the senders on other hosts
                    received += got
                    reader.stats.bytes_process_group += got
                _lost_peer(url, comm.barrier)  # every rank's chunks of this round are in place
                fetched = holds or round_owned
                pending.append(helper.submit(fetch_all, [c for r in needed for c in fetched[r]]))
                received += sum(c.nbytes for r in local if r != comm.rank for c in fetched[r])
        finally:  # never leave while the helper still writes into the targets
            wait_start = time.perf_counter()
            errors = [f.exception() for f in pending]
            reader.stats.broadcast_s = time.perf_counter() - wait_start
    error = next((e for e in errors if e is not None), None)
    _lost_peer(url, lambda: comm.agree(None if error is None else DistCheckpointError(
        f"{url}: copying another rank's chunks failed: {type(error).__name__}: {error}")), error)
    reader.stats.bytes_broadcast = received


def _lost_peer(url: str, collective: Callable[[], T], error: BaseException | None = None) -> T:
    """Run ``collective`` and return what it returns; if the process group fails (a rank is gone: killed, crashed), raise a
    `DistCheckpointError` that names the checkpoint, with the group's error as its cause (``error``: what this rank's
    own copies raised, if anything). Package errors pass through."""
    try:
        return collective()
    except DistCheckpointError:
        raise
    except Exception as e:
        mine = f"; this rank's copies: {type(error).__name__}: {error}" if error is not None else ""
        raise DistCheckpointError(f"{url}: the ranks of this load lost one of their peers "
                                  f"({type(e).__name__}: {e}){mine}") from e


ROUNDS = 4  # balanced reads: broadcast one round while reading the next
SHARED_ROUNDS = 2  # through shared memory: copy one round while reading the next
ATTACH_ROUNDS = 1  # by attach: one round (a copy runs at memory speed; each round costs a collective DCP load)
ROUND_MIN_BYTES = 32 << 20  # fewer rounds when a rank reads less than ROUNDS of these (each round costs a collective)


def _load_round(reader: CheckpointReader, encodings: dict[str, Any], targets: dict[str, Any], comm: Comm) -> None:
    """One collective DCP load of ``targets`` (decoding encoded tensors into them)."""
    read, decode = decode_plan(encodings, targets)

    def load() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(read, storage_reader=reader, planner=load_planner(), process_group=comm.group,
                     no_dist=not comm.active)

    try:
        if comm.active:  # a rank's own errors reach every rank as DCP's CheckpointException (a BaseException, passed
            _lost_peer(reader.sources[0].url(), load)  # through); an Exception out of it is a failed collective
        else:
            load()
    except BaseException as e:
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for exc in failures.values():
                inner = exc[0] if isinstance(exc, tuple) else exc
                if isinstance(inner, DistCheckpointError):
                    raise inner from e  # the error itself (type, attributes, traceback), DCP's wrapper as its cause
        raise
    decode()


def read_checkpoint(url: str, options: StorageLike = None, safe_globals: list[str] | None = None,
                    threads: int = 2, progress: Callable[[int], None] | None = None,
                    trusted: bool = False) -> dict[str, Any]:
    """The whole checkpoint at ``url`` as a plain dict of CPU tensors, read by this process alone.

    Works for any world size and strategy that wrote it. Optimizer state is keyed by parameter FQN (by
    parameter index for a checkpoint imported from a stock Lightning file). Never executes code from the
    checkpoint, unless ``trusted`` (objects that JSON cannot hold are then unpickled without an allowlist).
    ``progress`` gets the stored bytes read as they verify.
    """
    ckpt = open_checkpoint(source_of(url, options))
    tensors = allocate(ckpt.metadata, state.tensor_refs(ckpt.skeleton), url)
    read_tensors(ckpt, tensors, threads=threads, comm=SOLO, progress=progress)
    return state.join(ckpt.skeleton, tensors.__getitem__, safe_globals or (), trusted=trusted)


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
