"""Writing one checkpoint: staging directory, DCP save, manifest, atomic publish, commit marker.

``write_checkpoint`` is collective over ``group`` (every rank calls it with the same URL). It returns only
once the checkpoint is committed, or raises `CheckpointSaveError` on every rank; in that case the
staging directory is removed (best effort) and no earlier checkpoint was touched.
"""

from __future__ import annotations

import logging
import warnings
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from lightning_distckpt import ondisk
from lightning_distckpt.catalog import Heartbeat, publish, source_of
from lightning_distckpt.catalog.blocks import borrows_bytes
from lightning_distckpt.catalog.cleanup import foreign
from lightning_distckpt.engine.incremental import BlockIndex, IncrementalSave
from lightning_distckpt.engine.writer import CheckpointWriter, FileWritten
from lightning_distckpt.errors import CheckpointSaveError, UnsafeCheckpointError
from lightning_distckpt.faults import crash_point
from lightning_distckpt.gcpause import without_gc
from lightning_distckpt.ondisk.names import PENDING, check_checkpoint_name
from lightning_distckpt.ondisk.skeleton import OPTIM
from lightning_distckpt.parallel.comm import Comm
from lightning_distckpt.parallel.planner import BalancedSavePlanner, PlanCache
from lightning_distckpt.parallel.regular import REGULAR_PLAN, NotRegular
from lightning_distckpt.storage import Source, Store, StorageLike, open_store
from lightning_distckpt.engine.dcp_metadata import from_dcp
from lightning_distckpt.transforms import PART, CompressionConfig
from lightning_distckpt.transforms.compression import encode

log = logging.getLogger(__name__)


#: saves over this many ranks or more write compact metadata by default (`DistCheckpointIO(compact_metadata=None)`):
#: below it the listed form costs little to plan and parse (docs/scaling.md has the measurements)
COMPACT_FROM_RANKS = 16


@dataclass(frozen=True)
class WriteOptions:
    """How bytes are laid out; identical on every rank."""

    threads: int = 2
    chunk_bytes: int = 32 << 20
    block_bytes: int = 8 << 20


@dataclass
class SaveResult:
    """What one rank did in one save."""

    url: str
    bytes_written: int
    seconds: float
    manifest: ondisk.Manifest | None = None  # rank 0 only
    metadata: ondisk.CheckpointMetadata | None = None  # rank 0 only
    bytes_borrowed: int = 0  # incremental saves: stored bytes this rank referenced instead of writing
    prepare_s: float = 0.0  # until every rank knew the staging directory (and, incremental, the base's index)


def write_checkpoint(
    url: str,
    skeleton: Any,
    tensors: dict[str, Any],
    manifest: ondisk.Manifest,
    options: WriteOptions,
    comm: Comm,
    storage: StorageLike = None,
    compression: CompressionConfig | None = None,
    params: set[str] | None = None,
    plan_cache: PlanCache | None = None,
    incremental: IncrementalSave | None = None,
    compact: bool = False,
) -> SaveResult:
    """Save ``tensors`` (flat, possibly sharded) and ``skeleton`` (JSON) as the checkpoint ``url``.

    ``params`` are the keys of model parameters: with optimizer state, the only plain tensors assumed to
    hold the same bytes on every rank (so any rank may write them, see
    `balance()`); ``None`` assumes that of every tensor. ``compression``
    encodes tensors (on the calling thread, which is the background thread for async saves).

    ``incremental`` (see `lightning_distckpt.engine.incremental`): the data files go to the root's block store
    (``<root>/.distckpt-blocks/<token>/``) and blocks confirmed equal to blocks of the base are referenced, not
    written. Rank 0 records the block directories it may reference in the staging directory (``BORROWS``) before it
    checks that the base is still committed, so no clean-up can delete them while the save runs.

    ``compact`` (not with ``incremental``): when every rank's state is *regular* (each tensor held whole by every
    rank, or cut along dim 0 by the ``torch.chunk`` rule over the ranks: DDP, FSDP2 on a 1-D mesh), plan the save
    from one summary per rank and write the compact metadata (version 3, `lightning_distckpt.ondisk.layout`): O(tensors
    + ranks) on the coordinator instead of O(ranks x tensors). A state that is regular on no rank is planned and
    listed as usual; one that is regular on some ranks only is planned again the usual way (one failed planning
    round, nothing written).
    """
    regular = compact and incremental is None and (plan_cache is None or plan_cache.regular)
    try:
        return _write_checkpoint(url, skeleton, tensors, manifest, options, comm, storage, compression, params,
                                 plan_cache, incremental, regular)  # fmt: skip
    except _PlanListed:
        if plan_cache is not None:
            plan_cache.regular = False  # this structure is not regular everywhere: later saves plan with items at once
        return _write_checkpoint(url, skeleton, tensors, manifest, options, comm, storage, compression, params,
                                 plan_cache, incremental, False)  # fmt: skip


