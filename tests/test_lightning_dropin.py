"""The drop-in promise (issue 13): what Lightning users rely on keeps working with the plugin added.

One test (at least) per behaviour difference found by running Lightning's own tests with the plugin
(tools/lightning_compat), plus the ways in (stock checkpoints) and out (load_from_checkpoint), and the
resume options. Single process unless marked slow.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, WORKLOADS, run, torchrun_cmd
from lightning.pytorch.callbacks import ModelCheckpoint
from workloads.common import Net, data

from lightning_distckpt import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistCheckpoint,
    DistCheckpointIO,
    UnsafeCheckpointError,
    list_checkpoints,
    load_checkpoint,
)
from lightning_distckpt.ondisk.names import check_checkpoint_name
from lightning_distckpt.ops.importing import import_checkpoint


def trainer(root: Path | str, max_steps: int = 4, plugin: bool = True, callbacks=None, io=None, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root))
    args.update(kw)
    if plugin:
        args["plugins"] = [io or DistCheckpointIO()]
    return L.Trainer(callbacks=callbacks or [], **args)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def plugin_ckpt(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A plugin checkpoint of Net after 4 steps, and the weights it holds."""
    root = tmp_path_factory.mktemp("plugin")
    torch.manual_seed(0)
    model = Net(width=24)
    t = trainer(root, enable_checkpointing=False)
    t.fit(model, data())
    path = str(root / "model.ckpt")
    t.save_checkpoint(path)
    assert os.path.isdir(path)
    return path, weights(model)


# ---- 1. load_from_checkpoint ----------------------------------------------------------------------------
LOAD_SCRIPT = """
import sys, torch
sys.path.insert(0, {workloads!r})
from common import Net
import lightning.pytorch.core.saving as saving
original = saving.pl_load
import lightning_distckpt
assert saving.pl_load is original, "importing lightning_distckpt changed Lightning"
try:
    Net.load_from_checkpoint({path!r})
    print("LOADED WITHOUT ENABLE")
except (IsADirectoryError, PermissionError, OSError) as e:
    print("REFUSED", type(e).__name__)
lightning_distckpt.enable_load_from_checkpoint()
for where in ({path!r}, "file://" + {path!r}):
    m = Net.load_from_checkpoint(where)
    print("HPARAMS", dict(m.hparams))
    torch.save(m.state_dict(), {out!r})
"""


def test_load_from_checkpoint_in_a_process_that_never_built_a_trainer(plugin_ckpt, tmp_path):
    path, expected = plugin_ckpt
    script = tmp_path / "load.py"
    out = tmp_path / "weights.pt"
    script.write_text(LOAD_SCRIPT.format(workloads=str(WORKLOADS), path=path, out=str(out)))
    proc = run([sys.executable, str(script)])
    assert "REFUSED" in proc.stdout, proc.stdout  # only the explicit call changes Lightning
    assert proc.stdout.count("HPARAMS {'width': 24, 'depth': 3, 'lr': 0.01}") == 2, proc.stdout
    assert same(torch.load(out), expected)


def test_load_from_checkpoint_reads_a_url_and_keeps_stock_files_working(tmp_path):
    torch.manual_seed(0)
    model = Net(width=8)
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    t.fit(model, data())
    url = "memory://dropin/run/ckpt"
    t.save_checkpoint(url)
    loaded = Net.load_from_checkpoint(url)  # this process built a DistCheckpointIO: enabled
    assert loaded.hparams.width == 8 and same(weights(loaded), weights(model))
    stock_trainer = trainer(tmp_path, max_steps=2, plugin=False, enable_checkpointing=False)
    stock_trainer.fit(Net(width=8), data())
    stock_trainer.save_checkpoint(tmp_path / "stock.ckpt")
    assert Net.load_from_checkpoint(tmp_path / "stock.ckpt").hparams.width == 8


