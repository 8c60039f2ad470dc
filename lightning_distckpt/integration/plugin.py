"""DistCheckpointIO: the Lightning ``CheckpointIO`` plugin that saves and loads through DCP.

Two ways in:

* **Routed** (the normal case): once this plugin is given to a Trainer, the strategy calls
  ``save_routed`` / ``load_routed`` / ``load_optimizers_routed`` / ``remove_routed`` on **every rank**
  (see `lightning_distckpt.integration`). Each rank writes and reads only its own part.
* **Direct**: the plain ``CheckpointIO`` methods (``save_checkpoint``, ``load_checkpoint``,
  ``remove_checkpoint``) act in the calling process alone, like any CheckpointIO. Lightning uses them for
  internal files (``ddp_spawn`` results); users can use them to read a checkpoint into a plain dict.

With ``async_save=True`` a routed save blocks only while the tensors are copied into host buffers
(reused across saves); writing, committing and the after-commit tasks run in one background thread
with its own gloo process group. At most one save is in flight: the next save, a load, ``wait()`` and
``teardown()`` wait for it, and an error in the background is raised there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_distckpt import catalog, ondisk
from lightning_distckpt.engine.reader import ReadStats
from lightning_distckpt.engine.loading import (
    Pending,
    allocate,
    match,
    open_for_load,
    read_checkpoint,
    read_tensors,
    saved_tensors,
)
from lightning_distckpt.catalog.blocks import data_ids_of, sweep_after_removal
from lightning_distckpt.engine.incremental import Base, IncrementalSave
from lightning_distckpt.engine.saving import SaveResult, WriteOptions, write_checkpoint
from lightning_distckpt.engine.snapshot import Snapshotter
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistCheckpointError,
    StateMismatchError,
    UncommittedCheckpointError,
)
from lightning_distckpt.integration.adapters import (
    model_state_dict,
    optimizer_state_dict,
    parameter_fqns,
    set_optimizer_state,
)
from lightning_distckpt.integration.routing import RoutedIO, install_hook, strategy_name
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.parallel.comm import SOLO, Comm
from lightning_distckpt.parallel.planner import PlanCache
from lightning_distckpt.storage import HdfsOptions, StorageConfig, open_store
from lightning_distckpt.transforms import CompressionConfig, resolve

log = logging.getLogger(__name__)
_SKIP = object()


@dataclass
class IOStats:
    """Timings of the last operations on this rank, for benchmarks and logs."""

    last_save: SaveResult | None = None
    blocked_s: float = 0.0  # time the training thread was blocked by the last save call
    saves: int = 0
    load_bytes_read: dict[str, int] = field(default_factory=dict)
    load_fallbacks: dict[str, str] = field(default_factory=dict)
    load_bytes_broadcast: int = 0
    loaded_from: str = ""
    load_s: dict[str, float] = field(default_factory=dict)  # the last load's phases
    #: blocks of the last load that were read from another copy because one failed verification, every rank's
    #: (``file``, ``bad`` and ``good`` copy, ``reason``, ``blocks``, ``bytes``, ``rank``)
    load_repairs: list[dict[str, Any]] = field(default_factory=list)
    load_failures: dict[str, str] = field(default_factory=dict)  # this rank: file -> why its first copy failed
    repaired_blocks: int = 0  # over every load of this plugin, all ranks
    repaired_files: int = 0


class DistCheckpointIO(CheckpointIO, RoutedIO):
    """Sharded, verified, atomic checkpoints through ``torch.distributed.checkpoint``.

    Args:
        async_save: Return from a save once the state is copied to host memory; write in the background.
        storage_options: Options for the fsspec filesystem of remote URLs (strings for HDFS client settings).
        durable: fsync data files and directories on local filesystems before a checkpoint commits.
        hdfs: Replication, block size, user, Hadoop conf dir and retries for ``hdfs://``, ``viewfs://`` and
            ``webhdfs://`` locations (see `HdfsOptions`).
        compression: ``"lossless"``, ``"bf16"``, ``"int8"`` or a `CompressionConfig`
            (see `lightning_distckpt.compression`); loading needs no setting.
        balanced_reads: Read each replicated tensor (DDP state) once across the ranks and broadcast it,
            instead of every rank reading all of it.
        write_threads: Files (and concurrent streams) per rank and save.
        read_threads: Concurrent readers per rank and load.
        chunk_mb: Tensors are cut into chunks of at most this many MiB; shared chunks are spread over ranks.
        safe_globals: Extra ``module.Name`` types that non-tensor state may contain (e.g. custom
            hyper-parameter classes); everything else that JSON cannot hold is refused on load.
        connect_timeout_s: How long reaching a store may take: ``DistCheckpoint`` checks the checkpoint root
            and every replica root at setup, before the first training step, and ModelCheckpoint's own calls on
            the root are bounded by it; an unreachable root fails with
            `StorageUnreachableError` naming the URL (``HdfsOptions.connect_timeout_s``
            overrides it for HDFS URLs).
        incremental: Write only the blocks that differ from the last committed checkpoint of this run under the same
            root (or the one it resumed from): a block whose raw bytes match one of that checkpoint's (xxh3, length,
            block codec, and SHA-256) is referenced where it lies instead of written again. Data files then live in
            the root's block store (``<root>/.distckpt-blocks/``) and are kept while any checkpoint references them;
            loading, verification, copies and replication work as for any checkpoint (see docs/incremental.md).
        full_every: With ``incremental``: every K-th save is self-contained (borrows nothing), so that the data of a
            long run does not spread over ever more earlier saves. ``None``: only the first save of a process (and a
            save whose base already spans ``engine.incremental.MAX_SOURCES`` earlier saves) is a full one.
    """

    def __init__(
        self,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        durable: bool = True,
        hdfs: HdfsOptions | None = None,
        compression: Literal["lossless", "bf16", "int8"] | CompressionConfig | None = None,
        balanced_reads: bool = True,
        write_threads: int = 2,
        read_threads: int = 2,
        chunk_mb: int = 32,
        safe_globals: list[str] | None = None,
        connect_timeout_s: float = 30.0,
        incremental: bool = False,
        full_every: int | None = None,
    ) -> None:
        super().__init__()
        install_hook()  # from now on, assigning a DistCheckpointIO to a strategy routes it (see routing.py)
        if write_threads < 1 or read_threads < 1 or chunk_mb < 1:
            raise ValueError("write_threads, read_threads and chunk_mb must be at least 1")
        if full_every is not None and (type(full_every) is not int or full_every < 1):
            raise ValueError(f"full_every={full_every!r}: must be an integer of at least 1 (or None)")
        self.incremental = incremental
        self.full_every = full_every
        self._base: Base | None = None  # rank 0: what the next incremental save may borrow from
        self._since_full = 0  # rank 0: saves since (and including) the last self-contained one
        self.async_save = async_save
        self.storage = StorageConfig(options=dict(storage_options or {}), durable=durable, hdfs=hdfs,
                                     connect_timeout_s=connect_timeout_s)  # fmt: skip
        self.compression = resolve(compression)
        self.balanced_reads = balanced_reads
        self.safe_globals = list(safe_globals or [])
        self.read_threads = read_threads
        self.write_options = WriteOptions(threads=write_threads, chunk_bytes=chunk_mb << 20)
        self.stats = IOStats()
        self._pg: dist.ProcessGroup | None = None
        self._bulk_pg: dist.ProcessGroup | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None
        self._snapshots = Snapshotter()
        self._plan_cache = PlanCache()
        self._after_commit: list[Callable[[SaveResult | None], None]] = []
        self._in_flight = False
        self._failed = False
        self._lock = threading.Lock()
        #: Given the URL being loaded, the checkpoints to try in order, each as its copies' URLs (primary
        #: first). DistCheckpoint installs one that knows replicas and the "last" fallback.
        self.resolver: Callable[[str], list[list[str]]] = lambda url: [[url]]

    # ------------------------------------------------------------------------------------------
    # plain CheckpointIO API: this process alone
    # ------------------------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` from this process alone (no other rank takes part). Blocks until committed."""
        skeleton, tensors = state.split(checkpoint)
        self.wait()
        self._write(str(path), skeleton, tensors, self._manifest(checkpoint, 1, ""), SOLO)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the whole checkpoint at ``path`` into a plain dict of CPU tensors, in this process alone.

        Optimizer state comes back keyed by parameter FQN. Never executes code from the checkpoint.
        """
        checkpoint = read_checkpoint(str(path), self.storage, self.safe_globals, self.read_threads)
        if map_location is not None and not callable(map_location):
            from lightning.fabric.utilities.apply_func import move_data_to_device

            checkpoint = move_data_to_device(checkpoint, map_location)
        return checkpoint

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove a checkpoint directory (its commit marker first, so it is never half visible). Blocks of an
        incremental checkpoint that no other checkpoint references are deleted afterwards (the block store's sweep:
        blocks a newer checkpoint borrows stay)."""
        store, p = open_store(str(path), self.storage)
        ids = data_ids_of(store, p)
        catalog.remove_checkpoint(store, p)
        sweep_after_removal(store, p, ids, self.storage)

    @override
    def teardown(self) -> None:
        """Wait for the save in flight (raising its error); release the background thread and process group.

        Called on every rank at the end of ``fit`` (routed strategies call it from their ``teardown``).
        Idempotent; a later save or load creates what it needs again.
        """
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            for pg in (self._pg, self._bulk_pg):
                if pg is not None:
                    dist.destroy_process_group(pg)
            self._pg = self._bulk_pg = None
            self._plan_cache.clear()

    # ------------------------------------------------------------------------------------------
    # routed API: called by the strategy on every rank
    # ------------------------------------------------------------------------------------------
    def save_routed(self, strategy: Strategy, checkpoint: dict[str, Any], path: str, storage_options: Any = None) -> None:
        """Collective save. Blocks for the whole save, or (``async_save``) only for the snapshot."""
        start = time.perf_counter()
        comm = self._comm()
        self.wait()
        url = comm.broadcast(path)
        skeleton, tensors = state.split(checkpoint)
        manifest = self._manifest(checkpoint, comm.world_size, strategy_name(strategy))
        params = {state.model_key(fqn) for fqn in parameter_fqns(strategy)}
        if self.async_save:
            snapshot = self._snapshots.take(tensors, self._plan_cache.owned() if comm.active else None,
                                            self.write_options.chunk_bytes)
            with self._lock:
                self._in_flight = True  # tasks registered from now on wait for this save
            self._future = self._pool().submit(self._write, url, skeleton, snapshot, manifest, comm, params, True)
        else:
            self._write(url, skeleton, tensors, manifest, comm, params)
        self.stats.blocked_s = time.perf_counter() - start

    def load_routed(self, strategy: Strategy, path: str) -> dict[str, Any]:
        """Collective load of everything the restore needs, verified, before Lightning uses any of it.

        Model tensors are read into the model's own tensors (in place, any sharding). Optimizer tensors
        are read into the optimizers' state when the optimizers exist already (FSDP, ModelParallel),
        otherwise (DDP restores before setup) into host buffers that ``load_optimizer_state_dict`` applies.
        Every block is read from the first healthy copy (primary, then replicas); blocks served by another
        copy because one failed verification are reported (a warning naming the file and both copies, and
        ``stats.load_repairs``). If the checkpoint cannot be read from any copy and it was chosen as "last",
        the next older one is used, loudly.

        Every decision the ranks must share is made once: rank 0 picks the path and the fallback order (the
        ``resolver`` runs on rank 0 only) and broadcasts them; whether memory suffices is judged from every
        rank's numbers, the same way everywhere. A shortage of host memory on any rank raises
        `InsufficientMemoryError` on every rank and never falls back to an older checkpoint.
        """
        self.wait()
        comm = self._comm(bulk=self.balanced_reads)
        url = comm.broadcast(path)
        candidates = comm.decide(lambda: self.resolver(url))
        first_error: DistCheckpointError | None = None
        for i, urls in enumerate(candidates):
            try:
                checkpoint = self._load_candidate(strategy, urls, comm)
            except (CorruptCheckpointError, CheckpointNotFoundError, UncommittedCheckpointError) as e:
                first_error = first_error or e
                nxt = f"; falling back to the previous checkpoint {candidates[i + 1][0]}" if i + 1 < len(candidates) else ""
                if comm.rank == 0:
                    log.error("checkpoint %s cannot be loaded from any copy: %s%s", urls[0], e, nxt)
                continue
            if i > 0 and comm.rank == 0:
                rank_zero_warn(f"RESUMED FROM AN OLDER CHECKPOINT: {urls[0]} (the newer {candidates[0][0]} is "
                               f"unusable: {first_error}). Training since that older checkpoint will be repeated.")
            return checkpoint
        assert first_error is not None
        raise first_error

    def _load_candidate(self, strategy: Strategy, urls: list[str], comm: Comm) -> dict[str, Any]:
        start = time.perf_counter()
        ckpt, sources = open_for_load(urls, comm, self.storage)
        self.stats.load_s = {"open": time.perf_counter() - start}
        url = ckpt.url
        module = strategy.lightning_module
        strict = bool(getattr(module, "strict_loading", True))
        error: DistCheckpointError | None = None
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        host: list[str] = []  # tensors read into new host buffers
        try:
            model = match(ckpt.metadata, {state.model_key(k): v for k, v in model_state_dict(strategy).items()},
                          state.MODEL, strict, "model", url)  # fmt: skip
            if _fitting(module):
                optimizers = list(strategy.optimizers)
                saved = saved_tensors(ckpt.metadata)
                saved_n = len({k.split("/")[1] for k in saved if k.startswith(state.OPTIM)})
                if optimizers:
                    if saved_n and saved_n != len(optimizers):
                        raise StateMismatchError(f"{url} holds {saved_n} optimizer states, the model configures "
                                                 f"{len(optimizers)} optimizers")  # fmt: skip
                    for i, opt in enumerate(optimizers):
                        live = {
                            state.optim_key(i, fqn, name): t
                            for fqn, st in optimizer_state_dict(strategy, opt)["state"].items()
                            for name, t in st.items() if isinstance(t, torch.Tensor)
                        }  # fmt: skip
                        prefix = f"{state.OPTIM}{i}/"
                        saved_params = {k[len(prefix):].rsplit("/", 1)[0] for k in saved if k.startswith(prefix)}
                        live = {k: v for k, v in live.items() if k[len(prefix):].rsplit("/", 1)[0] in saved_params}
                        optim.update(match(ckpt.metadata, live, prefix, True, f"optimizer {i}", url))
                else:  # DDP and single device restore before setup: read into host buffers now, apply later
                    host += [k for k in state.tensor_refs(ckpt.skeleton) if k.startswith(state.OPTIM)]
            host += [k for k in state.tensor_refs(ckpt.skeleton) if k.startswith(state.EXTRA)]
        except DistCheckpointError as e:
            error = e
        comm.agree(error)  # a mismatch on any rank is the same error on every rank, before any collective read
        buffers = allocate(ckpt.metadata, host, url, comm)  # collective memory check: all ranks, same verdict
        optim.update({k: v for k, v in buffers.items() if k.startswith(state.OPTIM)})
        extras = {k: v for k, v in buffers.items() if k.startswith(state.EXTRA)}
        ordered = sources[comm.rank % len(sources):] + sources[: comm.rank % len(sources)]  # spread reads over copies
        self._record(read_tensors(ckpt, {**model, **optim, **extras}, sources=ordered, threads=self.read_threads,
                                  comm=comm, balanced=self.balanced_reads), comm, strategy)  # fmt: skip

        def lookup(key: str) -> Any:
            if key.startswith(state.MODEL):
                return model.get(key, _SKIP)
            if key.startswith(state.OPTIM):
                return optim.get(key, Pending(key))
            return extras[key]

        checkpoint = state.join(ckpt.skeleton, lookup, self.safe_globals)
        if self.incremental and comm.rank == 0:  # a resumed run's next save borrows from what it resumed from
            self._base, self._since_full = Base(url, ckpt.manifest, ckpt.metadata), 1
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if v is not _SKIP}
        self.stats.loaded_from = url
        return checkpoint

    def load_optimizers_routed(self, strategy: Strategy, checkpoint: dict[str, Any]) -> None:
        """Apply the optimizer states that `load_routed()` read (no I/O happens here)."""
        saved_states = checkpoint.get("optimizer_states", [])
        optimizers = list(strategy.optimizers)
        if len(saved_states) != len(optimizers):
            raise StateMismatchError(f"the checkpoint holds {len(saved_states)} optimizer states, the model configures "
                                     f"{len(optimizers)} optimizers")  # fmt: skip
        start = time.perf_counter()
        for opt, saved in zip(optimizers, saved_states):
            missing = [p.key for st in saved.get("state", {}).values() for p in st.values() if isinstance(p, Pending)]
            if missing:
                raise RuntimeError(f"optimizer state {missing[0]!r} was not read when the checkpoint was loaded")
            set_optimizer_state(strategy, opt, saved)
        self.stats.load_s["apply_optimizers"] = time.perf_counter() - start

    def remove_routed(self, strategy: Strategy, path: str) -> None:
        """Remove a checkpoint (rank 0). With a save in flight, only after that save has committed."""
        if self._comm().rank == 0:
            self.after_commit(lambda result: self.remove_checkpoint(path))

    # ------------------------------------------------------------------------------------------
    # background work
    # ------------------------------------------------------------------------------------------
    def after_commit(self, task: Callable[[SaveResult | None], None]) -> None:
        """Run ``task`` once the save in flight has committed, or now if none is in flight.

        Tasks are dropped if that save fails, and not run at all while the last save's failure has not
        been raised yet: nothing is removed unless the checkpoint written before it is committed. Tasks
        run in the committing thread (the background thread for async saves), must not use
        collectives, and never fail the save (their errors are logged).
        """
        with self._lock:
            if self._in_flight:
                self._after_commit.append(task)
                return
            if self._failed:
                return
        self._run_task(task, self.stats.last_save)

    def wait(self) -> None:
        """Block until the save in flight has committed; raise `CheckpointSaveError` if it failed."""
        future, self._future = self._future, None
        if future is not None:
            try:
                future.result()
            finally:
                self._failed = False

    def _write(self, url: str, skeleton: Any, tensors: dict[str, Any], manifest: ondisk.Manifest, comm: Comm,
               params: set[str] | None = None, background: bool = False) -> None:
        with self._lock:
            self._in_flight = True
        try:
            exact = self.compression.exact_every and (self.stats.saves + 1) % self.compression.exact_every == 0
            compression = self.compression.exact() if exact else self.compression
            result = write_checkpoint(url, skeleton, tensors, manifest, self.write_options, comm, self.storage,
                                      compression, params, self._plan_cache if comm.active else None,
                                      self._incremental_save(url, comm))
        except BaseException:
            with self._lock:
                self._after_commit.clear()
                self._in_flight = False
                self._failed = background  # remembered until wait() raises it
            raise
        self.stats.last_save = result
        self.stats.saves += 1
        if self.incremental and result.manifest is not None and result.metadata is not None:  # rank 0
            self._base = Base(url, result.manifest, result.metadata)
            self._since_full = self._since_full + 1 if result.manifest.borrows else 1
        with self._lock:
            tasks, self._after_commit = self._after_commit, []
            self._in_flight = False
        for task in tasks:
            self._run_task(task, result)

    def _incremental_save(self, url: str, comm: Comm) -> IncrementalSave | None:
        """How the next save is incremental (rank 0 decides the base; the others only need to know it is)."""
        if not self.incremental:
            return None
        if comm.rank != 0:
            return IncrementalSave()
        base = self._base if self._base is not None and self._base.same_root(url) else None
        full = base is None or (self.full_every is not None and self._since_full >= self.full_every)
        return IncrementalSave(base, full)

    @staticmethod
    def _run_task(task: Callable[[SaveResult | None], None], result: SaveResult | None) -> None:
        try:
            task(result)
        except Exception:  # noqa: BLE001 - an after-commit task never fails the save
            log.exception("after-commit task failed (checkpoint %s)", result.url if result else None)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="distckpt-save")
        return self._executor

    def _comm(self, bulk: bool = False) -> Comm:
        """All ranks of the job, over a dedicated gloo group (created collectively on first use); with ``bulk``
        a second one too, on which balanced reads broadcast while the next round is read."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Comm()
        if self._pg is None:
            self._pg = dist.new_group(backend="gloo")
        if bulk and self._bulk_pg is None:
            self._bulk_pg = dist.new_group(backend="gloo")
        return Comm(self._pg, bulk=self._bulk_pg)

    def _record(self, stats: ReadStats, comm: Comm, strategy: Strategy | None = None) -> None:
        """Keep the load's statistics; report repairs (collective: every rank's repairs reach every rank)."""
        repairs = [r.to_json() for r in stats.repairs.values()]
        everyone = comm.all_gather(repairs)
        self.stats.load_repairs = [dict(r, rank=rank) for rank, rs in enumerate(everyone) for r in rs]
        self.stats.load_failures = dict(stats.failures)
        self.stats.repaired_blocks += sum(r["blocks"] for r in self.stats.load_repairs)
        self.stats.repaired_files += len({(r["bad"], r["file"]) for r in self.stats.load_repairs})
        if self.stats.load_repairs and comm.rank == 0:
            _warn_repairs(self.stats.load_repairs)
        trainer = getattr(getattr(strategy, "lightning_module", None), "_trainer", None) if strategy else None
        if trainer is not None and self.stats.repaired_blocks:
            trainer.callback_metrics["distckpt/repaired_blocks"] = torch.tensor(float(self.stats.repaired_blocks))
        self.stats.load_bytes_read = dict(stats.bytes_by_source)
        self.stats.load_fallbacks = dict(stats.fallbacks)
        self.stats.load_bytes_broadcast = stats.bytes_broadcast
        self.stats.load_s.update(read=stats.read_s, broadcast=stats.broadcast_s,
                                 slowest_file=max(stats.file_s.values(), default=0.0))

    @staticmethod
    def _manifest(checkpoint: dict[str, Any], world_size: int, strategy: str) -> ondisk.Manifest:
        return ondisk.Manifest(
            name="", created=0.0, world_size=world_size,
            global_step=checkpoint.get("global_step"), epoch=checkpoint.get("epoch"), strategy=strategy,
            versions={"torch": torch.__version__, "lightning": lightning.__version__, "lightning_distckpt": _version()},
        )  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        # process groups, threads and buffers belong to one process (ddp_spawn pickles the trainer)
        s = self.__dict__.copy()
        s.update(_pg=None, _bulk_pg=None, _executor=None, _future=None, _snapshots=Snapshotter(), _plan_cache=PlanCache(), _after_commit=[],
                 _lock=None, _in_flight=False, _failed=False, resolver=lambda url: [[url]], _base=None)
        return s

    def __setstate__(self, s: dict[str, Any]) -> None:
        self.__dict__.update(s)
        self._lock = threading.Lock()


def _warn_repairs(repairs: list[dict[str, Any]]) -> None:
    """One warning per (bad copy, file): what failed, where the blocks were read from instead."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in repairs:
        m = merged.setdefault((r["file"], r["bad"], r["good"]), dict(r, blocks=0, ranks=[]))
        m["blocks"] += r["blocks"]
        m["ranks"].append(r["rank"])
    for (file, bad, good), m in merged.items():
        rank_zero_warn(
            f"REPAIRED ON LOAD: {file}: the copy in {bad} failed verification ({m['reason']}); {m['blocks']} "
            f"block(s) were read from the copy in {good} instead (ranks {sorted(set(m['ranks']))}). The storage "
            f"of {bad} may be going bad: check it with `distckpt verify {bad}`."
        )


def _fitting(module: Any) -> bool:
    from lightning.pytorch.trainer.states import TrainerFn

    trainer = getattr(module, "_trainer", None)
    return trainer is None or trainer.state.fn == TrainerFn.FITTING


def _version() -> str:
    from lightning_distckpt import __version__

    return __version__

