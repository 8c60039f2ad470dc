"""``distckpt`` commands of the checkpoint catalog (``--catalog hbase://HOST:PORT/TABLE``).

    distckpt runs --catalog URL                          every run: owner epoch, latest, best pointers
    distckpt ls --catalog URL [--run R]                  the catalog's rows (newest first per run)
    distckpt best --catalog URL --metric M [--mode min|max] [--run R]
                                                         the best checkpoint by a logged metric, across runs
    distckpt reconcile ROOT --catalog URL [--run R]      rebuild a run's rows from the committed checkpoints
                                                         under ROOT (run defaults to ROOT's last component)

All take ``--json``. Registered into the main parser by :func:`register`; imports nothing heavy until a command
runs (never Lightning).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any


def _options(args: argparse.Namespace) -> Any:
    from lightning_distckpt.catalog.index import CatalogOptions

    return CatalogOptions(timeout_s=args.catalog_timeout, retries=args.catalog_retries, namespace=args.catalog_namespace,
                          create_table=False)  # fmt: skip


def _out(args: argparse.Namespace, obj: Any, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(obj, indent=1, default=str))
    elif not args.quiet:
        print(text())


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_runs(args: argparse.Namespace) -> int:
    from lightning_distckpt.catalog.index import open_index

    with open_index(args.catalog, _options(args)) as index:
        runs = index.runs()
    rows = [r.to_json() for r in runs]

    def text() -> str:
        if not runs:
            return f"no runs in {args.catalog}"
        lines = [f"{'RUN':<24} {'EPOCH':>5} {'LATEST':<28} {'STEP':>8} {'BEST':<36} REFUSED"]
        for r in runs:
            best = ", ".join(f"{m}={p.value:.4g} ({p.name})" for m, p in sorted(r.best.items()) if p.value is not None)
            lines.append(f"{r.run:<24} {r.owner_epoch:>5} {(r.latest.name if r.latest else '-'):<28} "
                         f"{(r.latest.step if r.latest else '-'):>8} {best or '-':<36} {r.refused}")  # fmt: skip
        return "\n".join(lines)

    _out(args, rows, text)
    return 0


def cmd_ls_catalog(args: argparse.Namespace) -> int:
    from lightning_distckpt.catalog.index import open_index

    with open_index(args.catalog, _options(args)) as index:
        runs = [args.run] if args.run else [r.run for r in index.runs()]
        entries = [e for run in runs for e in index.entries(run, include_deleting=True)]
    rows = [e.to_json() for e in entries]

    def text() -> str:
        if not entries:
            return f"no checkpoints in {args.catalog}" + (f" for run {args.run!r}" if args.run else "")
        lines = [f"{'RUN':<20} {'NAME':<30} {'STEP':>8} {'CREATED':<19} {'MONITOR':<24} {'COPIES':>6} STATE"]
        for e in entries:
            mon = f"{e.monitor}={e.monitor_value:.4g}" if e.monitor and e.monitor_value is not None else "-"
            lines.append(f"{e.run:<20} {e.name:<30} {e.step:>8} {_when(e.created):<19} {mon:<24} "
                         f"{len(e.locations):>6} {e.state}")  # fmt: skip
        return "\n".join(lines)

    _out(args, rows, text)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Best by ``--metric``: from the runs' ``best/<metric>`` pointers when they were kept in the same mode (one
    scan of the run rows), else from every row's logged metrics (a scan per run)."""
    from lightning_distckpt.catalog.index import open_index

    sign = -1.0 if args.mode == "max" else 1.0
    found: list[dict[str, Any]] = []
    with open_index(args.catalog, _options(args)) as index:
        runs = [r for r in index.runs() if not args.run or r.run == args.run]
        for r in runs:
            p = r.best.get(args.metric)
            if p is not None and p.mode == args.mode and p.value is not None:
                found.append({"run": r.run, "name": p.name, "step": p.step, "value": p.value, "url": p.url,
                              "copies": p.copies, "source": "pointer"})  # fmt: skip
                continue
            for e in index.entries(r.run):
                v = e.monitor_value if e.monitor == args.metric else e.metrics.get(args.metric)
                if v is not None and math.isfinite(v):
                    found.append({"run": r.run, "name": e.name, "step": e.step, "value": v, "url": e.url,
                                  "copies": e.copies, "source": "rows"})  # fmt: skip
    found.sort(key=lambda f: sign * f["value"])
    top = found[: args.top]

    def text() -> str:
        if not top:
            return f"no checkpoint in {args.catalog} has metric {args.metric!r}"
        return "\n".join(f"{f['value']:<12.6g} {f['run']:<20} {f['name']:<30} step {f['step']:<8} {f['url']}" for f in top)

    _out(args, top, text)
    return 0 if top else 1