def test_load_from_checkpoint_over_http_reads_a_plugin_checkpoint_and_a_stock_file(tmp_path, monkeypatch):
    """A static file server (``python -m http.server``, as Lightning's own ``tmpdir_server`` fixture) serving a
    plugin checkpoint directory and a stock file: both load through ``load_from_checkpoint(http://...)``."""
    pytest.importorskip("aiohttp", reason="fsspec's HTTP client needs aiohttp")
    import socket

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # torch.hub caches stock files by name

    torch.manual_seed(0)
    model = Net(width=8)
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    t.fit(model, data())
    t.save_checkpoint(str(tmp_path / "served" / "plugin.ckpt"))
    stock_trainer = trainer(tmp_path, max_steps=2, plugin=False, enable_checkpointing=False)
    stock_model = Net(width=6)
    stock_trainer.fit(stock_model, data())
    stock_trainer.save_checkpoint(tmp_path / "served" / "stock.ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path / "served", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        loaded = Net.load_from_checkpoint(f"{base}/plugin.ckpt")
        assert loaded.hparams.width == 8 and same(weights(loaded), weights(model))
        from_stock = Net.load_from_checkpoint(f"{base}/stock.ckpt", weights_only=False)
        assert from_stock.hparams.width == 6 and same(weights(from_stock), weights(stock_model))
    finally:
        server.kill()
        server.wait()


# ---- 2. Tuner and checkpoint names -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["run 1-{epoch}", "ckpt@{step}", "{epoch},{step}", "~{epoch}"])
def test_names_lightning_accepts_are_saved_and_resumed(tmp_path, name):
    for plugin, folder in ((False, "stock"), (True, "ck")):
        cb = ModelCheckpoint(dirpath=tmp_path / folder, filename=name, every_n_train_steps=2, save_top_k=-1)
        torch.manual_seed(0)
        trainer(tmp_path, max_steps=4, plugin=plugin, callbacks=[cb]).fit(Net(), data())
    saved = sorted(os.listdir(tmp_path / "ck"))
    assert saved == sorted(os.listdir(tmp_path / "stock"))  # the names stock Lightning gives
    assert all(os.path.isfile(tmp_path / "ck" / s / "COMMITTED") for s in saved), saved
    t = trainer(tmp_path, max_steps=6)
    t.fit(Net(), data(), ckpt_path=str(tmp_path / "ck" / saved[-1]))
    assert t.global_step == 6


def test_checkpoint_name_rule():
    for ok in (".lr_find_0b1c.ckpt", "run 1-epoch=0", "ckpt@3", "epoch=0,step=2", "~epoch=0", ".temp.ckpt"):
        assert check_checkpoint_name(ok, "x") == ok
    for bad in ("", ".", "..", "a/b", "a\\b", "a\x00b", "x" * 256, ".a.staging-123", "a.trash-1", "tab\there"):
        with pytest.raises(UnsafeCheckpointError, match="refusing checkpoint name"):
            check_checkpoint_name(bad, "x")


def test_tuner_lr_find_and_scale_batch_size(tmp_path):
    from lightning.pytorch.tuner import Tuner

    class Tunable(Net):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 8

        def train_dataloader(self):
            return data(batch_size=self.batch_size)

    results = []
    for plugin in (False, True):  # the same search with and without the plugin
        torch.manual_seed(0)
        model = Tunable()
        t = trainer(tmp_path / str(plugin), max_steps=20, plugin=plugin)
        tuner = Tuner(t)
        finder = tuner.lr_find(model, num_training=20, min_lr=1e-4, max_lr=1e-1)
        size = tuner.scale_batch_size(model, mode="power", max_trials=2, steps_per_trial=1)
        results.append((finder.results, finder.suggestion(), size, weights(model)))
        assert not os.listdir(tmp_path / str(plugin)) or not [  # its temporary checkpoints are removed
            n for n in os.listdir(tmp_path / str(plugin)) if n.startswith((".lr_find", ".scale_batch_size"))]
    (stock_res, stock_lr, stock_size, stock_w), (res, lr, size, w) = results
    assert res == stock_res and lr == stock_lr and size == stock_size
    assert same(w, stock_w)  # the model is restored after each search, as stock


# ---- 3. ddp_spawn and pickling ---------------------------------------------------------------------------
def test_plugin_callback_and_routed_strategy_pickle_and_deepcopy(tmp_path):
    cb = DistCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=2)
    t = trainer(tmp_path, max_steps=2, callbacks=[cb])
    t.fit(Net(), data())
    assert type(t.strategy).__name__.startswith("Routed")
    for obj in (t.strategy.checkpoint_io, cb, t.strategy):
        clone = pickle.loads(pickle.dumps(obj))
        assert type(clone) is type(obj)
    copy.deepcopy(t.callbacks)  # the routed strategy is reachable from the callbacks' state
    torch.save(t, tmp_path / "trainer.pt")  # LightningOptimizers are dropped as by Strategy.__getstate__
    clone = pickle.loads(pickle.dumps(t.strategy))
    assert type(clone) is type(t.strategy) and isinstance(clone.checkpoint_io, DistCheckpointIO)
    assert len(clone._lightning_optimizers) == 1  # re-created by Strategy.__setstate__


