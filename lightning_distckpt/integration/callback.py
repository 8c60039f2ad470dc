"""DistCheckpoint: Lightning's ModelCheckpoint, saving through DistCheckpointIO, with ``keep_last``.

It keeps every option of ``ModelCheckpoint`` (``monitor``, ``save_top_k``, ``every_n_train_steps``,
``filename`` ...) and adds:

* ``keep_last=N``: keep the N newest committed checkpoints this callback saved, in addition to the top-k
  ones; older ones are removed only after a newer one has committed (never the newest);
* ``replicas=[URL, ...]``: every committed checkpoint is copied to each replica root in the background
  (`lightning_distckpt.replication`); retention applies per target;
* ``ckpt_path="last"`` resolves to the newest *committed* checkpoint under ``dirpath`` or any replica, as
  rank 0 lists them (every rank restores rank 0's choice, and follows rank 0's fallback order); a
  load reads each file from the first healthy copy and, if no copy of it is complete, falls back to the
  previous checkpoint (loudly). An explicit path is never substituted unless ``fallback_to_previous``;
* stale staging directories of crashed saves are removed at setup (committed checkpoints never are);
* checkpoints are directories named like ModelCheckpoint's files, without the ``.ckpt`` suffix;
* ``ckpt_path="step:N"`` resumes the committed checkpoint of global step N under ``dirpath`` (or a replica);
* ``initial_load_path``: a warm start (model weights only by default) when the folder holds no committed
  checkpoint to resume; ``last_save_model_only`` / ``export_dtype``: a final save of the weights alone.
* every root is reached at setup, before the first training step, within the plugin's ``connect_timeout_s``:
  an unreachable or misconfigured checkpoint root (a file, a scheme without an installed backend) fails
  there on every rank with the URL in the message; a replica root whose backend is missing fails too, one
  that is merely down is a loud warning and the metric ``distckpt/replicas_unreachable``. ModelCheckpoint's
  own filesystem calls on a URL root go through the package's client, each bounded by the same timeout;
* blocks read from another copy because the first copy failed verification are reported (a warning, and
  ``distckpt/repaired_blocks`` in ``trainer.callback_metrics``).

In ``setup`` it makes sure the strategy is routed through a `DistCheckpointIO` (creating a default
one if the Trainer has none) and fails clearly for a strategy that cannot be routed.
"""

from __future__ import annotations

import logging
import threading
import warnings
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_distckpt import catalog, ondisk
from lightning_distckpt.catalog import check_keep_last
from lightning_distckpt.catalog.blocks import data_ids_of, sweep_after_removal
from lightning_distckpt.catalog.index import CatalogOptions
from lightning_distckpt.catalog.replication import Replicator, describe
from lightning_distckpt.errors import (
    CheckpointNotFoundError,
    DistCheckpointError,
    BackendUnavailableError,
    StorageError,
    StorageUnreachableError,
)
from lightning_distckpt.integration.catalog_hook import make_hook
from lightning_distckpt.integration.plugin import DistCheckpointIO
from lightning_distckpt.integration.plugin import STEP_PREFIX
from lightning_distckpt.integration.routing import route
from lightning_distckpt.ondisk.names import check_checkpoint_name
from lightning_distckpt.parallel.comm import Comm
from lightning_distckpt.storage import (
    StorageConfig,
    StorageLike,
    bounded_filesystem,
    is_local,
    open_store,
    probe,
    within,
)

log = logging.getLogger(__name__)


def _check_fsspec_knows(dirpath: str) -> None:
    """ModelCheckpoint (which DistCheckpoint extends) makes and lists ``dirpath`` through fsspec: a scheme that only
    ``lightning_distckpt.storage.register_store`` serves gets a clear error here, not fsspec's "Protocol not known"."""
    import fsspec

    scheme = dirpath.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError):
        from lightning_distckpt.storage.registry import _factory

        if _factory(scheme) is None:
            return  # neither knows it: ModelCheckpoint's own error says so
        raise ValueError(
            f"DistCheckpoint(dirpath={dirpath!r}): {scheme}:// is a store registered with lightning_distckpt only; "
            "DistCheckpoint, a ModelCheckpoint, also needs an fsspec filesystem for it (fsspec.register_implementation)"
            ". The plugin alone reads and writes it: trainer.save_checkpoint(url), fit(ckpt_path=url)") from None


