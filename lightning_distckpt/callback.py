"""DistCheckpoint: Lightning's ModelCheckpoint, saving through DistCheckpointIO, with ``keep_last``.

It keeps every option of ``ModelCheckpoint`` (``monitor``, ``save_top_k``, ``every_n_train_steps``,
``filename`` ...) and adds:

* ``keep_last=N``: keep the N newest committed checkpoints this callback saved, in addition to the top-k
  ones; older ones are removed only after a newer one has committed (never the newest);
* ``ckpt_path="last"`` resolves to the newest *committed* checkpoint under ``dirpath``;
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_distckpt import catalog
from lightning_distckpt.integration import route
from lightning_distckpt.io import DistCheckpointIO

log = logging.getLogger(__name__)


class DistCheckpoint(ModelCheckpoint):
    """Save sharded checkpoints on a schedule; keep the last N; resume from the newest committed one.

    Args:
        dirpath: Where checkpoints go: a local path, ``file://`` or any fsspec URL (``hdfs://nn:8020/x``).
            Defaults to Lightning's ``<log_dir>/checkpoints``.
        keep_last: Keep this many of the newest checkpoints (plus the top-k ones when ``monitor`` is set).
            ``None`` keeps ModelCheckpoint's own rule (``save_top_k``).
        Other arguments: as :class:`~lightning.pytorch.callbacks.ModelCheckpoint`.
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
        self._saved: list[str] = []  # checkpoints this callback wrote, oldest first (part of its state)
        self._lock = threading.Lock()
        self._io: DistCheckpointIO | None = None

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
        super()._save_checkpoint(trainer, filepath)
        if self.keep_last is not None and trainer.is_global_zero:
            self.io.after_commit(lambda result: self.apply_retention())

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

    # -- resume ------------------------------------------------------------------------------------
    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """The newest committed checkpoint under ``dirpath`` (what ``ckpt_path="last"`` resumes from)."""
        dirpath = self.dirpath if self.dirpath is not None else self._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        options = self._io.storage if self._io else None
        found = catalog.latest([str(dirpath)], options)
        return {found[0].url} if found else set()

    @override
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**super().state_dict(), "saved": list(self._saved)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            with self._lock:
                self._saved = [p for p in state_dict.get("saved", []) if p not in self._saved] + self._saved


def _is_committed(url: str, options: catalog.StorageLike) -> bool:
    try:
        catalog.read_manifest(catalog.source_of(url, options))
        return True
    except catalog.DistCheckpointError:
        return False
