"""``distckpt verify CKPT``: read every byte of a checkpoint and check it against its checksums."""

from __future__ import annotations

import argparse

from lightning_distckpt.cli.common import EXIT_FAILED, EXIT_OK, basename, out, printable, progress, size, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("verify", parents=[common], help="check every file's checksum (exit 1 on failure)",
                       description="Read every byte of CKPT and check it against its manifest and block checksums. "
                                   "Exit 0 if everything verifies, 1 if anything is corrupt (the manifest "
                                   "included), 3 if CKPT is not a committed checkpoint.")  # fmt: skip
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint directory (or URL) to verify")
    s.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.errors import CorruptCheckpointError

    config = storage(args)
    source = catalog.source_of(args.ckpt, config)
    try:  # not found / not a checkpoint / never committed: raised (exit 3); corrupt: reported (exit 1)
        manifest = catalog.read_manifest(source)
    except CorruptCheckpointError as e:
        report = catalog.VerifyReport(source.url(), False, error=str(e))
    else:
        total = sum(f["size"] for f in manifest.files.values())
        with progress(args, total, f"verify {basename(args.ckpt)}") as advance:
            report = catalog.verify(args.ckpt, config, progress=advance)
    obj = {"url": report.url, "ok": report.ok, "error": report.error,
           "files": [{"name": f.name, "ok": f.ok, "size": f.size, "problem": f.problem} for f in report.files]}  # fmt: skip

    def text() -> str:
        if report.error:
            return f"FAILED {printable(report.url)}: {printable(report.error)}"
        lines = [f"{'ok' if f.ok else 'BAD':<4} {printable(f.name):<28} {size(f.size):>10} {printable(f.problem)}"
                 for f in report.files]  # fmt: skip
        lines.append(f"{'OK' if report.ok else 'FAILED'}: {printable(report.url)} ({len(report.files)} files)")
        return "\n".join(lines)

    out(args, obj, text)
    return EXIT_OK if report.ok else EXIT_FAILED
