"""The HBase catalog vs listing storage: "which checkpoint is newest / best" on the test HDFS, in ONE run.

    python benchmarks/bench_catalog.py      # starts a MiniDFS (3 DataNodes) and a mini HBase; needs Java 17 + Maven

20 runs; checkpoints are added in rounds until every run has 250 (5,000 in all). After each round, with the
same checkpoints on HDFS and in the catalog:

* ``latest_one``: the newest committed checkpoint of one run. Listing: ``catalog.latest([root])`` (list the run's
  directory, read each checkpoint's marker and manifest). Catalog: the run's row (one ``get``), and the same plus
  verifying the answer on HDFS (marker + manifest of that one checkpoint, ``+verify``), as a resume does.
* ``best_one``: the checkpoint of one run with the lowest ``val_loss``. Listing: the committed checkpoints, the
  metric parsed from the names (``...-val_loss=0.1234``, ModelCheckpoint's filename pattern; the usual way without
  a catalog). Catalog: the same ``get`` (the ``best/val_loss`` pointer).
* ``latest_all``: the newest checkpoint of every run. Listing: every run's directory. Catalog: one scan of the
  run rows (family ``r`` only).

Checkpoints are real committed checkpoints (marker, manifest, metadata, state, one data file) copied from one
saved by DistCheckpointIO, each with its own name, step and manifest; they are written to HDFS and registered
(``HBaseIndex.register``, the call the training hook makes in its background thread: its latency is the
registration cost per save). A short training run with ``DistCheckpoint(catalog=...)`` measures what a save
costs the training thread. Medians and min-max over the repeats. Writes benchmarks/results/catalog.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    xs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        xs.append(time.perf_counter() - t0)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}, out


def template(tmp: str) -> dict[str, bytes]:
    """The files of one small real checkpoint."""
    import torch

    from lightning_distckpt import DistCheckpointIO

    url = os.path.join(tmp, "template")
    DistCheckpointIO(durable=False).save_checkpoint({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 0,
                                                     "epoch": 0}, url)  # fmt: skip
    return {n: open(os.path.join(url, n), "rb").read() for n in os.listdir(url)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--per-run", type=int, nargs="+", default=[25, 50, 125, 250], help="checkpoints per run, by round")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=6, help="concurrent writers while filling HDFS and the catalog")
    args = p.parse_args()

    from hbase_cluster import MiniHBase
    from hdfs_cluster import MiniDfs, java_home_or_none

    from lightning_distckpt import catalog, ondisk
    from lightning_distckpt.catalog.index import CatalogOptions, entry_from_manifest, manifest_digest, open_index
    from lightning_distckpt.storage import open_store

    java_home, reason = java_home_or_none()
    if java_home is None:
        raise SystemExit(f"needs Java 17: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as base, \
            MiniDfs.start(os.path.join(base, "dfs"), datanodes=3, java_home=java_home) as dfs, \
            MiniHBase.start(os.path.join(base, "hb"), java_home=java_home) as hb:  # fmt: skip
        files = template(base)
        tmpl = json.loads(files[ondisk.MANIFEST])
        root = dfs.namenode_url + "/bench/catalog"
        url = hb.catalog_url("bench")
        opts = CatalogOptions(timeout_s=10)
        index = open_index(url, opts)
        runs = [f"run{r:02d}" for r in range(args.runs)]
        epochs = {r: index.take_ownership(r, "bench") for r in runs}
        store, _ = open_store(root)
        register_s: list[float] = []
        written = {r: 0 for r in runs}

        def value(r: int, i: int) -> float:
            return round(((r * 7919 + i * 104729) % 10007) / 10007, 6)

        def add(run_i: int, i: int, ix: Any) -> None:
            run = runs[run_i]
            name = f"step={i}-val_loss={value(run_i, i):.6f}"
            path = f"{root}/{run}/{name}"
            _, p_ = open_store(path)
            m = dict(tmpl, name=name, global_step=i, created=1.7e9 + i)  # commit order = step order
            mbytes = ondisk.dumps(m)
            for n, data in files.items():
                if n not in (ondisk.MANIFEST, ondisk.MARKER):
                    store.write_bytes(store.join(p_, n), data)
            store.write_bytes(store.join(p_, ondisk.MANIFEST), mbytes)
            store.write_bytes(store.join(p_, ondisk.MARKER), ondisk.marker_bytes(mbytes))
            manifest = ondisk.Manifest.from_json(m, path)
            entry = entry_from_manifest(run, path, manifest, {"val_loss": value(run_i, i)}, "val_loss", "min")
            assert entry.digest == ondisk.digest(mbytes)
            t0 = time.perf_counter()
            ix.register(entry, epochs[run])
            register_s.append(time.perf_counter() - t0)

        # what a save costs the training thread with catalog=... (async saves, local disk, 20 saves)
        train = training_cost(base, hb.catalog_url("bench_train"))  # its own table: not one of the 20 runs
        points: list[dict[str, Any]] = []
        seq: list[float] = []
        for per_run in args.per_run:
            jobs = [(r, i) for r in range(args.runs) for i in range(written[runs[r]], per_run)]
            t0 = time.perf_counter()
            indexes = [open_index(url, opts) for _ in range(args.threads)]
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda k: add(*jobs[k], indexes[k % args.threads]), range(len(jobs))))
            for ix in indexes:
                ix.close()
            for r in runs:
                written[r] = per_run
            fill_s = time.perf_counter() - t0
            total = per_run * args.runs
            one = runs[min(3, len(runs) - 1)]
            one_root = f"{root}/{one}"

            def list_latest() -> str:
                return catalog.latest([one_root])[0].name

            def list_best() -> str:
                found = catalog.committed(one_root)
                return min(found, key=lambda c: float(re.search(r"val_loss=([0-9.]+)", c.name).group(1))).name

            def list_all() -> dict[str, str]:
                return {r: catalog.latest([f"{root}/{r}"])[0].name for r in runs}

            def cat_latest() -> str:
                return index.run_info(one).latest.name

            def cat_latest_verified() -> str:
                pointer = index.run_info(one).latest
                m = catalog.read_manifest(catalog.source_of(pointer.url))
                assert manifest_digest(m) == pointer.digest
                return pointer.name

            def cat_best() -> str:
                return index.run_info(one).best["val_loss"].name

            def cat_all() -> dict[str, str]:
                return {r.run: r.latest.name for r in index.runs()}

            reps_list = max(2, args.repeats if total <= 1000 else args.repeats // 2)
            point: dict[str, Any] = {"checkpoints": total, "per_run": per_run, "fill_s": fill_s}
            for key, fn, reps in [("list_latest_one", list_latest, reps_list), ("list_best_one", list_best, reps_list),
                                  ("list_latest_all", list_all, 2 if total > 1000 else 3),
                                  ("catalog_latest_one", cat_latest, 30), ("catalog_latest_one_verified", cat_latest_verified, 30),
                                  ("catalog_best_one", cat_best, 30), ("catalog_latest_all", cat_all, 30)]:  # fmt: skip
                point[key], point[key + "_answer"] = timed(fn, reps)
            # the run rows' r:state cells were rewritten once per registration; until the memstore is flushed a scan
            # walks those old versions too: measure again after a flush (HBase flushes on its own, by size and hourly)
            hb.flush("bench")
            point["catalog_latest_all_flushed"], _ = timed(cat_all, 30)
            point["catalog_latest_one_flushed"], _ = timed(cat_latest, 30)
            assert point["catalog_latest_one_answer"] == point["list_latest_one_answer"]
            assert point["catalog_best_one_answer"] == point["list_best_one_answer"]
            assert point["catalog_latest_all_answer"] == point["list_latest_all_answer"]
            for k in list(point):
                if k.endswith("_answer"):
                    point[k] = point[k] if not isinstance(point[k], dict) else len(point[k])
            point["speedup"] = {q: point[f"list_{q}"]["median"] / point[f"catalog_{q}"]["median"]
                                for q in ("latest_one", "best_one", "latest_all")}  # fmt: skip
            points.append(point)
            write(args, points, register_s, seq, train)  # after every round: a late failure keeps what was measured
            print(json.dumps({k: (v["median"] if isinstance(v, dict) and "median" in v else v) for k, v in point.items()}),
                  flush=True)  # fmt: skip
        # registration alone, one writer, nothing else running: 200 rows of a fresh run
        epoch = index.take_ownership("sequential", "bench")
        tm = ondisk.Manifest.from_json(tmpl, "template")
        for i in range(200):
            tm.name, tm.global_step, tm.created = f"step={i}", i, 1.7e9 + i
            entry = entry_from_manifest("sequential", f"{root}/sequential/step={i}", tm, {"val_loss": 1.0 / (i + 1)},
                                        "val_loss", "min")  # fmt: skip
            t0 = time.perf_counter()
            index.register(entry, epoch)
            seq.append(time.perf_counter() - t0)
        index.close()
        write(args, points, register_s, seq, train)  # before the clean-up (deleting the cluster's files takes minutes)


def write(args: argparse.Namespace, points: list[dict[str, Any]], register_s: list[float], seq: list[float],
          train: dict[str, Any]) -> None:
    from _common import environment, write_result

    reg = sorted(register_s)
    result = {
        "env": environment(), "runs": args.runs, "points": points, "thrift": "happybase 1.3.0 (Thrift1)",
        "register_s": {"median": statistics.median(reg), "p90": reg[int(0.9 * len(reg))], "min": reg[0], "max": reg[-1],
                       "n": len(reg)},
        "training": train,
        "register_sequential_s": {"median": statistics.median(seq), "p90": sorted(seq)[int(0.9 * len(seq))],
                                  "min": min(seq), "max": max(seq), "n": len(seq)} if seq else None,
    }  # fmt: skip
    print(write_result("catalog", result))


def training_cost(base: str, url: str) -> dict[str, Any]:
    import lightning as L

    sys.path.insert(0, os.path.join(HERE, "..", "tests", "workloads"))
    from common import Net, data

    from lightning_distckpt import DistCheckpoint, DistCheckpointIO

    out = {}
    for label, catalog_url in (("without_catalog", None), ("with_catalog", url)):
        cb = DistCheckpoint(dirpath=os.path.join(base, "train", label), every_n_train_steps=1, save_top_k=-1,
                            catalog=catalog_url, run="train-bench" if catalog_url else None)  # fmt: skip
        io = DistCheckpointIO(async_save=True, durable=False)
        blocked: list[float] = []

        class Probe(L.Callback):
            def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
                blocked.append(io.stats.blocked_s)

        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=20, callbacks=[cb, Probe()], plugins=[io],
                            logger=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(Net(), data(n=512))
        out[label] = {"fit_s": time.perf_counter() - t0, "save_call_s": statistics.median(blocked)}
        if catalog_url:
            st = cb._catalog.stats
            out[label].update(submit_s={"median": statistics.median(st.submit_s), "max": max(st.submit_s)},
                              register_s={"median": statistics.median(st.register_s), "max": max(st.register_s)},
                              registered=st.registered)  # fmt: skip
    return out


if __name__ == "__main__":
    main()
