"""Balanced reads of replicated tensors: every byte is read from storage by one rank, then broadcast.

When every rank loads the same plain tensor (DDP's model and optimizer state, Adam step counters, callback
state), reading it on every rank multiplies the storage traffic by the world size. Instead the rows of
those tensors are cut into chunks, the chunks are dealt to ranks by bytes (largest first), each rank reads
(and verifies, and decodes) only its chunks straight into the target rows, and each rank's rows are then
broadcast to the others over the checkpoint's process group, one packed buffer per rank.

The work runs in rounds: while the chunks of one round are broadcast (asynchronously, on a second gloo
group), the next round is read. Only CPU tensors are balanced (the broadcast runs on gloo); others are
read by every rank. Collective: every rank must pass the same keys with the same shapes.

How ranks share what they read is ``DistCheckpointIO(same_host_reads=...)`` (`lightning_distckpt.engine.loading`):
these broadcasts; cross-memory attach inside a host (`lightning_distckpt.engine.attach`), with sends between
partners across hosts (`lightning_distckpt.engine.across_hosts`); or the shared-memory segments of
:class:`SharedSegments` (in /dev/shm), into which each rank of a host reads its chunks and out of which every
rank of the host copies all of them.
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_distckpt.parallel.comm import Comm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Chunk:
    key: str
    start: int
    rows: int
    nbytes: int


def _chunks(key: str, t: torch.Tensor, chunk_bytes: int, stored: list[tuple[int, int]] | None) -> list[_Chunk]:
    """Row ranges of ``t`` to deal out: the stored chunks' own row ranges when known (so that no rank reads
    part of a block another rank needs too), else ranges of about ``chunk_bytes``."""
    if t.dim() == 0:
        return [_Chunk(key, 0, 1, t.element_size())]
    if t.numel() == 0:
        return []
    row = t[0].numel() * t.element_size()
    if stored:
        return [_Chunk(key, s, n, n * row) for s, n in sorted(stored) if n > 0]
    step = max(1, chunk_bytes // max(1, row))
    return [_Chunk(key, s, min(step, t.shape[0] - s), min(step, t.shape[0] - s) * row) for s in range(0, t.shape[0], step)]


def is_balanceable(t: object) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous()


def deal(targets: dict[str, object], comm: Comm, layout: dict[str, list[tuple[int, int]]] | None = None,
         places: dict[tuple[str, int], tuple[str, int]] | None = None,
         chunk_bytes: int = 16 << 20, ranks: list[int] | None = None) -> list[list[_Chunk]]:
    """Every rank's chunks of the balanceable targets, in about equal bytes (over ``ranks`` only, when
    given: the others get none).

    ``layout`` gives each key's stored row ranges, so that no block is read by two ranks. The chunks are
    taken in file order (``places``: where each stored chunk starts, file and offset; chunks without a place
    go last, in key order) and cut into ``world`` runs of about equal bytes (a chunk goes to the rank whose
    share holds its middle byte): each rank then reads long adjacent ranges, one stream each.
    """
    layout, places = layout or {}, places or {}
    chunks = [c for k, t in targets.items() if is_balanceable(t) for c in _chunks(k, t, chunk_bytes, layout.get(k))]
    last = ("\uffff", 0)
    chunks.sort(key=lambda c: (places.get((c.key, c.start), last), c.key, c.start))
    owned: list[list[_Chunk]] = [[] for _ in range(comm.world_size)]
    ranks = list(range(comm.world_size)) if ranks is None else ranks
    n = len(ranks)
    total, done = sum(c.nbytes for c in chunks) or 1, 0
    for c in chunks:
        owned[ranks[min(n - 1, (2 * done + c.nbytes) * n // (2 * total))]].append(c)
        done += c.nbytes
    return owned


def chunk_bytes(targets: dict[str, object], c: _Chunk) -> torch.Tensor:
    """Chunk ``c``'s rows of its (contiguous CPU) target, as a flat uint8 view."""
    t = targets[c.key]
    assert isinstance(t, torch.Tensor)
    return (t if t.dim() == 0 else t.narrow(0, c.start, c.rows)).reshape(-1).view(torch.uint8)


