"""The HBase checkpoint catalog against a real mini HBase (tools/minihbase) through its Thrift gateway.

One mini HBase for the session (fixture ``minihbase``); each test uses its own table. Checkpoints are real
(written by DistCheckpointIO on local disk, or by training runs); the catalog is read back with happybase.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import WORKLOADS, load_json, run, torchrun_cmd

pytestmark = pytest.mark.hbase


def _table() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _ckpt(root: Path | str, name: str, step: int, value: float = 0.0) -> tuple[str, object]:
    """A real committed checkpoint (tiny) at root/name; returns (url, manifest)."""
    import torch

    from lightning_distckpt import DistCheckpointIO, catalog

    url = f"{root}/{name}"
    DistCheckpointIO(durable=False).save_checkpoint(
        {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step, "epoch": 0, "value": value}, url)
    return url, catalog.read_manifest(catalog.source_of(url))


def _entry(run_name: str, url: str, manifest, value: float | None = None, monitor: str = "val_loss"):
    from lightning_distckpt.catalog.index import entry_from_manifest

    metrics = {monitor: value} if value is not None else {}
    return entry_from_manifest(run_name, url, manifest, metrics, monitor if value is not None else None, "min")


def _cli(*argv: str) -> tuple[int, str]:
    from lightning_distckpt.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


@pytest.fixture
def index(healthy_minihbase):
    from lightning_distckpt.catalog.index import CatalogOptions, open_index

    ix = open_index(healthy_minihbase.catalog_url(_table()), CatalogOptions(timeout_s=5, retries=1))
    yield ix
    ix.close()


def _raw_row(hb, table: str, row: str) -> dict[bytes, bytes]:
    """Read a row with happybase directly (what another client sees)."""
    import happybase

    conn = happybase.Connection(hb.thrift_host, hb.thrift_port, timeout=5000)
    try:
        return conn.table(table).row(row.encode())
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------
def test_two_writers_register_the_same_checkpoint(index, tmp_path, healthy_minihbase):
    from lightning_distckpt.catalog.index import CatalogOptions, open_index
    from lightning_distckpt.errors import CatalogConflictError

    epoch = index.take_ownership("r1", "test")
    url, manifest = _ckpt(tmp_path, "step=4", 4)
    results: list[bool] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        ix = open_index(index.url, CatalogOptions(timeout_s=5))
        try:
            barrier.wait()
            for _ in range(5):
                results.append(ix.register(_entry("r1", url, manifest), epoch))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            ix.close()

    threads = [threading.Thread(target=writer) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    assert sorted(results) == [False] * 19 + [True]  # exactly one writer created the row; the rest were no-ops
    rows = index.entries("r1")
    assert [e.name for e in rows] == ["step=4"] and rows[0].state == "committed"
    raw = _raw_row(healthy_minihbase, index.table_name, rows[0].row)
    assert int(raw[b"c:digest"]) == rows[0].digest and raw[b"l:primary"] == url.encode()
    assert index.run_info("r1").latest.row == rows[0].row
    other = _entry("r1", url, manifest)
    other.digest += 1  # same key, another checkpoint: refused, row unchanged
    with pytest.raises(CatalogConflictError, match="names another checkpoint"):
        index.register(other, epoch)
    assert index.entries("r1")[0].digest == rows[0].digest


def test_two_runs_race_for_best(index, tmp_path):
    from lightning_distckpt.catalog.index import CatalogOptions, open_index

    values = {run: [((i * 7 + k * 3) % 11) / 10 + 0.05 for i in range(12)] for k, run in enumerate(["ra", "rb"])}
    epochs = {run: index.take_ownership(run, "test") for run in values}
    ckpts = {run: [_ckpt(tmp_path / run, f"step={i}", i) for i in range(12)] for run in values}

    def writer(run: str, part: int) -> None:  # two writers per run, interleaved steps, all at once
        ix = open_index(index.url, CatalogOptions(timeout_s=5))
        for i in range(part, 12, 2):
            url, m = ckpts[run][i]
            ix.register(_entry(run, url, m, values[run][i]), epochs[run])
        ix.close()

    threads = [threading.Thread(target=writer, args=(run, part)) for run in values for part in (0, 1)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for run, vals in values.items():
        info = index.run_info(run)
        best_i = min(range(12), key=lambda i: (vals[i], i))
        assert info.best["val_loss"].value == pytest.approx(min(vals))
        assert vals[int(info.best["val_loss"].name.split("=")[1])] == pytest.approx(min(vals)), best_i
        assert info.latest.name == "step=11"
    rc, out = _cli("best", "--catalog", index.url, "--metric", "val_loss", "--json")
    got = json.loads(out)[0]
    assert rc == 0 and got["value"] == pytest.approx(min(min(v) for v in values.values())) and got["source"] == "pointer"
    rc, out = _cli("best", "--catalog", index.url, "--metric", "val_loss", "--mode", "max", "--json")
    assert json.loads(out)[0]["value"] == pytest.approx(max(max(v) for v in values.values()))  # from the rows


def test_zombie_with_an_old_epoch_is_refused(index, tmp_path):
    from lightning_distckpt.errors import StaleOwnerError
    from lightning_distckpt.integration.catalog_hook import CatalogHook

    old = index.take_ownership("rz", "old job")
    urls = [_ckpt(tmp_path, f"step={i}", i) for i in range(3)]
    for url, m in urls[:2]:
        index.register(_entry("rz", url, m, 1.0 - 0.1 * m.global_step), old)
    new = index.take_ownership("rz", "new job")  # the restarted job
    assert new == old + 1
    before = index.run_info("rz")
    rows = index.entries("rz")
    with pytest.raises(StaleOwnerError, match=r"owned by epoch 2 \(new job\).*holds epoch 1"):
        index.register(_entry("rz", *urls[2], 0.1), old)  # register + move pointers
    with pytest.raises(StaleOwnerError):
        index.begin_delete(rows[-1], old)  # prune
    with pytest.raises(StaleOwnerError):
        index.add_location("rz", 0, "step=0", "replica:/x", "/x/step=0", old)
    after = index.run_info("rz")
    assert after.latest == before.latest and after.best == before.best and after.refused == 3
    assert [e.name for e in index.entries("rz", include_deleting=True)] == ["step=1", "step=0"]
    assert all(e.state == "committed" and e.locations.keys() == {"primary"} for e in index.entries("rz"))

    # the training side: the old job's hook is refused, counts it, and from then on prunes nothing
    hook = CatalogHook(index.url, "rz")
    hook.stats.owner_epoch = old
    hook._thread = threading.Thread(target=hook._work, daemon=True)
    hook._thread.start()
    hook._committed(type("R", (), {"url": urls[2][0], "manifest": urls[2][1]})(), urls[2][0], {}, None, "min")
    assert hook.close(30)
    assert hook.fenced and hook.stats.refused == 1 and hook.stats.registered == 0
    removed: list[str] = []
    assert not hook.remove(urls[0][0], removed.append, None)
    assert removed == [] and os.path.exists(os.path.join(urls[0][0], "COMMITTED"))
    assert index.run_info("rz").refused == 4


def test_crash_between_marker_and_row_then_reconcile(index, tmp_path, healthy_minihbase):
    from lightning_distckpt import catalog
    from lightning_distckpt.catalog.index import manifest_digest

    root = tmp_path / "job"
    epoch = index.take_ownership("job", "test")
    made = [_ckpt(root, f"step={i}", i) for i in range(4)]
    for url, m in made[:2]:  # registered normally
        index.register(_entry("job", url, m), epoch)
    # step=2: the job died after the marker, before its row (nothing in the catalog);
    # step=3: it died between the row's compare-and-set and the row's columns (only c:digest there)
    url3, m3 = made[3]
    assert index._cas(_entry("job", url3, m3).row, b"c:digest", None, str(manifest_digest(m3)).encode())
    # and a row whose checkpoint is gone from storage
    gone_url, gone_m = _ckpt(root, "step=1-gone", 1)
    index.register(_entry("job", gone_url, gone_m), epoch)
    import shutil

    shutil.rmtree(gone_url)
    assert sorted(e.name for e in index.entries("job")) == ["step=0", "step=1", "step=1-gone"]
    assert index.run_info("job").latest.name == "step=1-gone"  # same step as step=1, committed later

    rc, out = _cli("reconcile", str(root), "--catalog", index.url, "--json")
    rep = json.loads(out)
    assert rc == 0, out
    assert rep["run"] == "job" and len(rep["registered"]) == 2 and len(rep["present"]) == 2 and len(rep["removed"]) == 1
    names = [e.name for e in index.entries("job")]
    assert names == ["step=3", "step=2", "step=1", "step=0"]
    assert names == [c.name for c in reversed(catalog.committed(str(root)))]
    assert index.run_info("job").latest.name == "step=3"
    assert _raw_row(healthy_minihbase, index.table_name, index.entries("job")[0].row)[b"c:state"] == b"committed"
    rc, out = _cli("reconcile", str(root), "--catalog", index.url, "--json")  # idempotent
    assert rc == 0 and len(json.loads(out)["present"]) == 4 and not json.loads(out)["registered"]


def _trainer(tmp_path, callbacks, max_steps: int, **kw):
    import lightning as L

    sys_path = str(WORKLOADS)
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from common import Net, data

    from lightning_distckpt import DistCheckpointIO

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks,
                        plugins=[DistCheckpointIO(durable=False, **kw)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))  # fmt: skip
    return trainer, Net(), data()


def test_retention_removes_row_marker_data_in_order(healthy_minihbase, tmp_path, monkeypatch):
    from lightning_distckpt import DistCheckpoint, catalog
    from lightning_distckpt.catalog.hbase import HBaseIndex
    from lightning_distckpt.catalog.index import CatalogOptions, open_index
    from lightning_distckpt.storage.local import LocalStore

    url = healthy_minihbase.catalog_url(_table())
    events: list[tuple[str, str]] = []
    probe = open_index(url, CatalogOptions())
    orig_remove, orig_begin, orig_finish = LocalStore.remove, HBaseIndex.begin_delete, HBaseIndex.finish_delete

    def of(name: str, path: str) -> bool:  # the checkpoint's directory, a file in it, or where removal moved it
        parts = path.rstrip("/").split("/")
        return any(p == name or p.startswith((f".{name}.trash-", f".{name}.staging-")) for p in parts[-2:])

    def remove(self, path, recursive=False):
        row = [e for e in probe.entries("keep", include_deleting=True) if of(e.name, path)]
        events.append(("marker" if path.endswith("COMMITTED") else "data", row[0].state if row else "no row"))
        return orig_remove(self, path, recursive)

    def begin(self, entry, epoch, force=False):
        events.append(("begin", entry.name))
        return orig_begin(self, entry, epoch, force)

    def finish(self, entry):
        events.append(("row", entry.name))
        return orig_finish(self, entry)

    monkeypatch.setattr(LocalStore, "remove", remove)
    monkeypatch.setattr(HBaseIndex, "begin_delete", begin)
    monkeypatch.setattr(HBaseIndex, "finish_delete", finish)
    root = tmp_path / "ckpts"
    cb = DistCheckpoint(dirpath=str(root), every_n_train_steps=2, keep_last=2, catalog=url, run="keep")
    trainer, model, data = _trainer(tmp_path, [cb], 8, async_save=True)
    trainer.fit(model, data)
    probe.close()
    # each removal: row marked deleting -> marker -> data -> row deleted
    begins = [i for i, e in enumerate(events) if e[0] == "begin"]
    assert len(begins) == 2, events
    for i in begins:  # the files go one by one (manifest last), then the directory: several "data" events
        end = next(j for j in range(i, len(events)) if events[j][0] == "row")
        kinds = [e[0] for e in events[i : end + 1]]
        assert kinds[:2] == ["begin", "marker"] and kinds[-1] == "row" and len(kinds) >= 4, events
        assert set(kinds[2:-1]) == {"data"}, events
        assert all(e[1] == "deleting" for e in events[i + 1 : end]), events
    on_storage = [c.name for c in catalog.committed(str(root))]
    with open_index(url) as ix:
        rows = [e.name for e in ix.entries("keep", include_deleting=True)]
        assert rows == list(reversed(on_storage)) and len(rows) == 2
        assert ix.run_info("keep").deleting == [] and ix.run_info("keep").latest.name == on_storage[-1]
    assert cb.catalog_stats["registered"] == 4 and cb.catalog_stats["failures"] == 0


def test_gateway_stopped_mid_training(healthy_minihbase, tmp_path):
    """Training goes on while the Thrift gateway is down; "last" falls back to storage; the rows catch up."""
    import lightning as L

    from lightning_distckpt import DistCheckpoint, catalog
    from lightning_distckpt.catalog.index import CatalogOptions, open_index

    hb = healthy_minihbase
    url = hb.catalog_url(_table())
    seen: dict[str, object] = {}

    class Outage(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                t0 = time.monotonic()
                hb.stop_thrift()  # open client connections are dropped too (the gateway closes idle ones after 3 s)
                seen["stop_s"] = time.monotonic() - t0
            if trainer.global_step == 7:
                cbk = trainer.checkpoint_callback
                seen["during"] = dict(cbk.catalog_stats)
                seen["last"] = cbk._catalog.lookup("last")  # what ckpt_path="last" would get: nothing -> listing
                hb.start_thrift()

    root = tmp_path / "ckpts"
    cb = DistCheckpoint(dirpath=str(root), every_n_train_steps=1, save_top_k=-1, catalog=url, run="outage",
                        catalog_options=CatalogOptions(timeout_s=1.0, retries=1, retry_backoff_s=0.05))  # fmt: skip
    cb._catalog.retry_interval_s = 0.3
    trainer, model, data = _trainer(tmp_path, [cb, Outage()], 10)
    t0 = time.monotonic()
    trainer.fit(model, data)
    assert trainer.global_step == 10 and time.monotonic() - t0 < 90 and seen["stop_s"] < 20, seen
    during, final = seen["during"], cb.catalog_stats
    assert during["failures"] >= 1 and during["pending"] >= 3, during
    assert seen["last"] is None and final["fallbacks"] == 1
    assert final["registered"] == 10 and final["caught_up"] >= 3 and final["pending"] == 0, final
    assert final["failures"] >= 1 and not final["fenced"]
    on_storage = [c.name for c in catalog.committed(str(root))]
    with open_index(url) as ix:
        assert [e.name for e in ix.entries("outage")] == list(reversed(on_storage))
        assert ix.run_info("outage").latest.name == on_storage[-1]
    assert cb._catalog.lookup("last") == str(root / on_storage[-1])  # and "last" resolves through it again


def test_catalog_answers_equal_storage_listings_for_20_runs(index, tmp_path):
    from lightning_distckpt import catalog
    from lightning_distckpt.catalog.index import manifest_digest

    epochs = {f"run{i:02d}": index.take_ownership(f"run{i:02d}", "t") for i in range(20)}
    for k, (run_name, epoch) in enumerate(epochs.items()):
        for step in (k % 3, 3 + k % 2, 6):
            url, m = _ckpt(tmp_path / run_name, f"s{step}", step)
            index.register(_entry(run_name, url, m, value=((k * 5 + step) % 7) / 7), epoch)
    runs = {r.run: r for r in index.runs()}
    assert sorted(runs) == sorted(epochs)
    for run_name in epochs:
        listed = catalog.committed(str(tmp_path / run_name))
        assert runs[run_name].latest.url == catalog.latest([str(tmp_path / run_name)])[0].url
        rows = index.entries(run_name)
        assert [e.url for e in rows] == [c.url for c in reversed(listed)]
        assert [e.digest for e in rows] == [manifest_digest(c.manifest) for c in reversed(listed)]
    rc, out = _cli("runs", "--catalog", index.url, "--json")
    assert rc == 0 and len(json.loads(out)) == 20
    rc, out = _cli("ls", "--catalog", index.url, "--json")
    assert rc == 0 and len(json.loads(out)) == 60
    rc, out = _cli("ls", "--catalog", index.url, "--run", "run07")
    assert rc == 0 and out.count("run07") == 3 and "STEP" in out


@pytest.mark.hdfs
def test_hbase_on_the_project_minidfs(minidfs, tmp_path):
    """HBase keeps its WAL and store files on the project's MiniDFS; the catalog works the same."""
    import fsspec

    from hbase_cluster import MiniHBase
    from lightning_distckpt.catalog.index import open_index

    with MiniHBase.start(tmp_path / "hb", dfs=minidfs.namenode_url) as hb:
        assert hb.info["rootdir"].startswith(minidfs.namenode_url), hb.info
        url, m = _ckpt(tmp_path, "step=3", 3)
        with open_index(hb.catalog_url("ondfs")) as ix:
            ix.register(_entry("dfsrun", url, m, 0.5), ix.take_ownership("dfsrun"))
            assert ix.run_info("dfsrun").latest.url == url
        fs, _ = fsspec.core.url_to_fs(minidfs.namenode_url)
        root = hb.info["rootdir"][len(minidfs.namenode_url):]
        assert any("ondfs" in p for p in fs.find(root + "/data/default", withdirs=True)), fs.ls(root)


