"""A pytest plugin that runs Lightning's own tests with ``DistCheckpointIO`` in every Trainer.

Load it with ``-p distckpt_compat`` (this folder on ``PYTHONPATH``); ``run.sh`` does. It is not part of the
package and never runs in the project's own suite.

Modes (environment variable ``DISTCKPT_COMPAT``):

``stock``
    Nothing is changed: Lightning's tests as they are (the baseline).
``plugin``
    ``DistCheckpointIO()`` is added to the ``plugins`` of every ``Trainer`` that has no CheckpointIO of its
    own (none in ``plugins=`` and none set on a strategy instance). Nothing else changes.
``adapted``
    As ``plugin``, and the *tests' own* reads of checkpoint files are taught to open a plugin checkpoint
    (a directory). Only calls made from a test module (``tests_pytorch.*``, found by the caller's frame) are
    adapted; Lightning's and the plugin's own calls are untouched, so behaviour is still measured. Exactly:

    * ``torch.load(p)`` and Lightning's ``lightning.fabric.utilities.cloud_io._load(p)`` (which tests import
      as ``pl_load``) where ``p`` (str, ``Path``) is a committed plugin checkpoint ->
      ``lightning_distckpt.load_checkpoint(p)`` re-keyed to Lightning's file layout
      (``ops.export.to_lightning_format``: optimizer state by parameter index), ``map_location`` applied;
    * ``os.path.isfile(p)`` / ``Path.is_file()`` -> True for a committed plugin checkpoint;
    * ``os.path.getsize(p)`` / ``Path.stat().st_size`` of a plugin checkpoint -> the sum of its files' sizes;
    * ``torch.save(d, p)`` of a dict over a committed plugin checkpoint ``p`` (a test that edits a checkpoint
      and writes it back) -> ``DistCheckpointIO().save_checkpoint(d, p)``, which replaces it as a new commit;
    * ``torch.save`` replaced by a ``Mock`` and its calls counted by a test: the plugin never calls
      ``torch.save``; the injected plugin (:class:`ReportingDistCheckpointIO`) reports each save it starts on
      rank 0 to such a mock as one call ``torch.save({"__distckpt__": path}, path)``.

With ``DISTCKPT_COMPAT_ASYNC=1`` the injected plugin is ``DistCheckpointIO(async_save=True)``, and every
``Trainer.fit/validate/test/predict`` and every ``Trainer.save_checkpoint`` called while none of them runs is
checked on return: a save still in flight fails the test (``DistCheckpointIO`` must have committed or raised
it by then). ``save_checkpoint`` calls made during ``fit`` (ModelCheckpoint's) are asynchronous by design;
``fit`` itself is checked when it returns.

``DISTCKPT_COMPAT_LOG=<file>`` appends one line per test: ``<nodeid>\\t<injected trainers>\\t<saves>``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from typing import Any

import pytest

from lightning_distckpt.integration.plugin import DistCheckpointIO

MODE = os.environ.get("DISTCKPT_COMPAT", "plugin")
ASYNC = os.environ.get("DISTCKPT_COMPAT_ASYNC", "0") == "1"
_TEST_PREFIX = "tests_pytorch"

_counts = {"injected": 0, "saves": 0}


def _from_test_code(depth: int = 2) -> bool:
    """True when the caller ``depth`` frames up is code of Lightning's test suite."""
    frame = sys._getframe(depth)
    return frame.f_globals.get("__name__", "").startswith(_TEST_PREFIX)


def _is_plugin_checkpoint(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = os.fspath(path)
    if "://" in p:
        return False
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, "COMMITTED"))


# -------------------------------------------------------------------------------------------------
# injection
# -------------------------------------------------------------------------------------------------
def _install_injection() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.strategies import Strategy

    original = Trainer.__init__

    @functools.wraps(original)
    def __init__(self: Trainer, *args: Any, **kwargs: Any) -> None:
        plugins = kwargs.get("plugins")
        plist = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = kwargs.get("strategy")
        own = any(isinstance(p, CheckpointIO) for p in plist) or (
            isinstance(strategy, Strategy) and strategy._checkpoint_io is not None
        )
        if not own:
            plist.append((ReportingDistCheckpointIO if MODE == "adapted" else DistCheckpointIO)(async_save=ASYNC))
            kwargs["plugins"] = plist
            _counts["injected"] += 1
        original(self, *args, **kwargs)

    Trainer.__init__ = __init__  # type: ignore[method-assign]

    if ASYNC:
        for name in ("fit", "validate", "test", "predict", "save_checkpoint"):
            _check_on_return(Trainer, name)


