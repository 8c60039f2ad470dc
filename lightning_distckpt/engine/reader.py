"""DCP StorageReader: reads exactly the blocks a rank needs and verifies each before using it.

For every read item the reader finds the stored chunk's blocks that cover the requested rows, reads them
with one ranged read and checks each block's xxh3 against the metadata as its bytes stream in. Uncompressed
blocks land straight in a CPU destination (or in pinned buffers bound for an accelerator's); compressed ones
are decoded after their check. A tensor is handed to DCP only once all of its blocks matched. A block that fails (missing file, short read, wrong checksum) is read
from the next source that has the same file (a replica); if none has a good copy the load fails with a
`CorruptCheckpointError` naming file, offset and tensor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk.digests import BlockDigests
from lightning_distckpt.ondisk.metadata import Location
from lightning_distckpt.storage.base import Source, read_at, read_scatter, windows
from lightning_distckpt.transforms.block import BlockCodec
from lightning_distckpt.transforms.vector import map_chunks

log = logging.getLogger(__name__)

#: pinned host buffer size for reads into accelerator memory
STAGE_BYTES = 64 << 20


@dataclass
class Repair:
    """Blocks of one file read from another copy because an earlier copy's failed (checksum, short, missing)."""

    file: str
    bad: str  # URL of the copy that failed (the checkpoint directory)
    good: str  # URL of the copy the blocks were read from instead
    reason: str  # why the bad copy failed (the first problem seen)
    blocks: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "bad": self.bad, "good": self.good, "reason": self.reason, "blocks": self.blocks,
                "bytes": self.bytes}  # fmt: skip


@dataclass
class ReadStats:
    """What a load read, per source URL (bytes) and which files needed a fallback source.

    ``failures`` keeps, per file, why the first source that failed for it failed (also when a retry of that
    source succeeded later); ``repairs`` the blocks that were served by another copy because of such a failure.
    """

    bytes_by_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fallbacks: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    repairs: dict[tuple[str, str, str], Repair] = field(default_factory=dict)
    bytes_broadcast: int = 0  # received from other ranks instead of read (balanced reads), by any way
    bytes_process_group: int = 0  # of those, received through the process group (broadcasts, sends between hosts)
    #: how balanced reads shared the bytes: "attach", "segments", "broadcast", or "attach+send" (several hosts:
    #: partners on other hosts swapped chunks, local ranks attached); "": not balanced
    same_host: str = ""
    read_s: float = 0.0
    broadcast_s: float = 0.0
    file_s: dict[str, float] = field(default_factory=dict)  # time each file's reads took (threads overlap)
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: Callable[[int], None] | None = None  # called with the stored bytes of each verified read

    def add(self, url: str, n: int) -> None:
        """Count ``n`` verified bytes read from ``url`` (thread-safe) and report them to ``progress``."""
        with self.lock:
            self.bytes_by_source[url] += n
        if self.progress is not None and n:
            self.progress(n)


class _Geometry(NamedTuple):
    """Where a read item's rows are: its chunk's stored location, dtype and shape, raw bytes [lo, hi)."""

    fqn: str
    loc: Location
    dtype: torch.dtype
    shape: list[int]
    rows: int
    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class _Direct:
    """A read item whose stored blocks go unchanged into ``target`` (contiguous, same dtype)."""

    ri: ReadItem
    target: torch.Tensor
    offset: int  # of the first block in the file
    blocks: Sequence[Any]
    first: int = 0  # index of the first block in its chunk's location

    @property
    def end(self) -> int:
        return self.offset + sum(b.stored for b in self.blocks)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[i, j)`` of consecutive numbers in sorted ``indices``."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _first_bad(blocks: Sequence[Any], got: Sequence[int]) -> int | None:
    """Byte position (from the first block) of the first block whose digest is not in ``got``; None if all match."""
    pos = 0
    for b, d in zip(blocks, got):
        if d != b.digest:
            return pos
        pos += b.stored
    return None