@pytest.mark.slow
def test_ddp_resume_last_and_best_through_the_catalog(healthy_minihbase, tmp_path):
    """2-process DDP with catalog= and a replica; resumes ckpt_path="last" (primary copy lost: from the replica) and
    "best", both resolved through the catalog."""
    import shutil

    from lightning_distckpt.catalog.index import open_index

    url = healthy_minihbase.catalog_url(_table())
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    common = ["--strategy", "ddp", "--catalog", url, "--run-name", "ddp", "--ckpt-dir", primary,
              "--replicas", replica, "--save-every", "2", "--mode", "max"]  # fmt: skip
    script = WORKLOADS / "catalog_train.py"
    run(torchrun_cmd(script, 2, *common, "--max-steps", "6", "--out", tmp_path / "r1.json"), timeout=300)
    r1 = load_json(tmp_path / "r1.json")
    assert r1["catalog"]["registered"] == 3 and r1["catalog"]["pending"] == 0, r1
    with open_index(url) as ix:
        info = ix.run_info("ddp")
        assert info.latest.step == 6 and len(info.latest.copies) == 2, info  # primary + replica location
        best = info.best["train_loss"]  # mode max: the highest loss, usually not the newest checkpoint
        assert best.value == pytest.approx(r1["best_score"]) and best.mode == "max"
        assert best.value == max(e.monitor_value for e in ix.entries("ddp"))

    shutil.rmtree(primary / info.latest.name)  # the newest primary copy is lost
    # two fits in one pair of processes (saves a start-up): ckpt_path="last", then "best"
    run(torchrun_cmd(script, 2, *common, "--max-steps", "7", "--resume", "last", "best", "--out", tmp_path / "r2.json"),
        timeout=300)  # fmt: skip
    r2, r3 = load_json(tmp_path / "r2.json")
    assert r2["loaded_from"] == str(replica / info.latest.name) and r2["started_step"] == 6, r2
    assert r2["catalog"]["skipped"] == 0  # the pointer's replica copy verified (the primary was tried first)
    assert r3["loaded_from"] in best.copies and r3["started_step"] == best.step, (r3, best)
    assert r3["global_step"] == 7


