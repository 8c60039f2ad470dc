"""DistCheckpoint's link to a checkpoint catalog (``DistCheckpoint(catalog="hbase://HOST:PORT/TABLE", run="NAME")``).

What it guarantees:

* **Catalog errors never fail training.** Every call into the catalog is caught, logged and counted
  (:class:`CatalogStats`); registrations that fail because the catalog is unreachable stay in a backlog and are
  retried in order (catch-up) when it answers again; ``ckpt_path="last"``/``"best"`` fall back to listing
  storage when it does not answer.
* **Off the training thread.** The training thread only snapshots the logged metrics and queues a task that
  runs after the checkpoint commits (:meth:`DistCheckpointIO.after_commit`); the rows are written by one
  background thread of this hook ("distckpt-catalog"), on global rank 0 only.
* **Fencing.** At ``fit`` setup, rank 0 takes the run's ownership (a new ``owner_epoch``, in the background
  thread). A job whose epoch is no longer current is refused by the catalog; from then on this hook registers
  nothing and prunes nothing (retention removals are skipped, so a zombie never deletes a checkpoint the
  new owner may use), and it says so in the log at ERROR level.
* **Storage is the source of truth.** A row is used for a resume only after its checkpoint verifies on
  storage (marker naming the row's manifest digest, documents' checksums, data file sizes); a row that fails is
  skipped, reported (``skipped``) and the next one is tried.

Retention with a catalog: a checkpoint is removed as mark the row ``deleting`` (compare-and-set, fenced) →
remove the marker → remove the data → delete the row. While the catalog is unreachable or the run's ownership
is not established, retention removes nothing (it tries again after the next save).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_distckpt import catalog
from lightning_distckpt.catalog.index import (
    CatalogOptions,
    CheckpointIndex,
    check_run,
    entry_from_manifest,
    open_index,
    verify_entry,
)
from lightning_distckpt.errors import CatalogError, CatalogUnavailableError, DistCheckpointError, StaleOwnerError
from lightning_distckpt.storage import StorageLike

log = logging.getLogger(__name__)

__all__ = ["CatalogHook", "CatalogStats"]


@dataclass
class CatalogStats:
    """Counters of one hook (rank 0 counts writes; every rank counts its own resolutions)."""

    registered: int = 0  # rows written (new or already there)
    caught_up: int = 0  # of those, written after an earlier attempt had failed
    failures: int = 0  # catalog calls that failed (unreachable, timeout, conflict)
    refused: int = 0  # attempts the catalog refused because this job is not the run's owner (zombie)
    fallbacks: int = 0  # resolutions answered by listing storage because the catalog did not answer
    skipped: int = 0  # rows whose checkpoint failed verification on storage
    deferred_removals: int = 0  # retention removals skipped (catalog unreachable, ownership unknown, fenced)
    owner_epoch: int | None = None
    last_error: str = ""
    register_s: list[float] = field(default_factory=list)  # background time per registration (last 1000)
    submit_s: list[float] = field(default_factory=list)  # training-thread time per save (last 1000)


class CatalogHook:
    """One run's connection to a catalog, for :class:`~lightning_distckpt.DistCheckpoint`.

    Args:
        url: ``hbase://HOST[:PORT]/TABLE``.
        run: The run's name (rows are keyed by it; a restarted job uses the same name and takes over).
        options: Timeouts, retries and namespace of the client.
        retry_interval_s: How often the background thread retries a backlog while the catalog is down.
    """

    def __init__(self, url: str, run: str, options: CatalogOptions | None = None, retry_interval_s: float = 2.0) -> None:
        self.url = url
        self.run = check_run(run)
        self.options = options or CatalogOptions()
        self.retry_interval_s = retry_interval_s
        self.stats = CatalogStats()
        self.fenced = False
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._backlog: list[tuple[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._index: CheckpointIndex | None = None  # the worker's connection
        self._lock = threading.Lock()
        self._last_warned = 0.0
        self._behind = 0  # jobs at the head of the backlog that were there when the catalog last failed
        self._deferred: list[str] = []  # removals to retry (top-k removals Lightning will not ask for again)

    # ------------------------------------------------------------------------------------------
    # lifecycle (rank 0)
    # ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Global rank 0, at ``fit`` setup: start the background thread, whose first task takes ownership."""
        if self._thread is not None:
            return
        owner = f"{socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        self._queue.put(("own", owner))
        self._thread = threading.Thread(target=self._work, name="distckpt-catalog", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Let the background thread finish what is queued (bounded); True if nothing is left pending."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._queue.put(None)
        thread.join(timeout_s)
        left = self.pending
        if thread.is_alive() or left:
            log.warning("catalog %s: %d registration(s) not written at the end of fit; run `distckpt reconcile ROOT "
                        "--catalog %s --run %s` to add them", self.url, left, self.url, self.run)  # fmt: skip
        return not left and not thread.is_alive()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._backlog) + self._queue.qsize()

    # ------------------------------------------------------------------------------------------
    # training thread: cheap, never raises
    # ------------------------------------------------------------------------------------------
    def after_save(self, trainer: Any, filepath: str, monitor: str | None, mode: str,
                   after_commit: Callable[[Callable[[Any], None]], None]) -> None:  # fmt: skip
        """Global rank 0, training thread, when a save starts: snapshot the metrics; register after the commit."""
        start = time.perf_counter()
        try:
            # references only, and the values ModelCheckpoint computed for this save: reading the public
            # trainer.callback_metrics recomputes every logged result, and converting tensors (.item()) releases
            # the GIL, which a busy background save then holds for milliseconds; the catalog thread converts them
            cached = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
            metrics = dict(cached if isinstance(cached, dict) else getattr(trainer, "callback_metrics", {}))
            after_commit(lambda result: self._committed(result, filepath, metrics, monitor, mode))
        except Exception as e:  # noqa: BLE001 - never fails training
            self._failed(f"cannot queue the registration of {filepath}: {e}")
        _keep(self.stats.submit_s, time.perf_counter() - start)

    def _committed(self, result: Any, filepath: str, metrics: dict[str, Any], monitor: str | None, mode: str) -> None:
        """After the commit (committing thread, or inline on the training thread when the save had committed
        already): only queue; the background thread converts the metrics and writes the row."""
        manifest = getattr(result, "manifest", None)
        url = getattr(result, "url", None) or filepath
        self._submit("register", (url, manifest, metrics, monitor, mode))

    def replica_committed(self, root: str, name: str) -> None:
        """Rank 0, after a replica commits: record the copy's location (in the background)."""
        self._submit("location", (root, name))

    def _submit(self, kind: str, payload: Any) -> None:
        if self._thread is None:
            return
        self._queue.put((kind, payload))

    # ------------------------------------------------------------------------------------------
    # background thread
    # ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        stopping = False
        while True:
            try:
                job = self._queue.get(timeout=self.retry_interval_s if self._backlog else None)
            except queue.Empty:
                job = ()  # type: ignore[assignment]
            if job is None:
                stopping = True
            elif job:
                with self._lock:
                    self._backlog.append(job)
            self._drain()
            if stopping and (not self._backlog or not self._retry_before_close()):
                break
        if self._index is not None:
            self._index.close()
            self._index = None

    def _retry_before_close(self) -> bool:
        """At close with a backlog: one more attempt after a pause, only if the catalog just came back."""
        time.sleep(min(self.retry_interval_s, 1.0))
        before = len(self._backlog)
        self._drain()
        return bool(self._backlog) and len(self._backlog) < before

    def _drain(self) -> None:
        while self._backlog:
            kind, payload = self._backlog[0]
            start = time.perf_counter()
            try:
                if self._index is None:
                    self._index = open_index(self.url, self.options)
                retry = getattr(self, f"_do_{kind}")(self._index, payload)
            except CatalogUnavailableError as e:
                self._failed(str(e))
                self._behind = len(self._backlog)
                return  # keep the backlog; retried later, in order
            except StaleOwnerError as e:
                self.fenced = True
                self.stats.refused += 1
                log.error("catalog %s: %s (training goes on; this job registers and prunes nothing from now on)",
                          self.url, e)  # fmt: skip
            except (CatalogError, DistCheckpointError, OSError) as e:
                self._failed(f"{kind} dropped: {e}")
            except Exception as e:  # noqa: BLE001 - a bug here must not kill the thread
                log.exception("catalog %s: unexpected error in %s", self.url, kind)
                self._failed(f"{kind} dropped: {e}")
            else:
                if retry:
                    return
                if kind == "register":
                    self.stats.registered += 1
                    self.stats.caught_up += self._behind > 0
                    _keep(self.stats.register_s, time.perf_counter() - start)
            with self._lock:
                self._backlog.pop(0)
                self._behind = max(0, self._behind - 1)

    def _do_own(self, index: CheckpointIndex, owner: str) -> bool:
        epoch = index.take_ownership(self.run, owner)
        self.stats.owner_epoch = epoch
        log.info("catalog %s: run %r owned by this job (owner epoch %d)", self.url, self.run, epoch)
        return False

    def _do_register(self, index: CheckpointIndex, payload: Any) -> bool:
        url, manifest, metrics, monitor, mode = payload
        metrics = _scalars(metrics)
        if self.fenced:
            raise StaleOwnerError(f"{self.url}: not registering {url}: this job was fenced off run {self.run!r}")
        if manifest is None:  # not from this rank's save result: read what the storage committed
            manifest = catalog.read_manifest(catalog.source_of(url))
        entry = entry_from_manifest(self.run, url, manifest, metrics, monitor, mode)
        assert self.stats.owner_epoch is not None
        index.register(entry, self.stats.owner_epoch)
        return False

    def _do_location(self, index: CheckpointIndex, payload: Any) -> bool:
        root, name = payload
        copy = f"{root.rstrip('/')}/{name}"
        if self.fenced:
            raise StaleOwnerError(f"{self.url}: not recording {copy}: this job was fenced off run {self.run!r}")
        manifest = catalog.read_manifest(catalog.source_of(copy))
        assert self.stats.owner_epoch is not None
        index.add_location(self.run, int(manifest.global_step or 0), name, f"replica:{root}", copy,
                           self.stats.owner_epoch)  # fmt: skip
        return False

    def _failed(self, msg: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = msg
        now = time.monotonic()
        if now - self._last_warned > 30:  # an outage is reported, not every retry of it
            self._last_warned = now
            log.warning("catalog %s: %s (training goes on; will catch up)", self.url, msg)

    # ------------------------------------------------------------------------------------------
    # retention (rank 0, in the committing thread)
    # ------------------------------------------------------------------------------------------
    def remove(self, path: str, remove_checkpoint: Callable[[str], None], storage: StorageLike,
               remember: bool = False) -> bool:  # fmt: skip
        """Remove a checkpoint the fenced, ordered way (rank 0, committing thread; blocks for a few round trips).

        First waits (up to ``timeout_s``) for queued registrations, so that pointers name the newest checkpoint.
        Returns False, removing nothing, when the removal cannot be fenced (catalog unreachable, ownership not yet
        established, this job fenced off); with ``remember`` it is retried at the next call.
        """
        deferred, self._deferred = self._deferred, []
        for p in deferred:
            if p != path:
                self.remove(p, remove_checkpoint, storage, remember=True)
        ok = self._remove(path, remove_checkpoint, storage)
        if not ok and remember and not self.fenced:
            self._deferred.append(path)
        return ok

    def _remove(self, path: str, remove_checkpoint: Callable[[str], None], storage: StorageLike) -> bool:
        deadline = time.monotonic() + self.options.timeout_s
        while self._thread is not None and self.pending and not self._behind and time.monotonic() < deadline:
            time.sleep(0.005)
        epoch = self.stats.owner_epoch
        if self.fenced or epoch is None or self._backlog_has_owner():
            self.stats.deferred_removals += 1
            return False
        try:
            manifest = catalog.read_manifest(catalog.source_of(path, storage))
        except DistCheckpointError:
            source = catalog.source_of(path, storage)
            if source.store.exists(source.path):
                remove_checkpoint(path)  # not a committed checkpoint (crashed save): no row can name it
            return True
        entry = entry_from_manifest(self.run, path, manifest)
        try:
            with open_index(self.url, self.options) as index:
                index.begin_delete(entry, epoch)
                remove_checkpoint(path)  # the marker first, then the data (catalog.remove_checkpoint)
                index.finish_delete(entry)
        except StaleOwnerError as e:
            self.fenced = True
            self.stats.refused += 1
            log.error("catalog %s: %s (nothing removed)", self.url, e)
            return False
        except CatalogError as e:
            self.stats.deferred_removals += 1
            self._failed(f"retention of {path} deferred: {e}")
            return False
        return True

    def _backlog_has_owner(self) -> bool:
        with self._lock:
            return any(k == "own" for k, _ in self._backlog)

    # ------------------------------------------------------------------------------------------
    # resolution (any rank; before the run is set up)
    # ------------------------------------------------------------------------------------------
    def resolve(self, which: str, storage: StorageLike = None, metric: str | None = None) -> str | None:
        """The URL to resume from for ``"last"`` or ``"best"`` (of ``metric``): the pointer read in one round trip,
        verified on storage, else the next verified row; None if the run has none. Raises
        :class:`CatalogUnavailableError` if the catalog does not answer (the caller lists storage instead)."""
        with open_index(self.url, self.options) as index:
            info = index.run_info(self.run)
            if info is None:
                return None
            pointer = info.latest if which == "last" else info.best.get(metric or "")
            if pointer is not None:
                url = self._verified(pointer.copies, pointer.digest, pointer.row, storage)
                if url:
                    return url
            rows = index.entries(self.run)
        if which == "best":
            mode = pointer.mode if pointer is not None else "min"
            rows = [e for e in rows if e.monitor == metric and e.monitor_value is not None
                    and math.isfinite(e.monitor_value)]  # fmt: skip
            rows.sort(key=lambda e: e.monitor_value if mode != "max" else -e.monitor_value)  # type: ignore[operator]
        for e in rows:
            if pointer is not None and e.row == pointer.row:
                continue
            url = self._verified(e.copies, e.digest, e.row, storage)
            if url:
                return url
        return None

    def lookup(self, which: str, storage: StorageLike = None, metric: str | None = None) -> str | None:
        """:meth:`resolve`, but never raising: None (counted in ``fallbacks`` when the catalog failed) lets the
        caller list storage instead."""
        try:
            return self.resolve(which, storage, metric)
        except CatalogError as e:
            self.stats.fallbacks += 1
            log.warning("catalog %s did not answer ckpt_path=%r (%s); listing storage instead", self.url, which, e)
            return None

    def _verified(self, copies: list[str], digest: int, row: str, storage: StorageLike) -> str | None:
        problems = []
        for url in copies:
            problem = verify_entry(url, digest, storage)
            if not problem:
                return url
            problems.append(problem)
        self.stats.skipped += 1
        log.warning("catalog %s: row %r skipped, its checkpoint fails verification on storage: %s", self.url, row,
                    "; ".join(problems) or "no location")  # fmt: skip
        return None

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {"registered": s.registered, "caught_up": s.caught_up, "failures": s.failures, "refused": s.refused,
                "fallbacks": s.fallbacks, "skipped": s.skipped, "pending": self.pending, "owner_epoch": s.owner_epoch,
                "deferred_removals": s.deferred_removals, "fenced": self.fenced, "last_error": s.last_error}  # fmt: skip


def _scalars(metrics: Any) -> dict[str, float]:
    out = {}
    for k, v in dict(metrics).items():
        try:
            if hasattr(v, "numel") and v.numel() != 1:
                continue
            out[str(k)] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError):
            continue
    return out


def _keep(samples: list[float], value: float, limit: int = 1000) -> None:
    samples.append(value)
    if len(samples) > limit:
        del samples[: len(samples) - limit]



def make_hook(url: str | None, run: str | None, options: CatalogOptions | None) -> CatalogHook | None:
    """The hook for ``DistCheckpoint(catalog=..., run=...)``, or None without a catalog."""
    if url is None:
        return None
    if not run:
        raise ValueError(f"DistCheckpoint(catalog={url!r}) needs run=NAME: the rows of a run are keyed by its name")
    return CatalogHook(url, run, options)
