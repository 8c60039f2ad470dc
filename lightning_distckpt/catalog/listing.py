"""What exists under a root: checkpoint directories, committed or not, and the newest across roots.

A root directory holds checkpoint directories side by side. Only directories with a valid commit marker
count; names starting with ``.`` are staging or trash directories of saves in progress or crashed.
Not collective: call on one rank (rank 0) or on every rank independently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.documents import read_manifest
from lightning_distckpt.errors import DistCheckpointError
from lightning_distckpt.storage import Source, StorageLike, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listed:
    """A checkpoint directory under a root, committed or not."""

    name: str
    url: str
    committed: bool
    manifest: ondisk.Manifest | None
    problem: str = ""

    @property
    def order(self) -> tuple[float, int, str]:
        m = self.manifest
        return (m.created if m else 0.0, (m.global_step or 0) if m else 0, self.name)


def list_checkpoints(root: str, options: StorageLike = None) -> list[Listed]:
    """Checkpoint directories directly under ``root``, oldest first (by commit time); empty if none.

    A committed checkpoint that a crashed overwrite left in a trash directory is listed under its own
    name (with the trash directory's URL) until `clean_stale()` moves it back: nothing committed is
    ever invisible.
    """
    store, path = open_store(root, options)
    try:
        entries = store.listdir(path)
    except FileNotFoundError:
        return []
    out = []
    present = {e.name for e in entries}
    for e in entries:
        name = e.name if not e.name.startswith(".") else ondisk.trashed_name(e.name)
        if not e.is_dir or name is None or (name != e.name and name in present):
            continue
        src = Source(store, store.join(path, e.name))
        try:
            out.append(Listed(name, src.url(), True, read_manifest(src)))
        except DistCheckpointError as err:
            if name == e.name:
                out.append(Listed(name, src.url(), False, None, str(err)))
    return sorted(out, key=lambda c: c.order)


def committed(root: str, options: StorageLike = None) -> list[Listed]:
    return [c for c in list_checkpoints(root, options) if c.committed]


def latest(roots: list[str], options: StorageLike = None) -> list[Listed]:
    """Committed checkpoints across ``roots`` (primary first, then replicas), newest first, by name.

    When the same name exists in several roots, the first root's copy is listed (replicas are read from
    when its files fail). A root that cannot be listed is skipped with a warning.
    """
    seen: dict[str, Listed] = {}
    for root in roots:
        try:
            found = committed(root, options)
        except (OSError, DistCheckpointError) as e:  # an unreachable target is skipped, not fatal
            log.warning("cannot list checkpoints under %s: %s", root, e)
            continue
        for c in found:
            seen.setdefault(c.name, c)
    return sorted(seen.values(), key=lambda c: c.order, reverse=True)


