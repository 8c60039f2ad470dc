"""The ``distckpt`` command: list, inspect, verify, export, copy and clean up checkpoints, on any store.

    distckpt ls ROOT                      checkpoints under ROOT
    distckpt info CKPT                    tensors, state keys, manifest
    distckpt verify CKPT                  read every byte; exit 1 if anything is wrong
    distckpt export CKPT OUT [--format torch|safetensors] [--dtype bf16] [--prune F] [--quantize int8]
    distckpt copy SRC DST                 verified, resumable copy between stores
    distckpt gc ROOT --keep-last N        remove crashed saves and old checkpoints (dry run unless --apply)

Every command takes ``--json`` (machine-readable output on stdout), ``--quiet``, ``--debug`` (tracebacks)
and storage options (``-o key=value`` for fsspec, ``--hdfs-user``, ``--hdfs-replication``). Exit codes:
0 success; 1 verification failed or nothing to do; 2 bad usage; 3 not found, not a checkpoint or not
committed; 4 corrupt or unsafe checkpoint; 5 storage error; 6 other error. It does not import Lightning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_STORAGE, EXIT_OTHER = range(7)


def _storage(args: argparse.Namespace) -> Any:
    from lightning_distckpt.storage import HdfsOptions, StorageConfig

    options = {}
    for kv in args.option or []:
        if "=" not in kv:
            raise SystemExit(_usage(f"-o/--option expects key=value, got {kv!r}"))
        k, v = kv.split("=", 1)
        options[k] = v
    hdfs = HdfsOptions(user=args.hdfs_user, replication=args.hdfs_replication)
    return StorageConfig(options=options, hdfs=hdfs, durable=True)


def _usage(msg: str) -> int:
    print(f"distckpt: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # the loop returns at TiB


@contextmanager
def _progress(args: argparse.Namespace, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar with bytes and throughput on stderr (nothing with --quiet/--json or when not a tty)."""
    if args.quiet or args.json or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  transient=True) as bar:  # fmt: skip
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _out(args: argparse.Namespace, obj: Any, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(obj, indent=1, default=str))
    elif not args.quiet:
        print(text())


# ---- commands ------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog

    storage = _storage(args)
    rows = []
    replicas = args.replica or []
    copies = {r: {c.name for c in catalog.committed(r, storage)} for r in replicas}
    for c in catalog.list_checkpoints(args.root, storage):
        m = c.manifest
        row = {"name": c.name, "url": c.url, "committed": c.committed, "step": m.global_step if m else None,
               "epoch": m.epoch if m else None, "world_size": m.world_size if m else None,
               "bytes": sum(f["size"] for f in m.files.values()) if m else None,
               "compression": (m.compression or {}).get("preset") if m and m.compression else None,
               "replicas": [r for r in replicas if c.name in copies[r]], "problem": c.problem}  # fmt: skip
        if args.verify and c.committed:
            row["verified"] = catalog.verify(c.url, storage).ok
        rows.append(row)

    def text() -> str:
        if not rows:
            return f"no checkpoints under {args.root}"
        head = f"{'NAME':<32} {'STEP':>8} {'SIZE':>10} {'WORLD':>5} {'COMPRESSION':<11} STATUS"
        lines = [head]
        for r in rows:
            status = ("verified" if r.get("verified") else "CORRUPT" if "verified" in r else "committed") if r["committed"] else "UNCOMMITTED"
            if r["replicas"]:
                status += f" (+{len(r['replicas'])} replica{'s' if len(r['replicas']) > 1 else ''})"
            lines.append(f"{r['name']:<32} {r['step'] if r['step'] is not None else '-':>8} "
                         f"{_size(r['bytes']) if r['bytes'] is not None else '-':>10} {r['world_size'] or '-':>5} "
                         f"{r['compression'] or '-':<11} {status}")  # fmt: skip
        return "\n".join(lines)

    _out(args, rows, text)
    return EXIT_OK if all(r.get("verified", True) for r in rows) else EXIT_FAILED