@pytest.mark.slow
def test_ddp_spawn_fits_saves_and_hands_results_back(tmp_path):
    proc = run([sys.executable, str(WORKLOADS / "spawn.py"), str(tmp_path)], timeout=400)
    assert "SPAWN OK" in proc.stdout, proc.stdout + proc.stderr


# ---- 4. on_load_checkpoint edits ---------------------------------------------------------------------------
class FreshHead(Net):
    """Fine-tuning: keep a fresh head, take the body from the checkpoint."""

    mode = "delete"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.strict_loading = False
        self.seen: dict[str, torch.Tensor] = {}

    def on_load_checkpoint(self, checkpoint) -> None:
        sd = checkpoint["state_dict"]
        head = [k for k in sd if k.startswith("net.5.")]  # the last Linear (depth 3)
        if self.mode == "delete":
            for k in head:
                del sd[k]
        elif self.mode == "replace":
            for k in head:
                sd[k] = torch.zeros_like(self.state_dict()[k])
        elif self.mode == "read":
            self.seen = {k: v.clone() for k, v in sd.items()}
        elif self.mode == "scale":
            for k in head:
                sd[k].mul_(2)


@pytest.mark.parametrize("mode", ["delete", "replace", "read", "scale", "none"])
def test_edits_to_the_state_dict_in_on_load_checkpoint_are_honoured(plugin_ckpt, tmp_path, mode):
    path, saved = plugin_ckpt
    torch.manual_seed(123)
    model = FreshHead(width=24)
    model.mode = mode
    fresh = weights(model)
    t = trainer(tmp_path, max_steps=4, enable_checkpointing=False)  # max_steps reached: no step runs
    t.fit(model, data(), ckpt_path=path)
    got = weights(model)
    for k in got:
        head = k.startswith("net.5.")
        if mode == "delete" and head:
            assert torch.equal(got[k], fresh[k]), k
        elif mode == "replace" and head:
            assert torch.equal(got[k], torch.zeros_like(got[k])), k
        elif mode == "scale" and head:
            assert torch.equal(got[k], saved[k] * 2), k
        else:
            assert torch.equal(got[k], saved[k]), k
    if mode == "read":
        assert same(model.seen, saved)


# ---- 5. weights_only ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    width: int = 8


class WithObjects(Net):
    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(width=8)
        self.save_hyperparameters()

    def on_save_checkpoint(self, checkpoint) -> None:
        import numpy as np

        checkpoint["extra_array"] = np.arange(3)

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


