"""DistCheckpointIO: the Lightning ``CheckpointIO`` plugin that saves and loads through DCP.

Two ways in:

* **Routed** (the normal case): once this plugin is given to a Trainer, the strategy calls
  ``save_routed`` / ``load_routed`` / ``load_optimizers_routed`` / ``remove_routed`` on **every rank**
  (see `lightning_distckpt.integration`). Each rank writes and reads only its own part.
* **Direct**: the plain ``CheckpointIO`` methods (``save_checkpoint``, ``load_checkpoint``,
  ``remove_checkpoint``) act in the calling process alone, like any CheckpointIO. Lightning uses them for
  internal files (``ddp_spawn`` results); users can use them to read a checkpoint into a plain dict.

With ``async_save=True`` a routed save returns once the tensors that the next forward/backward may change
(buffers, callback state) are copied into host buffers (reused across saves). Parameters and optimizer
state, which only an optimizer step changes, are copied by the background thread while the next step's
forward and backward run (a pipelined snapshot, as in CheckFreq); every optimizer of the strategy gets a
step pre-hook, on every rank, that waits for that copy if it is not done yet. Writing, committing and the
after-commit tasks follow in the same background thread, with its own gloo process group. At most one save
is in flight: the next save, a load, ``wait()`` and ``teardown()`` wait for it, and an error in the
background is raised there. ``pipelined_snapshot=False`` copies everything inside the save call instead, and
so does a save of a LightningModule with manual optimization (``automatic_optimization = False``), whose
``training_step`` may write parameters anywhere.

Guarantee of the pipelined snapshot: the checkpoint holds the state as of the save provided parameters and
optimizer state change only through ``optimizer.step()`` of the strategy's optimizers until the copy is
done. Code that writes them in place otherwise (a callback that edits weights right after a save) must
call :meth:`DistCheckpointIO.wait_snapshot` first.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
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
    SAME_HOST,
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
from lightning_distckpt.engine.saving import (
    COMPACT_FROM_RANKS,
    SaveResult,
    WriteOptions,
    release,
    reserve,
    write_checkpoint,
)
from lightning_distckpt.engine.shared_root import check_shared_root
from lightning_distckpt.engine.snapshot import PendingSnapshot, Snapshotter
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    CorruptCheckpointError,
    DistCheckpointError,
    StateMismatchError,
    UncommittedCheckpointError,
)
from lightning_distckpt.integration import stock
from lightning_distckpt.integration.adapters import (
    model_state_dict,
    optimizer_state_dict,
    parameter_fqns,
    set_model_state,
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
    load_bytes_broadcast: int = 0  # received from other ranks (by broadcast, attach or shared memory)
    load_bytes_process_group: int = 0  # of those, received through the process group (broadcasts, sends between hosts)
    load_same_host: str = ""  # how the last load's balanced reads shared bytes: attach, segments, broadcast, attach+send
    loaded_from: str = ""
    load_s: dict[str, float] = field(default_factory=dict)  # the last load's phases
    snapshot_copy_s: float = 0.0  # the last pipelined snapshot's background copy
    step_wait_s: float = 0.0  # time optimizer steps waited for the last pipelined snapshot
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
        pipelined_snapshot: With ``async_save``, copy parameters and optimizer state in the background
            while the next forward/backward run; the next optimizer step waits for the copy if needed.
            Not used for a module with manual optimization (everything is copied inside the call).
        storage_options: Options for the fsspec filesystem of remote URLs (strings for HDFS client settings).
        durable: fsync data files and directories on local filesystems before a checkpoint commits.
        hdfs: Replication, block size, user, Hadoop conf dir and retries for ``hdfs://``, ``viewfs://`` and
            ``webhdfs://`` locations (see `HdfsOptions`).
        compression: ``"lossless"``, ``"bf16"``, ``"int8"`` or a `CompressionConfig`
            (see `lightning_distckpt.compression`); loading needs no setting.
        balanced_reads: Read each replicated tensor (DDP state) once across the ranks and broadcast it,
            instead of every rank reading all of it.
        same_host_reads: How ranks of one host share what balanced reads read. ``"attach"``: each host reads
            every replicated byte once, and each rank copies its peers' part straight out of their memory (one
            kernel copy, ``process_vm_readv``; needs ptrace permission between the ranks, see docs/torchrun.md);
            ``"segments"``: once per host, through shared-memory segments in /dev/shm; ``"broadcast"``: once
            per job, broadcast over gloo. ``"auto"`` (default): attach when all ranks run on one host; on several
            hosts, one of them with several ranks, read once per job, send each rank's part to one rank of every
            other host, and attach inside each host; with one rank per host, broadcast. Attach (also
            inside ``"auto"``) and segments fall back to broadcasts when any rank cannot use them.
        write_threads: Files (and concurrent streams) per rank and save.
        read_threads: Concurrent readers per rank and load.
        chunk_mb: Tensors are cut into chunks of at most this many MiB; shared chunks are spread over ranks.
        safe_globals: Extra ``module.Name`` types that non-tensor state may contain (e.g. custom
            hyper-parameter classes); everything else that JSON cannot hold is refused on load, unless the
            load is given ``weights_only=False`` (``fit``/``validate``/... and ``load_from_checkpoint`` take it,
            as for ``torch.load``). Types registered with ``torch.serialization.add_safe_globals`` count too.
        node_local: The checkpoint root is a per-node directory on purpose. By default a job on several
            nodes checks (at ``DistCheckpoint`` setup, else at the first save under a root) that every node
            sees the same root and refuses a node-local one with :class:`NodeLocalRootError`
            (:mod:`~lightning_distckpt.engine.shared_root`). With ``node_local=True`` nothing is checked, and
            a checkpoint is complete only where every rank's files end up in one directory (e.g. after the
            user gathers them).
        connect_timeout_s: How long reaching a store may take: ``DistCheckpoint`` checks the checkpoint root
            and every replica root at setup, before the first training step, and ModelCheckpoint's own calls on
            the root are bounded by it; an unreachable root fails with
            `StorageUnreachableError` naming the URL (``HdfsOptions.connect_timeout_s``
            overrides it for HDFS URLs).
        exclude_from_loading: Parts of a checkpoint that a resume leaves as they are in the new run:
            ``"model"``, ``"optimizer"``, ``"lr_schedulers"``, ``"loops"`` (step and epoch counters start at
            0), ``"callbacks"``, or any other top-level key of Lightning's checkpoint dict (e.g. a
            precision plugin's or datamodule's entry). Excluded tensors are not read at all.
        incremental: Write only the blocks that differ from the last committed checkpoint of this run under the same
            root (or the one it resumed from): a block whose raw bytes match one of that checkpoint's (xxh3, length,
            block codec, and SHA-256) is referenced where it lies instead of written again. Data files then live in
            the root's block store (``<root>/.distckpt-blocks/``) and are kept while any checkpoint references them;
            loading, verification, copies and replication work as for any checkpoint (see docs/incremental.md).
        compact_metadata: Describe regular shardings by their rule instead of listing every rank's chunks
            (metadata version 3, docs/scaling.md): the coordinator plans a save in O(tensors + ranks) and
            ``metadata.json`` stays small at thousands of ranks; each data file carries the index of its own blocks.
            ``None`` (default): from `COMPACT_FROM_RANKS` ranks on; ``True``: always (one process too); ``False``:
            never. Not with ``incremental`` (its saves list every chunk); a state that follows no rule on some
            rank is listed as usual.
        full_every: With ``incremental``: every K-th save is self-contained (borrows nothing), so that the data of a
            long run does not spread over ever more earlier saves. ``None``: only the first save of a process (and a
            save whose base already spans ``engine.incremental.MAX_SOURCES`` earlier saves) is a full one.

    Constructing one also lets ``LightningModule.load_from_checkpoint`` read this package's checkpoints
    (`enable_load_from_checkpoint()`), and routes every strategy it is assigned to.
    """

    def __init__(
        self,
        async_save: bool = False,
        pipelined_snapshot: bool = True,
        storage_options: dict[str, Any] | None = None,
        durable: bool = True,
        hdfs: HdfsOptions | None = None,
        compression: Literal["lossless", "bf16", "int8"] | CompressionConfig | None = None,
        balanced_reads: bool = True,
        same_host_reads: Literal["auto", "attach", "segments", "broadcast"] = "auto",
        write_threads: int = 2,
        read_threads: int = 2,
        chunk_mb: int = 32,
        safe_globals: list[str] | None = None,
        node_local: bool = False,
        connect_timeout_s: float = 30.0,
        exclude_from_loading: list[str] | None = None,
        incremental: bool = False,
        full_every: int | None = None,
        compact_metadata: bool | None = None,
    ) -> None:
        super().__init__()
        install_hook()  # from now on, assigning a DistCheckpointIO to a strategy routes it (see routing.py)
        if write_threads < 1 or read_threads < 1 or chunk_mb < 1:
            raise ValueError("write_threads, read_threads and chunk_mb must be at least 1")
        if full_every is not None and (type(full_every) is not int or full_every < 1):
            raise ValueError(f"full_every={full_every!r}: must be an integer of at least 1 (or None)")
        if compact_metadata and incremental:
            raise ValueError("compact_metadata=True cannot be combined with incremental=True: incremental saves list "
                             "every chunk with its blocks' fingerprints")  # fmt: skip
        self.incremental = incremental
        self.full_every = full_every
        self.compact_metadata = compact_metadata
        self._base: Base | None = None  # rank 0: what the next incremental save may borrow from
        self._since_full = 0  # rank 0: saves since (and including) the last self-contained one
        self.async_save = async_save
        self.pipelined_snapshot = pipelined_snapshot
        self.node_local = node_local
        self._checked_roots: set[str] = set()
        self.storage = StorageConfig(options=dict(storage_options or {}), durable=durable, hdfs=hdfs,
                                     connect_timeout_s=connect_timeout_s)  # fmt: skip
        self.compression = resolve(compression)
        self.balanced_reads = balanced_reads
        if same_host_reads not in SAME_HOST:
            raise ValueError(f"same_host_reads={same_host_reads!r}: must be one of {', '.join(SAME_HOST)}")
        self.same_host_reads = same_host_reads
        self.safe_globals = list(safe_globals or [])
        self.exclude_from_loading = _check_exclude(exclude_from_loading)
        self.read_threads = read_threads
        self.write_options = WriteOptions(threads=write_threads, chunk_bytes=chunk_mb << 20)
        self.stats = IOStats()
        self._pg: dist.ProcessGroup | None = None
        self._bulk_pg: dist.ProcessGroup | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None
        self._snapshots = Snapshotter()
        self._snapshot: PendingSnapshot | None = None
        self._hooked: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._plan_cache = PlanCache()
        self._after_commit: list[Callable[[SaveResult | None], None]] = []
        self._in_flight = False
        self._failed = False
        self._lock = threading.Lock()
        #: Given the URL being loaded, the checkpoints to try in order, each as its copies' URLs (primary
        #: first). DistCheckpoint installs one that knows replicas and the "last" fallback.
        self.resolver: Callable[[str], list[list[str]]] = _only
        self._loaded: _Loaded | None = None  # what the last routed load left for load_model/optimizers_routed
        self._next_exclude: dict[str, list[str]] = {}  # url -> parts the next load of it leaves out
        from lightning_distckpt.integration.load_from_checkpoint import enable_load_from_checkpoint

        enable_load_from_checkpoint(storage_options=storage_options, hdfs=hdfs, safe_globals=safe_globals)

    def _compact(self, comm: Comm) -> bool:
        """Whether a save over ``comm`` plans regular states from summaries (`compact_metadata`)."""
        if self.incremental:
            return False
        if self.compact_metadata is None:
            return comm.world_size >= COMPACT_FROM_RANKS
        return self.compact_metadata

    # ------------------------------------------------------------------------------------------
    # plain CheckpointIO API: this process alone
    # ------------------------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` from this process alone (no other rank takes part). Blocks until committed.

        ``storage_options`` per call are refused with ``TypeError``, as by Lightning's ``TorchCheckpointIO``
        (storage settings belong to the plugin: ``DistCheckpointIO(storage_options=..., hdfs=...)``).
        """
        _refuse_storage_options(self, storage_options)
        skeleton, tensors = state.split(checkpoint)
        self.wait()
        self._write(str(path), skeleton, tensors, self._manifest(checkpoint, 1, ""), SOLO)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the whole checkpoint at ``path`` into a plain dict of CPU tensors, in this process alone.

        A checkpoint of this package: optimizer state comes back keyed by parameter FQN, and objects that
        JSON cannot hold are unpickled through the allowlist (without one with ``weights_only=False``). A
        stock Lightning file: read with ``torch.load`` as Lightning would.
        """
        url = str(path)
        found = stock.kind(url, self.storage)
        if found == "missing":
            raise CheckpointNotFoundError(f"Checkpoint file not found: {url} (no checkpoint directory or file there)")
        if found == "file":
            return stock.load_file(url, self.storage, weights_only, map_location if map_location is not None else "cpu")
        checkpoint = read_checkpoint(url, self.storage, stock.safe_globals(self.safe_globals), self.read_threads,
                                     trusted=stock.trusted(weights_only))
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
            for handle in list(self._hooked.values()):
                handle.remove()
            self._hooked = weakref.WeakKeyDictionary()
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
        """Collective save. Blocks for the whole save, or (``async_save``) only for the snapshot.

        With ``async_save`` the name is reserved at once (a ``PENDING`` placeholder directory, so that
        Lightning's version counter counts it as taken). A save made while no ``fit``/``validate``/... is
        running (``trainer.save_checkpoint`` after ``fit``) is written before returning, as without
        ``async_save``: nothing would wait for it, and no thread outlives the call.
        """
        _refuse_storage_options(self, storage_options)
        start = time.perf_counter()
        comm = self._comm()
        self.wait()
        url = comm.broadcast(path)
        self.check_root(_parent(url), comm)
        skeleton, tensors = state.split(checkpoint)
        manifest = self._manifest(checkpoint, comm.world_size, strategy_name(strategy))
        params = {state.model_key(fqn) for fqn in parameter_fqns(strategy)}
        if self.async_save and _running(strategy):
            # under manual optimization training_step may write parameters anywhere (clipping, swaps, EMA),
            # not only through optimizer.step(): everything is copied inside the call
            pipelined = self.pipelined_snapshot and _automatic_optimization(strategy)

            def now(key: str) -> bool:  # what the next forward/backward may change: copied before returning
                return not (pipelined and (key in params or key.startswith(state.OPTIM)))

            if pipelined:
                self._hook_optimizers(strategy)
            snapshot = self._snapshots.start(tensors, self._plan_cache.owned() if comm.active else None,
                                             self.write_options.chunk_bytes, now=now)
            self._snapshot = snapshot
            self.stats.step_wait_s = 0.0
            with self._lock:
                self._in_flight = True  # tasks registered from now on wait for this save
            if comm.rank == 0:
                try:
                    reserve(url, self.storage)
                except Exception as e:  # noqa: BLE001 - the save itself reports what is wrong with the location
                    log.debug("could not reserve %s: %s", url, e)
            self._future = self._pool().submit(self._write, url, skeleton, snapshot, manifest, comm, params, True)
        else:  # also with async_save when no fit/validate/... runs (trainer.save_checkpoint after fit): no thread
            self._write(url, skeleton, tensors, manifest, comm, params)
        self.stats.blocked_s = time.perf_counter() - start

    def load_routed(self, strategy: Strategy, path: str, weights_only: bool | None = None) -> dict[str, Any]:
        """Collective load of everything the restore needs, verified, before Lightning uses any of it.

        Model tensors are read into the model's own tensors (in place, any sharding), unless the
        LightningModule overrides ``on_load_checkpoint``: then ``checkpoint["state_dict"]`` is a
        `LazyModelState` and the weights are applied in ``load_model_state_dict``, after the hook,
        honouring whatever it changed (unchanged entries are still read straight into the model).
        Optimizer tensors are read into the optimizers' state when the optimizers exist already (FSDP,
        ModelParallel), otherwise (DDP restores before setup) into host buffers that
        ``load_optimizer_state_dict`` applies. Every block is read from the first healthy copy (primary, then
        replicas); blocks served by another copy because one failed verification are reported (a warning naming
        the file and both copies, and ``stats.load_repairs``). If the checkpoint cannot be read from any copy and
        it was chosen as "last", the next older one is used, loudly.

        A stock Lightning file is read whole by every rank (as stock DDP does) with ``torch.load`` under
        Lightning's ``weights_only`` rule and applied under any strategy (sharded here when needed).
        Without a LightningModule (``strategy.load_checkpoint`` before ``fit``) the whole checkpoint is
        returned as a plain dict, as stock Lightning does. ``exclude_from_loading`` applies to all of these.

        Every decision the ranks must share is made once: rank 0 picks the path and the fallback order (the
        ``resolver`` runs on rank 0 only) and broadcasts them; whether memory suffices is judged from every
        rank's numbers, the same way everywhere. A shortage of host memory on any rank raises
        `InsufficientMemoryError` on every rank and never falls back to an older checkpoint.
        """
        self.wait()
        self._loaded = None
        exclude = [*self.exclude_from_loading, *self._next_exclude.pop(str(path).rstrip("/"), [])]
        if strategy.lightning_module is None:
            return self._exclude(self.load_checkpoint(path, weights_only=weights_only), exclude)
        comm = self._comm(bulk=self.balanced_reads)
        url = comm.broadcast(path)
        found = comm.decide(lambda: "ours" if url.startswith(STEP_PREFIX) else stock.kind(url, self.storage))
        if found == "file":
            checkpoint = stock.load_file(url, self.storage, weights_only)
            self._loaded = _Loaded(id(checkpoint), full=True)
            self.stats.loaded_from = url
            return self._exclude(checkpoint, exclude)
        candidates = comm.decide(lambda: self.resolver(url))
        if found == "missing" and candidates == [[url]]:
            raise CheckpointNotFoundError(f"Checkpoint file not found: {url} (no checkpoint directory or file there)")
        first_error: DistCheckpointError | None = None
        for i, urls in enumerate(candidates):
            try:
                checkpoint = self._load_candidate(strategy, urls, comm, weights_only, exclude)
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

    def _load_candidate(self, strategy: Strategy, urls: list[str], comm: Comm, weights_only: bool | None,
                        exclude: list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        ckpt, sources = open_for_load(urls, comm, self.storage)
        self.stats.load_s = {"open": time.perf_counter() - start}
        url = ckpt.url
        module = strategy.lightning_module
        strict = bool(getattr(module, "strict_loading", True))
        skip_model = "model" in exclude
        skip_optim = "optimizer" in exclude
        saved_optims = ckpt.skeleton.get("optimizer_states") if isinstance(ckpt.skeleton, dict) else None
        error: DistCheckpointError | None = None
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        host: list[str] = []  # tensors read into new host buffers
        try:
            if not skip_model:
                model = match(ckpt.metadata, {state.model_key(k): v for k, v in model_state_dict(strategy).items()},
                              state.MODEL, strict, "model", url)  # fmt: skip
            if _fitting(module) and not skip_optim:
                optimizers = list(strategy.optimizers)
                saved = saved_tensors(ckpt.metadata)
                saved_n = len({k.split("/")[1] for k in saved if k.startswith(state.OPTIM)})
                if optimizers:
                    if saved_n and saved_n != len(optimizers):
                        raise StateMismatchError(f"{url} holds {saved_n} optimizer states, the model configures "
                                                 f"{len(optimizers)} optimizers")  # fmt: skip
                    for i, opt in enumerate(optimizers):
                        prefix = f"{state.OPTIM}{i}/"
                        saved_params = {k[len(prefix):].rsplit("/", 1)[0] for k in saved if k.startswith(prefix)}
                        if not saved_params:  # saved before its first step: nothing to read, nothing to create
                            continue
                        names = _saved_param_names(saved_optims, i, strategy, opt, url)  # live FQN -> saved name
                        live = {
                            state.optim_key(i, names.get(fqn, fqn), name): t
                            for fqn, st in optimizer_state_dict(strategy, opt)["state"].items()
                            for name, t in st.items() if isinstance(t, torch.Tensor)
                        }  # fmt: skip
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
        lazy = bool(model) and _hooks_load(module)  # a hook may change the weights: read them after it ran
        now = {} if lazy else model
        self._record(read_tensors(ckpt, {**now, **optim, **extras}, sources=ordered, threads=self.read_threads,
                                  comm=comm, balanced=self.balanced_reads,
                                  same_host=self.same_host_reads), comm, strategy)  # fmt: skip

        def lookup(key: str) -> Any:
            if key.startswith(state.MODEL):
                return model.get(key, _SKIP)
            if key.startswith(state.OPTIM):
                return optim.get(key, Pending(key))
            return extras[key]

        checkpoint = state.join(ckpt.skeleton, lookup, stock.safe_globals(self.safe_globals), trusted=stock.trusted(weights_only))
        if self.incremental and comm.rank == 0:  # a resumed run's next save borrows from what it resumed from
            self._base, self._since_full = Base(url, ckpt.manifest, ckpt.metadata), 1
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if v is not _SKIP}
            if lazy:
                checkpoint["state_dict"] = LazyModelState(
                    [k for k in checkpoint["state_dict"]],
                    read=lambda keys: self._read_model(ckpt, ordered, {k: model[state.model_key(k)] for k in keys}, SOLO, copy=True),
                    read_in_place=lambda keys: self._read_model(ckpt, ordered, {k: model[state.model_key(k)] for k in keys}, comm),
                )  # fmt: skip
        self._loaded = _Loaded(id(checkpoint), full=False)
        self.stats.loaded_from = url
        return self._exclude(checkpoint, exclude)

    def _read_model(self, ckpt: Any, sources: list[Any], targets: dict[str, Any], comm: Comm,
                    copy: bool = False) -> dict[str, Any]:
        """Read model tensors ``{fqn: target}``: into new tensors shaped like the targets (``copy``), else in place.

        In place, collective over ``comm``; balanced only when every rank reads the same keys."""
        if copy:
            targets = {k: torch.empty_like(v) for k, v in targets.items()}
        balanced = self.balanced_reads and comm.active and len(set(comm.all_gather(tuple(sorted(targets))))) == 1
        read_tensors(ckpt, {state.model_key(k): v for k, v in targets.items()}, sources=sources,
                     threads=self.read_threads, comm=comm, balanced=balanced)
        return targets

    def exclude_next_load(self, path: str, parts: list[str]) -> None:
        """Leave ``parts`` (as in ``exclude_from_loading``) out of the next routed load of ``path`` only."""
        self._next_exclude[str(path).rstrip("/")] = _check_exclude(parts)

    def _exclude(self, checkpoint: dict[str, Any], exclude: list[str]) -> dict[str, Any]:
        """Leave the ``exclude`` parts out of a loaded checkpoint dict (in place); record what to skip."""
        if self._loaded is None or self._loaded.checkpoint_id != id(checkpoint):
            self._loaded = _Loaded(id(checkpoint), full=False)
        for part in exclude:
            if part == "model":
                self._loaded.skip_model = True
                checkpoint["state_dict"] = {}
            elif part == "optimizer":
                self._loaded.skip_optim = True
                checkpoint["optimizer_states"] = []
            elif part == "lr_schedulers":
                checkpoint["lr_schedulers"] = []
            elif part in checkpoint:
                del checkpoint[part]
            else:
                log.warning("exclude_from_loading: the checkpoint has no %r", part)
        return checkpoint

    def load_model_routed(self, strategy: Strategy, checkpoint: dict[str, Any], strict: bool = True) -> None:
        """Apply ``checkpoint["state_dict"]`` to the model, after the LightningModule's ``on_load_checkpoint``.

        Collective. Entries of a `LazyModelState` that no hook read or replaced are read from storage
        straight into the model's tensors now; everything else is applied as given.
        """
        loaded = self._loaded if self._loaded is not None and self._loaded.checkpoint_id == id(checkpoint) else None
        if loaded is not None and loaded.skip_model:
            return
        sd = checkpoint["state_dict"]
        if isinstance(sd, LazyModelState):
            sd = sd.resolve()
        set_model_state(strategy, sd, strict, full=loaded is not None and loaded.full)

    def load_optimizers_routed(self, strategy: Strategy, checkpoint: dict[str, Any]) -> None:
        """Apply the optimizer states that `load_routed()` read (no I/O happens here).

        A state saved by parameter index (a stock file, or a checkpoint imported from one) is mapped onto the
        live optimizer's parameters in order, as ``torch.optim.Optimizer.load_state_dict`` does."""
        loaded = self._loaded if self._loaded is not None and self._loaded.checkpoint_id == id(checkpoint) else None
        if loaded is not None and loaded.skip_optim:
            return
        saved_states = checkpoint.get("optimizer_states", [])
        optimizers = list(strategy.optimizers)
        if not saved_states or (loaded is not None and loaded.full):
            saved_states = list(saved_states or [])  # as stock Lightning: zip, an empty list loads nothing
            optimizers = optimizers[: len(saved_states)]
        elif len(saved_states) != len(optimizers):
            raise StateMismatchError(f"the checkpoint holds {len(saved_states)} optimizer states, the model configures "
                                     f"{len(optimizers)} optimizers")  # fmt: skip
        start = time.perf_counter()
        for opt, saved in zip(optimizers, saved_states):
            missing = [p.key for st in saved.get("state", {}).values() for p in st.values() if isinstance(p, Pending)]
            if missing:
                raise RuntimeError(f"optimizer state {missing[0]!r} was not read when the checkpoint was loaded")
            set_optimizer_state(strategy, opt, saved, full=loaded is not None and loaded.full,
                                where=self.stats.loaded_from or "checkpoint")
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

    def check_root(self, root: str, comm: Comm | None = None) -> None:
        """Collective (every rank, same order): refuse a root that the job's nodes do not share, unless
        ``node_local``. Checked once per root and plugin; a job on one node checks nothing."""
        if self.node_local or root in self._checked_roots:
            return
        comm = comm or self._comm()
        check_shared_root(root, comm, self.storage)
        self._checked_roots.add(root)

    def wait_snapshot(self) -> None:
        """Block until the save in flight has copied everything it saves (its snapshot is complete); after
        this, training may change any tensor. The optimizer steps of the strategy's optimizers do this by
        themselves. Returns at once when no save is in flight."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.wait()

    def _hook_optimizers(self, strategy: Strategy) -> None:
        """Make every optimizer of ``strategy`` wait for the pipelined snapshot before it steps (once each)."""
        for opt in strategy.optimizers:
            if opt not in self._hooked and hasattr(opt, "register_step_pre_hook"):
                self._hooked[opt] = opt.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        """Step pre-hook: the update must not start before the snapshot has copied the parameters. A step with a
        closure (Lightning's automatic optimization runs forward and backward inside ``optimizer.step``) gets
        a closure that waits after it returns, so forward and backward still overlap with the copy."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.done:
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if not callable(closure):
            self._wait_for(snapshot)
            return None

        def closure_then_wait() -> Any:
            out = closure()
            self._wait_for(snapshot)
            return out

        if "closure" in kwargs or not args:
            return args, {**kwargs, "closure": closure_then_wait}
        return (closure_then_wait, *args[1:]), kwargs

    def _wait_for(self, snapshot: PendingSnapshot) -> None:
        if snapshot.done:
            return
        start = time.perf_counter()
        snapshot.wait()
        self.stats.step_wait_s += time.perf_counter() - start

    def wait(self) -> None:
        """Block until the save in flight has committed; raise `CheckpointSaveError` if it failed."""
        future, self._future = self._future, None
        if future is not None:
            try:
                future.result()
            finally:
                self._failed = False

    def _write(self, url: str, skeleton: Any, tensors: dict[str, Any] | PendingSnapshot, manifest: ondisk.Manifest,
               comm: Comm, params: set[str] | None = None, background: bool = False) -> None:
        with self._lock:
            self._in_flight = True
        try:
            if isinstance(tensors, PendingSnapshot):  # the pipelined part of an async snapshot
                tensors_ = tensors.run()
                self.stats.snapshot_copy_s = tensors.copy_s
                try:  # every rank learns whether any rank's copy is unusable, before anything is written
                    tensors.check(comm.all_gather)
                except CheckpointSaveError as e:
                    if comm.rank == 0:
                        release(url, self.storage)
                    raise CheckpointSaveError(f"saving checkpoint {url} failed (nothing was committed): {e}") from None
                tensors = tensors_
            exact = self.compression.exact_every and (self.stats.saves + 1) % self.compression.exact_every == 0
            compression = self.compression.exact() if exact else self.compression
            result = write_checkpoint(url, skeleton, tensors, manifest, self.write_options, comm, self.storage,
                                      compression, params, self._plan_cache if comm.active else None,
                                      self._incremental_save(url, comm), compact=self._compact(comm))
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
        self.stats.load_bytes_process_group = stats.bytes_process_group
        self.stats.load_same_host = stats.same_host
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
                 _lock=None, _in_flight=False, _failed=False, resolver=_only, _loaded=None, _next_exclude={},
                 _snapshot=None, _hooked=None, _checked_roots=set(), _base=None)
        return s

    def __setstate__(self, s: dict[str, Any]) -> None:
        self.__dict__.update(s)
        self._lock = threading.Lock()
        self._hooked = weakref.WeakKeyDictionary()