def cmd_info(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog, ondisk
    from lightning_distckpt.engine.loading import saved_tensors
    from lightning_distckpt.transforms import PART

    ckpt = catalog.open_checkpoint(catalog.source_of(args.ckpt, _storage(args)), check_sizes=False)
    encodings = (ckpt.metadata.planner_data or {}).get("encodings", {})
    stored: dict[str, int] = {}
    chunks: dict[str, list[str]] = {}
    for index, loc in ckpt.metadata.storage_data.items():
        base = index.fqn.split(PART)[0]
        stored[base] = stored.get(base, 0) + loc.stored
        chunks.setdefault(base, []).append(loc.file)
    tensors = []
    for key, (size, dtype) in sorted(saved_tensors(ckpt.metadata).items()):
        files = sorted(set(chunks.get(key, [])))
        tensors.append({"name": key, "shape": list(size), "dtype": ondisk.dtype_name(dtype),
                        "chunks": len(chunks.get(key, [])), "files": files, "stored_bytes": stored.get(key, 0),
                        "codec": encodings.get(key, {}).get("codec")})  # fmt: skip
    state_keys = sorted(ckpt.skeleton) if isinstance(ckpt.skeleton, dict) else []
    info = {"url": ckpt.url, "manifest": ckpt.manifest.to_json(), "state_keys": state_keys, "tensors": tensors}

    def text() -> str:
        m = ckpt.manifest
        lines = [f"{ckpt.url}", f"  step {m.global_step}  epoch {m.epoch}  world size {m.world_size}  strategy {m.strategy}",
                 f"  {len(m.files)} files, {_size(sum(f['size'] for f in m.files.values()))}; tensors {_size(m.tensor_bytes)} raw",
                 f"  compression: {m.compression or 'none'}", f"  versions: {m.versions}",
                 f"  non-tensor state: {', '.join(state_keys)}", "",
                 f"  {'TENSOR':<48} {'SHAPE':<18} {'DTYPE':<9} {'CHUNKS':>6} {'STORED':>10} CODEC"]  # fmt: skip
        for t in tensors:
            lines.append(f"  {t['name']:<48} {str(t['shape']):<18} {t['dtype']:<9} {t['chunks']:>6} "
                         f"{_size(t['stored_bytes']):>10} {t['codec'] or ''}")  # fmt: skip
        return "\n".join(lines)

    _out(args, info, text)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog

    storage = _storage(args)
    manifest = catalog.read_manifest(catalog.source_of(args.ckpt, storage))  # not found / not committed: exit 3
    total = sum(f["size"] for f in manifest.files.values())
    with _progress(args, total, f"verify {os.path.basename(args.ckpt.rstrip('/'))}") as advance:
        report = catalog.verify(args.ckpt, storage, progress=advance)
    obj = {"url": report.url, "ok": report.ok, "error": report.error,
           "files": [{"name": f.name, "ok": f.ok, "size": f.size, "problem": f.problem} for f in report.files]}

    def text() -> str:
        if report.error:
            return f"FAILED {report.url}: {report.error}"
        lines = [f"{'ok' if f.ok else 'BAD':<4} {f.name:<28} {_size(f.size):>10} {f.problem}" for f in report.files]
        lines.append(f"{'OK' if report.ok else 'FAILED'}: {report.url} ({len(report.files)} files)")
        return "\n".join(lines)

    _out(args, obj, text)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from lightning_distckpt.ops.export import export_checkpoint, export_sharded_safetensors

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    t0 = time.perf_counter()
    if args.format == "safetensors" and args.shard_size_mb:
        files = export_sharded_safetensors(args.ckpt, args.out, args.shard_size_mb << 20, dtype=dtype, prune=args.prune,
                                           prune_threshold=args.prune_threshold, quantize=args.quantize,
                                           storage_options=_storage(args))  # fmt: skip
    else:
        files = [export_checkpoint(args.ckpt, args.out, weights_only=args.weights_only, dtype=dtype, format=args.format,
                                   prune=args.prune, prune_threshold=args.prune_threshold, quantize=args.quantize,
                                   storage_options=_storage(args))]  # fmt: skip
    sizes = {f: os.path.getsize(f) for f in files}
    _out(args, {"files": sizes, "seconds": time.perf_counter() - t0},
         lambda: "\n".join(f"wrote {f} ({_size(s)})" for f, s in sizes.items()))
    return EXIT_OK


def cmd_copy(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.catalog.replication import copy_checkpoint

    storage = _storage(args)
    src = catalog.read_manifest(catalog.source_of(args.src, storage))
    total = sum(f["size"] for f in src.files.values())
    t0 = time.perf_counter()
    with _progress(args, total, f"copy {os.path.basename(args.src.rstrip('/'))}") as advance:
        copy_checkpoint(args.src, args.dst, storage, progress=advance)
    dt = time.perf_counter() - t0
    _out(args, {"src": args.src, "dst": args.dst, "bytes": total, "seconds": dt},
         lambda: f"copied {args.src} -> {args.dst}: {_size(total)} in {dt:.1f} s ({_size(total / max(dt, 1e-9))}/s), verified")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.storage import open_store

    storage = _storage(args)
    dry = not args.apply
    stale = catalog.clean_stale(args.root, storage, older_than_s=args.older_than, dry_run=dry)
    committed = catalog.committed(args.root, storage)
    old = committed[: -args.keep_last] if args.keep_last else []
    if not dry:
        store, root = open_store(args.root, storage)
        for c in old:
            catalog.remove_checkpoint(store, store.join(root, c.name))
    removed = stale + [c.url for c in old]
    verb = "would remove" if dry else "removed"
    _out(args, {"dry_run": dry, "removed": removed, "kept": [c.url for c in committed[len(old):]]},
         lambda: "\n".join([f"{verb} {u}" for u in removed] + ([f"(dry run: pass --apply to delete)"] if dry and removed else [])
                           or [f"nothing to remove under {args.root}"]))  # fmt: skip
    return EXIT_OK


# ---- entry point ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no output but errors")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="fsspec storage option")
    common.add_argument("--hdfs-user", default=None)
    common.add_argument("--hdfs-replication", type=int, default=None)
    p = argparse.ArgumentParser(prog="distckpt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ls", parents=[common], help="checkpoints under a root")
    s.add_argument("root")
    s.add_argument("--verify", action="store_true", help="also read every byte of every committed checkpoint")
    s.add_argument("--replica", action="append", help="a replica root to report copies in")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("info", parents=[common], help="tensors, state keys and manifest of a checkpoint")
    s.add_argument("ckpt")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("verify", parents=[common], help="check every file's checksum (exit 1 on failure)")
    s.add_argument("ckpt")
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("export", parents=[common], help="one file loadable without this package")
    s.add_argument("ckpt")
    s.add_argument("out")
    s.add_argument("--format", choices=["torch", "safetensors"], default="torch")
    s.add_argument("--weights-only", action="store_true", help="torch format: model weights only")
    s.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    s.add_argument("--prune", type=float, default=None, metavar="FRACTION", help="zero this fraction of each weight")
    s.add_argument("--prune-threshold", type=float, default=None, metavar="X", help="zero weights with |w| < X")
    s.add_argument("--quantize", choices=["int8"], default=None)
    s.add_argument("--shard-size-mb", type=int, default=0, help="safetensors: split into shards with an index")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("copy", parents=[common], help="verified, resumable copy between stores")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_copy)
    s = sub.add_parser("gc", parents=[common], help="remove crashed saves and old checkpoints (dry run by default)")
    s.add_argument("root")
    s.add_argument("--keep-last", type=int, default=0, help="keep this many newest committed checkpoints (0: all)")
    s.add_argument("--older-than", type=float, default=0.0, metavar="SECONDS", help="only stale dirs this old")
    s.add_argument("--apply", action="store_true", help="really delete")
    s.set_defaults(fn=cmd_gc)
    from lightning_distckpt.cli.catalog_cmds import register as register_catalog_commands

    register_catalog_commands(sub, common, _storage)  # runs, best, reconcile, ls --catalog (cli/catalog_cmds.py)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from lightning_distckpt import errors

    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - mapped to an exit code and one line
        if args.debug:
            raise
        code = (EXIT_NOT_FOUND if isinstance(e, (errors.CheckpointNotFoundError, errors.NotACheckpointError,
                                                 errors.UncommittedCheckpointError, FileNotFoundError))
                else EXIT_CORRUPT if isinstance(e, errors.CorruptCheckpointError)
                else EXIT_STORAGE if isinstance(e, (errors.StorageError, OSError))
                else EXIT_OTHER)  # fmt: skip
        print(f"distckpt {args.command}: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