def rounds(owned: list[list[_Chunk]], n: int) -> list[list[list[_Chunk]]]:
    """Split every rank's chunks into ``n`` rounds of about equal bytes: ``out[round][rank]``."""
    out: list[list[list[_Chunk]]] = [[[] for _ in owned] for _ in range(n)]
    for r, chunks in enumerate(owned):
        total = sum(c.nbytes for c in chunks) or 1
        done = 0
        for c in chunks:
            out[min(n - 1, done * n // total)][r].append(c)
            done += c.nbytes
    return out


class Broadcaster:
    """Issues the broadcasts of each round without waiting for them (on ``comm.bulk`` when there is one,
    so that the next round's reads, which coordinate on ``comm.group``, overlap with them)."""

    def __init__(self, targets: dict[str, object], comm: Comm, pack_below: int = 1 << 20) -> None:
        self.targets, self.comm, self.pack_below = targets, comm, pack_below
        self.group = comm.bulk if comm.bulk is not None else comm.group
        self.pending: list[tuple[Any, list[torch.Tensor] | None, torch.Tensor | None]] = []
        self.received = 0

    def _view(self, c: _Chunk) -> torch.Tensor:
        return chunk_bytes(self.targets, c)

    def send(self, owned: list[list[_Chunk]]) -> None:
        rank = self.comm.rank
        for src, chunks in enumerate(owned):
            global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
            small = []
            for c in chunks:
                v = self._view(c)
                if c.nbytes < self.pack_below:
                    small.append(v)
                    continue
                self.pending.append((dist.broadcast(v, src=global_src, group=self.group, async_op=True), None, None))
                self.received += c.nbytes if rank != src else 0
            if small:
                total = sum(v.numel() for v in small)
                buf = torch.cat(small) if rank == src else torch.empty(total, dtype=torch.uint8)
                work = dist.broadcast(buf, src=global_src, group=self.group, async_op=True)
                self.pending.append((work, small if rank != src else None, buf))
                self.received += total if rank != src else 0

    def wait(self) -> int:
        """Wait for every broadcast issued; returns the bytes this rank received."""
        for work, small, buf in self.pending:
            work.wait()
            if small is not None and buf is not None:
                pos = 0
                for v in small:
                    v.copy_(buf[pos : pos + v.numel()])
                    pos += v.numel()
        self.pending.clear()
        return self.received


# ---- same-host sharing through shared memory ---------------------------------------------------------
SHM_DIR = "/dev/shm"
_SHM_PREFIX = "distckpt-"
_ALIGN = 64


def shm_dir() -> str:
    """Where segments go: ``DISTCKPT_SHM_DIR`` if set, else /dev/shm."""
    return os.environ.get("DISTCKPT_SHM_DIR") or SHM_DIR


def node_id() -> str:
    """This process's host, as balanced reads group ranks: ``DISTCKPT_NODE_ID`` if set (tests simulate
    several nodes on one machine with it), else the host name."""
    import socket

    return os.environ.get("DISTCKPT_NODE_ID") or socket.gethostname()


def _pid_namespace() -> str:
    """This process's PID namespace, as a name part: a pid means something only inside its namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def segment_name(token: str, rank: int) -> str:
    """A segment's file name: ``distckpt-<pid namespace>-<token>-<pid>-<rank>``."""
    return f"{_SHM_PREFIX}{_pid_namespace()}-{token}-{os.getpid()}-{rank}"


def clean_stale_segments(directory: str | None = None) -> int:
    """Remove shared-memory segments of loads whose creating process is gone (a crash between creating
    and unlinking one). Returns how many were removed. Safe to call at any time on any rank: only segments
    created in this process's PID namespace are judged (whether a pid is alive means nothing outside it; a job
    in another namespace that shares the directory keeps its segments)."""
    removed = 0
    directory = directory or shm_dir()
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    mine = f"{_SHM_PREFIX}{_pid_namespace()}-"
    for name in names:
        if not name.startswith(mine):
            continue
        try:
            pid = int(name[len(mine):].split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedSegments:
    """One load's shared-memory segments on this host: each local rank's chunks, read once, mapped by all.

    Collective over ``comm`` (every rank of the job constructs it, in the same order of calls). Each rank
    creates a file ``/dev/shm/`` `segment_name` of exactly its chunks' bytes (allocated with
    ``posix_fallocate``, so a full /dev/shm is an error now, never a SIGBUS later), the ranks of a host map
    each other's files, and each creator unlinks its file as soon as everyone mapped it: from then on the
    memory is freed by the kernel when the last process unmaps it or exits, however the load ends. A rank
    whose collective fails (another rank died) unlinks its file before it raises; a rank killed in between
    leaves a file that :func:`clean_stale_segments` removes (every balanced load calls it first, whatever its
    ``same_host_reads``).

    ``ok`` is False on every rank when any rank could not set up its segment; then nothing is mapped and
    the caller falls back to broadcasts.
    """

    def __init__(self, comm: Comm, owned: list[list[_Chunk]], local_ranks: list[int], directory: str | None = None) -> None:
        directory = directory or shm_dir()
        self.comm, self.local_ranks, self.directory = comm, local_ranks, directory
        self.places: dict[tuple[str, int], tuple[int, int]] = {}  # (key, start) -> (owner rank, byte offset)
        sizes = {}
        for r in local_ranks:
            pos = 0
            for c in owned[r]:
                self.places[(c.key, c.start)] = (r, pos)
                pos += (c.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
            sizes[r] = pos
        token = comm.broadcast(uuid.uuid4().hex[:12])
        self._maps: dict[int, mmap.mmap] = {}
        self._views: dict[int, torch.Tensor] = {}
        self.path = os.path.join(directory, segment_name(token, comm.rank))
        error = ""
        clean_stale_segments(directory)
        try:
            self._create(sizes[comm.rank])
        except OSError as e:
            error = f"{self.path}: {e}"
        try:
            created = comm.all_gather((error, self.path))  # one collective: every rank's outcome and name
            errors = [e for e, _ in created]
            self.ok = not any(errors)
            if self.ok:
                try:
                    for r in local_ranks:
                        if r != comm.rank:
                            self._map(r, created[r][1], sizes[r])
                except OSError as e:
                    error = f"{created[r][1]}: {e}"
            # everyone mapped what it needs (or gave up): the names can go; this gather is also that barrier
            mapped = comm.all_gather(error)
        except BaseException:  # a collective failed (another rank is gone): leave no file behind
            self._unlink()
            self.close()
            raise
        self.ok = self.ok and not any(mapped)
        errors = errors + mapped
        self._unlink()
        if not self.ok:
            self.close()
            bad = next((e for e in errors if e), "")
            log.warning("balanced reads fall back to broadcasts: shared memory unavailable (%s)", bad or "on another rank")

    def _create(self, size: int) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
                self._maps[self.comm.rank] = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self._unlink()
            raise
        os.close(fd)

    def _map(self, rank: int, path: str, size: int) -> None:
        if not size:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            self._maps[rank] = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _bytes(self, rank: int) -> torch.Tensor:
        v = self._views.get(rank)
        if v is None:
            with warnings.catch_warnings():  # read-only mappings of the other ranks: only ever read
                warnings.simplefilter("ignore", UserWarning)
                v = self._views[rank] = torch.frombuffer(self._maps[rank], dtype=torch.uint8)
        return v

    def copy_into(self, c: _Chunk, target: torch.Tensor) -> None:
        """Copy chunk ``c`` from its reader's segment into the same rows of ``target`` (a contiguous CPU tensor),
        as one single-threaded memory copy (no intra-op thread team: on a busy machine waking one for each
        copy costs more than the copy)."""
        rank, pos = self.places[(c.key, c.start)]
        dst = target if target.dim() == 0 else target.narrow(0, c.start, c.rows)
        out = dst.reshape(-1).view(torch.uint8).numpy()
        out[...] = memoryview(self._maps[rank])[pos : pos + c.nbytes]

    def view(self, c: _Chunk, like: torch.Tensor) -> torch.Tensor:
        """Chunk ``c`` of the tensor ``like`` in its reader's segment (a tensor of the chunk's rows)."""
        rank, pos = self.places[(c.key, c.start)]
        shape = like.shape if like.dim() == 0 else (c.rows, *like.shape[1:])
        return self._bytes(rank)[pos : pos + c.nbytes].view(like.dtype).reshape(shape)

    def close(self) -> None:
        """Unmap everything (the memory goes once every rank of the host has closed or exited)."""
        self._views.clear()
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                pass
        self._maps.clear()