def test_a_name_saved_again_keeps_one_row(index, tmp_path):
    """save_last-style overwrites: the row of the replaced bytes goes when the new save registers, and reconcile
    drops such rows too."""
    from lightning_distckpt.catalog.index import reconcile

    epoch = index.take_ownership("ow", "t")
    index.register(_entry("ow", *_ckpt(tmp_path, "last", 2)), epoch)
    index.register(_entry("ow", *_ckpt(tmp_path, "last", 4)), epoch)  # same name, overwritten on storage
    rows = index.entries("ow")
    assert [(e.name, e.step) for e in rows] == [("last", 4)] and index.run_info("ow").latest.step == 4
    stale = _entry("ow", *_ckpt(tmp_path / "old", "last", 1))  # a row left by an older client
    index.register(stale, epoch)
    assert len(index.entries("ow")) == 2
    rep = reconcile(index, str(tmp_path), "ow")
    assert rep.removed == [stale.row] and [(e.name, e.step) for e in index.entries("ow")] == [("last", 4)]


def test_namespace_option(healthy_minihbase, tmp_path):
    from lightning_distckpt.catalog.index import CatalogOptions, open_index

    ns = "ns" + uuid.uuid4().hex[:6]
    healthy_minihbase.create_namespace(ns)
    with open_index(healthy_minihbase.catalog_url("cat"), CatalogOptions(namespace=ns)) as ix:
        ix.register(_entry("r", *_ckpt(tmp_path, "step=1", 1)), ix.take_ownership("r"))
        assert ix.table_name == f"{ns}:cat" and ix.run_info("r").latest.name == "step=1"
    assert _raw_row(healthy_minihbase, f"{ns}:cat", "r")[b"r:state"]
