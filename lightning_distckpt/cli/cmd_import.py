"""``distckpt import STOCK.ckpt DEST``: a stock Lightning checkpoint file as a committed checkpoint."""

from __future__ import annotations

import argparse
import time

from lightning_distckpt.cli.common import EXIT_OK, out, size, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("import", parents=[common], help="a stock Lightning .ckpt file as a committed checkpoint",
                       description="Read SRC, one checkpoint file written by stock Lightning (torch.save), and write "
                                   "it as the committed checkpoint DEST, which fit(ckpt_path=DEST) resumes exactly "
                                   "under any strategy and world size. Everything in the file is kept. The file is "
                                   "unpickled as torch.load(weights_only=True) would, unless --trust.")  # fmt: skip
    s.add_argument("src", metavar="SRC", help="the stock checkpoint file (path or URL)")
    s.add_argument("dest", metavar="DEST", help="the checkpoint to create (path or URL)")
    s.add_argument("--trust", action="store_true",
                   help="unpickle any class the file names (torch.load weights_only=False): only for files you trust")
    s.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt.ops.importing import import_checkpoint

    t0 = time.perf_counter()
    manifest = import_checkpoint(args.src, args.dest, storage(args), weights_only=False if args.trust else None)
    dt = time.perf_counter() - t0
    out(args, {"src": args.src, "dest": args.dest, "global_step": manifest.global_step,
               "tensor_bytes": manifest.tensor_bytes, "seconds": dt},
        lambda: f"imported {args.src} -> {args.dest} (global step {manifest.global_step}, "
                f"{size(manifest.tensor_bytes or 0)} of tensors) in {dt:.1f} s, committed")  # fmt: skip
    return EXIT_OK
