"""``distckpt copy SRC DST``: a verified, resumable copy of one checkpoint between any two stores."""

from __future__ import annotations

import argparse
import time

from lightning_distckpt.cli.common import EXIT_OK, basename, out, progress, size, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("copy", parents=[common], help="verified, resumable copy between stores",
                       description="Copy the committed checkpoint SRC to DST, checking every block against its "
                                   "checksum; the copy becomes visible (committed) only when complete, and an "
                                   "interrupted copy resumes. Like cp: if DST is an existing directory that is not "
                                   "a checkpoint, or ends with '/', the copy goes into it as DST/<name of SRC>. "
                                   "An existing checkpoint is never overwritten (exit 6).")  # fmt: skip
    s.add_argument("src", metavar="SRC", help="committed checkpoint to copy (path or URL)")
    s.add_argument("dst", metavar="DST", help="new checkpoint path or URL, or a directory to copy into")
    s.set_defaults(fn=run)


def target(dst: str, src: str, config: object) -> str:
    """Where ``copy SRC DST`` writes: ``DST/<name of SRC>`` when DST is an existing directory that is not a
    checkpoint (or ends with ``/``), else DST itself. An existing checkpoint at the target is refused."""
    from lightning_distckpt import ondisk
    from lightning_distckpt.errors import DestinationExistsError, NotACheckpointError
    from lightning_distckpt.storage import open_store

    store, path = open_store(dst, config)  # type: ignore[arg-type]
    if dst.endswith("/") or store.isdir(path):
        if store.exists(store.join(path, ondisk.MANIFEST)) and not store.exists(store.join(path, ondisk.MARKER)):
            return dst  # a copy killed before its marker: copy_checkpoint finishes it if it is this copy, else refuses
        if store.exists(store.join(path, ondisk.MARKER)) or store.exists(store.join(path, ondisk.MANIFEST)):
            raise DestinationExistsError(f"{dst}: a checkpoint already exists there; remove it first or copy elsewhere")
        dst = dst.rstrip("/") + "/" + basename(src)
        store, path = open_store(dst, config)  # type: ignore[arg-type]
    if store.exists(path):
        if not store.isdir(path):
            raise NotACheckpointError(f"{dst}: is a file; copy needs a new checkpoint path or a directory")
        if store.exists(store.join(path, ondisk.MANIFEST)) and not store.exists(store.join(path, ondisk.MARKER)):
            return dst  # as above: an interrupted copy, finished or refused by copy_checkpoint
        raise DestinationExistsError(f"{dst}: already exists; remove it first or copy elsewhere")
    return dst


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.catalog.replication import copy_checkpoint

    config = storage(args)
    src = catalog.read_manifest(catalog.source_of(args.src, config))
    dst = target(args.dst, args.src, config)
    total = sum(f["size"] for f in src.files.values())
    t0 = time.perf_counter()
    with progress(args, total, f"copy {basename(args.src)}") as advance:
        copy_checkpoint(args.src, dst, config, progress=advance)
    dt = time.perf_counter() - t0
    out(args, {"src": args.src, "dst": dst, "bytes": total, "seconds": dt},
        lambda: f"copied {args.src} -> {dst}: {size(total)} in {dt:.1f} s ({size(total / max(dt, 1e-9))}/s), verified")  # fmt: skip
    return EXIT_OK
