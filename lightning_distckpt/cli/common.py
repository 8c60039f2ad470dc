"""What every ``distckpt`` subcommand shares: exit codes, storage options, output, progress, sizes.

A subcommand module imports only this module and, inside its ``run`` function, what it needs below
(``catalog``, ``ops``, ...), so that ``distckpt --help`` and commands that do not need torch never import
it. Output goes through `out()` (text, or JSON with ``--json``), sizes through `size()` (binary
units: KiB, MiB, GiB, TiB, everywhere, progress bars included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Exit codes (docs/cli.md has the table; tests/test_cli_tool.py checks each one).
EXIT_OK = 0  #: success
EXIT_FAILED = 1  #: a check ran and found a problem (``verify``, ``ls --verify``)
EXIT_USAGE = 2  #: bad arguments
EXIT_NOT_FOUND = 3  #: no such path, not a checkpoint (or not a directory of checkpoints), never committed
EXIT_CORRUPT = 4  #: a checkpoint the command needed to read is corrupt or unsafe
EXIT_STORAGE = 5  #: storage failed, or a backend (storage, export format) is not installed (unreachable, permission, disk full)
EXIT_REFUSED = 6  #: the output exists and the command does not overwrite it (``--force`` where offered)
EXIT_OTHER = 7  #: any other error (a bug: run again with ``--debug`` and report the traceback)
EXIT_INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT), nothing printed
EXIT_PIPE = 141  #: stdout was closed by its reader (``distckpt ls | head``: 128 + SIGPIPE), nothing printed

#: every exit code and its meaning, in the order docs/cli.md lists them
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "a check ran and found a problem",
    EXIT_USAGE: "bad usage",
    EXIT_NOT_FOUND: "not found, not a checkpoint, or never committed",
    EXIT_CORRUPT: "corrupt or unsafe checkpoint",
    EXIT_STORAGE: "storage error, or a storage or export backend not installed",
    EXIT_REFUSED: "output exists: not overwritten",
    EXIT_OTHER: "any other error",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_PIPE: "output pipe closed by its reader",
}


class UsageError(Exception):
    """Bad arguments found after parsing (exit 2)."""


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """The options every subcommand takes (added through the ``common`` parent parser of ``main``)."""
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout (errors too)")
    p.add_argument("-q", "--quiet", action="store_true", help="no output but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="fsspec storage option for remote URLs (repeatable), e.g. -o anon=true")  # fmt: skip
    p.add_argument("--hdfs-user", default=None, metavar="USER", help="HDFS user name (hdfs://, webhdfs://)")
    p.add_argument("--hdfs-replication", type=int, default=None, metavar="N",
                   help="HDFS replication of files written (copy)")  # fmt: skip
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long reaching a store may take before the command fails (exit 5); default 30")  # fmt: skip


def storage(args: argparse.Namespace) -> Any:
    """The ``StorageConfig`` the storage options of ``args`` describe."""
    from lightning_distckpt.storage import HdfsOptions, StorageConfig

    options = {}
    for kv in getattr(args, "option", None) or []:
        if "=" not in kv:
            raise UsageError(f"-o/--option expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        options[k] = v
    hdfs = HdfsOptions(user=getattr(args, "hdfs_user", None), replication=getattr(args, "hdfs_replication", None))
    timeout = getattr(args, "connect_timeout", 30.0)
    if not timeout > 0:
        raise UsageError(f"--connect-timeout must be a positive number of seconds, got {timeout}")
    return StorageConfig(options=options, hdfs=hdfs, durable=True, connect_timeout_s=timeout)


def reach(args: argparse.Namespace) -> None:
    """Reach the store of every location given to the command (``root``, ``ckpt``, ``src``, ``dst``,
    ``--replica``), each within ``--connect-timeout`` seconds: a store that does not answer is a
    ``StorageUnreachableError`` naming the URL (exit 5), not a client waiting for minutes."""
    from lightning_distckpt.storage import probe

    config = storage(args)
    urls = [getattr(args, name, None) for name in ("root", "ckpt", "src", "dst")]
    for url in [u for u in urls if isinstance(u, str)] + list(getattr(args, "replica", None) or []):
        probe(url, config, directory=False)  # what a file there means is the command's to say


def size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.0 MiB``, ``2.1 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # the loop returns at TiB


def printable(text: object) -> str:
    """``text`` with control characters (terminal escape sequences, newlines) escaped, for terminal output: a
    directory name crafted to hold ``ESC [ 2 J`` is shown as ``\\x1b[2J``, never sent to the terminal."""
    s = str(text)
    return s if s.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def basename(url: str) -> str:
    """The last component of a path or URL (trailing slashes ignored)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


@contextmanager
def progress(args: argparse.Namespace, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr: bytes done and total, throughput and time left, in binary units.

    Shown only when stderr is a terminal and neither ``--quiet`` nor ``--json`` is given; otherwise the
    returned callback does nothing. Call the callback with the number of bytes just processed.
    """
    if args.quiet or args.json or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Bytes(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{size(task.completed)} / {size(task.total or 0)}")

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{size(task.speed)}/s" if task.speed else "")

    with Progress(TextColumn(what), BarColumn(), Bytes(), Speed(), TimeRemainingColumn(),
                  transient=True) as bar:  # fmt: skip
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def out(args: argparse.Namespace, obj: Any, text: Callable[[], str]) -> None:
    """Print ``obj`` as JSON with ``--json``, else ``text()`` unless ``--quiet``."""
    if args.json:
        print(json.dumps(obj, indent=1, default=str))
    elif not args.quiet:
        print(text())
