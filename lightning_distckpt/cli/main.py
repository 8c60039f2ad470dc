"""The ``distckpt`` command: list, inspect, verify, export, copy and clean up checkpoints, on any store.

    distckpt ls ROOT                      checkpoints under ROOT
    distckpt info CKPT                    tensors, state keys, manifest
    distckpt verify CKPT                  read every byte; exit 1 if anything is wrong
    distckpt export CKPT OUT              one plain file; format from OUT's suffix (.safetensors, .pt, ...)
    distckpt copy SRC DST                 verified, resumable copy between stores (into DST/ if a directory)
    distckpt gc ROOT --keep-last N        remove crashed saves and old checkpoints (dry run unless --apply)
    distckpt import STOCK.ckpt DEST       a stock Lightning checkpoint file as a committed checkpoint

Every subcommand takes ``--json`` (machine-readable output on stdout, errors included), ``--quiet``,
``--debug`` (tracebacks) and storage options (``-o key=value`` for fsspec, ``--hdfs-user``,
``--hdfs-replication``, ``--connect-timeout``: every store given is reached within that many seconds or the
command fails with exit code 5). Exit codes: see ``common.EXIT_CODES`` and docs/cli.md. It never imports
Lightning, and ``ls``, ``info``, ``verify``, ``copy`` and ``gc`` never import torch.

Adding a subcommand: write a module with ``register(subparsers, common)`` (which calls
``subparsers.add_parser(name, parents=[common], help=...)`` and ``set_defaults(fn=run)``) and add its
name to `COMMAND_MODULES`. ``run(args) -> int`` returns an exit code, or raises: errors of
``lightning_distckpt.errors`` are mapped to exit codes here (`exit_code()`). Import heavy modules
inside ``run``, never at module level.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from lightning_distckpt.cli.common import (
    EXIT_CORRUPT,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OTHER,
    EXIT_PIPE,
    EXIT_REFUSED,
    EXIT_STORAGE,
    EXIT_USAGE,
    UsageError,
    add_storage_options,
    printable,
    reach,
)

#: modules that each add subcommands through ``register(subparsers, common)``, in ``--help`` order
COMMAND_MODULES = [
    "lightning_distckpt.cli.cmd_ls",
    "lightning_distckpt.cli.cmd_info",
    "lightning_distckpt.cli.cmd_verify",
    "lightning_distckpt.cli.cmd_export",
    "lightning_distckpt.cli.cmd_copy",
    "lightning_distckpt.cli.cmd_gc",
    "lightning_distckpt.cli.cmd_catalog",  # runs, best, reconcile; ls --catalog (after cmd_ls)
    "lightning_distckpt.cli.cmd_import",
]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `UsageError` (so ``--json`` can report them as JSON)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _version() -> str:
    from lightning_distckpt import __version__

    return f"distckpt (lightning-distckpt) {__version__}"


def parser() -> argparse.ArgumentParser:
    """The full argument parser: every subcommand of `COMMAND_MODULES`."""
    common = _Parser(add_help=False)
    add_storage_options(common)
    p = _Parser(prog="distckpt", description=__doc__.split("\n\n")[0],
                epilog="Run 'distckpt COMMAND -h' for a command's options. Exit codes: docs/cli.md.")  # fmt: skip
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return p


def exit_code(e: BaseException) -> int:
    """The exit code for an error a command raised (the table in docs/cli.md)."""
    from lightning_distckpt import errors

    if isinstance(e, UsageError):
        return EXIT_USAGE
    if isinstance(e, errors.DestinationExistsError | FileExistsError):
        return EXIT_REFUSED
    if isinstance(e, errors.CheckpointNotFoundError | errors.NotACheckpointError | errors.UncommittedCheckpointError
                  | FileNotFoundError | NotADirectoryError):  # fmt: skip
        return EXIT_NOT_FOUND
    if isinstance(e, errors.CorruptCheckpointError):
        return EXIT_CORRUPT
    if isinstance(e, errors.StorageError | OSError | ImportError):  # ImportError: a backend (e.g. safetensors) missing
        return EXIT_STORAGE
    return EXIT_OTHER


def _report(argv: list[str], line: str, e: BaseException, code: int) -> None:
    """One line on stderr; with ``--json`` also ``{"error": {"type", "message", "exit_code"}}`` on stdout."""
    print("\n".join(printable(part) for part in line.split("\n")), file=sys.stderr)
    if "--json" in argv:
        message = str(e) or type(e).__name__
        print(json.dumps({"error": {"type": type(e).__name__, "message": message, "exit_code": code}}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Run ``distckpt`` with ``argv`` (default: ``sys.argv[1:]``) and return its exit code.

    Never raises (but with ``--debug``, which re-raises to show the traceback): errors become one line on
    stderr (and a JSON object on stdout with ``--json``) and an exit code; Ctrl-C exits 130 and a closed
    stdout 141, both silently.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parser().parse_args(argv)
        except UsageError as e:
            _report(argv, f"{e}\nrun 'distckpt -h' for help", e, EXIT_USAGE)
            return EXIT_USAGE
        try:
            reach(args)
            code = args.fn(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers
            return code
        except (KeyboardInterrupt, BrokenPipeError):
            raise
        except Exception as e:
            if args.debug:
                raise
            code = exit_code(e)
            if isinstance(e, UsageError):  # from a command's own parser (its message names the command) or its checks
                line = str(e) if str(e).startswith("distckpt ") else f"distckpt {args.command}: {e}"
                _report(argv, f"{line}\nrun 'distckpt {args.command} -h' for help", e, code)
                return code
            _report(argv, f"distckpt {args.command}: {str(e) or type(e).__name__}", e, code)
            return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``| head``): print nothing more, and keep Python's exit-time flush of stdout
        # from failing again by pointing stdout at /dev/null
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (tests capture it)
            pass
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