def _objects_checkpoint(tmp_path: Path) -> str:
    """A plugin checkpoint of `WithObjects` (objects JSON cannot hold), after two training steps."""
    torch.manual_seed(0)
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    t.fit(WithObjects(Config()), data())
    path = str(tmp_path / "objects.ckpt")
    t.save_checkpoint(path)
    return path


def test_weights_only_false_is_honoured_from_fit_validate_and_load_from_checkpoint(tmp_path):
    path = _objects_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        trainer(tmp_path, max_steps=2).fit(WithObjects(Config()), data(), ckpt_path=path)
    trainer(tmp_path, max_steps=2).fit(WithObjects(Config()), data(), ckpt_path=path, weights_only=False)
    trainer(tmp_path, max_steps=2).validate(WithObjects(Config()), data(), ckpt_path=path, weights_only=False)
    with pytest.raises(UnsafeCheckpointError):
        WithObjects.load_from_checkpoint(path)
    assert WithObjects.load_from_checkpoint(path, weights_only=False).hparams.cfg == Config()
    assert load_checkpoint(path, weights_only=False)["extra_array"].tolist() == [0, 1, 2]


def test_torch_safe_globals_are_honoured(tmp_path):
    import numpy as np

    path = _objects_checkpoint(tmp_path)
    allowed = [Config, np.ndarray, np.dtype, type(np.dtype("int64")), np._core.multiarray._reconstruct]
    with torch.serialization.safe_globals(allowed):
        trainer(tmp_path, max_steps=2).fit(WithObjects(Config()), data(), ckpt_path=path)


# ---- 6. async saves ------------------------------------------------------------------------------------------
def test_async_version_counter_and_every_save_committed_on_return(tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", filename="ckpt", every_n_train_steps=1, save_top_k=-1,
                         monitor="step", mode="max")
    t = trainer(tmp_path, max_steps=4, callbacks=[cb], io=DistCheckpointIO(async_save=True))
    t.fit(Net(), data())
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["ckpt-v1.ckpt", "ckpt-v2.ckpt", "ckpt-v3.ckpt", "ckpt.ckpt"], names  # as stock names them
    assert all(os.path.isfile(tmp_path / "ck" / n / "COMMITTED") for n in names)
    t.save_checkpoint(tmp_path / "after.ckpt")  # outside fit: committed when the call returns
    assert os.path.isfile(tmp_path / "after.ckpt" / "COMMITTED")
    t2 = trainer(tmp_path, max_steps=5, io=DistCheckpointIO(async_save=True))
    t2.fit(Net(), data(), ckpt_path=tmp_path / "after.ckpt")
    assert t2.global_step == 5


def test_a_pending_async_save_is_visible_under_its_name(tmp_path):
    from lightning_distckpt.engine.saving import reserve
    from lightning_distckpt.errors import UncommittedCheckpointError

    url = str(tmp_path / "ckpt")
    assert reserve(url) and os.listdir(url) == ["PENDING"]
    assert not reserve(url)  # taken
    assert list_checkpoints(str(tmp_path))[0].committed is False
    with pytest.raises(UncommittedCheckpointError, match="in flight"):
        load_checkpoint(url)
    DistCheckpointIO().save_checkpoint({"x": torch.ones(2)}, url)  # the commit replaces the placeholder
    assert sorted(os.listdir(url)) == ["COMMITTED", "__0_0.distcp", "manifest.json", "metadata.json", "state.json"]


# ---- 7. stock checkpoints in -------------------------------------------------------------------------------
def _stock_run(root: Path, steps: int) -> tuple[str, L.Trainer, Net]:
    torch.manual_seed(0)
    model = Net()
    t = trainer(root, max_steps=steps, plugin=False, enable_checkpointing=False)
    t.fit(model, data())
    path = str(root / "stock.ckpt")
    t.save_checkpoint(path)
    return path, t, model


