"""Compact checkpoints (metadata version 3): the data files' indexes, read and verified.

A compact ``metadata.json`` describes tensors by rule (`lightning_distckpt.ondisk.layout`); where a chunk's blocks
lie, and their digests, are in the index at the end of the data file that holds it. This module reads those
indexes: each one is verified against the file's digest in the manifest before anything in it is used
(invariant 3), and a copy whose index fails is passed over for the next copy that has the file.

Not collective. `Indexes` is thread-safe (reader threads share one).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from lightning_distckpt import ondisk
from lightning_distckpt.errors import CorruptCheckpointError, DistCheckpointError
from lightning_distckpt.storage import Source
from lightning_distckpt.storage.base import read_at


def check_layout_files(layout: ondisk.Layout, manifest: ondisk.Manifest, where: str) -> None:
    """Every data file the layout names is listed in the manifest, with room for at least its trailer
    (O(files)); the indexes themselves are read when a file is read or verified."""
    files = manifest.files
    for _, name in layout.all_files():
        info = files.get(name)
        if info is None:
            raise CorruptCheckpointError(f"{where}: data file {name!r} is not listed in the manifest")
        if info["size"] < ondisk.layout.TRAILER:
            raise CorruptCheckpointError(f"{where}: data file {name!r} is too small to hold its block index")


def read_tail(source: Source, name: str, size: int) -> bytes:
    """The tail (index + trailer) of data file ``name`` of ``size`` bytes (as the manifest lists it): the trailer
    first, then the index it announces. ``CorruptCheckpointError`` if the trailer is malformed; ``OSError`` /
    ``EOFError`` from the store."""
    url = source.url(name)
    with source.store.open_read(source.store.join(source.path, name)) as f:
        trailer = bytearray(ondisk.layout.TRAILER)
        read_at(f, size - len(trailer), memoryview(trailer), url)
        n = ondisk.tail_length(bytes(trailer), size, url)
        tail = bytearray(n)
        read_at(f, size - n, memoryview(tail), url)
    return bytes(tail)


def read_index(source: Source, layout: ondisk.Layout, manifest: ondisk.Manifest, w: int, name: str) -> ondisk.FileIndex:
    """The verified index of rank ``w``'s data file ``name`` in ``source``."""
    info = manifest.files.get(name)
    if info is None:
        raise CorruptCheckpointError(f"{source.url(ondisk.METADATA)}: data file {name!r} is not listed in the manifest")
    tail = read_tail(source, name, info["size"])
    return ondisk.parse_index(tail, name, w, layout, info["size"], info["xxh3"], source.url(name))


def read_index_from(sources: Sequence[Source], layout: ondisk.Layout, manifest: ondisk.Manifest, w: int,
                    name: str) -> ondisk.FileIndex:
    """`read_index` from the first source whose copy verifies; if none does, a `CorruptCheckpointError` naming
    what each copy got wrong."""
    problems = []
    for source in sources:
        try:
            return read_index(source, layout, manifest, w, name)
        except (DistCheckpointError, OSError, EOFError) as e:
            problems.append(f"{type(e).__name__}: {e}")
    raise CorruptCheckpointError("; ".join(problems) or f"{name}: no copy to read its block index from")