def cmd_reconcile(args: argparse.Namespace, storage: Callable[[argparse.Namespace], Any]) -> int:
    from lightning_distckpt.catalog.index import CatalogOptions, open_index, reconcile

    run = args.run or args.root.rstrip("/").rsplit("/", 1)[-1]
    opts = _options(args)
    opts = CatalogOptions(**{**opts.__dict__, "create_table": True})
    with open_index(args.catalog, opts) as index:
        report = reconcile(index, args.root, run, storage(args), remove_missing=not args.keep_missing)
    obj = {"run": run, **report.to_json()}

    def text() -> str:
        lines = [f"run {run!r}: {len(report.registered)} registered, {len(report.present)} already present, "
                 f"{len(report.removed)} rows removed (checkpoint gone), {len(report.restored)} restored"]  # fmt: skip
        lines += [f"  + {r}" for r in report.registered] + [f"  - {r}" for r in report.removed]
        lines += [f"  ! {p}" for p in report.problems]
        return "\n".join(lines)

    _out(args, obj, text)
    return 1 if report.problems else 0


def register(sub: Any, common: argparse.ArgumentParser, storage: Callable[[argparse.Namespace], Any]) -> None:
    """Add ``runs``, ``best``, ``reconcile`` and ``ls --catalog`` to the ``distckpt`` parser."""
    cat = argparse.ArgumentParser(add_help=False)
    cat.add_argument("--catalog-timeout", type=float, default=10.0, metavar="S", help="seconds per catalog call")
    cat.add_argument("--catalog-retries", type=int, default=2, help="reconnecting retries per catalog call")
    cat.add_argument("--catalog-namespace", default="", help="the catalog table's namespace")

    s = sub.add_parser("runs", parents=[common, cat], help="runs in a checkpoint catalog")
    s.add_argument("--catalog", required=True, metavar="URL", help="hbase://HOST:PORT/TABLE")
    s.set_defaults(fn=cmd_runs)
    s = sub.add_parser("best", parents=[common, cat], help="best checkpoint by a metric, from a catalog")
    s.add_argument("--catalog", required=True, metavar="URL", help="hbase://HOST:PORT/TABLE")
    s.add_argument("--metric", required=True)
    s.add_argument("--mode", choices=["min", "max"], default="min")
    s.add_argument("--run", default=None, help="only this run")
    s.add_argument("--top", type=int, default=1, help="how many to show")
    s.set_defaults(fn=cmd_best)
    s = sub.add_parser("reconcile", parents=[common, cat], help="rebuild a run's catalog rows from storage")
    s.add_argument("root")
    s.add_argument("--catalog", required=True, metavar="URL", help="hbase://HOST:PORT/TABLE")
    s.add_argument("--run", default=None, help="run name (default: ROOT's last path component)")
    s.add_argument("--keep-missing", action="store_true", help="keep rows whose checkpoint is gone from storage")
    s.set_defaults(fn=lambda args: cmd_reconcile(args, storage))

    # ls: ROOT becomes optional when --catalog is given
    ls = sub.choices.get("ls")
    if ls is None:
        return
    for action in ls._actions:  # argparse reads nargs at parse time
        if action.dest == "root":
            action.nargs, action.default = "?", None
    ls.add_argument("--catalog", default=None, metavar="URL", help="list the catalog's rows instead of a root")
    ls.add_argument("--run", default=None, help="with --catalog: only this run")
    for a in cat._actions:
        ls._add_action(a)
    plain = ls.get_default("fn")

    def ls_fn(args: argparse.Namespace) -> int:
        if args.catalog:
            return cmd_ls_catalog(args)
        if not args.root:
            ls.error("the following arguments are required: root (or --catalog URL)")
        return plain(args)

    ls.set_defaults(fn=ls_fn)