@pytest.mark.parametrize("where", ["path", "file-url", "memory-url"])
def test_fit_resumes_a_stock_lightning_file_exactly(tmp_path, where):
    path, _, _ = _stock_run(tmp_path, 4)
    src = {"path": path, "file-url": "file://" + path, "memory-url": f"memory://stock-{tmp_path.name}/x.ckpt"}[where]
    if where == "memory-url":
        import fsspec

        fsspec.filesystem("memory").pipe(src[len("memory://"):], Path(path).read_bytes())
    # the reference: stock Lightning resuming its own file for 4 more steps
    torch.manual_seed(1)
    ref_model = Net()
    ref = trainer(tmp_path, max_steps=8, plugin=False, enable_checkpointing=False)
    ref.fit(ref_model, data(), ckpt_path=path)
    torch.manual_seed(1)
    model = Net()
    t = trainer(tmp_path, max_steps=8, enable_checkpointing=False)
    t.fit(model, data(), ckpt_path=src)
    assert t.global_step == ref.global_step == 8
    assert same(weights(model), weights(ref_model))
    ref_opt, opt = ref.optimizers[0].state_dict(), t.optimizers[0].state_dict()
    assert ref_opt["param_groups"] == opt["param_groups"]
    for i in ref_opt["state"]:
        assert all(torch.equal(ref_opt["state"][i][k], opt["state"][i][k]) for k in ref_opt["state"][i])
    assert ref.lr_scheduler_configs[0].scheduler.state_dict() == t.lr_scheduler_configs[0].scheduler.state_dict()
    assert ref.fit_loop.state_dict() == t.fit_loop.state_dict()


def test_stock_file_unpickling_follows_lightnings_weights_only_rule(tmp_path):
    torch.manual_seed(0)
    t = trainer(tmp_path, max_steps=2, plugin=False, enable_checkpointing=False)
    t.fit(WithObjects(Config()), data())
    path = str(tmp_path / "stock.ckpt")
    t.save_checkpoint(path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        trainer(tmp_path, max_steps=2).fit(WithObjects(Config()), data(), ckpt_path=path)
    trainer(tmp_path, max_steps=2).fit(WithObjects(Config()), data(), ckpt_path=path, weights_only=False)


def test_damaged_or_refused_stock_files_are_package_errors_naming_the_file(tmp_path):
    """Garbage, a truncated file, and a pickle naming a class weights_only refuses: the plugin's load, import and
    `distckpt import` raise (print) the package's error naming the file; nothing in the pickle runs."""
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, good)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    files = {"garbage.ckpt": (b"\x80\x02not a checkpoint at all", CorruptCheckpointError),
             "truncated.ckpt": (good.read_bytes()[:200], CorruptCheckpointError)}  # fmt: skip
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    files["evil.ckpt"] = (evil.read_bytes(), UnsafeCheckpointError)
    for fname, (content, error) in files.items():
        path = tmp_path / fname
        path.write_bytes(content)
        for load in (DistCheckpointIO().load_checkpoint, lambda p: import_checkpoint(p, str(tmp_path / "dest"))):
            with pytest.raises(error, match=re.escape(str(path))):
                load(str(path))
        proc = run([sys.executable, "-m", "lightning_distckpt.cli.main", "import", str(path), str(tmp_path / "d")],
                   check=False)  # fmt: skip
        assert proc.returncode != 0 and str(path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "dest").exists() and not (tmp_path / "d").exists()


def test_a_scheme_only_the_package_serves_is_a_clear_error_for_the_callback_and_works_with_the_plugin(tmp_path):
    from lightning_distckpt.storage import LocalStore, register_store

    register_store("dropintest", lambda url, config: (LocalStore(), str(tmp_path) + "/" + url.split("://", 1)[1]),
                   replace=True)  # fmt: skip
    with pytest.raises(ValueError, match="fsspec.register_implementation"):
        DistCheckpoint(dirpath="dropintest://ckpts")
    DistCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 2}, "dropintest://one")
    assert load_checkpoint("dropintest://one")["global_step"] == 2 and (tmp_path / "one" / "COMMITTED").exists()


