"""``distckpt`` commands of the checkpoint catalog (``--catalog hbase://HOST:PORT/TABLE``).

    distckpt runs --catalog URL                          every run: owner epoch, latest, best pointers
    distckpt ls --catalog URL [--run R]                  the catalog's rows (newest first per run)
    distckpt best --catalog URL --metric M [--mode min|max] [--run R]
                                                         the best checkpoint by a logged metric, across runs
    distckpt reconcile ROOT --catalog URL [--run R]      rebuild a run's rows from the committed checkpoints
                                                         under ROOT (run defaults to ROOT's last component)

All take ``--json``. Registered into the main parser by `register` (listed in ``cli.main.COMMAND_MODULES`` after ``cmd_ls``, whose
``ls`` it extends); imports nothing heavy until a command runs (never Lightning, never torch).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from lightning_distckpt.cli.common import EXIT_FAILED, EXIT_OK, UsageError, out, printable, storage


def _index(args: argparse.Namespace, create_table: bool = False) -> Any:
    """The catalog ``--catalog`` names (no I/O yet); a malformed URL is a usage error (exit 2)."""
    from lightning_distckpt.catalog.index import CatalogOptions, open_index
    from lightning_distckpt.errors import CatalogError

    if not args.catalog_timeout > 0 or args.catalog_retries < 0:
        raise UsageError("--catalog-timeout must be positive and --catalog-retries at least 0")
    opts = CatalogOptions(timeout_s=args.catalog_timeout, retries=args.catalog_retries,
                          namespace=args.catalog_namespace, create_table=create_table)  # fmt: skip
    try:
        return open_index(args.catalog, opts)
    except CatalogError as e:
        raise UsageError(str(e)) from None


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_runs(args: argparse.Namespace) -> int:
    with _index(args) as index:
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
        return "\n".join(printable(line) for line in lines)

    out(args, rows, text)
    return EXIT_OK


def cmd_ls_catalog(args: argparse.Namespace) -> int:
    with _index(args) as index:
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
        return "\n".join(printable(line) for line in lines)

    out(args, rows, text)
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    """Best by ``--metric``: from the runs' ``best/<metric>`` pointers when they were kept in the same mode (one
    scan of the run rows), else from every row's logged metrics (a scan per run)."""
    sign = -1.0 if args.mode == "max" else 1.0
    found: list[dict[str, Any]] = []
    with _index(args) as index:
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
        return "\n".join(printable(f"{f['value']:<12.6g} {f['run']:<20} {f['name']:<30} step {f['step']:<8} {f['url']}")
                         for f in top)

    out(args, top, text)
    return EXIT_OK if top else EXIT_FAILED


def cmd_reconcile(args: argparse.Namespace) -> int:
    from lightning_distckpt.catalog.index import reconcile

    run = args.run or args.root.rstrip("/").rsplit("/", 1)[-1]
    with _index(args, create_table=True) as index:
        report = reconcile(index, args.root, run, storage(args), remove_missing=not args.keep_missing)
    obj = {"run": run, **report.to_json()}

    def text() -> str:
        lines = [f"run {run!r}: {len(report.registered)} registered, {len(report.present)} already present, "
                 f"{len(report.removed)} rows removed (checkpoint gone), {len(report.restored)} restored"]  # fmt: skip
        lines += [f"  + {r}" for r in report.registered] + [f"  - {r}" for r in report.removed]
        lines += [f"  ! {p}" for p in report.problems]
        return "\n".join(printable(line) for line in lines)

    out(args, obj, text)
    return EXIT_FAILED if report.problems else EXIT_OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``runs``, ``best``, ``reconcile`` and ``ls --catalog`` to the ``distckpt`` parser."""
    cat = argparse.ArgumentParser(add_help=False)
    cat.add_argument("--catalog-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="how long one catalog call may take (default 10)")  # fmt: skip
    cat.add_argument("--catalog-retries", type=int, default=2, metavar="N",
                     help="reconnecting retries of a failed catalog call (default 2)")  # fmt: skip
    cat.add_argument("--catalog-namespace", default="", metavar="NS", help="the catalog table's HBase namespace")
    url_help = "the catalog: hbase://HOST[:PORT]/TABLE (HBase's Thrift gateway; port 9090 by default)"

    s = sub.add_parser("runs", parents=[common, cat], help="runs in a checkpoint catalog",
                       description="Every run in the catalog: owner epoch, latest checkpoint, best pointers and "
                                   "how many zombie attempts were refused.")  # fmt: skip
    s.add_argument("--catalog", required=True, metavar="URL", help=url_help)
    s.set_defaults(fn=cmd_runs)
    s = sub.add_parser("best", parents=[common, cat], help="the best checkpoint by a metric, from a catalog",
                       description="The best checkpoint(s) by a logged metric, across runs (or in one run): from the "
                                   "runs' best pointers when kept in that mode, else from every row.")  # fmt: skip
    s.add_argument("--catalog", required=True, metavar="URL", help=url_help)
    s.add_argument("--metric", required=True, metavar="NAME", help="a metric logged when the checkpoints were saved")
    s.add_argument("--mode", choices=["min", "max"], default="min", help="lowest (min, default) or highest is best")
    s.add_argument("--run", default=None, metavar="RUN", help="only this run")
    s.add_argument("--top", type=int, default=1, metavar="N", help="how many to show (default 1)")
    s.set_defaults(fn=cmd_best)
    s = sub.add_parser("reconcile", parents=[common, cat], help="rebuild a run's catalog rows from storage",
                       description="Register the committed checkpoints under ROOT that the catalog misses (a crash "
                                   "between the commit marker and the row, or saves without a catalog), drop rows "
                                   "whose checkpoint is gone, restore rows a crash left 'deleting'. Deletes nothing "
                                   "on storage.")  # fmt: skip
    s.add_argument("root", metavar="ROOT", help="directory (or URL) that holds the run's checkpoint directories")
    s.add_argument("--catalog", required=True, metavar="URL", help=url_help)
    s.add_argument("--run", default=None, metavar="RUN", help="the run's name (default: ROOT's last path component)")
    s.add_argument("--keep-missing", action="store_true", help="keep rows whose checkpoint is gone from storage")
    s.set_defaults(fn=cmd_reconcile)

    # ls: ROOT becomes optional when --catalog is given
    ls = sub.choices.get("ls")
    if ls is None:
        return
    for action in ls._actions:  # argparse reads nargs at parse time
        if action.dest == "root":
            action.nargs, action.default = "?", None
    ls.add_argument("--catalog", default=None, metavar="URL", help="list the catalog's rows instead of ROOT: " + url_help)
    ls.add_argument("--run", default=None, metavar="RUN", help="with --catalog: only this run")
    for a in cat._actions:
        ls._add_action(a)
    plain = ls.get_default("fn")

    def ls_fn(args: argparse.Namespace) -> int:
        if args.catalog:
            return cmd_ls_catalog(args)
        if not args.root:
            ls.error("the following arguments are required: ROOT (or --catalog URL)")
        return plain(args)

    ls.set_defaults(fn=ls_fn)