class DistCheckpoint(ModelCheckpoint):
    """Save sharded checkpoints on a schedule; keep the last N; resume from the newest committed one.

    Every argument of `ModelCheckpoint` of the installed Lightning works as there (a test compares the
    signatures).

    Args:
        dirpath: Where checkpoints go: a local path, ``file://`` or any fsspec URL (``hdfs://nn:8020/x``).
            Defaults to Lightning's ``<log_dir>/checkpoints``.
        keep_last: Keep this many of the newest checkpoints (plus the top-k ones when ``monitor`` is set).
            ``None`` keeps ModelCheckpoint's own rule (``save_top_k``).
        replicas: Root URLs that receive a verified copy of every committed checkpoint.
        fallback_to_previous: Also fall back to older checkpoints when an explicitly given checkpoint
            path cannot be read from any copy (``ckpt_path="last"`` always does).
        replication_timeout_s: How long the end of ``fit`` waits for replication still in progress.
        catalog: ``hbase://HOST:PORT/TABLE``: index every committed checkpoint of this run there (off the training
            thread, rank 0), resolve ``ckpt_path="last"``/``"best"`` through it (see :mod:`~lightning_distckpt.
            integration.catalog_hook`). Catalog errors never fail training.
        run: The run's name in the catalog (required with ``catalog``; a restarted job reuses it and takes over).
        catalog_options: Timeouts, retries and namespace of the catalog client.
        initial_load_path: A checkpoint (of this package or a stock Lightning file) to start from when
            ``dirpath`` holds no committed checkpoint: with ``fit(ckpt_path="last")`` it is what "last" finds,
            with ``fit()`` its weights are loaded at the start of ``fit``. Ignored once ``dirpath`` has a
            committed checkpoint (a restarted job resumes its own).
        initial_load_model_only: Take only the model weights from ``initial_load_path`` (optimizer, schedulers,
            loops and callbacks start fresh). ``False`` resumes everything from it, which needs
            ``fit(ckpt_path="last")``.
        last_save_model_only: At the end of ``fit``, save the model weights alone (no optimizer state) as
            ``<dirpath>/<final_name>``; that checkpoint is never what ``ckpt_path="last"`` resumes.
        export_dtype: Cast floating-point weights of that final save to this dtype (``"bfloat16"``,
            ``"float16"``, ``"float32"``); ``None`` keeps the training dtype.
        final_name: The name of the final weights-only checkpoint.
    """

    FILE_EXTENSION = ""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        keep_last: int | None = None,
        replicas: list[str] | None = None,
        fallback_to_previous: bool = False,
        replication_timeout_s: float = 600.0,
        catalog: str | None = None,
        run: str | None = None,
        catalog_options: CatalogOptions | None = None,
        initial_load_path: str | None = None,
        initial_load_model_only: bool = True,
        last_save_model_only: bool = False,
        export_dtype: Literal["float32", "float16", "bfloat16"] | None = None,
        final_name: str = "final-weights",
    ) -> None:
        if keep_last is not None:  # one rule with `distckpt gc --keep-last` (catalog.check_keep_last)
            check_keep_last(keep_last, "DistCheckpoint(keep_last)")  # (the argument `catalog` shadows the module)
        if dirpath is not None and not isinstance(dirpath, str):
            dirpath = str(dirpath)
        if dirpath is not None and dirpath.startswith("file://"):
            dirpath = dirpath[len("file://") :]  # ModelCheckpoint would turn the URL into a relative path
        if dirpath is not None and "://" in dirpath:
            _check_fsspec_knows(dirpath)
        if keep_last is not None and monitor is None:
            save_top_k = -1  # the newest ``keep_last`` are kept by retention, not by ModelCheckpoint
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose, save_last=save_last,
            save_top_k=save_top_k, save_on_exception=save_on_exception, save_weights_only=save_weights_only, mode=mode,
            auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=enable_version_counter,
        )  # fmt: skip
        self.keep_last = keep_last
        self.replicas = [r[len("file://") :] if r.startswith("file://") else r for r in (replicas or [])]
        self.fallback_to_previous = fallback_to_previous
        self.replication_timeout_s = replication_timeout_s
        if export_dtype is not None and export_dtype not in _EXPORT_DTYPES:
            raise ValueError(f"DistCheckpoint(export_dtype={export_dtype!r}): expected one of {sorted(_EXPORT_DTYPES)}")
        check_checkpoint_name(final_name, "DistCheckpoint(final_name=...)")
        self.initial_load_path = str(initial_load_path) if initial_load_path is not None else None
        self.initial_load_model_only = initial_load_model_only
        self.last_save_model_only = last_save_model_only
        self.export_dtype = export_dtype
        self.final_name = final_name
        self._saved: list[str] = []  # checkpoints this callback wrote and still keeps, oldest first (state)
        self._ever: set[str] = set()  # names of every checkpoint this callback wrote (state)
        self._lock = threading.Lock()
        self._io: DistCheckpointIO | None = None
        self._replicator: Replicator | None = None
        self._final_replication: dict[str, Any] | None = None
        self._last_resolved: str | None = None
        self._unreachable: list[str] = []  # replica roots that did not answer at setup (warned, not resumed from)
        self._last_requested = False  # ckpt_path="last" was resolved by this rank alone; setup settles it
        # -- catalog (integration/catalog_hook.py) --
        self._catalog = make_hook(catalog, run, catalog_options)
        self._check_filename()

    def _check_filename(self) -> None:
        """Refuse a ``filename`` template that cannot make a checkpoint name now, not at the first save: it
        must format (every ``{metric}`` filled with 0, as ModelCheckpoint does for missing metrics) into one
        plain path component (letters, digits, ``_.=+-``; no ``/``, no leading dot), also with a version
        suffix, and so must the name of the ``last`` checkpoint."""
        names = []
        try:
            for template in (self.filename, self.CHECKPOINT_NAME_LAST):
                name = self._format_checkpoint_name(template, {}, auto_insert_metric_name=self.auto_insert_metric_name)
                names += [name, self.CHECKPOINT_JOIN_CHAR.join((name, "v1"))]
        except (KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(f"DistCheckpoint(filename={self.filename!r}): not a usable name template: "
                             f"{type(e).__name__}: {e}") from None  # fmt: skip
        bad = [n for n in names if not ondisk.is_checkpoint_name(n) or n.startswith(".")]
        if bad:
            raise ValueError(
                f"DistCheckpoint(filename={self.filename!r}) makes the checkpoint name {bad[0]!r}: a checkpoint name "
                f"must be one path component (no '/', '\\' or control characters, no '.staging-'/'.trash-'), not "
                f"starting with a dot (such checkpoints are not listed: 'last' and retention would never see them)"
            )

    # -- wiring ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        io = strategy._checkpoint_io
        if io is None or type(io) is TorchCheckpointIO:
            rank_zero_info("DistCheckpoint: the Trainer has no DistCheckpointIO plugin; using DistCheckpointIO()")
            io = DistCheckpointIO()
            strategy.checkpoint_io = io
        if not isinstance(io, DistCheckpointIO):
            raise TypeError(
                f"DistCheckpoint needs DistCheckpointIO as the Trainer's checkpoint plugin, found {type(io).__name__}; "
                f"pass plugins=[DistCheckpointIO(...)]"
            )
        route(strategy, io)
        self._io = io
        self._reach_roots(trainer)  # before ModelCheckpoint's own calls on the root, on every rank
        super().setup(trainer, pl_module, stage)
        io.resolver = self._candidates
        if stage == "fit" and self.dirpath is not None:
            io.check_root(str(self.dirpath))  # collective: every node must see the same root (or node_local)
        if self._catalog is not None:  # catalog: no "best" lookups after setup; rank 0 owns the run while fitting
            self.__dict__["_best_asked"] = True
            if trainer.is_global_zero and stage == "fit":
                self._catalog.start()
        if trainer.is_global_zero and stage == "fit":
            for root in self._reachable(self.roots):
                try:
                    for url in catalog.clean_stale(root, io.storage):
                        log.warning("removed %s (a save or copy that never committed)", url)
                except Exception as e:  # noqa: BLE001 - cleanup never fails training
                    log.warning("could not clean up stale saves under %s: %s", root, e)
        self._settle_last(trainer)
        if self.replicas and stage == "fit" and self._replicator is None:
            self._replicator = Replicator(self.replicas, io.storage, _replication_comm(),
                                          after_replica_commit=self._retain_replica)  # fmt: skip

    @property
    def roots(self) -> list[str]:
        """The primary root and the replica roots."""
        return [str(self.dirpath), *self.replicas] if self.dirpath is not None else list(self.replicas)

    def _reachable(self, roots: list[str]) -> list[str]:
        return [r for r in roots if r not in self._unreachable]

    def _reach_roots(self, trainer: pl.Trainer) -> None:
        """Reach the checkpoint root and every replica root, on every rank, each within ``connect_timeout_s``.

        Collective (every rank calls it in ``setup``; the verdicts are gathered, so every rank decides the
        same): any rank failing to reach the checkpoint root, or lacking a replica's backend, raises the same
        error on every rank, naming the URL, what was tried and the ranks; a replica that is down on some
        rank is a warning and ``distckpt/replicas_unreachable``. Blocks at most about ``connect_timeout_s``
        per root.
        """
        storage = self.io.storage
        roots = self.roots
        mine = []
        for root in roots:
            try:
                probe(root, storage)
                mine.append(None)
            except StorageError as e:
                kind = ("missing" if isinstance(e, BackendUnavailableError)
                        else "unreachable" if isinstance(e, StorageUnreachableError) else "error")  # fmt: skip
                mine.append((kind, str(e)))
        comm = self.io._comm()
        verdicts = comm.all_gather(mine)
        unreachable = []
        for i, root in enumerate(roots):
            failed = [(rank, v[i]) for rank, v in enumerate(verdicts) if v[i] is not None]
            if not failed:
                continue
            rank, (kind, message) = failed[0]
            ranks = sorted({r for r, _ in failed})
            where = f" (seen by rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" if comm.world_size > 1 else ""
            primary = i == 0 and self.dirpath is not None
            if primary or kind == "missing":
                cls = {"missing": BackendUnavailableError, "unreachable": StorageUnreachableError}.get(kind, StorageError)
                what = "checkpoint root" if primary else "replica root"
                raise cls(f"DistCheckpoint {what} {root}: {message}{where}")
            unreachable.append(root)
            if comm.rank == 0:
                rank_zero_warn(
                    f"REPLICA UNREACHABLE AT SETUP: {message}{where}. Training goes on; checkpoints are copied there "
                    f"once it answers (failed copies count in distckpt/replica_failures), and it is not used to "
                    f"resume in this run."
                )
        self._unreachable = unreachable

    @property
    def _fs(self) -> Any:
        """ModelCheckpoint's filesystem for ``dirpath``. For a URL: the package's own client for it (fast-fail
        HDFS settings, the plugin's storage options), each call bounded by ``connect_timeout_s``; a local path
        keeps fsspec's local filesystem. (ModelCheckpoint assigns ``_fs``; the assignment is kept for local paths.)
        """
        stock = self.__dict__.get("_stock_fs")
        dirpath = self.__dict__.get("dirpath")
        if dirpath is None or is_local(str(dirpath)):
            return stock
        io = self.__dict__.get("_io")
        storage = io.storage if io is not None else StorageConfig()
        cached = self.__dict__.get("_bounded_fs")
        if cached is None or cached[0] != str(dirpath) or cached[1] is not storage:
            cached = (str(dirpath), storage, bounded_filesystem(str(dirpath), storage))
            self.__dict__["_bounded_fs"] = cached
        return cached[2]

    @_fs.setter
    def _fs(self, value: Any) -> None:
        self.__dict__["_stock_fs"] = value

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer._checkpoint_connector.__dict__.pop("_restore_modules_and_callbacks", None)  # if never called
        if self._replicator is not None:
            self.io.wait()  # the last save commits, and queues its replication, first
            finished = self._replicator.close(self.replication_timeout_s)
            self._final_replication = describe(self._replicator.stats)
            group, self._replicator = self._replicator.comm.group, None
            if finished and group is not None:  # its own gloo group (made in setup): not leaked across fits
                import torch.distributed as dist

                dist.destroy_process_group(group)
        if self._catalog is not None:  # catalog: the last save's registration is written before fit returns
            self.io.wait()
            self._catalog.close()
        if trainer.is_global_zero:  # the final counts, also of copies that ended after the last step
            for name, value in self._metrics().items():
                trainer.callback_metrics[name] = torch.tensor(value)

    def _metrics(self) -> dict[str, float]:
        """The counters this callback reports: replication (with replicas) and repairs on load."""
        out: dict[str, float] = {}
        st = self._replicator.stats if self._replicator is not None else None
        if st is not None or self._final_replication is not None:
            out["distckpt/replica_failures"] = float(st.failures if st else self._final_replication["failures"])  # type: ignore[index]
            out["distckpt/replicas_pending"] = float(st.pending if st else self._final_replication["pending"])  # type: ignore[index]
        if self.replicas:
            out["distckpt/replicas_unreachable"] = float(len(self._unreachable))
        if self._io is not None and (self.replicas or self._io.stats.repaired_blocks):
            out["distckpt/repaired_blocks"] = float(self._io.stats.repaired_blocks)
        if self._catalog is not None:  # catalog: failed calls, waiting registrations, refused zombie attempts
            st = self._catalog.describe()
            out.update({f"distckpt/catalog_{k}": float(st[k]) for k in ("failures", "pending", "refused")})
        return out

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:  # the metrics of setup and restore (Lightning resets them after a restore)
            for name, value in self._metrics().items():
                trainer.callback_metrics[name] = torch.tensor(value)

    @property
    def replication(self) -> dict[str, Any] | None:
        """Replication counters (``copied``, ``failures``, ``pending``); after ``fit`` the final ones. None
        without replicas."""
        return describe(self._replicator.stats) if self._replicator else self._final_replication

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        for name, value in self._metrics().items():
            pl_module.log(name, value, rank_zero_only=True)

    @property
    def io(self) -> DistCheckpointIO:
        if self._io is None:
            raise RuntimeError("DistCheckpoint is not set up yet")
        return self._io

    # -- saving and retention ----------------------------------------------------------------------
    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        with self._lock:
            if filepath in self._saved:
                self._saved.remove(filepath)
            self._saved.append(filepath)
            self._ever.add(_name(filepath))
        super()._save_checkpoint(trainer, filepath)
        if self._catalog is not None and trainer.is_global_zero:  # catalog: register after the commit
            self._catalog.after_save(trainer, filepath, self.monitor, self.mode, self.io.after_commit)
        if self.keep_last is not None and trainer.is_global_zero:
            self.io.after_commit(lambda result: self.apply_retention())
        if self._replicator is not None:
            replicator = self._replicator
            self.io.after_commit(lambda result: replicator.submit(_name(filepath), filepath))

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self.keep_last is not None:
            return  # retention decides, after the newer checkpoint has committed
        with self._lock:
            if filepath in self._saved:
                self._saved.remove(filepath)
        if self._catalog is not None:  # catalog: fenced removal (row deleting, marker, data, row), rank 0
            if trainer.is_global_zero:
                self.io.after_commit(lambda r: self._catalog.remove(filepath, self.io.remove_checkpoint,  # type: ignore[union-attr]
                                                                    self.io.storage, remember=True))
            return
        super()._remove_checkpoint(trainer, filepath)

    def apply_retention(self) -> list[str]:
        """Remove this callback's committed checkpoints beyond the newest ``keep_last`` and the top-k.

        Runs on rank 0 after a commit (in the background thread for async saves). Returns what it removed.
        """
        if self.keep_last is None:
            return []
        with self._lock:
            saved = [p for p in self._saved if self._is_ours(p)]
        alive = [p for p in saved if _is_committed(p, self.io.storage)]
        protect = set(alive[-self.keep_last :]) | set(self.best_k_models) | {self.best_model_path, self.last_model_path}
        removed = []
        for path in alive:
            if path not in protect:
                if self._catalog is None:
                    self.io.remove_checkpoint(path)
                elif not self._catalog.remove(path, self.io.remove_checkpoint, self.io.storage):
                    continue  # catalog: could not fence the removal; the next pass tries again
                removed.append(path)
        with self._lock:
            self._saved = [p for p in self._saved if p not in removed]
        if removed:
            log.info("retention removed %s", ", ".join(removed))
        return removed

    def _retain_replica(self, target: str, name: str) -> None:
        """Rank 0, after a replica commits: remove there what the primary no longer keeps (never the newest)."""
        if self._catalog is not None:  # catalog: record the copy's location
            self._catalog.replica_committed(target, name)
        with self._lock:
            keep = {_name(p) for p in self._saved}
            ever = set(self._ever)
        found = catalog.committed(target, self.io.storage)
        newest = found[-1].name if found else None
        store, root = open_store(target, self.io.storage)
        for c in found:
            if c.name in ever and c.name not in keep and c.name != newest:
                path = store.join(root, c.name)
                ids = data_ids_of(store, path)
                catalog.remove_checkpoint(store, path)
                sweep_after_removal(store, path, ids, self.io.storage)  # blocks newer copies borrow stay

    # -- resume ------------------------------------------------------------------------------------
    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """The newest committed checkpoint under ``dirpath`` or a replica, as this rank lists them; with none,
        ``initial_load_path`` (a warm start). The final weights-only save (``final_name``) never counts.

        Lightning resolves ``ckpt_path="last"`` on every rank *before* the process group exists, so this
        rank's answer is provisional: `setup` decides on rank 0, broadcasts, and makes every rank restore
        that checkpoint (ranks that list storage differently still restore the same one). The listing is bounded
        by ``connect_timeout_s``; a root that does not answer is reported by `setup`.
        """
        dirpath = self.dirpath if self.dirpath is not None else _default_dirpath(trainer)
        self._last_requested = True
        io = trainer.strategy._checkpoint_io
        try:
            self._last_resolved = self._newest(str(dirpath), io.storage if isinstance(io, DistCheckpointIO) else None)
        except StorageError as e:  # provisional: `setup` lists again on rank 0 and raises on every rank
            log.debug("ckpt_path='last', provisional listing on this rank failed: %s", e)
            self._last_resolved = None
            warnings.filterwarnings("ignore", message=_LIGHTNING_NO_LAST)  # not "starting from scratch": setup decides
            return set()
        if not self._last_resolved and self.initial_load_path is not None:
            return {self._warm_start(trainer)}
        if not self._last_resolved:
            _no_last_checkpoint([str(dirpath), *self.replicas])
        return {self._last_resolved} if self._last_resolved else set()

    def _warm_start(self, trainer: pl.Trainer, quiet: bool = False) -> str:
        """``initial_load_path``, which this rank's next load of it reads as a warm start (model weights only
        unless ``initial_load_model_only=False``)."""
        assert self.initial_load_path is not None
        io = self._io or trainer.strategy.checkpoint_io
        if self.initial_load_model_only and isinstance(io, DistCheckpointIO):
            io.exclude_next_load(self.initial_load_path, _WARM_START_EXCLUDED)
        if not quiet:
            rank_zero_info(f"DistCheckpoint: no committed checkpoint to resume under {self.dirpath}; starting from "
                           f"initial_load_path={self.initial_load_path}"
                           + (" (model weights only)" if self.initial_load_model_only else ""))  # fmt: skip
        return self.initial_load_path

    def _newest(self, dirpath: str, options: StorageConfig | None = None) -> str | None:
        """The newest committed checkpoint under ``dirpath`` or a replica (None if there is none). Raises
        `StorageError` when that cannot be told (a root silent past its timeout, a checkpoint unreadable)."""
        options = options or (self._io.storage if self._io else StorageConfig())
        if self._catalog is not None and (url := self._catalog.lookup("last", options)):  # catalog: one round trip
            return url
        roots = self._reachable([dirpath, *self.replicas])
        try:
            found = within(lambda: catalog.latest(roots, options), options.connect_timeout(dirpath), f"list {dirpath}")
        except StorageUnreachableError as e:  # reached at setup, silent now: never "nothing to resume"
            raise StorageUnreachableError(f"{e}; ckpt_path='last' cannot tell which checkpoint is the newest and "
                                          f"refuses to start over") from e  # fmt: skip
        found = [c for c in found if c.name != self.final_name]  # weights only: never resumed as "last"
        return found[0].url if found else None

    def _settle_last(self, trainer: pl.Trainer) -> None:
        """Collective, in ``setup``: when ``ckpt_path="last"`` was asked for, rank 0 lists the roots again and
        every rank restores rank 0's choice (or nothing, if rank 0 found nothing), whatever it listed itself."""
        if not self._last_requested:
            return
        self._last_requested = False
        mine = self._last_resolved
        comm = self.io._comm()
        decided = comm.decide(lambda: self._newest(str(self.dirpath)))
        views = comm.all_gather(mine)
        self._last_resolved = decided
        if any(v != decided for v in views) and comm.rank == 0:
            rank_zero_warn(
                "ranks listed different checkpoints for ckpt_path='last' ("
                + ", ".join(f"rank {r}: {v or 'none'}" for r, v in enumerate(views))
                + f"); every rank restores rank 0's choice: {decided or 'none (start from scratch)'}"
            )
        if decided is None and self.initial_load_path is not None:
            decided = self._warm_start(trainer, quiet=True)
        connector = trainer._checkpoint_connector
        restore = connector._restore_modules_and_callbacks  # Lightning calls it with its own per-rank choice

        def restore_decided(checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> Any:
            connector.__dict__.pop("_restore_modules_and_callbacks", None)  # once
            if checkpoint_path is None or checkpoint_path == mine:  # Lightning's choice came from this callback
                checkpoint_path = decided
            return restore(checkpoint_path, *args, **kwargs)

        connector._restore_modules_and_callbacks = restore_decided

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warm start from ``initial_load_path`` when ``fit`` resumes nothing and ``dirpath`` holds no
        committed checkpoint: the model weights are read into the (set-up, possibly sharded) model, after the
        LightningModule's ``on_load_checkpoint`` saw the checkpoint, as in a resume."""
        super().on_fit_start(trainer, pl_module)
        if self.initial_load_path is None or trainer.ckpt_path is not None:
            return
        if [c for c in catalog.latest(self._reachable(self.roots), self.io.storage) if c.name != self.final_name]:
            rank_zero_info(f"DistCheckpoint: {self.dirpath} holds committed checkpoints; initial_load_path is not used "
                           f"(pass fit(ckpt_path='last') to resume them)")
            return
        if not self.initial_load_model_only:
            raise ValueError("DistCheckpoint(initial_load_model_only=False) resumes everything from initial_load_path, "
                             "which Lightning can only do at the start of a resume: use fit(ckpt_path='last')")
        self.io.exclude_next_load(self.initial_load_path, _WARM_START_EXCLUDED)
        checkpoint = trainer.strategy.load_checkpoint(self.initial_load_path)
        pl_module.on_load_checkpoint(checkpoint)
        trainer.strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
        rank_zero_info(f"DistCheckpoint: model weights loaded from initial_load_path={self.initial_load_path}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.last_save_model_only and self.dirpath is not None:
            self.save_final_weights(trainer)

    def save_final_weights(self, trainer: pl.Trainer) -> str:
        """Save the model weights alone (cast to ``export_dtype``) as ``<dirpath>/<final_name>``; collective.

        Returns once the checkpoint has committed (also with ``async_save``). Returns its URL."""
        assert self.dirpath is not None
        path = f"{str(self.dirpath).rstrip('/')}/{self.final_name}"
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
        if self.export_dtype is not None:
            dtype = getattr(torch, self.export_dtype)
            checkpoint["state_dict"] = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                                        for k, v in checkpoint["state_dict"].items()}  # fmt: skip
        trainer.strategy.save_checkpoint(checkpoint, path)
        self.io.wait()
        trainer.strategy.barrier("DistCheckpoint.save_final_weights")
        return path

    def _candidates(self, url: str) -> list[list[str]]:
        """The checkpoints a load of ``url`` may use, in order, each as the URLs of its copies.

        ``step:N`` is the newest committed checkpoint of global step N under ``dirpath`` or a replica.
        The plugin calls it on rank 0 only and broadcasts the answer (one listing, one fallback order for all
        ranks). Replica roots that were unreachable at setup are left out."""
        dirpath = str(self.dirpath) if self.dirpath is not None else None
        if url.startswith(STEP_PREFIX):
            return [self._by_step(url)]
        name, parent = _name(url), url.rstrip("/").rsplit("/", 1)[0] if "/" in url else ""
        name = ondisk.trashed_name(name) or name  # "last" may be a checkpoint a crashed overwrite moved aside
        roots = self._reachable([r for r in [dirpath, *self.replicas] if r])
        if parent not in roots:
            return [[url]]
        copies = lambda n: [f"{r.rstrip('/')}/{n}" for r in roots]  # noqa: E731
        if url == self._last_resolved or self.fallback_to_previous:
            names = [c.name for c in catalog.latest(roots, self.io.storage)]
            older = names[names.index(name) + 1 :] if name in names else names
            return [copies(name)] + [copies(n) for n in older]
        return [copies(name)]

    def _by_step(self, url: str) -> list[str]:
        roots = self.roots
        try:
            step = int(url[len(STEP_PREFIX):])
        except ValueError:
            raise CheckpointNotFoundError(f"ckpt_path={url!r}: expected 'step:<global step>', e.g. 'step:1000'") from None
        found = [c for c in catalog.latest(roots, self.io.storage)
                 if c.manifest is not None and c.manifest.global_step == step and c.name != self.final_name]  # fmt: skip
        if not found:
            raise CheckpointNotFoundError(f"ckpt_path={url!r}: no committed checkpoint of global step {step} "
                                          f"under {', '.join(roots)}")  # fmt: skip
        return [f"{r.rstrip('/')}/{found[0].name}" for r in roots]

    def __getstate__(self) -> dict[str, Any]:
        # a lock, the plugin and the replicator belong to one process (ddp_spawn pickles the callbacks)
        s = self.__dict__.copy()
        s.update(_lock=None, _io=None, _replicator=None)
        return s

    def __setstate__(self, s: dict[str, Any]) -> None:
        self.__dict__.update(s)
        self._lock = threading.Lock()

    # -- catalog: ckpt_path="best" before any state is restored (Lightning reads best_model_path first) --
    @property  # type: ignore[override]
    def best_model_path(self) -> str:
        path = self.__dict__.get("_best_model_path", "")
        hook = self.__dict__.get("_catalog")
        if not path and hook is not None and self.monitor and not self.__dict__.get("_best_asked"):
            self.__dict__["_best_asked"] = True
            path = self.__dict__["_best_model_path"] = hook.lookup("best", self._io.storage if self._io else None,
                                                                   self.monitor) or ""  # fmt: skip
        return path

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        self.__dict__["_best_model_path"] = value

    @property
    def catalog_stats(self) -> dict[str, Any] | None:
        """The catalog's counters (registered, caught_up, failures, refused, fallbacks, skipped, pending ...)."""
        return self._catalog.describe() if self._catalog is not None else None

    @override
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**super().state_dict(), "saved": list(self._saved), "ever": sorted(self._ever)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the list of checkpoints this callback wrote. Only entries that this callback could have
        written are kept: checkpoints directly under its own ``dirpath`` with a plain name (a restored state
        never makes retention delete anything elsewhere)."""
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            saved = state_dict.get("saved", [])
            ever = state_dict.get("ever", [])
            saved = [p for p in saved if self._is_ours(p)] if isinstance(saved, list) else []
            ever = {n for n in ever if ondisk.is_checkpoint_name(n)} if isinstance(ever, list) else set()
            with self._lock:
                self._saved = [p for p in saved if p not in self._saved] + self._saved
                self._ever |= ever

    def _is_ours(self, path: Any) -> bool:
        """A checkpoint URL this callback may have written: a listed checkpoint name directly under its ``dirpath``."""
        if not isinstance(path, str) or self.dirpath is None:
            return False
        base = str(self.dirpath) if str(self.dirpath).endswith("/") else f"{self.dirpath}/"  # also "memory://"
        name = path.rstrip("/")[len(base):] if path.startswith(base) else ""
        return "/" not in name and ondisk.is_checkpoint_name(name) and not name.startswith(".")


#: Lightning's warning when ``ckpt_path="last"`` finds nothing; its hint (``save_last=True``) does not apply here
_LIGHTNING_NO_LAST = r'\.\w+\(ckpt_path="last"\) is set, but there is no last checkpoint available'


def _no_last_checkpoint(roots: list[str]) -> None:
    """Say why ``ckpt_path="last"`` starts from scratch, instead of Lightning's hint to set ``save_last=True``
    (this callback finds the newest committed checkpoint itself; ``save_last`` changes nothing)."""
    where = roots[0] + (f" or its replicas ({', '.join(roots[1:])})" if len(roots) > 1 else "")
    rank_zero_info(f'DistCheckpoint: ckpt_path="last" found no committed checkpoint under {where}; training starts '
                   "from scratch (expected on a first run).")  # fmt: skip
    warnings.filterwarnings("ignore", message=_LIGHTNING_NO_LAST)


_EXPORT_DTYPES = ("float32", "float16", "bfloat16")
#: what a warm start from ``initial_load_path`` leaves out (model weights only)
_WARM_START_EXCLUDED = ["optimizer", "lr_schedulers", "loops", "callbacks"]


def _default_dirpath(trainer: pl.Trainer) -> str:
    """Where ModelCheckpoint puts checkpoints when no ``dirpath`` is given (its documented rule): the first
    logger's ``<save_dir>/<name>/<version>/checkpoints``, else ``<default_root_dir>/checkpoints``."""
    import os

    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(save_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _replication_comm() -> Comm:
    """A gloo group of all ranks for replication (collective: every rank calls this in setup)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Comm(dist.new_group(backend="gloo"))
    return Comm()


def _is_committed(url: str, options: StorageLike) -> bool:
    try:
        catalog.read_manifest(catalog.source_of(url, options))
        return True
    except DistCheckpointError:
        return False