def test_distckpt_import_converts_a_stock_file(tmp_path):
    path, _, _ = _stock_run(tmp_path, 4)
    dest = tmp_path / "imported"
    proc = run([sys.executable, "-m", "lightning_distckpt.cli.main", "import", path, str(dest)])
    assert os.path.isfile(dest / "COMMITTED"), proc.stdout + proc.stderr
    torch.manual_seed(1)
    a, b = Net(), Net()
    ta = trainer(tmp_path, max_steps=8, enable_checkpointing=False)
    ta.fit(a, data(), ckpt_path=path)
    tb = trainer(tmp_path, max_steps=8, enable_checkpointing=False)
    tb.fit(b, data(), ckpt_path=str(dest))
    assert same(weights(a), weights(b)) and tb.global_step == 8
    # like cp: into an existing directory, named like the file without ".ckpt"; never over an existing one
    (tmp_path / "into").mkdir()
    run([sys.executable, "-m", "lightning_distckpt.cli.main", "import", path, str(tmp_path / "into")])
    assert os.path.isfile(tmp_path / "into" / "stock" / "COMMITTED")
    again = run([sys.executable, "-m", "lightning_distckpt.cli.main", "import", path, str(dest)], check=False)
    assert again.returncode == 6 and "already exists" in again.stderr


# ---- 8. strategy.load_checkpoint without a model; storage_options -------------------------------------------
def test_strategy_load_checkpoint_before_a_model_is_attached_returns_the_dict(plugin_ckpt, tmp_path):
    path, saved = plugin_ckpt
    t = trainer(tmp_path)
    checkpoint = t.strategy.load_checkpoint(path)
    assert same(checkpoint["state_dict"], saved) and checkpoint["global_step"] == 4
    stock_path, _, _ = _stock_run(tmp_path, 2)
    assert trainer(tmp_path).strategy.load_checkpoint(stock_path)["global_step"] == 2


def test_save_checkpoint_with_storage_options_is_refused_like_stock(tmp_path):
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    t.fit(Net(), data())
    with pytest.raises(TypeError, match="storage_options"):
        t.save_checkpoint(tmp_path / "x.ckpt", storage_options={"a": 1})
    assert not os.path.exists(tmp_path / "x.ckpt")


def test_a_missing_path_is_a_clear_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found: .*nothing-here"):
        trainer(tmp_path).fit(Net(), data(), ckpt_path=str(tmp_path / "nothing-here"))


# ---- 9. DistCheckpoint takes every ModelCheckpoint argument -------------------------------------------------
def test_dist_checkpoint_takes_every_model_checkpoint_argument():
    ours = inspect.signature(DistCheckpoint.__init__).parameters
    for name, p in inspect.signature(ModelCheckpoint.__init__).parameters.items():
        assert name in ours, f"DistCheckpoint lacks ModelCheckpoint's {name!r}"
        if name not in ("self", "dirpath"):
            assert ours[name].default == p.default, name
    assert DistCheckpoint(save_on_exception=True).save_on_exception is True
    source = Path(inspect.getsourcefile(DistCheckpoint)).read_text()
    assert not re.search(r"_ModelCheckpoint__", source), "name-mangled private call"


