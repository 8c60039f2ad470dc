"""Copies committed checkpoints to replica targets, in the background, every rank doing its share.

After a checkpoint commits on the primary, `Replicator.submit()` queues it on every rank. A background
thread per rank then copies, for each replica target, the data files assigned to that rank (round-robin
over the manifest's files), checking every block against the primary's metadata as it goes. The ranks
agree over their own gloo process group (separate from the save's), and rank 0 copies the documents,
moves the staging directory into place and writes the replica's own commit marker, after checking the
replica's files against the manifest. A failed copy is logged, counted, retried later, and never fails
training. Not used when there are no replicas.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.cleanup import Heartbeat, publish
from lightning_distckpt.catalog.documents import open_checkpoint, read_document, read_manifest, source_of
from lightning_distckpt.catalog.blocks import borrows_bytes
from lightning_distckpt.catalog.verify import blocks_by_file, is_borrowed, verify_file
from lightning_distckpt.errors import (
    CorruptCheckpointError,
    DestinationExistsError,
    DistCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
)
from lightning_distckpt.faults import crash_point
from lightning_distckpt.storage import LocalStore, Source, StorageLike
from lightning_distckpt.storage.base import read_at, read_blocks

if TYPE_CHECKING:  # torch.distributed: only replication during training needs it, not `copy_checkpoint`
    from lightning_distckpt.parallel.comm import Comm

log = logging.getLogger(__name__)


@dataclass
class ReplicaStats:
    """Counters for logs and metrics (rank 0's are authoritative).

    Updated by the training thread (``submit``) and the replication thread: change them only through
    `update()` (under the lock), read a consistent set with `snapshot()`.
    """

    copied: int = 0
    failures: int = 0
    pending: int = 0
    last_error: str = ""
    bytes_copied: int = 0
    by_target: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, *, copied: int = 0, failures: int = 0, pending: int = 0, bytes_copied: int = 0,
               target: str | None = None, last_error: str | None = None) -> None:
        """Add the given deltas atomically (and set ``last_error``, count one more copy to ``target``)."""
        with self.lock:
            self.copied += copied
            self.failures += failures
            self.pending += pending
            self.bytes_copied += bytes_copied
            if target is not None:
                self.by_target[target] = self.by_target.get(target, 0) + 1
            if last_error is not None:
                self.last_error = last_error

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"copied": self.copied, "failures": self.failures, "pending": self.pending,
                    "last_error": self.last_error, "bytes_copied": self.bytes_copied, "by_target": dict(self.by_target)}


@dataclass
class _Job:
    name: str
    primary: str
    attempt: int = 0


def copy_file(src: Source, dst: Source, name: str, blocks: list[tuple[int, ondisk.Block]] | None, size: int,
              progress: Callable[[int], None] | None = None, partial: bool = False) -> int:
    """Copy one file, verifying each block (data files) or the whole (documents); returns its digest.

    A file of the block store (``name`` a block-store key) is copied into the destination root's block store,
    through a temporary name renamed into place when complete (a file there under its own name is always whole).
    With ``partial`` (a file another save wrote, of which the checkpoint knows only the blocks it borrows) the blocks
    given are verified and the bytes between them copied as they are; the digest returned is then 0 (the file's
    digest covers blocks the checkpoint does not know)."""
    target = dst.file(name)
    in_store = "/" in name
    if in_store:
        dst.store.makedirs(dst.store.parent(target))
        final, target = target, dst.store.join(dst.store.parent(target), f".{dst.store.basename(target)}.part-{uuid.uuid4().hex[:12]}")
    reader = src.store.open_read(src.file(name))
    writer = dst.store.open_write(target)
    try:
        if blocks is None:
            data = reader.read()
            writer.write(data)
            if progress:
                progress(len(data))
            result = ondisk.digest(data)
        elif partial:
            result = _copy_partial(reader, writer, src.url(name), blocks, size, progress)
        else:
            result = _copy_blocks(reader, writer, src.url(name), blocks, size, progress)
    except BaseException:
        reader.close()
        writer.close()
        if in_store:
            dst.store.remove(target)
        raise
    reader.close()
    writer.close()
    if in_store:
        if dst.store.exists(final):  # another copy put it there meanwhile: keep that one
            dst.store.remove(target)
        else:
            dst.store.rename(target, final)
    return result


def _copy_blocks(reader: Any, writer: Any, url: str, blocks: list[tuple[int, ondisk.Block]], size: int,
                 progress: Callable[[int], None] | None) -> int:
    pos = 0
    for offset, b in blocks:
        if offset != pos:
            raise CorruptCheckpointError(f"{url}: blocks are not contiguous at byte {pos}")
        pos += b.stored
    digests, pos = [], 0
    try:
        for (offset, b), data in zip(blocks, read_blocks(reader, [b.stored for _, b in blocks], url)):
            if ondisk.digest(data) != b.digest:
                raise CorruptCheckpointError(f"{url}: block at byte {offset} fails its checksum; not copied")
            writer.write(data)
            if progress:
                progress(len(data))
            digests.append(b.digest)
            pos += b.stored
    except EOFError as e:  # a file shorter than its blocks
        raise CorruptCheckpointError(f"{e}; not copied") from None
    if pos != size:
        raise CorruptCheckpointError(f"{url}: blocks cover {pos} of {size} bytes")
    return ondisk.blocks_digest(digests)


def _copy_partial(reader: Any, writer: Any, url: str, blocks: list[tuple[int, ondisk.Block]], size: int,
                  progress: Callable[[int], None] | None) -> int:
    """Copy the ``size`` bytes of a file of which only ``blocks`` are known: those are verified, the rest copied."""
    pieces: list[tuple[int, int, ondisk.Block | None]] = []
    pos = 0
    for offset, b in blocks:
        if offset < pos or offset + b.stored > size:
            raise CorruptCheckpointError(f"{url}: a borrowed block at byte {offset} overlaps another or the end")
        pieces += [(pos, offset - pos, None)] if offset > pos else []
        pieces.append((offset, b.stored, b))
        pos = offset + b.stored
    pieces += [(pos, size - pos, None)] if size > pos else []
    for offset, n, b in pieces:
        for start in range(offset, offset + n, 64 << 20):
            buf = memoryview(bytearray(min(64 << 20, offset + n - start) if b is None else n))
            try:
                read_at(reader, start, buf, url)
            except EOFError as e:
                raise CorruptCheckpointError(f"{e}; not copied") from None
            if b is not None and ondisk.digest(buf) != b.digest:
                raise CorruptCheckpointError(f"{url}: block at byte {offset} fails its checksum; not copied")
            writer.write(buf)
            if progress:
                progress(len(buf))
            if b is not None:
                break
    return 0


def present(dst: Source, name: str, size: int) -> bool:
    """Whether the destination already has the block-store file ``name`` complete (files of the block store are
    renamed into place only when whole and never change: its size is the check). Background replication trusts
    that (a load checks every block anyway, and falls back to the primary); `copy_checkpoint` reads the blocks."""
    if "/" not in name:
        return False
    try:
        entry = dst.store.info(dst.file(name))
    except FileNotFoundError:
        return False
    return entry.type == "file" and entry.size == size


class Replicator:
    """Background replication of committed checkpoints to ``targets`` (root URLs), collective over ``comm``.

    Every rank must create it (same targets, same order of ``submit`` calls). ``after_replica_commit`` is
    called on rank 0 with (target root, checkpoint name) after each replica commits (retention hooks in).
    """

    def __init__(self, targets: list[str], storage: StorageLike, comm: Comm, max_attempts: int = 3,
                 retry_delay_s: float = 5.0, after_replica_commit: Callable[[str, str], None] | None = None) -> None:
        self.targets = list(targets)
        self.storage = storage
        self.comm = comm
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.after_replica_commit = after_replica_commit
        self.stats = ReplicaStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="distckpt-replicate", daemon=True)
        self._thread.start()

    def submit(self, name: str, primary_url: str) -> None:
        """Queue a committed checkpoint for replication (non-blocking; call on every rank, same order)."""
        self.stats.update(pending=1)
        self._queue.put(_Job(name, primary_url))

    def close(self, timeout_s: float = 600.0) -> bool:
        """Finish the queued copies (bounded by ``timeout_s``); True if all finished."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("replication still running after %.0f s; %d checkpoint(s) not replicated", timeout_s,
                        self.stats.snapshot()["pending"])  # fmt: skip
            return False
        return True

    # -- background thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            ok, error = self._replicate(job)
            if ok:
                self.stats.update(pending=-1, copied=1)
                continue
            self.stats.update(failures=1, last_error=error)
            job.attempt += 1
            if job.attempt < self.max_attempts:
                log.warning("replication of %s failed (attempt %d of %d), retrying in %.0f s: %s", job.name,
                            job.attempt, self.max_attempts, self.retry_delay_s, error)  # fmt: skip
                time.sleep(self.retry_delay_s)
                self._queue.put(job)
            else:
                self.stats.update(pending=-1)
                log.error("replication of %s given up after %d attempts: %s", job.name, job.attempt, error)

    def _replicate(self, job: _Job) -> tuple[bool, str]:
        """One attempt at copying ``job`` to every target; the same outcome on every rank."""
        errors = []
        for target in self.targets:
            try:
                self._replicate_to(job, target)
            except Exception as e:  # noqa: BLE001 - replication never fails training
                errors.append(f"{target}: {type(e).__name__}: {e}")
        return (not errors), "; ".join(errors)

    def _replicate_to(self, job: _Job, target: str) -> None:
        rank = self.comm.rank
        error = ""
        already = False
        beat: Heartbeat | None = None
        try:
            primary = open_checkpoint(source_of(job.primary, self.storage))
            dst_root = source_of(target, self.storage)
            final = dst_root.store.join(dst_root.path, job.name)
            token = f"{ondisk.digest(ondisk.dumps(primary.manifest.to_json())):016x}"[:12]
            staging = Source(dst_root.store, dst_root.store.join(dst_root.path, ondisk.staging_name(job.name, "r" + token)))
            if rank == 0:
                try:  # already replicated, with this very manifest?
                    already = read_manifest(Source(dst_root.store, final)).to_json() == primary.manifest.to_json()
                except DistCheckpointError:
                    already = False
                if not already:  # an older or broken copy under the same name stays until the new one commits
                    staging.store.remove(staging.path, recursive=True)  # a crashed earlier attempt
                    staging.store.makedirs(staging.path)
                    beat = Heartbeat(staging.store, staging.path)
                    if primary.manifest.data_id:  # the target's block directories it relies on stay meanwhile
                        staging.store.write_bytes(staging.store.join(staging.path, ondisk.BORROWS),
                                                  borrows_bytes(primary.manifest.data_ids()))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = f"rank {rank}: {type(e).__name__}: {e}"
        try:
            self._agree(error)
            if self.comm.broadcast(already):
                return
            self._copy_to(job, target, primary, staging, final, token, beat)
        finally:
            if beat is not None:
                beat.stop()
        if rank == 0 and self.after_replica_commit is not None:
            try:
                self.after_replica_commit(target, job.name)
            except Exception:  # noqa: BLE001
                log.exception("retention on replica %s failed", target)

    def _copy_to(self, job: _Job, target: str, primary: Any, staging: Source, final: str, token: str,
                 beat: Heartbeat | None) -> None:
        rank, world = self.comm.rank, self.comm.world_size
        error = ""
        copied = 0
        blocks = blocks_by_file(primary)
        data_files = sorted(n for n in primary.manifest.files if n not in (ondisk.METADATA, ondisk.STATE))
        try:
            for i, name in enumerate(data_files):
                if i % world == rank:
                    info = primary.manifest.files[name]
                    if present(staging, name, info["size"]):
                        continue  # the target has this file of the block store already: only what it lacks moves
                    partial = is_borrowed(primary, name)
                    got = copy_file(primary.source, staging, name, blocks.get(name, []), info["size"], partial=partial)
                    if not partial and got != info["xxh3"]:
                        raise CorruptCheckpointError(f"{primary.source.url(name)}: digest differs from its manifest")
                    copied += info["size"]
        except Exception as e:  # noqa: BLE001
            error = f"rank {rank}: {type(e).__name__}: {e}"
        self._agree(error)
        if rank == 0:
            try:
                for name in (ondisk.METADATA, ondisk.STATE):
                    info = primary.manifest.files[name]
                    if copy_file(primary.source, staging, name, None, info["size"]) != info["xxh3"]:
                        raise CorruptCheckpointError(f"{primary.source.url(name)}: digest differs from its manifest")
                sizes = _sizes(staging, primary.manifest)
                for name, info in primary.manifest.files.items():
                    if sizes.get(name) != info["size"]:
                        raise CorruptCheckpointError(f"{staging.url(name)}: copy has {sizes.get(name)} bytes, "
                                                     f"expected {info['size']}")  # fmt: skip
                manifest_bytes = ondisk.dumps(primary.manifest.to_json())
                staging.store.write_bytes(staging.store.join(staging.path, ondisk.MANIFEST), manifest_bytes)
                staging.store.remove(staging.store.join(staging.path, ondisk.BORROWS))  # the manifest names them now
                if beat is not None:
                    beat.stop()
                publish(staging.store, staging.path, final, manifest_bytes, "r" + token)  # replaces an old copy
            except Exception as e:  # noqa: BLE001
                error = f"rank 0: {type(e).__name__}: {e}"
                try:
                    staging.store.remove(staging.path, recursive=True)
                except Exception as ce:  # noqa: BLE001 - the failure above is what is reported
                    log.warning("could not remove the staging directory %s of a failed replication (%s: %s); "
                                "clean-up at the next start or `distckpt gc` removes it", staging.url(),
                                type(ce).__name__, ce)  # fmt: skip
        self._agree(error)
        self.stats.update(bytes_copied=copied, target=target)

    def _agree(self, error: str) -> None:
        """All ranks learn every rank's error; raise the same failure everywhere if any rank failed."""
        errors = [e for e in self.comm.all_gather(error) if e]
        if errors:
            raise DistCheckpointError("; ".join(errors))