class _PlanListed(Exception):
    """Internal: some ranks' states are regular and some are not; plan the save again with items."""


def _write_checkpoint(url: str, skeleton: Any, tensors: dict[str, Any], manifest: ondisk.Manifest,
                      options: WriteOptions, comm: Comm, storage: StorageLike, compression: CompressionConfig | None,
                      params: set[str] | None, plan_cache: PlanCache | None, incremental: IncrementalSave | None,
                      regular: bool) -> SaveResult:
    start = time.perf_counter()
    compression = compression or CompressionConfig()
    encodings: dict[str, Any] = {}
    if compression.preset not in (None, "lossless"):
        tensors, encodings = encode(tensors, compression, params, lazy=True)  # encoded by the writer's threads
    codec = compression.make_block_codec()
    manifest.compression = compression.descriptor()

    def replicated(key: str) -> bool:
        return params is None or key.split(PART)[0] in params or key.startswith(OPTIM)

    store, path = open_store(url, storage)
    parent, name = store.parent(path), store.basename(path)
    try:
        check_checkpoint_name(name, url)
    except UnsafeCheckpointError as e:
        raise CheckpointSaveError(f"{url}: cannot save here: {e}") from None
    token = comm.broadcast(uuid.uuid4().hex[:12])
    staging = store.join(parent, ondisk.staging_name(name, token))
    is_coordinator = comm.rank == 0

    error = ""
    beat: Heartbeat | None = None
    index: BlockIndex | None = None
    data_dir = store.join(parent, ondisk.BLOCKS, token) if incremental is not None else None
    if is_coordinator:
        try:
            error = foreign(store, path)  # somebody's directory is never replaced (publish checks again)
            if not error:
                store.makedirs(staging)
                beat = Heartbeat(store, staging)  # clean-up elsewhere never takes this save for a crashed one
                if incremental is not None:
                    if incremental.base_ids():  # before the base is checked: clean-up keeps them from now on
                        store.write_bytes(store.join(staging, ondisk.BORROWS), borrows_bytes(incremental.base_ids()))
                    store.makedirs(data_dir)  # type: ignore[arg-type]
                    base = incremental.base
                    index = incremental.index(source_of(base.url, storage) if base is not None
                                              else Source(store, staging))  # fmt: skip
                    index.data_id = token
                crash_point("save:staged")
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = f"cannot create {store.url(staging)}: {e}"
    error, index = comm.broadcast((error, index))
    prepared = time.perf_counter() - start
    if error:
        if beat is not None:
            beat.stop()
        if is_coordinator:
            _release(store, path)
        raise CheckpointSaveError(f"saving checkpoint {url} failed: {error}")

    published: list[tuple[ondisk.Manifest, ondisk.CheckpointMetadata]] = []

    def on_finish(metadata: Metadata) -> None:
        published.append(_publish(store, path, staging, token, metadata, skeleton, manifest, encodings, beat, index))

    writer = CheckpointWriter(store, staging, threads=options.threads, block_bytes=options.block_bytes,
                              codec=codec, on_finish=on_finish, incremental=index, data_dir=data_dir)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            planner = BalancedSavePlanner(options.chunk_bytes, replicated, plan_cache, rank=comm.rank,
                                          world=comm.world_size, regular=regular)  # fmt: skip
            dcp.save(tensors, storage_writer=writer, planner=planner, process_group=comm.group, no_dist=not comm.active)
    except BaseException as e:
        if plan_cache is not None:
            plan_cache.clear()
        if is_coordinator:
            try:
                if beat is not None:
                    beat.stop()
                store.remove(staging, recursive=True)
                if data_dir is not None:
                    store.remove(data_dir, recursive=True)
            except Exception:  # noqa: BLE001 - best effort; gc removes it later
                log.warning("could not remove staging directory %s", store.url(staging), exc_info=True)
            _release(store, path)
        if regular and _not_regular(e):
            raise _PlanListed() from e
        raise CheckpointSaveError(f"saving checkpoint {url} failed (nothing was committed): {_root_cause(e)}") from e
    finally:
        if beat is not None:
            beat.stop()
    done = published[0] if published else (None, None)
    return SaveResult(url, writer.bytes_written, time.perf_counter() - start, done[0], done[1], writer.bytes_borrowed,
                      prepared)