# ---- options -------------------------------------------------------------------------------------------------
def test_exclude_from_loading(tmp_path):
    torch.manual_seed(0)
    t = trainer(tmp_path, max_steps=10, enable_checkpointing=False)  # past one epoch (8 batches)
    t.fit(Net(), data())
    path = str(tmp_path / "ten.ckpt")
    t.save_checkpoint(path)
    io = DistCheckpointIO(exclude_from_loading=["optimizer", "lr_schedulers", "loops"])
    t = trainer(tmp_path, max_steps=1, io=io, enable_checkpointing=False)
    t.fit(Net(), data(), ckpt_path=path)
    assert t.global_step == 1  # loops excluded: counting starts at 0, one step ran
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 0  # fresh scheduler (the saved one had stepped)
    assert t.optimizers[0].state_dict()["state"][0]["step"].item() == 1  # fresh optimizer state (saved: 10)
    t = trainer(tmp_path, max_steps=11, io=DistCheckpointIO(exclude_from_loading=["callbacks"]), enable_checkpointing=False)
    t.fit(Net(), data(), ckpt_path=path)
    assert t.global_step == 11 and t.optimizers[0].state_dict()["state"][0]["step"].item() == 11
    with pytest.raises(ValueError, match="exclude_from_loading"):
        DistCheckpointIO(exclude_from_loading=[""])


def test_initial_load_path_warm_starts_only_an_empty_folder(plugin_ckpt, tmp_path):
    path, saved = plugin_ckpt
    ck = tmp_path / "ck"
    torch.manual_seed(7)
    model = Net(width=24)
    cb = DistCheckpoint(dirpath=str(ck), every_n_train_steps=100, initial_load_path=path)
    t = trainer(tmp_path, max_steps=1, callbacks=[cb])
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(weights(pl_module))

    t.callbacks.append(Spy())
    t.fit(model, data())
    assert same(seen, saved) and t.global_step == 1  # weights only: training counted from 0
    # "last" with an empty folder: the warm start too (model only)
    torch.manual_seed(7)
    cb2 = DistCheckpoint(dirpath=str(tmp_path / "ck2"), every_n_train_steps=100, initial_load_path=path)
    t2 = trainer(tmp_path, max_steps=1, callbacks=[cb2])
    t2.fit(Net(width=24), data(), ckpt_path="last")
    assert t2.global_step == 1
    # a folder with a committed checkpoint resumes its own
    cb3 = DistCheckpoint(dirpath=str(ck), every_n_train_steps=1, initial_load_path=path)
    trainer(tmp_path, max_steps=2, callbacks=[cb3]).fit(Net(width=24), data())
    cb4 = DistCheckpoint(dirpath=str(ck), every_n_train_steps=1, initial_load_path=path)
    t4 = trainer(tmp_path, max_steps=3, callbacks=[cb4])
    t4.fit(Net(width=24), data(), ckpt_path="last")
    assert t4.global_step == 3 and t4.strategy.checkpoint_io.stats.loaded_from.endswith("step=2")


def test_last_save_model_only_in_export_dtype(tmp_path):
    ck = tmp_path / "ck"
    cb = DistCheckpoint(dirpath=str(ck), every_n_train_steps=2, last_save_model_only=True, export_dtype="bfloat16")
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(Net(), data())
    final = load_checkpoint(str(ck / "final-weights"))
    assert "optimizer_states" not in final
    assert all(v.dtype == torch.bfloat16 for v in final["state_dict"].values() if v.is_floating_point())
    # "last" resumes the newest full checkpoint, never the weights-only one
    cb2 = DistCheckpoint(dirpath=str(ck), every_n_train_steps=2, last_save_model_only=True)
    t = trainer(tmp_path, max_steps=6, callbacks=[cb2])
    t.fit(Net(), data(), ckpt_path="last")
    assert t.strategy.checkpoint_io.stats.loaded_from.endswith("step=4")