def _sizes(copy: Source, manifest: ondisk.Manifest) -> dict[str, int]:
    """The sizes of the files of ``copy`` that ``manifest`` lists (documents in its directory, data files in its
    root's block store too); a file that is missing or not a regular file is left out."""
    sizes = {e.name: e.size for e in copy.store.listdir(copy.path) if e.type == "file"}
    for name in manifest.files:
        if "/" in name:
            try:
                entry = copy.store.info(copy.file(name))
            except FileNotFoundError:
                continue
            if entry.type == "file":
                sizes[name] = entry.size
    return sizes


def describe(stats: ReplicaStats) -> dict[str, Any]:
    snap = stats.snapshot()
    return {"copied": snap["copied"], "failures": snap["failures"], "pending": snap["pending"]}


def copy_checkpoint(src_url: str, dst_url: str, storage: StorageLike = None,
                    progress: Callable[[int], None] | None = None) -> ondisk.Manifest:
    """Copy one committed checkpoint to ``dst_url`` (any store to any store), in this process, verified.

    Every block is checked against the source's checksums as it is copied; the copy is committed (renamed
    into place, its own marker written, `lightning_distckpt.catalog.publish()`) only when complete.
    Resumable: an interrupted copy leaves a staging directory named after the source's manifest, and the
    next call keeps the files there that already verify; a copy killed between its rename and its marker
    (``dst_url`` holds exactly the source's manifest, no marker) is finished by writing the marker after its
    files' sizes are checked. Refuses to overwrite any other existing directory at ``dst_url``.
    """
    src = open_checkpoint(source_of(src_url, storage))
    dst = source_of(dst_url, storage)
    store = dst.store
    if within(dst, src.source):
        raise DestinationExistsError(f"{dst.url()}: lies inside the checkpoint it copies ({src.source.url()}); copy it "
                                     "elsewhere (removing the checkpoint would remove the copy too)")  # fmt: skip
    manifest_bytes = ondisk.dumps(src.manifest.to_json())
    if store.exists(dst.path):
        if _finish_interrupted(dst, src.manifest, manifest_bytes):
            return src.manifest
        raise DestinationExistsError(f"{dst.url()}: already exists; remove it first or copy elsewhere")
    parent, name = store.parent(dst.path), store.basename(dst.path)
    if store.exists(parent) and not store.isdir(parent):
        raise NotACheckpointError(f"{dst.url()}: {store.url(parent)} is a file, not a directory to copy into")
    token = f"c{ondisk.digest(manifest_bytes):016x}"[:13]
    staging = Source(store, store.join(parent, ondisk.staging_name(name, token)))
    _real_dir_or_absent(staging)
    store.makedirs(staging.path)
    beat = Heartbeat(store, staging.path)
    try:
        if src.manifest.data_id:  # the destination's block directories this copy relies on stay meanwhile
            store.write_bytes(store.join(staging.path, ondisk.BORROWS), borrows_bytes(src.manifest.data_ids()))
        done = {e.name: e.size for e in store.listdir(staging.path) if e.type == "file"}
        blocks = blocks_by_file(src)
        for fname, info in sorted(src.manifest.files.items()):
            kind = None if fname in (ondisk.METADATA, ondisk.STATE) else blocks.get(fname, [])
            partial = is_borrowed(src, fname)
            there = present(staging, fname, info["size"])
            if there:  # in the destination's block store: the blocks this checkpoint uses are read and checked
                report = verify_file(staging, fname, info, kind or [], partial=True)
                if not report.ok:
                    raise CorruptCheckpointError(f"{staging.url(fname)}: the destination's block store holds this file "
                                                 f"already, damaged ({report.problem}); not copied (distckpt verify "
                                                 "finds the destination's checkpoints that use it)")  # fmt: skip
            if there or (
                    done.get(fname) == info["size"] and verify_file(staging, fname, info, kind or []).ok):
                if progress:
                    progress(info["size"])
                continue  # the destination has it (block store), or it was copied completely before an interruption
            got = copy_file(src.source, staging, fname, kind, info["size"], progress, partial=partial)
            if not partial and got != info["xxh3"]:
                raise CorruptCheckpointError(f"{src.source.url(fname)}: digest differs from its manifest; not copied")
            crash_point("copy:file")
        store.write_bytes(store.join(staging.path, ondisk.MANIFEST), manifest_bytes)
        store.remove(store.join(staging.path, ondisk.BORROWS))
    finally:
        beat.stop()
    publish(store, staging.path, dst.path, manifest_bytes, token)
    return src.manifest