def _parent(url: str) -> str:
    """The directory a checkpoint URL is in (its root), as a string."""
    u = url.rstrip("/")
    return (u.rsplit("/", 1)[0] or "/") if "/" in u else "."


STEP_PREFIX = "step:"


def _only(url: str) -> list[list[str]]:
    """The default resolver: a load of ``url`` uses ``url`` alone."""
    if url.startswith(STEP_PREFIX):
        raise CheckpointNotFoundError(
            f"ckpt_path={url!r} names a checkpoint by step, which needs a DistCheckpoint callback (it knows the "
            f"checkpoint folder); pass the checkpoint's path instead"
        )
    return [[url]]


@dataclass
class _Loaded:
    """What a routed load left for ``load_model_routed`` / ``load_optimizers_routed`` (same checkpoint dict)."""

    checkpoint_id: int
    full: bool  # tensors are whole (a stock file), not shaped like the live (possibly sharded) state
    skip_model: bool = False
    skip_optim: bool = False


_UNREAD = object()


class LazyModelState(dict):  # type: ignore[type-arg]
    """``checkpoint["state_dict"]`` of a routed load whose LightningModule overrides ``on_load_checkpoint``.

    It behaves as the dict of the checkpoint's weights (a ``dict``; keys, ``in`` and ``len`` are free). The
    first time a hook reads a value, every value is read from storage (this process alone) into new tensors
    shaped like the model's. Entries the hook assigns or deletes are taken as it left them. Entries it never
    read, assigned or deleted are read straight into the model's tensors (collectively) when Lightning applies
    the state, after the hook: no copy of the weights is made unless a hook looks at them. Pickles and copies
    as a plain dict of its values.
    """

    def __init__(self, keys: list[str], read: Callable[[list[str]], dict[str, Any]],
                 read_in_place: Callable[[list[str]], dict[str, Any]]) -> None:
        super().__init__((k, _UNREAD) for k in keys)
        self._read = read
        self._read_in_place = read_in_place

    def _unread(self) -> list[str]:
        return [k for k, v in dict.items(self) if v is _UNREAD]

    def _fill(self) -> None:
        keys = self._unread()
        if keys:
            for k, v in self._read(keys).items():
                dict.__setitem__(self, k, v)

    def resolve(self) -> dict[str, Any]:
        """The state to apply, as a plain dict: unread entries are read into the model's tensors now."""
        live = self._read_in_place(self._unread())
        return {k: live[k] if v is _UNREAD else v for k, v in dict.items(self)}

    def __getitem__(self, key: str) -> Any:
        self._fill()
        return dict.__getitem__(self, key)

    def __iter__(self) -> Any:  # defined so that dict(x) and {**x} go through __getitem__
        return dict.__iter__(self)

    def get(self, key: str, default: Any = None) -> Any:
        self._fill()
        return dict.get(self, key, default)

    def values(self) -> Any:
        self._fill()
        return dict.values(self)

    def items(self) -> Any:
        self._fill()
        return dict.items(self)

    def pop(self, key: str, *default: Any) -> Any:
        self._fill()
        return dict.pop(self, key, *default)

    def popitem(self) -> Any:
        self._fill()
        return dict.popitem(self)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._fill()
        return dict.setdefault(self, key, default)

    def copy(self) -> dict[str, Any]:
        self._fill()
        return dict(dict.items(self))

    def __or__(self, other: Any) -> Any:
        return self.copy() | other

    def __ror__(self, other: Any) -> Any:
        return other | self.copy()

    def __eq__(self, other: object) -> bool:
        self._fill()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._fill()
        return dict.__repr__(self)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (self.copy(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self.copy(), memo)


def _hooks_load(module: Any) -> bool:
    """Whether the LightningModule overrides ``on_load_checkpoint`` (it may change ``checkpoint["state_dict"]``)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return module is not None and is_overridden("on_load_checkpoint", module)


def _saved_param_names(saved_optims: Any, i: int, strategy: Strategy, optimizer: Any, url: str) -> dict[str, Any]:
    """For optimizer ``i`` saved by parameter index (imported from a stock file): live FQN -> saved index."""
    if not isinstance(saved_optims, list) or i >= len(saved_optims) or not stock.is_index_keyed(saved_optims[i]):
        return {}
    order = [p for g in saved_optims[i].get("param_groups", []) for p in g.get("params", [])]
    fqns = stock.index_fqns(strategy, optimizer)
    if len(order) != len(fqns):
        raise StateMismatchError(f"{url}: optimizer {i} holds {len(order)} parameters, the live one {len(fqns)}")
    return dict(zip(fqns, order))


def _automatic_optimization(strategy: Strategy) -> bool:
    """Whether the strategy's LightningModule uses automatic optimization (True if there is none)."""
    module = strategy.lightning_module
    return module is None or bool(getattr(module, "automatic_optimization", True))


def _running(strategy: Strategy) -> bool:
    """Whether a ``fit``/``validate``/``test``/``predict`` of the strategy's Trainer is running."""
    from lightning.pytorch.trainer.states import TrainerStatus

    module = strategy.lightning_module
    trainer = getattr(module, "_trainer", None) if module is not None else None
    return trainer is not None and trainer.state.status == TrainerStatus.RUNNING


def _refuse_storage_options(io: Any, storage_options: Any) -> None:
    if storage_options is not None:
        raise TypeError(
            f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
            f"`{type(io).__name__}`: storage settings belong to the plugin, "
            f"`DistCheckpointIO(storage_options=..., hdfs=...)`."
        )


_EXCLUDE_ALIASES = {"optimizers": "optimizer", "optimizer_states": "optimizer", "state_dict": "model",
                    "lr_scheduler": "lr_schedulers", "schedulers": "lr_schedulers"}  # fmt: skip


def _check_exclude(parts: list[str] | None) -> list[str]:
    out = []
    for part in parts or []:
        if not isinstance(part, str) or not part:
            raise ValueError(f"exclude_from_loading: expected names of checkpoint parts, got {part!r}")
        out.append(_EXCLUDE_ALIASES.get(part, part))
    return out


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

