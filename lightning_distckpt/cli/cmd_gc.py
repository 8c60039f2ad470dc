"""``distckpt gc ROOT``: remove crashed saves and, with ``--keep-last``, old checkpoints (dry run by default).

What it may delete is `lightning_distckpt.catalog.clean_stale`'s rule (docs/fault-tolerance.md, "What clean-up may
delete"): only names the package makes, only directly under ROOT, only when idle for ``--older-than`` seconds
(default 600), never a committed copy unless a newer committed copy of the same name exists. ``--keep-last N``
is `lightning_distckpt.catalog.check_keep_last`'s rule, the same as ``DistCheckpoint(keep_last=N)``.
"""

from __future__ import annotations

import argparse

from lightning_distckpt.cli.common import EXIT_OK, UsageError, out, printable, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("gc", parents=[common], help="remove crashed saves and old checkpoints (dry run by default)",
                       description="Find staging and trash directories of crashed saves under ROOT and, with "
                                   "--keep-last N, committed checkpoints older than the N newest. Prints what it "
                                   "would remove; removes it only with --apply.")  # fmt: skip
    s.add_argument("root", metavar="ROOT", help="directory (or URL) that holds checkpoint directories")
    s.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="also remove committed checkpoints beyond the N newest (N >= 1: the same rule as "
                        "DistCheckpoint(keep_last=N)); without it no committed checkpoint is removed")  # fmt: skip
    s.add_argument("--older-than", type=float, default=None, metavar="SECONDS",
                   help="only leftovers idle at least this long (default 600; 0 only when no job can be writing "
                        "under ROOT)")  # fmt: skip
    s.add_argument("--apply", action="store_true", help="really delete (default: dry run)")
    s.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.errors import CheckpointNotFoundError, NotACheckpointError
    from lightning_distckpt.storage import open_store

    if args.keep_last is not None:  # the one rule shared with DistCheckpoint(keep_last=), before anything is touched
        try:
            catalog.check_keep_last(args.keep_last, "--keep-last")
        except ValueError as e:
            raise UsageError(str(e)) from None
    older_than = catalog.DEFAULT_STALE_AGE_S if args.older_than is None else args.older_than
    if not older_than >= 0:
        raise UsageError(f"--older-than {args.older_than}: must be 0 or more seconds")
    config = storage(args)
    store, root = open_store(args.root, config)
    if not store.exists(root):
        raise CheckpointNotFoundError(f"{args.root}: no such directory")
    if not store.isdir(root):
        raise NotACheckpointError(f"{args.root}: is a file, not a directory of checkpoints")
    from lightning_distckpt import ondisk

    if store.exists(store.join(root, ondisk.MARKER)):  # a typo for its root: nothing under it is garbage to collect
        raise NotACheckpointError(f"{args.root}: is a checkpoint, not a directory of checkpoints (gc its root)")
    dry = not args.apply
    stale = catalog.clean_stale(args.root, config, older_than_s=older_than, dry_run=dry)
    committed = catalog.committed(args.root, config)
    old = catalog.retention_victims(committed, args.keep_last) if args.keep_last is not None else []
    blocks: list[str] = []
    ids = {i for c in old if c.manifest is not None for i in c.manifest.data_ids()}  # complete: no idle test for them
    if not dry:
        for c in old:
            where, path = open_store(c.url, config)  # the listed copy (a trash directory's, until restored)
            catalog.remove_checkpoint(where, path)
        if ids:  # blocks of the removed checkpoints that no checkpoint still references
            blocks = catalog.sweep_blocks(args.root, config, older_than_s=older_than, done=ids)
    elif ids:
        blocks = catalog.sweep_blocks(args.root, config, older_than_s=older_than, dry_run=True, done=ids,
                                      ignore=[store.basename(c.url) for c in old])  # fmt: skip
    removed = stale + [c.url for c in old] + [b for b in blocks if b not in stale]
    verb = "would remove" if dry else "removed"
    out(args, {"dry_run": dry, "removed": removed, "kept": [c.url for c in committed[len(old):]]},
        lambda: "\n".join([f"{verb} {printable(u)}" for u in removed]
                          + (["(dry run: pass --apply to delete)"] if dry and removed else [])
                          or [f"nothing to remove under {printable(args.root)}"]))  # fmt: skip
    return EXIT_OK