def within(inner: Source, outer: Source) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (local paths after resolving links; other stores by URL)."""
    if type(inner.store) is not type(outer.store):
        return False
    if isinstance(inner.store, LocalStore):
        a, b, sep = os.path.realpath(inner.path), os.path.realpath(outer.path), os.sep
    else:
        a, b, sep = inner.url().rstrip("/"), outer.url().rstrip("/"), "/"
    return a == b or a.startswith(b + sep)


def _real_dir_or_absent(staging: Source) -> None:
    """Refuse to resume into a staging "directory" that is a link (files would land wherever it points) or a file."""
    try:
        entry = staging.store.info(staging.path)
    except FileNotFoundError:
        return
    if entry.type != "dir":
        raise UnsafeCheckpointError(f"{staging.url()}: the staging directory of this copy is {entry.described}, not a "
                                    "directory; refused (remove it to copy)")


def _finish_interrupted(dst: Source, manifest: ondisk.Manifest, manifest_bytes: bytes) -> bool:
    """Commit ``dst`` if it is this very copy, killed after its rename and before its marker: no marker, the
    same manifest, every file present with its size. False for anything else (left untouched)."""
    store = dst.store
    try:
        if store.info(dst.path).type != "dir" or store.exists(store.join(dst.path, ondisk.MARKER)):
            return False
        if read_document(dst, ondisk.MANIFEST) != manifest_bytes:
            return False
        sizes = _sizes(dst, manifest)
    except (OSError, DistCheckpointError):
        return False
    if any(sizes.get(n) != f["size"] for n, f in manifest.files.items()):
        return False
    store.write_bytes(store.join(dst.path, ondisk.MARKER), ondisk.marker_bytes(manifest_bytes))
    log.warning("%s: finished a copy that was interrupted before its commit marker", dst.url())
    return True
