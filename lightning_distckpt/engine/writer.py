"""DCP StorageWriter: each rank writes its chunks into its own files, in blocks with checksums.

A rank's chunks are spread over ``threads`` files (``__<rank>_<k>.distcp``) written concurrently, one
stream per thread, balanced by bytes. Every chunk is stored as blocks of at most ``block_bytes`` raw
bytes, each optionally encoded by a block codec and always checksummed (xxh3 of the stored bytes), so a
reader can verify exactly the bytes it reads. All files go to a staging directory; the coordinator's
``finish`` hands the complete metadata to ``on_finish``, which commits.

With a block codec, blocks are encoded (and checksummed) ahead on a pool of codec threads shared by the
rank's files while earlier blocks are written, a bounded number in flight per file; they are written in
order, so the bytes are the same as encoding one block after the other.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from lightning_distckpt.ondisk.digests import blocks_digest, digest
from lightning_distckpt.ondisk.layout import RegularTensor, index_tail
from lightning_distckpt.ondisk.metadata import Block, Location
from lightning_distckpt.engine.incremental import BlockIndex, strong_hash
from lightning_distckpt.ondisk.names import blocks_key, data_file_name
from lightning_distckpt.parallel.planner import item_bytes
from lightning_distckpt.parallel.regular import RegularLocal
from lightning_distckpt.storage.base import Store
from lightning_distckpt.transforms.block import BlockCodec
from lightning_distckpt.transforms.vector import threads as codec_threads

DEFAULT_BLOCK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class FileWritten:
    """A compact save's write result for one data file (no per-chunk result reaches the coordinator): the file's
    writer, stored size (blocks and index tail), manifest digest, raw bytes and block codec."""

    name: str
    writer: int
    size: int
    xxh3: int
    raw: int
    codec: str


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order (copied to CPU / made contiguous only if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def spread(items: list[WriteItem], n: int) -> list[list[WriteItem]]:
    """Split items into at most ``n`` non-empty groups of about equal bytes (largest first)."""
    groups: list[list[WriteItem]] = [[] for _ in range(max(1, n))]
    load = [0] * len(groups)
    for item in sorted(items, key=item_bytes, reverse=True):
        k = load.index(min(load))
        groups[k].append(item)
        load[k] += item_bytes(item)
    return [g for g in groups if g]


class CheckpointWriter(StorageWriter):
    """Writes one checkpoint into ``staging`` on ``store``. One instance per save; used by one DCP call."""

    def __init__(
        self,
        store: Store,
        staging: str,
        *,
        threads: int = 2,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        codec: BlockCodec | None = None,
        on_finish: Callable[[Metadata], None] | None = None,
        incremental: BlockIndex | None = None,
        data_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.staging = staging
        self.threads = threads
        self.block_bytes = block_bytes
        self.codec = codec or BlockCodec()
        self.on_finish = on_finish
        self.bytes_written = 0
        self._encoders: ThreadPoolExecutor | None = None
        self._ahead = 0
        #: incremental saves: data files go to ``data_dir`` (the save's block directory), named by block-store key;
        #: blocks the index confirms are referenced instead of written
        self.incremental = incremental
        self.data_dir = data_dir
        self.bytes_borrowed = 0
        self._lock = threading.Lock()

    # -- DCP protocol ------------------------------------------------------------------------------
    def reset(self, checkpoint_id: Any = None) -> None:
        self.bytes_written = 0
        self.bytes_borrowed = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=rank) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank = int(plan.storage_data)
        regular = plan.planner_data if isinstance(plan.planner_data, RegularLocal) else None
        groups = spread(list(plan.items), self.threads)
        encoders = codec_threads() if self.codec.name else 0
        self._encoders = ThreadPoolExecutor(encoders, thread_name_prefix="distckpt-encode") if encoders > 1 else None
        self._ahead = 2 * encoders
        try:
            if regular is not None:  # compact: every file ends with its own index, one result per file
                tensors = [RegularTensor(*t) for t in regular.tensors]
                write = lambda kg: self._write_indexed(rank, kg[0], kg[1], planner, tensors)  # noqa: E731
            else:
                write = lambda kg: self._write_file(rank, kg[0], kg[1], planner)  # noqa: E731
            if len(groups) <= 1:
                results = [write(kg) for kg in enumerate(groups)]
            else:
                with ThreadPoolExecutor(len(groups), thread_name_prefix="distckpt-write") as pool:
                    results = list(pool.map(write, enumerate(groups)))
        finally:
            if self._encoders is not None:
                self._encoders.shutdown(wait=True, cancel_futures=True)
                self._encoders = None
        flat = [r for rs in results for r in rs]
        self.bytes_written = sum(r.size_in_bytes for r in flat)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(flat)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        if self.on_finish is not None:
            self.on_finish(metadata)

    def storage_meta(self) -> StorageMeta | None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    # -- writing -----------------------------------------------------------------------------------
    def _write_file(self, rank: int, k: int, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        """Write one file; on a transient storage error the whole file is written again (bounded)."""
        name = data_file_name(rank, k)
        if self.incremental is not None:
            path = self.store.join(self.data_dir or self.staging, name)
            write = lambda: self._write_incremental(path, blocks_key(self.incremental.data_id, name), items, planner)  # type: ignore[union-attr]  # noqa: E731
        else:
            path = self.store.join(self.staging, name)
            write = lambda: self._write_file_once(path, name, items, planner)  # noqa: E731
        return self.store.retry.run(write, f"write {self.store.url(path)}", cleanup=lambda: self.store.remove(path))

    def _write_indexed(self, rank: int, k: int, items: list[WriteItem], planner: SavePlanner,
                       tensors: list[RegularTensor]) -> list[WriteResult]:
        """A compact save's data file: the blocks of ``items`` in order, then the file's index
        (`lightning_distckpt.ondisk.layout`): which chunk (tensor number, chunk number) each run of blocks holds, and
        every block's lengths and digest. One `FileWritten` result for the whole file."""
        name = data_file_name(rank, k)
        path = self.store.join(self.staging, name)
        number = {t.key: i for i, t in enumerate(tensors)}
        chunks: list[tuple[int, int]] = []  # (tensor number, chunk number) of each item
        for item in items:
            t = number[item.index.fqn]
            c = tensors[t].chunk_number(tuple(item.index.offset or ()), tuple(item.tensor_data.chunk.sizes))  # type: ignore[union-attr]
            if c is None:
                raise RuntimeError(f"internal error: {item.index.fqn} at {list(item.index.offset or ())} is no chunk "
                                   "of its rule")  # fmt: skip
            chunks.append((t, c))

        def once() -> list[WriteResult]:
            stream = self.store.open_write(path)
            blocks: list[Block] = []
            counts = [0] * len(items)
            try:
                for i, raw_len, data, d in self._encoded(items, planner):
                    stream.write(data)
                    blocks.append(Block(len(data), raw_len, d))
                    counts[i] += 1
                tail = index_tail(name, self.codec.name, [(t, c, n) for (t, c), n in zip(chunks, counts)], blocks)
                stream.write(tail)
            finally:
                stream.close()
            size = sum(b.stored for b in blocks) + len(tail)
            done = FileWritten(name, rank, size, blocks_digest([b.digest for b in blocks] + [digest(tail)]),
                               sum(b.raw for b in blocks), self.codec.name)
            return [WriteResult(index=MetadataIndex(name), size_in_bytes=size, storage_data=done)]

        return self.store.retry.run(once, f"write {self.store.url(path)}", cleanup=lambda: self.store.remove(path))

    def _write_incremental(self, path: str, key: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        """Like `_write_file_once`, but a block whose raw bytes the index confirms (same xxh3, length, codec and
        SHA-256 as a committed block) is referenced where it lies instead of written; the file is created only
        if some block is written. Every block gets its fingerprint (raw xxh3; SHA-256 when computed)."""
        index = self.incremental
        assert index is not None
        stream = None
        offset = 0
        borrowed = 0
        out = []
        try:
            for item in items:
                tensor = planner.resolve_data(item)
                raw = tensor_bytes(tensor)  # type: ignore[arg-type]
                itemsize = tensor.element_size()  # type: ignore[union-attr]
                blocks, refs, fps = [], [], []
                first = offset
                for start in range(0, max(len(raw), 1), self.block_bytes):
                    chunk = raw[start : start + self.block_bytes]
                    raw_xh = digest(chunk)
                    found = index.lookup(raw_xh, len(chunk), self.codec.name) if len(chunk) else []
                    strong = strong_hash(chunk) if found or index.full else ""
                    hit = next((c for c in found if c.strong and c.strong == strong), None)
                    if hit is not None:
                        blocks.append(hit.block)
                        refs.append((hit.key, hit.offset))
                        fps.append((raw_xh, strong))
                        borrowed += hit.block.stored
                        continue
                    data = self.codec.encode(chunk, itemsize)
                    if stream is None:
                        stream = self.store.open_write(path)
                    stream.write(data)
                    d = raw_xh if not self.codec.name else digest(data)
                    blocks.append(Block(len(data), len(chunk), d))
                    refs.append(None)
                    fps.append((raw_xh, strong))
                    offset += len(data)
                any_ref = any(r is not None for r in refs)
                loc = Location(key, first, tuple(blocks), self.codec.name, tuple(refs) if any_ref else (), tuple(fps))
                out.append(WriteResult(index=item.index, size_in_bytes=loc.own_stored, storage_data=loc))
        finally:
            if stream is not None:
                stream.close()
        with self._lock:
            self.bytes_borrowed += borrowed
        return out

    def _encoded(self, items: list[WriteItem], planner: SavePlanner) -> Iterator[tuple[int, int, Any, int]]:
        """(item number, raw length, stored bytes, digest) of every block of ``items``, in order; encoded on
        the encoder pool ahead of the consumer (at most ``2 x pool size`` blocks in flight) when there is one."""

        def blocks() -> Iterator[tuple[int, memoryview, int]]:
            for i, item in enumerate(items):
                tensor = planner.resolve_data(item)
                raw = tensor_bytes(tensor)  # type: ignore[arg-type]
                itemsize = tensor.element_size()  # type: ignore[union-attr]
                for start in range(0, max(len(raw), 1), self.block_bytes):
                    yield i, raw[start : start + self.block_bytes], itemsize

        def encode(chunk: memoryview, itemsize: int) -> tuple[Any, int]:
            data = self.codec.encode(chunk, itemsize)
            return data, digest(data)

        pool = self._encoders
        if pool is None:
            for i, chunk, itemsize in blocks():
                yield (i, len(chunk), *encode(chunk, itemsize))
            return
        ahead: deque[tuple[int, int, ThreadFuture[tuple[Any, int]]]] = deque()
        try:
            for i, chunk, itemsize in blocks():
                ahead.append((i, len(chunk), pool.submit(encode, chunk, itemsize)))
                if len(ahead) >= self._ahead:
                    j, n, fut = ahead.popleft()
                    yield (j, n, *fut.result())
            while ahead:
                j, n, fut = ahead.popleft()
                yield (j, n, *fut.result())
        finally:
            for _, _, fut in ahead:  # an error in between: drop what is still queued
                fut.cancel()

    def _write_file_once(self, path: str, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        stream = self.store.open_write(path)
        offset = 0
        out = []
        blocks: list[list[Block]] = [[] for _ in items]
        try:
            for i, raw_len, data, d in self._encoded(items, planner):
                stream.write(data)
                blocks[i].append(Block(len(data), raw_len, d))
        finally:
            stream.close()
        for item, bs in zip(items, blocks):
            loc = Location(name, offset, tuple(bs), self.codec.name)
            offset += loc.stored
            out.append(WriteResult(index=item.index, size_in_bytes=loc.stored, storage_data=loc))
        return out