class Indexes:
    """The indexes of a compact checkpoint's data files, read on first use, writer by writer (all the files of a
    rank at once, so that the chunks it wrote are checked to be all there, `ondisk.check_writer`).

    ``location(t, c)`` is where chunk ``c`` of tensor number ``t`` lies. Thread-safe: one lock per writer.
    """

    def __init__(self, layout: ondisk.Layout, manifest: ondisk.Manifest, sources: Sequence[Source]) -> None:
        self.layout, self.manifest, self.sources = layout, manifest, list(sources)
        self._by_writer: dict[int, dict[tuple[int, int], ondisk.FileIndex]] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()
        self.files_read = 0

    def writer(self, w: int) -> dict[tuple[int, int], ondisk.FileIndex]:
        """(tensor number, chunk number) -> the index of the file that holds it, for every chunk rank ``w`` wrote."""
        got = self._by_writer.get(w)
        if got is not None:
            return got
        with self._guard:
            lock = self._locks.setdefault(w, threading.Lock())
        with lock:
            got = self._by_writer.get(w)
            if got is None:
                indexes = [read_index_from(self.sources, self.layout, self.manifest, w, name)
                           for name in self.layout.data_files(w)]  # fmt: skip
                ondisk.check_writer(self.layout, w, indexes, self.sources[0].url(ondisk.METADATA))
                got = {key: ix for ix in indexes for key in ix.entries}
                self.files_read += len(indexes)
                self._by_writer[w] = got
        return got

    def prefetch(self, writers: set[int], threads: int) -> None:
        """Read the indexes of ``writers``' files now, on up to ``threads`` threads (the first error is raised)."""
        todo = sorted(w for w in writers if w not in self._by_writer)
        if len(todo) <= 1 or threads <= 1:
            for w in todo:
                self.writer(w)
            return
        with ThreadPoolExecutor(min(threads, len(todo)), thread_name_prefix="distckpt-index") as pool:
            list(pool.map(self.writer, todo))

    def location(self, t: int, c: int) -> ondisk.Location:
        tensor = self.layout.tensors[t]
        w = tensor.writer(c)
        ix = self.writer(w).get((t, c))
        if ix is None:  # check_writer makes this unreachable for a valid layout; kept as a clear error
            raise CorruptCheckpointError(f"{self.sources[0].url()}: chunk {c} of tensor {tensor.key!r} is in no data "
                                         f"file of rank {w}")  # fmt: skip
        return ix.location(t, c)


def layout_blocks_by_file(ckpt: object) -> tuple[dict[str, list[tuple[int, ondisk.Block]]], dict[str, str]]:
    """For every data file of a compact checkpoint: its blocks with their offsets, the index tail last (what
    ``verify_file`` and ``copy_file`` check), from its verified index; and, for the files whose index could not be
    read or verified (or whose rank's files do not hold all its chunks), what is wrong."""
    layout, manifest, source = ckpt.metadata.layout, ckpt.manifest, ckpt.source  # type: ignore[attr-defined]
    blocks: dict[str, list[tuple[int, ondisk.Block]]] = {}
    problems: dict[str, str] = {}
    for w in range(layout.world):
        indexes = []
        for name in layout.data_files(w):
            try:
                ix = read_index(source, layout, manifest, w, name)
            except (DistCheckpointError, OSError, EOFError) as e:
                problems[name] = f"block index: {type(e).__name__}: {e}"
                continue
            indexes.append(ix)
            blocks[name] = ix.placed_blocks()
        if len(indexes) == layout.files[w]:
            try:
                ondisk.check_writer(layout, w, indexes, source.url(ondisk.METADATA))
            except CorruptCheckpointError as e:
                for ix in indexes:
                    problems[ix.name] = str(e)
    return blocks, problems


def stored_by_tensor(ckpt: object) -> dict[str, tuple[int, int, set[str]]]:
    """For every tensor of a compact checkpoint: (chunks, stored bytes, data files that hold it), from the data
    files' verified indexes (reads every index: for tools such as ``distckpt info`` and export progress)."""
    layout = ckpt.metadata.layout  # type: ignore[attr-defined]
    indexes = Indexes(layout, ckpt.manifest, [ckpt.source])  # type: ignore[attr-defined]
    out: dict[str, tuple[int, int, set[str]]] = {t.key: (t.count, 0, set()) for t in layout.tensors}
    for w in range(layout.world):
        if not layout.files[w]:
            continue
        for (t, c), ix in indexes.writer(w).items():
            key = layout.tensors[t].key
            offset, i, j = ix.entries[(t, c)]
            count, stored, files = out[key]
            files.add(ix.name)
            out[key] = (count, stored + sum(b.stored for b in ix.blocks[i:j]), files)
    return out