def reserve(url: str, storage: StorageLike = None) -> bool:
    """Make a name that an asynchronous save will commit visible now (one process: rank 0).

    Creates ``<url>/PENDING`` when nothing exists at ``url`` yet, so that a name still being written counts
    as taken (Lightning's ``ModelCheckpoint`` picks ``name-v1`` instead of reusing it). The directory is an
    uncommitted checkpoint to every reader; the commit replaces it, a failed save removes it. Returns whether
    a placeholder was created.
    """
    store, path = open_store(url, storage)
    check_checkpoint_name(store.basename(path), url)
    if store.exists(path):
        return False
    store.makedirs(path)
    store.write_bytes(store.join(path, PENDING), b"")
    return True


def release(url: str, storage: StorageLike = None) -> None:
    """Remove the placeholder that `reserve()` made for a save that will not commit (rank 0; best effort:
    only a directory holding nothing but ``PENDING`` is removed, never a checkpoint)."""
    store, path = open_store(url, storage)
    _release(store, path)


def _is_placeholder(store: Store, path: str) -> bool:
    try:
        return store.isdir(path) and [e.name for e in store.listdir(path)] == [PENDING]
    except FileNotFoundError:
        return False


def _release(store: Store, path: str) -> None:
    """Remove the placeholder of a failed save (best effort; never a committed checkpoint)."""
    try:
        if _is_placeholder(store, path):
            store.remove(path, recursive=True)
    except Exception:  # noqa: BLE001 - clean-up removes it later
        log.warning("could not remove placeholder %s", store.url(path), exc_info=True)


def _not_regular(e: BaseException) -> bool:
    """Whether a failed DCP save failed only because the ranks' states were regular on some ranks only."""
    failures = getattr(e, "failures", None)
    if isinstance(e, NotRegular):
        return True
    if not isinstance(failures, dict) or not failures:
        return False
    return all(isinstance(exc[0] if isinstance(exc, tuple) else exc, NotRegular) for exc in failures.values())


def _root_cause(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: exception}
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, exc in sorted(failures.items()):
            inner = exc[0] if isinstance(exc, tuple) else exc
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def _publish(store: Store, path: str, staging: str, token: str, metadata: Metadata, skeleton: Any,
             manifest: ondisk.Manifest, encodings: dict[str, Any], beat: Heartbeat | None = None,
             index: BlockIndex | None = None) -> tuple[ondisk.Manifest, ondisk.CheckpointMetadata]:
    """Coordinator only: write the documents, move staging into place, write the commit marker
    (`lightning_distckpt.catalog.publish()`: an overwrite stays recoverable at every step). An incremental save also
    lists the data files it borrows blocks from (with the size and digest their own manifest gives) and the
    checkpoints they came from."""
    if REGULAR_PLAN in (metadata.planner_data or {}):
        return _publish_compact(store, path, staging, token, metadata, skeleton, manifest, encodings, beat)
    files: dict[str, dict[str, int]] = {}
    by_file: dict[str, list[tuple[int, ondisk.Location]]] = {}
    raw = 0
    used: set[str] = set()
    for loc in metadata.storage_data.values():
        if not loc.refs or any(r is None for r in loc.refs):
            by_file.setdefault(loc.file, []).append((loc.offset, loc))
        used.update(r[0] for r in loc.refs if r is not None)
        raw += loc.raw
    for name, locs in by_file.items():
        locs.sort(key=lambda x: x[0])
        digests, size = [], 0
        for offset, loc in locs:
            if offset != size:
                raise RuntimeError(f"internal error: chunks of {name} are not contiguous")
            digests.extend(b.digest for b, r in zip(loc.blocks, loc.refs or [None] * len(loc.blocks)) if r is None)
            size += loc.own_stored
        files[name] = {"size": size, "xxh3": ondisk.blocks_digest(digests)}
    md = from_dcp(metadata, encodings)
    if index is not None:
        md.data_id = manifest.data_id = token
        borrowed = {ondisk.parse_blocks_key(k)[0] for k in used}  # type: ignore[index]
        manifest.borrows = {i: index.names.get(i, "") or "unknown" for i in sorted(borrowed)}
        for key in used:
            files[key] = dict(index.files[key])
    return _commit(store, path, staging, token, files, raw, ondisk.metadata_to_json(md), md, skeleton, manifest, beat)