def test_ckpt_path_step(tmp_path):
    ck = tmp_path / "ck"
    torch.manual_seed(0)
    trainer(tmp_path, max_steps=6, callbacks=[DistCheckpoint(dirpath=str(ck), every_n_train_steps=2,
                                                             save_top_k=-1)]).fit(Net(), data())  # fmt: skip
    t = trainer(tmp_path, max_steps=6, callbacks=[DistCheckpoint(dirpath=str(ck), every_n_train_steps=2)])
    t.fit(Net(), data(), ckpt_path="step:4")
    assert t.strategy.checkpoint_io.stats.loaded_from.endswith("epoch=0-step=4")
    with pytest.raises(CheckpointNotFoundError, match="global step 5"):
        trainer(tmp_path, max_steps=6, callbacks=[DistCheckpoint(dirpath=str(ck))]).fit(Net(), data(), ckpt_path="step:5")
    with pytest.raises(CheckpointNotFoundError, match="needs a DistCheckpoint"):
        trainer(tmp_path, max_steps=6).fit(Net(), data(), ckpt_path="step:4")


def test_options_are_typed_for_lightning_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DistCheckpoint, "cb")
    parser.add_class_arguments(DistCheckpointIO, "io")
    cfg = parser.parse_args(["--cb.initial_load_path=/a", "--cb.last_save_model_only=true", "--cb.export_dtype=bfloat16",
                             "--cb.save_on_exception=true", "--io.exclude_from_loading=[optimizer, loops]"])  # fmt: skip
    assert cfg.cb.initial_load_path == "/a" and cfg.cb.export_dtype == "bfloat16" and cfg.cb.save_on_exception
    assert cfg.io.exclude_from_loading == ["optimizer", "loops"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--cb.export_dtype=int8"])


# ---- a stock file resumes exactly under every strategy (real torchrun jobs) -----------------------------------
@pytest.fixture(scope="module")
def stock_file(tmp_path_factory) -> Path:
    """A stock Lightning checkpoint of the training workload at step 4 (one process, no plugin) and the
    digest of the state it holds (saved-4.json)."""
    from conftest import train

    d = tmp_path_factory.mktemp("stock")
    train("single", 1, d / "unused", "--max-steps", 4, "--stock-save", d / "stock.ckpt", "--digest-dir", d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("strategy,via", [("ddp", "path"), ("mp", "url"), ("fsdp", "import"), ("mp", "import")])
def test_a_stock_file_resumes_exactly_under_every_strategy(stock_file, tmp_path, strategy, via):
    from conftest import load_json, train
    from workloads.common import state_differences

    src = str(stock_file / "stock.ckpt")
    if via == "url":
        src = "file://" + src
    elif via == "import":
        run([sys.executable, "-m", "lightning_distckpt.cli.main", "import", src, str(tmp_path / "imported")])
        src = str(tmp_path / "imported")
    train(strategy, 2, tmp_path / "ck", "--resume", src, "--max-steps", 5, "--digest-dir", tmp_path)
    saved, restored = load_json(stock_file / "saved-4.json"), load_json(tmp_path / "restored-4.json")
    assert state_differences(saved, restored) == []


def test_the_headline_example_says_what_to_use_on_cpu():
    """README/docs headline uses strategy="fsdp": Lightning refuses it on CPU, so the docs must say so."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises((MisconfigurationException, ValueError, RuntimeError), match="(?i)fsdp|cpu"):
        L.Trainer(accelerator="cpu", devices=1, strategy="fsdp", plugins=[DistCheckpointIO()])
    for page in ("README.md", "docs/index.md"):
        head = (ROOT / page).read_text().split("```")[1]
        assert 'strategy="fsdp"' in head and "On CPU" in head and "ModelParallelStrategy()" in head, page


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["delete", "read-delete"])
def test_on_load_checkpoint_edits_under_model_parallel(tmp_path, mode):
    """Sharded (DTensor) weights: untouched entries are read in place collectively, read ones by each rank."""
    for _ in range(2):  # train and save, then resume with the hook
        proc = run(torchrun_cmd(WORKLOADS / "hooks.py", 2, "--strategy", "mp", "--ckpt-dir", tmp_path / "ck",
                                "--mode", mode), timeout=400)  # fmt: skip
    assert "HOOKS OK" in proc.stdout, proc.stdout + proc.stderr