class CheckpointReader(StorageReader):
    """Reads one checkpoint from ``sources`` (the first is preferred). One instance per load."""

    def __init__(
        self,
        sources: Sequence[Source],
        metadata: Metadata,
        *,
        threads: int = 2,
        codecs: Callable[[str], BlockCodec] | None = None,
        indexes: Any = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("a reader needs at least one source")
        self.sources = list(sources)
        self.metadata = metadata
        self.threads = threads
        self.codecs = codecs or (lambda name: BlockCodec())
        self.stats = ReadStats()
        #: a compact checkpoint's data-file indexes (`lightning_distckpt.catalog.compact.Indexes`): chunks are found
        #: by their tensor's rule and located through the index of the file that holds them, read on first use
        self.indexes = indexes
        self._chunks: dict[MetadataIndex, ChunkStorageMetadata] = {
            MetadataIndex(fqn, c.offsets): c
            for fqn, tmd in metadata.state_dict_metadata.items()
            for c in tmd.chunks  # type: ignore[union-attr]
        }
        self._locs: dict[MetadataIndex, tuple[Location, list[int]]] = {}  # compact: located chunks
        self._locs_lock = threading.Lock()
        self._bad: dict[tuple[int, str], str] = {}  # (source index, file) known to be bad -> why
        self._devices: set[torch.device] = set()  # accelerators that _read_to_device copied to

    # -- DCP protocol ------------------------------------------------------------------------------
    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.indexes is not None:  # compact: read the indexes of every rank's files this plan needs, in parallel
            self.indexes.prefetch({self._writer_of(ri.storage_index) for ri in plan.items}, 4 * self.threads)
        by_file: dict[str, list[ReadItem]] = defaultdict(list)
        for ri in plan.items:
            by_file[self._loc(ri).file].append(ri)
        groups = sorted(by_file.items(), key=lambda kv: -sum(self._loc(r).stored for r in kv[1]))
        work = [(name, sorted(items, key=lambda r: self._loc(r).offset)) for name, items in groups]
        if self.threads <= 1 or len(work) <= 1:
            for name, items in work:
                self._read_file(name, items, planner)
        else:
            with ThreadPoolExecutor(min(self.threads, len(work)), thread_name_prefix="distckpt-read") as pool:
                list(pool.map(lambda w: self._read_file(w[0], w[1], planner), work))
        for device in self._devices:  # the non-blocking copies of _read_to_device
            torch.get_device_module(device).synchronize(device)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    # -- reading -----------------------------------------------------------------------------------
    def _loc(self, ri: ReadItem) -> Location:
        if self.indexes is not None:
            return self._located(ri.storage_index)[0]
        return self.metadata.storage_data[ri.storage_index]

    def _sizes(self, index: MetadataIndex) -> list[int]:
        """The stored chunk's sizes."""
        if self.indexes is not None:
            return self._located(index)[1]
        return list(self._chunks[index].sizes)

    def _chunk_of(self, index: MetadataIndex) -> tuple[int, int]:
        """A compact checkpoint's (tensor number, chunk number) of the stored chunk at ``index``."""
        layout = self.indexes.layout
        t = layout.number[index.fqn]
        tensor = layout.tensors[t]
        return t, tensor.chunk_at(index.offset[0]) if len(tensor.size) and not tensor.single else 0

    def _writer_of(self, index: MetadataIndex) -> int:
        t, c = self._chunk_of(index)
        return self.indexes.layout.tensors[t].writer(c)

    def _located(self, index: MetadataIndex) -> tuple[Location, list[int]]:
        """A compact checkpoint's chunk at ``index``: its location (from its file's verified index) and sizes."""
        got = self._locs.get(index)
        if got is None:
            t, c = self._chunk_of(index)
            got = (self.indexes.location(t, c), list(self.indexes.layout.tensors[t].chunk(c)[1]))
            with self._locs_lock:
                self._locs[index] = got
        return got

    def _read_file(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        handles: dict[tuple[int, str], BinaryIO] = {}
        start = time.perf_counter()
        try:
            for run in self._runs(items, planner):
                self._read_run(name, run, planner, handles)
        finally:
            for f in handles.values():
                f.close()
            with self.stats.lock:
                self.stats.file_s[name] = self.stats.file_s.get(name, 0.0) + time.perf_counter() - start

    def _geometry(self, ri: ReadItem) -> _Geometry:
        fqn = ri.storage_index.fqn
        dtype = self.metadata.state_dict_metadata[fqn].properties.dtype  # type: ignore[union-attr]
        shape = self._sizes(ri.storage_index)
        row_bytes = dtype.itemsize * (torch.Size(shape[1:]).numel() if shape else 1)
        first = ri.storage_offsets[0] if shape else 0
        rows = ri.lengths[0] if shape else 1
        return _Geometry(fqn, self._loc(ri), dtype, shape, rows, first * row_bytes, (first + rows) * row_bytes)

    def _direct(self, ri: ReadItem, planner: LoadPlanner) -> _Direct | None:
        """Where the item's whole, uncompressed blocks can go straight into a contiguous destination."""
        _, loc, dtype, shape, _, lo, hi = self._geometry(ri)
        if loc.codec or hi <= lo or any(o != 0 for o in ri.storage_offsets[1:]) or list(ri.lengths[1:]) != shape[1:]:
            return None
        target = planner.resolve_tensor(ri)
        if target.dtype != dtype or not target.is_contiguous():
            return None
        blocks, start_raw, start_stored, first = self._select(loc, lo, hi)
        if start_raw != lo or start_raw + sum(b.raw for b in blocks) != hi:
            return None
        return _Direct(ri, target, start_stored, blocks, first)

    def _runs(self, items: list[ReadItem], planner: LoadPlanner) -> list[list[tuple[ReadItem, _Direct | None]]]:
        """The items of one file in offset order, each with its direct read (or None), grouped into runs of
        adjacent direct reads into CPU memory (one ranged stream each); every other item is a run of one."""
        out: list[list[tuple[ReadItem, _Direct | None]]] = []
        last: _Direct | None = None  # the direct CPU read that ends the last run
        for ri in items:
            d = self._direct(ri, planner)
            cpu = d is not None and d.target.device.type == "cpu" and not self._loc(ri).refs  # one file, in order
            if cpu and last is not None and last.end == d.offset:  # type: ignore[union-attr]
                out[-1].append((ri, d))
            else:
                out.append([(ri, d)])
            last = d if cpu else None
        return out

    def _read_run(self, name: str, run: list[tuple[ReadItem, _Direct | None]], planner: LoadPlanner,
                  handles: dict[tuple[int, str], BinaryIO]) -> None:
        """Several adjacent direct reads: one ranged read from the first source straight into their
        destinations, each block checked as its bytes stream in; an item that fails (or a failed read) goes through
        `_read_item()`, which tries every source. A run of one: `_read_item()`."""
        retry = run
        if len(run) > 1 and (0, name) not in self._bad:
            source = self.sources[0]
            directs = [d for _, d in run if d is not None]
            views = [memoryview(d.target.reshape(-1).view(torch.uint8).numpy()) for d in directs]

            def read_once() -> list[int]:
                f = handles.get((0, name))
                if f is None:
                    f = handles[(0, name)] = source.store.open_read(source.file(name))
                digests = BlockDigests([b.stored for d in directs for b in d.blocks])
                read_scatter(f, directs[0].offset, views, source.url(name), digests)
                return digests.digests

            def reopen() -> None:
                f = handles.pop((0, name), None)
                if f is not None:
                    f.close()

            try:
                got = source.store.retry.run(read_once, f"read {source.url(name)}", cleanup=reopen)
            except (OSError, EOFError) as e:
                # recorded; the careful path below reads each item again, from every source in turn
                self._failed(name, f"{source.url(name)}: {type(e).__name__}: {e}")
            else:
                intact, pos = [], 0
                for d in directs:
                    bad = _first_bad(d.blocks, got[pos : pos + len(d.blocks)])
                    intact.append(bad is None)
                    if bad is not None and (0, name) not in self._bad:
                        self._bad[(0, name)] = self._failed(
                            name, f"{source.url(name)}: block at byte {d.offset + bad} (tensor {d.ri.storage_index.fqn!r}) "
                                  "fails its checksum")  # fmt: skip
                    pos += len(d.blocks)
                self.stats.add(source.url(), sum(d.end - d.offset for d, ok in zip(directs, intact) if ok))
                for d, ok in zip(directs, intact):
                    if ok:
                        planner.commit_tensor(d.ri, d.target)
                retry = [item for item, ok in zip(run, intact) if not ok]
        for ri, d in retry:
            self._read_item(ri, d, planner, handles)

    def _read_item(self, ri: ReadItem, direct: _Direct | None, planner: LoadPlanner,
                   handles: dict[tuple[int, str], BinaryIO]) -> None:
        """One item from the first source that has it intact; ``direct``: its direct read (``_direct``)."""
        fqn, loc, dtype, shape, rows, lo, hi = self._geometry(ri)
        if direct is not None:
            # whole blocks into a contiguous destination: read them straight into it, verified as they stream in
            flat = direct.target.reshape(-1).view(torch.uint8)
            if flat.device.type == "cpu":
                self._read_verified(loc, direct.first, len(direct.blocks), fqn, handles, into=memoryview(flat.numpy()))
            else:
                self._read_to_device(loc, direct.first, direct.blocks, fqn, handles, flat)
            planner.commit_tensor(ri, direct.target)
            return
        raw = self._read_raw(loc, lo, hi, fqn, handles)
        src = torch.frombuffer(raw, dtype=dtype) if len(raw) else torch.empty(0, dtype=dtype)
        src = src.reshape([rows, *shape[1:]] if shape else [])
        for d in range(1, len(shape)):
            src = src.narrow(d, ri.storage_offsets[d], ri.lengths[d])
        target = planner.resolve_tensor(ri)
        if target.shape != src.shape:
            raise CorruptCheckpointError(
                f"{self.sources[0].url(loc.file)}: tensor {fqn!r} region {list(src.shape)} does not fit its "
                f"destination {list(target.shape)}"
            )
        target.copy_(src)
        planner.commit_tensor(ri, target)

    def _read_to_device(self, loc: Location, first: int, blocks: Sequence[Any], fqn: str,
                        handles: dict[tuple[int, str], BinaryIO], flat: torch.Tensor) -> None:
        """Read ``blocks`` into the accelerator bytes ``flat`` through pinned host buffers of about
        ``STAGE_BYTES``: each is verified, then copied without blocking this thread (the caching host allocator
        keeps a buffer until its copy is done; ``read_data`` synchronizes the device before it returns)."""
        pos = 0
        for i, j, size in windows([b.stored for b in blocks], STAGE_BYTES):
            stage = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._read_verified(loc, first + i, j - i, fqn, handles, into=memoryview(stage.numpy()))
            flat[pos : pos + size].copy_(stage, non_blocking=True)
            self._devices.add(flat.device)
            pos += size

    def _failed(self, file: str, why: str) -> str:
        """Record why a source failed for ``file`` (the first reason per file is kept); returns ``why``."""
        with self.stats.lock:
            self.stats.failures.setdefault(file, why)
        return why

    @staticmethod
    def _select(loc: Location, lo: int, hi: int) -> tuple[list[Any], int, int, int]:
        """The blocks of ``loc`` that cover raw bytes [lo, hi), where the first one starts (raw, stored) and its
        index."""
        selected, raw_pos, stored_pos = [], 0, loc.offset
        start_raw = start_stored = first = 0
        for k, b in enumerate(loc.blocks):
            if raw_pos < hi and raw_pos + b.raw > lo:
                if not selected:
                    start_raw, start_stored, first = raw_pos, stored_pos, k
                selected.append(b)
            raw_pos += b.raw
            stored_pos += b.stored
        return selected, start_raw, start_stored, first

    def _read_raw(self, loc: Location, lo: int, hi: int, fqn: str, handles: dict[tuple[int, str], BinaryIO]) -> memoryview:
        """Raw bytes [lo, hi) of the chunk at ``loc``, from verified (and decoded) blocks."""
        if hi <= lo:
            return memoryview(bytearray())
        selected, start_raw, start_stored, first = self._select(loc, lo, hi)
        if start_raw + sum(b.raw for b in selected) < hi:
            raise CorruptCheckpointError(
                f"{self.sources[0].url(loc.file)}: tensor {fqn!r} needs {hi} bytes, its blocks hold less"
            )
        data = memoryview(self._read_verified(loc, first, len(selected), fqn, handles))
        if loc.codec:  # decode the blocks (on the codec threads when there are several) into one buffer
            codec = self.codecs(loc.codec)
            out = memoryview(bytearray(sum(b.raw for b in selected)))
            starts, raw_starts, pos, raw_pos = [], [], 0, 0
            for b in selected:
                starts.append(pos)
                raw_starts.append(raw_pos)
                pos, raw_pos = pos + b.stored, raw_pos + b.raw

            def decode(lo: int, hi: int) -> None:
                for k in range(lo, hi):
                    b = selected[k]
                    try:
                        decoded = codec.decode(data[starts[k] : starts[k] + b.stored], b.raw)
                    except CorruptCheckpointError as e:  # a block that matched its checksum but does not decode
                        if type(e) is not CorruptCheckpointError:  # a codec's own error type: raised as it is
                            raise
                        raise CorruptCheckpointError(f"{self.sources[0].url(loc.file)}: block {first + k} of tensor "
                                                     f"{fqn!r}: {e}") from None  # fmt: skip
                    if len(decoded) != b.raw:
                        raise CorruptCheckpointError(
                            f"{self.sources[0].url(loc.file)}: block of tensor {fqn!r} decodes to {len(decoded)} "
                            f"bytes, expected {b.raw}"
                        )
                    out[raw_starts[k] : raw_starts[k] + b.raw] = memoryview(decoded).cast("B")

            map_chunks(decode, len(selected), 1)
            data = out
        return data[lo - start_raw : hi - start_raw]

    def _read_verified(self, loc: Location, first: int, count: int, fqn: str, handles: dict[tuple[int, str], BinaryIO],
                       into: memoryview | None = None) -> bytearray | memoryview:
        """The stored bytes of ``count`` blocks of ``loc`` from block ``first`` on (read into ``into`` if given), each
        block checked against its digest, each run of blocks from the first source that has it intact (the blocks of
        an incremental checkpoint may lie in several files: its own and those of earlier saves it borrows from)."""
        segments = loc.segments(first, first + count)
        if len(segments) == 1:
            key, offset, a, b = segments[0]
            return self._read_verified_file(key, offset, loc.blocks[a:b], fqn, handles, into)
        buf = into if into is not None else bytearray(sum(b.stored for b in loc.blocks[first : first + count]))
        view, pos = memoryview(buf), 0
        for key, offset, a, b in segments:
            n = sum(blk.stored for blk in loc.blocks[a:b])
            self._read_verified_file(key, offset, loc.blocks[a:b], fqn, handles, view[pos : pos + n])
            pos += n
        return buf

    def _read_verified_file(self, file: str, offset: int, blocks: Sequence[Any], fqn: str,
                            handles: dict[tuple[int, str], BinaryIO], into: memoryview | None = None,
                            failed: list[tuple[int, str]] | None = None) -> bytearray | memoryview:
        """The stored bytes of ``blocks``, which lie one after the other in ``file`` from ``offset`` on (read into
        ``into`` if given), each block checked against its digest, from the first source that has them intact.
        The unit of fallback is the block: when a copy's read succeeds but some blocks fail their digests, its
        good blocks are kept and only the bad ones are read from the other copies. ``failed``: the copies
        already tried for these blocks, and why (not tried again)."""
        size = sum(b.stored for b in blocks)
        problems = []
        failed = list(failed or [])  # sources that failed for these blocks, and why
        tried = {s for s, _ in failed}
        # copies that failed for this file before are tried last, not skipped: one bad block (or a failed read)
        # does not make the file's other blocks bad, and that copy may hold the only good one of these
        for s in sorted(range(len(self.sources)), key=lambda s: (s, file) in self._bad):
            if s in tried:
                continue
            source = self.sources[s]
            buf = into if into is not None else bytearray(size)

            def read_once(s: int = s, source: Source = source, buf: bytearray = buf) -> list[int]:
                f = handles.get((s, file))
                if f is None:
                    f = handles[(s, file)] = source.store.open_read(source.file(file))
                digests = BlockDigests([b.stored for b in blocks])
                read_at(f, offset, memoryview(buf), source.url(file), digests)
                return digests.digests

            def reopen(s: int = s) -> None:
                f = handles.pop((s, file), None)
                if f is not None:
                    f.close()

            try:
                got = source.store.retry.run(read_once, f"read {source.url(file)}", cleanup=reopen)
            except (OSError, EOFError) as e:
                problems.append(f"{source.url(file)}: {e}")
                self._bad[(s, file)] = self._failed(file, problems[-1])
                failed.append((s, problems[-1]))
                continue
            bad = _first_bad(blocks, got)
            if bad is None:
                self.stats.add(source.url(), size)
                if s:
                    with self.stats.lock:
                        self.stats.fallbacks[file] = source.url()
                if not failed and s and (0, file) in self._bad:  # the preferred copy failed for this file before
                    failed.append((0, self._bad[(0, file)]))
                if failed:  # served by this copy because another one failed: a repair to report
                    first, why = failed[0]
                    key = (file, self.sources[first].url(), source.url())
                    with self.stats.lock:
                        r = self.stats.repairs.setdefault(key, Repair(*key, reason=why))
                        r.blocks += len(blocks)
                        r.bytes += size
                return buf
            problems.append(f"{source.url(file)}: block at byte {offset + bad} (tensor {fqn!r}) fails its checksum")
            self._bad[(s, file)] = self._failed(file, problems[-1])
            failed.append((s, problems[-1]))
            f = handles.pop((s, file), None)
            if f is not None:
                f.close()
            others = len(self.sources) - len(failed)
            wrong = [i for i, (b, d) in enumerate(zip(blocks, got)) if d != b.digest]
            if others and len(wrong) < len(blocks):  # keep this copy's good blocks; the bad ones from the others
                view, starts = memoryview(buf).cast("B"), [0]
                for b in blocks:
                    starts.append(starts[-1] + b.stored)
                try:
                    for i, j in _runs(wrong):
                        self._read_verified_file(file, offset + starts[i], blocks[i:j], fqn, handles,
                                                 into=view[starts[i] : starts[j]], failed=failed)
                except CorruptCheckpointError as e:
                    raise CorruptCheckpointError(f"{problems[-1]}; {e}") from None
                self.stats.add(source.url(), size - sum(blocks[i].stored for i in wrong))
                return buf
        if len(self.sources) > 1 and problems:
            log.warning("no good copy of %s: %s", file, "; ".join(problems))
        raise CorruptCheckpointError("; ".join(problems) or f"{file}: no readable copy")
