"""``distckpt gc ROOT``: remove crashed saves and, with ``--keep-last``, old checkpoints (dry run by default)."""

from __future__ import annotations

import argparse

from lightning_distckpt.cli.common import EXIT_OK, UsageError, out, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("gc", parents=[common], help="remove crashed saves and old checkpoints (dry run by default)",
                       description="Find staging and trash directories of crashed saves under ROOT and, with "
                                   "--keep-last N, committed checkpoints older than the N newest. Prints what it "
                                   "would remove; removes it only with --apply.")  # fmt: skip
    s.add_argument("root", metavar="ROOT", help="directory (or URL) that holds checkpoint directories")
    s.add_argument("--keep-last", type=int, default=0, metavar="N",
                   help="keep this many newest committed checkpoints, remove older ones (0: keep all)")  # fmt: skip
    s.add_argument("--older-than", type=float, default=0.0, metavar="SECONDS",
                   help="only remove staging/trash directories at least this old (default 0)")  # fmt: skip
    s.add_argument("--apply", action="store_true", help="really delete (default: dry run)")
    s.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.errors import CheckpointNotFoundError, NotACheckpointError
    from lightning_distckpt.storage import open_store

    if args.keep_last < 0:
        raise UsageError(f"--keep-last must be 0 or more, got {args.keep_last}")
    config = storage(args)
    store, root = open_store(args.root, config)
    if not store.exists(root):
        raise CheckpointNotFoundError(f"{args.root}: no such directory")
    if not store.isdir(root):
        raise NotACheckpointError(f"{args.root}: is a file, not a directory of checkpoints")
    dry = not args.apply
    stale = catalog.clean_stale(args.root, config, older_than_s=args.older_than, dry_run=dry)
    committed = catalog.committed(args.root, config)
    old = committed[: -args.keep_last] if args.keep_last else []
    if not dry:
        for c in old:
            catalog.remove_checkpoint(store, store.join(root, c.name))
    removed = stale + [c.url for c in old]
    verb = "would remove" if dry else "removed"
    out(args, {"dry_run": dry, "removed": removed, "kept": [c.url for c in committed[len(old):]]},
        lambda: "\n".join([f"{verb} {u}" for u in removed] + (["(dry run: pass --apply to delete)"] if dry and removed else [])
                          or [f"nothing to remove under {args.root}"]))  # fmt: skip
    return EXIT_OK
