"""DistCheckpoint: Lightning's ModelCheckpoint, saving through DistCheckpointIO, with ``keep_last``.

It keeps every option of ``ModelCheckpoint`` (``monitor``, ``save_top_k``, ``every_n_train_steps``,
``filename`` ...) and adds:

* ``keep_last=N``: keep the N newest committed checkpoints this callback saved, in addition to the top-k
  ones; older ones are removed only after a newer one has committed (never the newest);
* ``replicas=[URL, ...]``: every committed checkpoint is copied to each replica root in the background
  (:mod:`lightning_distckpt.replication`); retention applies per target;
* ``ckpt_path="last"`` resolves to the newest *committed* checkpoint under ``dirpath`` or any replica; a
  load reads each file from the first healthy copy and, if no copy of it is complete, falls back to the
  previous checkpoint (loudly). An explicit path is never substituted unless ``fallback_to_previous``;
* stale staging directories of crashed saves are removed at setup (committed checkpoints never are);
* checkpoints are directories named like ModelCheckpoint's files, without the ``.ckpt`` suffix.

In ``setup`` it makes sure the strategy is routed through a :class:`DistCheckpointIO` (creating a default
one if the Trainer has none) and fails clearly for a strategy that cannot be routed.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_distckpt import catalog, ondisk
from lightning_distckpt.catalog.replication import Replicator, describe
from lightning_distckpt.errors import DistCheckpointError
from lightning_distckpt.integration.plugin import DistCheckpointIO
from lightning_distckpt.integration.routing import route
from lightning_distckpt.parallel.comm import Comm
from lightning_distckpt.storage import StorageLike, open_store

log = logging.getLogger(__name__)


class DistCheckpoint(ModelCheckpoint):
    """Save sharded checkpoints on a schedule; keep the last N; resume from the newest committed one.

    Every argument of :class:`~lightning.pytorch.callbacks.ModelCheckpoint` works as there.

    Args:
        dirpath: Where checkpoints go: a local path, ``file://`` or any fsspec URL (``hdfs://nn:8020/x``).
            Defaults to Lightning's ``<log_dir>/checkpoints``.
        keep_last: Keep this many of the newest checkpoints (plus the top-k ones when ``monitor`` is set).
            ``None`` keeps ModelCheckpoint's own rule (``save_top_k``).
        replicas: Root URLs that receive a verified copy of every committed checkpoint.
        fallback_to_previous: Also fall back to older checkpoints when an explicitly given checkpoint
            path cannot be read from any copy (``ckpt_path="last"`` always does).
        replication_timeout_s: How long the end of ``fit`` waits for replication still in progress.
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
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"DistCheckpoint(keep_last={keep_last}): must be at least 1 (or None)")
        if dirpath is not None and not isinstance(dirpath, str):
            dirpath = str(dirpath)
        if dirpath is not None and dirpath.startswith("file://"):
            dirpath = dirpath[len("file://") :]  # ModelCheckpoint would turn the URL into a relative path
        if keep_last is not None and monitor is None:
            save_top_k = -1  # the newest ``keep_last`` are kept by retention, not by ModelCheckpoint
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose, save_last=save_last,
            save_top_k=save_top_k, save_weights_only=save_weights_only, mode=mode,
            auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=enable_version_counter,
        )  # fmt: skip
        self.keep_last = keep_last
        self.replicas = [r[len("file://") :] if r.startswith("file://") else r for r in (replicas or [])]
        self.fallback_to_previous = fallback_to_previous
        self.replication_timeout_s = replication_timeout_s
        self._saved: list[str] = []  # checkpoints this callback wrote and still keeps, oldest first (state)
        self._ever: set[str] = set()  # names of every checkpoint this callback wrote (state)
        self._lock = threading.Lock()
        self._io: DistCheckpointIO | None = None
        self._replicator: Replicator | None = None
        self._final_replication: dict[str, Any] | None = None
        self._last_resolved: str | None = None

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
        super().setup(trainer, pl_module, stage)
        io.resolver = self._candidates
        if trainer.is_global_zero and stage == "fit":
            for root in self.roots:
                try:
                    for url in catalog.clean_stale(root, io.storage):
                        log.warning("removed %s (a save or copy that never committed)", url)
                except Exception as e:  # noqa: BLE001 - cleanup never fails training
                    log.warning("could not clean up stale saves under %s: %s", root, e)
        if self.replicas and stage == "fit" and self._replicator is None:
            self._replicator = Replicator(self.replicas, io.storage, _replication_comm(),
                                          after_replica_commit=self._retain_replica)  # fmt: skip

    @property
    def roots(self) -> list[str]:
        """The primary root and the replica roots."""
        return [str(self.dirpath), *self.replicas] if self.dirpath is not None else list(self.replicas)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._replicator is not None:
            self.io.wait()  # the last save commits, and queues its replication, first
            finished = self._replicator.close(self.replication_timeout_s)
            self._final_replication = describe(self._replicator.stats)
            group, self._replicator = self._replicator.comm.group, None
            if finished and group is not None:  # its own gloo group (made in setup): not leaked across fits
                import torch.distributed as dist

                dist.destroy_process_group(group)
            if trainer.is_global_zero:  # the final counts, also of copies that ended after the last step
                for key in ("failures", "pending"):
                    name = "distckpt/replica_failures" if key == "failures" else "distckpt/replicas_pending"
                    trainer.callback_metrics[name] = torch.tensor(float(self._final_replication[key]))

    @property
    def replication(self) -> dict[str, Any] | None:
        """Replication counters (``copied``, ``failures``, ``pending``); after ``fit`` the final ones. None
        without replicas."""
        return describe(self._replicator.stats) if self._replicator else self._final_replication

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._replicator is not None:
            st = self._replicator.stats
            pl_module.log("distckpt/replica_failures", float(st.failures), rank_zero_only=True)
            pl_module.log("distckpt/replicas_pending", float(st.pending), rank_zero_only=True)

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
        super()._remove_checkpoint(trainer, filepath)

    def apply_retention(self) -> list[str]:
        """Remove this callback's committed checkpoints beyond the newest ``keep_last`` and the top-k.

        Runs on rank 0 after a commit (in the background thread for async saves). Returns what it removed.
        """
        if self.keep_last is None:
            return []
        with self._lock:
            saved = list(self._saved)
        alive = [p for p in saved if _is_committed(p, self.io.storage)]
        protect = set(alive[-self.keep_last :]) | set(self.best_k_models) | {self.best_model_path, self.last_model_path}
        removed = []
        for path in alive:
            if path not in protect:
                self.io.remove_checkpoint(path)
                removed.append(path)
        with self._lock:
            self._saved = [p for p in self._saved if p not in removed]
        if removed:
            log.info("retention removed %s", ", ".join(removed))
        return removed

    def _retain_replica(self, target: str, name: str) -> None:
        """Rank 0, after a replica commits: remove there what the primary no longer keeps (never the newest)."""
        with self._lock:
            keep = {_name(p) for p in self._saved}
            ever = set(self._ever)
        found = catalog.committed(target, self.io.storage)
        newest = found[-1].name if found else None
        store, root = open_store(target, self.io.storage)
        for c in found:
            if c.name in ever and c.name not in keep and c.name != newest:
                catalog.remove_checkpoint(store, store.join(root, c.name))

    # -- resume ------------------------------------------------------------------------------------
    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """The newest committed checkpoint under ``dirpath`` or a replica (what ``ckpt_path="last"`` resumes)."""
        dirpath = self.dirpath if self.dirpath is not None else self._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        options = self._io.storage if self._io else None
        found = catalog.latest([str(dirpath), *self.replicas], options)
        self._last_resolved = found[0].url if found else None
        return {found[0].url} if found else set()

    def _candidates(self, url: str) -> list[list[str]]:
        """The checkpoints a load of ``url`` may use, in order, each as the URLs of its copies."""
        dirpath = str(self.dirpath) if self.dirpath is not None else None
        name, parent = _name(url), url.rstrip("/").rsplit("/", 1)[0] if "/" in url else ""
        name = ondisk.trashed_name(name) or name  # "last" may be a checkpoint a crashed overwrite moved aside
        roots = [r for r in [dirpath, *self.replicas] if r]
        if parent not in roots:
            return [[url]]
        copies = lambda n: [f"{r.rstrip('/')}/{n}" for r in roots]  # noqa: E731
        if url == self._last_resolved or self.fallback_to_previous:
            names = [c.name for c in catalog.latest(roots, self.io.storage)]
            older = names[names.index(name) + 1 :] if name in names else names
            return [copies(name)] + [copies(n) for n in older]
        return [copies(name)]

    @override
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**super().state_dict(), "saved": list(self._saved), "ever": sorted(self._ever)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            with self._lock:
                self._saved = [p for p in state_dict.get("saved", []) if p not in self._saved] + self._saved
                self._ever |= set(state_dict.get("ever", []))


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
