"""Removing checkpoints and the leftovers of crashed saves: marker first, and only what is provably garbage."""

from __future__ import annotations

import logging
import time

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.documents import read_manifest
from lightning_distckpt.errors import DistCheckpointError, UncommittedCheckpointError
from lightning_distckpt.storage import Source, StorageLike, Store, open_store

log = logging.getLogger(__name__)


def remove_checkpoint(store: Store, path: str) -> None:
    """Remove a checkpoint so that it is invisible before any data goes: marker first, then the rest.

    A plain file at ``path`` (e.g. a checkpoint of Lightning's own format being overwritten) is removed too.
    """
    if store.isdir(path):
        store.remove(store.join(path, ondisk.MARKER))
    store.remove(path, recursive=True)


def clean_stale(root: str, options: StorageLike = None, older_than_s: float = 0.0,
                dry_run: bool = False) -> list[str]:
    """Remove staging/trash directories and uncommitted checkpoint directories under ``root``.

    A trash directory whose checkpoint name no longer exists is a committed checkpoint that a crashed
    overwrite moved aside: it is renamed back, never deleted. Returns the URLs removed (or that would be).
    """
    store, path = open_store(root, options)
    try:
        entries = store.listdir(path)
    except FileNotFoundError:
        return []
    names = {e.name for e in entries}
    now = time.time()
    removed = []
    for e in entries:
        if not e.is_dir or (older_than_s and e.mtime and now - e.mtime < older_than_s):
            continue
        full = store.join(path, e.name)
        original = ondisk.trashed_name(e.name)
        if original is not None:
            if original not in names:
                try:
                    read_manifest(Source(store, full))
                    if not dry_run:
                        store.rename(full, store.join(path, original))
                    log.warning("restored %s from an interrupted overwrite", store.url(store.join(path, original)))
                    continue
                except DistCheckpointError:
                    pass
        elif e.name.startswith(".") and ondisk.STAGING_INFIX in e.name:
            pass
        elif not e.name.startswith("."):
            try:
                read_manifest(Source(store, full))
                continue  # committed: never touched here
            except UncommittedCheckpointError:
                pass
            except DistCheckpointError:
                continue  # not ours, or corrupt committed: leave it for a human
        else:
            continue
        removed.append(store.url(full))
        if not dry_run:
            store.remove(full, recursive=True)
    return removed
