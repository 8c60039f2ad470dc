"""``distckpt ls ROOT``: the checkpoints under a root, committed or not, with their replicas."""

from __future__ import annotations

import argparse

from lightning_distckpt.cli.common import EXIT_FAILED, EXIT_OK, out, printable, size, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("ls", parents=[common], help="checkpoints under a root",
                       description="List the checkpoint directories under ROOT, oldest first: name, step, size, "
                                   "world size, compression and status (committed, UNCOMMITTED, verified, CORRUPT, UNREADABLE, ...).")  # fmt: skip
    s.add_argument("root", metavar="ROOT", help="directory (or URL) that holds checkpoint directories")
    s.add_argument("--verify", action="store_true",
                   help="also read every byte of every committed checkpoint (exit 1 if one is corrupt)")  # fmt: skip
    s.add_argument("--replica", action="append", metavar="URL",
                   help="a replica root to report copies in (repeatable)")  # fmt: skip
    s.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog, ondisk
    from lightning_distckpt.errors import CheckpointNotFoundError, NotACheckpointError
    from lightning_distckpt.storage import open_store

    config = storage(args)
    store, path = open_store(args.root, config)
    if not store.exists(path):
        raise CheckpointNotFoundError(f"{args.root}: no such directory")
    if not store.isdir(path):
        raise NotACheckpointError(f"{args.root}: is a file, not a directory of checkpoints")
    if store.exists(store.join(path, ondisk.MARKER)):
        raise NotACheckpointError(f"{args.root}: is a checkpoint, not a directory of checkpoints "
                                  f"(try: distckpt info {args.root})")  # fmt: skip
    rows = []
    replicas = args.replica or []
    for r in replicas:  # a typo is an error, not a replica silently holding nothing
        rstore, rpath = open_store(r, config)
        if not rstore.isdir(rpath):
            raise CheckpointNotFoundError(f"{r}: no such directory (--replica)")
    copies = {r: {c.name for c in catalog.committed(r, config)} for r in replicas}
    for c in catalog.list_checkpoints(args.root, config):
        m = c.manifest
        row = {"name": c.name, "url": c.url, "committed": c.committed, "step": m.global_step if m else None,
               "epoch": m.epoch if m else None, "world_size": m.world_size if m else None,
               "bytes": sum(f["size"] for f in m.files.values()) if m else None,
               "compression": (m.compression or {}).get("preset") if m and m.compression else None,
               "replicas": [r for r in replicas if c.name in copies[r]], "problem": c.problem,
               "status": c.status}  # fmt: skip
        if args.verify and c.committed:
            row["verified"] = catalog.verify(c.url, config).ok
        rows.append(row)

    def text() -> str:
        if not rows:
            return f"no checkpoints under {printable(args.root)}"
        lines = [f"{'NAME':<32} {'STEP':>8} {'SIZE':>10} {'WORLD':>5} {'COMPRESSION':<11} STATUS"]
        for r in rows:
            status = ("verified" if r.get("verified") else "CORRUPT" if "verified" in r else "committed") if r["committed"] else r["status"].upper()
            if r["replicas"]:
                status += f" (+{len(r['replicas'])} replica{'s' if len(r['replicas']) > 1 else ''})"
            lines.append(f"{printable(r['name']):<32} {r['step'] if r['step'] is not None else '-':>8} "
                         f"{size(r['bytes']) if r['bytes'] is not None else '-':>10} {r['world_size'] or '-':>5} "
                         f"{r['compression'] or '-':<11} {status}")  # fmt: skip
        return "\n".join(lines)

    out(args, rows, text)
    return EXIT_OK if all(r.get("verified", True) for r in rows) else EXIT_FAILED
