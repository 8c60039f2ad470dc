"""The catalog's parts that need no HBase: row keys, URLs, and "catalog errors never fail training" against a
port where nothing listens (a real refused connection)."""

from __future__ import annotations

import time

import pytest

from conftest import free_port


def test_row_keys_sort_newest_first_and_names_are_checked():
    from lightning_distckpt.catalog.index import row_key
    from lightning_distckpt.errors import CatalogError

    keys = [row_key("run-a", s, f"step={s}") for s in (0, 1, 9, 10, 255, 10**12)]
    assert sorted(keys) == list(reversed(keys))
    assert all(k.startswith("run-a/") for k in keys)
    for bad in ("", "a/b", "x\ny", "r" * 201):
        with pytest.raises(CatalogError, match="run name"):
            row_key(bad, 1, "n")
    with pytest.raises(CatalogError, match="checkpoint name"):
        row_key("r", 1, "a/b")


def test_catalog_urls_are_checked():
    from lightning_distckpt.catalog.index import open_index
    from lightning_distckpt.errors import CatalogError

    with pytest.raises(CatalogError, match="unknown catalog scheme 'redis'"):
        open_index("redis://h/t")
    with pytest.raises(CatalogError, match=r"hbase://h:1: not a catalog URL"):
        open_index("hbase://h:1")
    ix = open_index("hbase://h/t")  # no I/O until used
    assert (ix.host, ix.port, ix.table_name) == ("h", 9090, "t")


def test_unreachable_catalog_never_fails_training_paths(tmp_path):
    pytest.importorskip("happybase", reason="needs happybase: pip install 'lightning-distckpt[hbase]'")
    import torch

    from lightning_distckpt import DistCheckpoint, DistCheckpointIO, catalog
    from lightning_distckpt.catalog.index import CatalogOptions
    from lightning_distckpt.errors import CatalogUnavailableError
    from lightning_distckpt.integration.catalog_hook import CatalogHook

    url = f"hbase://127.0.0.1:{free_port()}/t"  # nothing listens there
    opts = CatalogOptions(timeout_s=0.5, retries=1, retry_backoff_s=0.01)
    hook = CatalogHook(url, "r", opts, retry_interval_s=0.05)
    hook.start()
    path = str(tmp_path / "step=1")
    DistCheckpointIO(durable=False).save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    result = type("R", (), {"url": path, "manifest": catalog.read_manifest(catalog.source_of(path))})()
    trainer = type("T", (), {"callback_metrics": {"loss": torch.tensor(0.5), "vec": torch.ones(3)}})()
    t0 = time.perf_counter()
    hook.after_save(trainer, path, "loss", "min", lambda task: task(result))  # as if committed already
    assert time.perf_counter() - t0 < 0.05  # the training thread does not wait for the catalog
    time.sleep(0.5)
    assert hook.stats.failures >= 1 and hook.pending == 2 and "127.0.0.1" in hook.stats.last_error
    assert hook.lookup("last") is None and hook.stats.fallbacks == 1
    assert not hook.remove(path, lambda p: pytest.fail("removed without the catalog"), None)
    assert hook.stats.deferred_removals == 1
    assert not hook.close(timeout_s=5)
    with pytest.raises(CatalogUnavailableError, match=r"hbase://127.0.0.1:\d+/t: read row 'r' failed after 2 attempt"):
        hook.resolve("last")
    with pytest.raises(ValueError, match="needs run=NAME"):
        DistCheckpoint(dirpath=str(tmp_path), catalog=url)