def _check_on_return(cls: type, name: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        from lightning.pytorch.trainer.states import TrainerStatus

        inside = self.state.status == TrainerStatus.RUNNING  # ModelCheckpoint's saves during fit: fit waits
        out = original(self, *args, **kwargs)
        if inside:
            return out
        io = getattr(self.strategy, "_checkpoint_io", None)
        future = getattr(io, "_future", None)
        if getattr(io, "_in_flight", False) or (future is not None and not future.done()):
            raise AssertionError(f"Trainer.{name} returned while a save of DistCheckpointIO was still in flight")
        return out

    setattr(cls, name, method)


# -------------------------------------------------------------------------------------------------
# adapted reads (only calls made by test modules)
# -------------------------------------------------------------------------------------------------
def _install_adapted_reads() -> None:
    import torch

    from lightning_distckpt import load_checkpoint
    from lightning_distckpt.ops.export import to_lightning_format

    torch_load = torch.load

    def read(f: Any, map_location: Any, weights_only: Any = None) -> Any:  # torch.load's weights_only rule
        checkpoint = to_lightning_format(load_checkpoint(os.fspath(f), weights_only=weights_only))
        if map_location is not None and not callable(map_location):
            from lightning.fabric.utilities.apply_func import move_data_to_device

            checkpoint = move_data_to_device(checkpoint, map_location)
        return checkpoint

    @functools.wraps(torch_load)
    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if _is_plugin_checkpoint(f) and _from_test_code():
            return read(f, map_location, kwargs.get("weights_only"))
        return torch_load(f, map_location, *args, **kwargs)

    torch.load = load

    from lightning.fabric.utilities import cloud_io

    pl_load = cloud_io._load

    @functools.wraps(pl_load)
    def adapted_pl_load(path_or_url: Any, map_location: Any = None, weights_only: Any = None) -> Any:
        if _is_plugin_checkpoint(path_or_url) and _from_test_code():
            return read(path_or_url, map_location, weights_only)
        return pl_load(path_or_url, map_location, weights_only)

    # test modules import it after this runs (``from ...cloud_io import _load as pl_load``); Lightning's own
    # modules imported it before and keep the original
    cloud_io._load = adapted_pl_load

    isfile = os.path.isfile

    def adapted_isfile(path: Any) -> bool:
        if isfile(path):
            return True
        return _is_plugin_checkpoint(path) and _from_test_code()

    os.path.isfile = adapted_isfile

    is_file = pathlib.Path.is_file

    def adapted_is_file(self: pathlib.Path, *args: Any, **kwargs: Any) -> bool:
        if is_file(self, *args, **kwargs):
            return True
        return _is_plugin_checkpoint(self) and _from_test_code()

    pathlib.Path.is_file = adapted_is_file  # type: ignore[method-assign]

    getsize = os.path.getsize

    def adapted_getsize(path: Any) -> int:
        if _is_plugin_checkpoint(path) and _from_test_code():
            return _dir_size(os.fspath(path))
        return getsize(path)

    os.path.getsize = adapted_getsize

    torch_save = torch.save

    @functools.wraps(torch_save)
    def adapted_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(obj, dict) and _is_plugin_checkpoint(f) and _from_test_code():
            return DistCheckpointIO().save_checkpoint(obj, os.fspath(f))  # overwrites it, as the file would be
        return torch_save(obj, f, *args, **kwargs)

    torch.save = adapted_save



def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


class ReportingDistCheckpointIO(DistCheckpointIO):
    """What ``adapted`` mode injects: DistCheckpointIO that reports each save it starts to a ``torch.save``
    mock, on rank 0, when the save is started (as stock's ``torch.save`` call happens then, also with
    ``async_save``). A class (not a patch), so that it travels to ``ddp_spawn`` children, which do not load
    this plugin."""

    def save_routed(self, strategy: Any, checkpoint: Any, path: str, storage_options: Any = None) -> None:
        super().save_routed(strategy, checkpoint, path, storage_options)
        _counts["saves"] += 1
        if strategy.global_rank == 0:  # a stock save is one torch.save on rank 0
            _report_save_to_torch_save_mock(path)

    def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        _counts["saves"] += 1
        _report_save_to_torch_save_mock(str(path))


def _report_save_to_torch_save_mock(url: str) -> None:
    """Record one call on ``torch.save`` if a test replaced it by a mock (never running what it wraps)."""
    import torch
    from unittest import mock

    save = torch.save
    if isinstance(save, mock.Mock):
        wraps, returns = save._mock_wraps, save._mock_return_value
        save._mock_wraps = None
        try:
            save({"__distckpt__": url}, url)
        finally:  # calling without wraps sets a return value that later calls would return instead of wrapping
            save._mock_wraps, save._mock_return_value = wraps, returns


# -------------------------------------------------------------------------------------------------
# pytest hooks
# -------------------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    if MODE == "stock":
        return
    if MODE not in ("plugin", "adapted"):
        raise pytest.UsageError(f"DISTCKPT_COMPAT={MODE!r}: expected stock, plugin or adapted")
    _install_injection()
    if MODE == "adapted":
        _install_adapted_reads()


def pytest_report_header(config: pytest.Config) -> str:
    import lightning

    return f"distckpt_compat: mode={MODE} async_save={ASYNC} lightning={lightning.__version__}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    _counts.update(injected=0, saves=0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    yield
    log = os.environ.get("DISTCKPT_COMPAT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{item.nodeid}\t{_counts['injected']}\t{_counts['saves']}\n")