def _publish_compact(store: Store, path: str, staging: str, token: str, metadata: Metadata, skeleton: Any,
                     manifest: ondisk.Manifest, encodings: dict[str, Any],
                     beat: Heartbeat | None) -> tuple[ondisk.Manifest, ondisk.CheckpointMetadata]:
    """`_publish` of a compact save: the layout from the regular plan, the files from one result per data file."""
    md, files, raw = compact_metadata(metadata, encodings)
    return _commit(store, path, staging, token, files, raw, ondisk.layout_to_json(md), md, skeleton, manifest, beat)


@without_gc
def compact_metadata(metadata: Metadata, encodings: dict[str, Any]) -> tuple[ondisk.CheckpointMetadata, dict[str, Any], int]:
    """Coordinator: a compact save's parsed metadata (the regular plan's layout), the manifest's entries of its data
    files and their raw bytes, from the global metadata and one `FileWritten` per data file. O(tensors + files)."""
    plan = metadata.planner_data[REGULAR_PLAN]
    written: list[FileWritten] = sorted(metadata.storage_data.values(), key=lambda f: (f.writer, f.name))
    counts = [0] * plan.world
    codec = ""
    for f in written:
        if f.name != ondisk.data_file_name(f.writer, counts[f.writer]):
            raise RuntimeError(f"internal error: unexpected data file {f.name} of rank {f.writer}")
        counts[f.writer] += 1
        codec = f.codec
    layout = ondisk.Layout(plan.world, codec, counts, [ondisk.RegularTensor(*t) for t in plan.tensors])
    files = {f.name: {"size": f.size, "xxh3": f.xxh3} for f in written}
    return ondisk.layout_metadata(layout, encodings), files, sum(f.raw for f in written)


def _commit(store: Store, path: str, staging: str, token: str, files: dict[str, dict[str, int]], raw: int,
            metadata_doc: dict[str, Any], md: ondisk.CheckpointMetadata, skeleton: Any, manifest: ondisk.Manifest,
            beat: Heartbeat | None) -> tuple[ondisk.Manifest, ondisk.CheckpointMetadata]:
    """Write the documents into staging, then publish (`lightning_distckpt.catalog.publish`)."""
    documents = ((ondisk.METADATA, ondisk.dumps(metadata_doc)), (ondisk.STATE, ondisk.dumps(skeleton)))
    for name, data in documents:
        store.write_bytes(store.join(staging, name), data)
        files[name] = {"size": len(data), "xxh3": ondisk.digest(data)}
    manifest.name = store.basename(path)
    manifest.files = files
    manifest.tensor_bytes = raw
    manifest.created = time.time()
    manifest_bytes = ondisk.dumps(manifest.to_json())
    store.write_bytes(store.join(staging, ondisk.MANIFEST), manifest_bytes)
    crash_point("save:documents")
    if beat is not None:
        beat.stop()
    if _is_placeholder(store, path):  # our own async save reserved the name: nothing to keep there
        store.remove(path, recursive=True)
    publish(store, staging, path, manifest_bytes, token)
    return manifest, md
