"""``distckpt import STOCK.ckpt DEST``: a stock Lightning checkpoint file as a committed checkpoint."""

from __future__ import annotations

import argparse
import time

from lightning_distckpt.cli.common import EXIT_OK, basename, out, size, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("import", parents=[common], help="a stock Lightning .ckpt file as a committed checkpoint",
                       description="Read SRC, one checkpoint file written by stock Lightning (torch.save), and write "
                                   "it as the committed checkpoint DEST, which fit(ckpt_path=DEST) resumes exactly "
                                   "under any strategy and world size. Everything in the file is kept. The file is "
                                   "unpickled as torch.load(weights_only=True) would, unless --trust. Like cp: if "
                                   "DEST is an existing directory that is not a checkpoint, or ends with '/', the "
                                   "checkpoint goes into it, named like SRC without '.ckpt'. An existing checkpoint "
                                   "is never overwritten (exit 6).")  # fmt: skip
    s.add_argument("src", metavar="SRC", help="the stock checkpoint file (path or URL)")
    s.add_argument("dest", metavar="DEST", help="the checkpoint to create, or a directory to create it in (path or URL)")
    s.add_argument("--trust", action="store_true",
                   help="unpickle any class the file names (torch.load weights_only=False): only for files you trust")
    s.set_defaults(fn=run)


def target(dest: str, src: str, config: object) -> str:
    """Where ``import SRC DEST`` writes: ``DEST/<SRC's name without .ckpt>`` when DEST is an existing directory
    that is not a checkpoint (or ends with ``/``), else DEST. Anything already at the target is refused."""
    from lightning_distckpt import ondisk
    from lightning_distckpt.errors import DestinationExistsError
    from lightning_distckpt.storage import open_store

    store, path = open_store(dest, config)  # type: ignore[arg-type]
    if dest.endswith("/") or (store.isdir(path) and not store.exists(store.join(path, ondisk.MANIFEST))):
        name = basename(src)
        dest = dest.rstrip("/") + "/" + (name[: -len(".ckpt")] if name.endswith(".ckpt") and name != ".ckpt" else name)
        store, path = open_store(dest, config)  # type: ignore[arg-type]
    if store.exists(path):
        raise DestinationExistsError(f"{dest}: already exists; remove it first or import elsewhere")
    return dest


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt.ops.importing import import_checkpoint

    config = storage(args)
    dest = target(args.dest, args.src, config)
    t0 = time.perf_counter()
    manifest = import_checkpoint(args.src, dest, config, weights_only=False if args.trust else None)
    dt = time.perf_counter() - t0
    out(args, {"src": args.src, "dest": dest, "global_step": manifest.global_step,
               "tensor_bytes": manifest.tensor_bytes, "seconds": dt},
        lambda: f"imported {args.src} -> {dest} (global step {manifest.global_step}, "
                f"{size(manifest.tensor_bytes or 0)} of tensors) in {dt:.1f} s, committed")  # fmt: skip
    return EXIT_OK
