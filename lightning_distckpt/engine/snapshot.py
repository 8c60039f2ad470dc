"""Host-memory snapshots of a rank's tensors for asynchronous saves, in buffers reused across saves.

Two ways to take one:

* :meth:`Snapshotter.take` copies every local piece now (blocking) and returns pieces backed by host
  buffers that a background writer can use while training mutates the originals.
* :meth:`Snapshotter.start` (pipelined, as in CheckFreq) copies now only the tensors that the next
  forward/backward may change (``now(key)``: buffers such as BatchNorm statistics, callback state) and
  returns a :class:`PendingSnapshot` whose :meth:`~PendingSnapshot.run` copies the rest (parameters and
  optimizer state, which only an optimizer step changes) on another thread while the next step's forward
  and backward run. Whoever is about to change those tensors (the optimizer step) calls
  :meth:`~PendingSnapshot.wait` first. A deferred tensor changed in place before it was copied by anything
  else (e.g. code that swaps a module's weights around a save call and restores them right after it
  returns) is detected through torch's version counter: the save fails on every rank with `CheckpointSaveError` naming it
  instead of writing a mix of two states (``DistCheckpointIO(pipelined_snapshot=False)`` copies at the call).

Buffers are kept per (key, piece) and reused as long as shape and dtype stay the same, so host memory
stays flat over many saves. Device tensors are copied into pinned buffers with ``non_blocking`` on a side
stream that first waits for the work already queued on the current stream (the step that produced the
state), then synchronized once.

Thread safety: one snapshot at a time per :class:`Snapshotter` (the caller waits for the previous save
first); ``start`` runs on the training thread, ``run`` on one other thread, ``wait`` on any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_distckpt.errors import CheckpointSaveError
from lightning_distckpt.parallel.pieces import DEFAULT_CHUNK_BYTES, Piece, pieces, split_rows

#: (key, tag, source piece): one copy to make; tag identifies the piece of the key (index or chunk offsets)
_Copy = tuple[str, Any, Piece]


class PendingSnapshot:
    """A snapshot whose deferred copies have not necessarily run yet.

    ``pieces`` maps every key to its host pieces (the deferred ones are filled by :meth:`run`). ``wait``
    blocks until ``run`` has finished (or failed: the error is raised by ``run`` on its own thread, and
    ``wait`` returns so that training can go on; the save reports it).
    """

    def __init__(self, owner: Snapshotter, pieces_: dict[str, list[Piece]], deferred: list[tuple[Piece, torch.Tensor]],
                 event: Any = None, versions: list[tuple[str, int | None]] | None = None) -> None:
        self.pieces = pieces_
        self._owner = owner
        self._deferred = deferred
        self._versions: list[tuple[str, int | None]] = versions or [("?", None)] * len(deferred)
        self._event = event  # a device event recorded on the training stream (device sources only)
        self._done = threading.Event()
        self.problem = ""  # why the deferred copies cannot be saved (set by run)
        self.copy_s = 0.0  # how long run() took
        self.waited_s = 0.0  # how long callers of wait() were blocked, in total
        if not deferred:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def run(self) -> dict[str, list[Piece]]:
        """Copy the deferred tensors (call once, on the saving thread); returns ``pieces``. Never raises: a
        failed copy or a tensor changed before its copy sets ``problem`` (the caller must not write ``pieces``,
        and in a job every rank must learn of it before any writes: `check()`)."""
        start = time.perf_counter()
        try:
            for (src, dst), (key, version) in zip(self._deferred, self._versions):
                dst.copy_(src.local.detach(), non_blocking=src.local.is_cuda)
                if version is not None and _version(src.local) != version and not self.problem:
                    self.problem = (
                        f"tensor {key!r} was changed in place after the save call returned and before its pipelined "
                        f"snapshot copied it (not by an optimizer step, which waits for the snapshot); the save is "
                        f"abandoned rather than written with a mix of two states. Use "
                        f"DistCheckpointIO(pipelined_snapshot=False) if weights are changed in place around saves")
            self._owner._sync([(None, None, src) for src, _ in self._deferred])
        except Exception as e:  # noqa: BLE001 - reported through `problem`, agreed on by every rank before writing
            self.problem = self.problem or f"the snapshot copy failed: {type(e).__name__}: {e}"
        finally:
            self.copy_s = time.perf_counter() - start
            self._done.set()
        return self.pieces

    def check(self, all_gather: Callable[[str], list[str]]) -> None:
        """After `run()`, on every rank of the save: raise `CheckpointSaveError` on every rank if any rank's
        snapshot has a ``problem`` (``all_gather``: the save's collective over the ranks)."""
        problems = [(r, p) for r, p in enumerate(all_gather(self.problem)) if p]
        if problems:
            raise CheckpointSaveError("; ".join(f"rank {r}: {p}" for r, p in problems))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the deferred copies are done; True unless ``timeout`` ran out first."""
        if self._done.is_set():
            return True
        start = time.perf_counter()
        ok = self._done.wait(timeout)
        self.waited_s += time.perf_counter() - start
        return ok


class Snapshotter:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, Any], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _plan(self, tensors: dict[str, Any], owned: tuple[set[str], set[tuple[str, tuple[int, ...]]]] | None,
              chunk_bytes: int) -> list[_Copy]:
        """The copies a snapshot makes.

        ``owned``: (the keys this rank held, the chunks (key, offsets) it wrote) in the previous save of
        the same structure (from the plan cache). Of a key held then, only the chunks it wrote are copied:
        a rank never writes the chunks of a replicated tensor that another rank writes, so it need not
        snapshot them. A new key is copied whole.
        """
        owned_keys, chunks = owned if owned else (set(), set())
        out: list[_Copy] = []
        for key, value in tensors.items():
            for i, p in enumerate(pieces(value)):
                if key in owned_keys:
                    out += [(key, tuple(o), Piece(v, o, p.global_size)) for o, _, v in split_rows(p, chunk_bytes)
                            if (key, tuple(o)) in chunks]  # fmt: skip
                else:
                    out.append((key, i, p))
        return out

    def _materialize(self, copies: list[_Copy], out: dict[str, list[Piece]]) -> list[tuple[str, Any, Piece, torch.Tensor]]:
        """Buffers for ``copies`` (allocated or reused), appended to ``out`` as pieces; (key, tag, src, buffer)."""
        made = []
        for key, tag, src in copies:
            buf = self._buffer((key, tag), src.local)
            out.setdefault(key, []).append(Piece(buf, src.offsets, src.global_size))
            made.append((key, tag, src, buf))
        return made

    @staticmethod
    def _sync(copies: list[_Copy]) -> None:
        """Wait for the non-blocking device copies just queued (on the current stream)."""
        if any(src.local.is_cuda for _, _, src in copies):
            torch.cuda.current_stream().synchronize()

    def _prune(self, copies: list[_Copy]) -> None:
        used = {(key, tag) for key, tag, _ in copies}
        for stale in set(self._buffers) - used:  # state that disappeared (e.g. a removed parameter)
            del self._buffers[stale]

    def take(self, tensors: dict[str, Any], owned: tuple[set[str], set[tuple[str, tuple[int, ...]]]] | None = None,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, list[Piece]]:
        """Copy ``tensors`` into host buffers now (blocking); returns pieces backed by those buffers."""
        pending = self.start(tensors, owned, chunk_bytes, now=lambda key: True)
        return pending.pieces

    def start(self, tensors: dict[str, Any], owned: tuple[set[str], set[tuple[str, tuple[int, ...]]]] | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, now: Callable[[str], bool] = lambda key: True) -> PendingSnapshot:
        """Copy the tensors whose key satisfies ``now`` (blocking); the rest is copied by the returned
        snapshot's :meth:`~PendingSnapshot.run`. Call on the training thread."""
        copies = self._plan(tensors, owned, chunk_bytes)
        self._prune(copies)
        out: dict[str, list[Piece]] = {key: [] for key in tensors}
        immediate = [c for c in copies if now(c[0])]
        deferred = [c for c in copies if not now(c[0])]
        for _, _, src, dst in self._materialize(immediate, out):
            dst.copy_(src.local.detach(), non_blocking=src.local.is_cuda)
        self._sync(immediate)
        # buffers of the deferred copies are allocated here, on the training thread: the same allocator arena
        # every save (allocating on the saving thread grew the RSS by a buffer set), and no dict changes later
        made = self._materialize(deferred, out)
        later = [(src, dst) for _, _, src, dst in made]
        versions = [(key, _version(src.local)) for key, _, src, _ in made]  # checked after each deferred copy
        event = None
        if any(src.local.is_cuda for _, _, src in deferred):
            # the side stream's copies must see what the training stream computed before this save
            event = torch.cuda.Event()
            event.record()
        pending = PendingSnapshot(self, out, later, event, versions)
        if event is not None:
            pending.run = _on_side_stream(pending.run, event)  # type: ignore[method-assign]
        return pending

    def _buffer(self, key: tuple[str, Any], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.is_inference():
            pin = like.is_cuda and torch.cuda.is_available()
            with torch.inference_mode(False):  # a save inside inference mode (the Tuner's) must not make a
                # buffer that a later copy outside it cannot write
                buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (shared with its views; bumped by every in-place change), None if untracked."""
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference tensors and some subclasses track none
        return None


def _on_side_stream(run: Callable[[], dict[str, list[Piece]]], event: Any) -> Callable[[], dict[str, list[Piece]]]:
    """``run`` on a new device stream that first waits for ``event`` (recorded on the training stream)."""

    def wrapped() -> dict[str, list[Piece]]:
        stream = torch.cuda.Stream()
        stream.wait_event(event)
        with torch.cuda.stream(stream):
            return run()

    return wrapped
