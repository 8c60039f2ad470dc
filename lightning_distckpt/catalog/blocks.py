"""The block store of a root: data files of incremental checkpoints, kept while any checkpoint references them.

An incremental save writes its data files into ``<root>/.distckpt-blocks/<id>/`` (``id``: the save's token, a
directory that is created once, filled once and never renamed or changed) and may reference blocks of earlier
saves' directories instead of writing them again. Which directories a checkpoint uses is written in its own
manifest (``data_id`` and the block-store keys of ``files``; ``borrows`` names the checkpoints they came from), so
references are counted from committed documents alone: there is no counter to update, nothing to get out of step
when a process dies.

**What `sweep_blocks()` may delete**: a directory ``<root>/.distckpt-blocks/<id>`` (``id`` letters and digits, a
directory, not a link) that

* no ``manifest.json`` under the root references: of a committed checkpoint, of an uncommitted one (a save between
  its rename and its marker, a removal that crashed after deleting the marker), of a trash copy or of a staging
  directory (a copy or replication in progress);
* is not the id of a staging directory (a save in progress writes its data there) and is not listed in the
  ``BORROWS`` file of one (a save or copy that relies on it before its manifest exists);
* lies in a block store that is a directory of the root itself (a block store that is a link, e.g. to a disk that
  other roots share, is never swept: what the others reference is not counted);
* is idle (nothing in it changed for ``older_than_s`` seconds), unless it belongs to a checkpoint that was
  committed and has just been removed (``done``: complete since its commit, nobody writes into it again).

If any manifest under the root exists but cannot be read (corrupt, newer format, unreadable), its references are
unknown and **nothing** is deleted (logged): clean-up deletes only what it can prove is garbage. Removing a checkpoint
(`remove_checkpoint`) never touches the block store; a sweep afterwards deletes what no longer has a reference, so
deleting the oldest checkpoint of a chain keeps every block a newer one borrows. A crash at any moment of a removal or
a sweep leaves every committed checkpoint complete (at worst an unreferenced directory, deleted by the next sweep).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.documents import read_document, read_manifest
from lightning_distckpt.errors import DistCheckpointError
from lightning_distckpt.faults import crash_point
from lightning_distckpt.storage import Entry, Source, StorageLike, Store, open_store

log = logging.getLogger(__name__)

__all__ = ["borrows_bytes", "data_ids_of", "parse_borrows", "references", "sweep_after_removal", "sweep_blocks"]


def borrows_bytes(ids: Iterable[str]) -> bytes:
    """The ``BORROWS`` document: the block directories a save or copy in progress may rely on."""
    return ondisk.dumps({"format": ondisk.FORMAT_NAME, "borrows": sorted(ids)})


def parse_borrows(data: bytes, where: str) -> set[str]:
    obj = ondisk.loads(data, where)
    ids = obj.get("borrows") if isinstance(obj, dict) else None
    if not isinstance(ids, list) or not all(ondisk.is_token(i) for i in ids):
        raise DistCheckpointError(f"{where}: not a {ondisk.BORROWS} document")
    return set(ids)


def _manifest_refs(source: Source) -> set[str] | None:
    """The block directories the manifest in ``source`` references; empty if it has none; None if it has one that
    cannot be read (its references are unknown)."""
    try:
        data = read_document(source, ondisk.MANIFEST)
    except FileNotFoundError:
        return set()
    except (DistCheckpointError, OSError) as e:
        log.warning("cannot read %s: %s", source.url(ondisk.MANIFEST), e)
        return None
    try:
        obj = ondisk.loads(data, source.url(ondisk.MANIFEST))
        if isinstance(obj, dict) and "format" in obj and obj["format"] != ondisk.FORMAT_NAME:
            return set()  # another program's document: it references nothing of ours
        m = ondisk.Manifest.from_json(obj, source.url(ondisk.MANIFEST))
    except DistCheckpointError as e:
        log.warning("block store: %s cannot be read (%s); its blocks are kept", source.url(ondisk.MANIFEST), e)
        return None
    return m.data_ids() | ({m.data_id} if m.data_id else set())


def references(store: Store, root: str, ignore: Iterable[str] = ()) -> set[str] | None:
    """Every block directory something under ``root`` references or may be writing (module docstring), or None
    when some manifest cannot be read (then nothing may be deleted). ``ignore``: names of checkpoint directories to
    leave out (as if removed: a dry run of a removal)."""
    ignored = set(ignore)
    refs: set[str] = set()
    for e in store.listdir(root):
        if e.type != "dir" or e.name == ondisk.BLOCKS or e.name in ignored:
            continue
        staged = ondisk.staged_name(e.name)
        # every directory counts, hidden ones too: a committed checkpoint may be named ".x" (Lightning's tuner saves
        # ".lr_find_<uuid>.ckpt"); a directory that is not a checkpoint has no manifest of ours and references nothing
        src = Source(store, store.join(root, e.name))
        if staged is not None:  # a save, copy or replication in progress (or crashed: clean-up removes it first)
            refs.add(ondisk.token_of(e.name) or "")
            try:
                refs |= parse_borrows(read_document(src, ondisk.BORROWS), src.url(ondisk.BORROWS))
            except FileNotFoundError:
                pass
            except (DistCheckpointError, OSError) as err:
                log.warning("block store: %s cannot be read (%s); its blocks are kept", src.url(ondisk.BORROWS), err)
                return None
        found = _manifest_refs(src)
        if found is None:
            return None
        refs |= found
    return refs


def _idle(store: Store, path: str, entry: Entry, now: float, older_than_s: float) -> bool:
    if older_than_s == 0:
        return True
    times = [entry.mtime] + [e.mtime for e in store.listdir(path)]
    return all(times) and now - max(times) >= older_than_s


def sweep_blocks(root: str, options: StorageLike = None, older_than_s: float = 600.0, dry_run: bool = False,
                 done: Iterable[str] = (), ignore: Iterable[str] = (), parts: bool = False) -> list[str]:
    """Delete the block directories under ``root`` that nothing references (module docstring for the rule); returns
    their URLs (with ``dry_run``: what would be deleted). ``done``: ids of saves known to be complete (of checkpoints
    removed just now), exempt from the idle test. With ``parts``, also the idle temporary files (``.<file>.part-<t>``)
    that an interrupted copy left in referenced directories (one listing per directory). A root without a block
    store costs one listing."""
    store, path = open_store(root, options)
    blocks = store.join(path, ondisk.BLOCKS)
    try:
        kind = store.info(blocks).type
    except FileNotFoundError:
        return []
    if kind != "dir":  # a link (to a disk other roots may share: their references are not counted here) or a file
        log.warning("block store of %s is a %s, not a directory: no block directory is deleted", store.url(path), kind)
        return []
    try:
        entries = [e for e in store.listdir(blocks) if e.type == "dir" and ondisk.is_token(e.name)]
    except FileNotFoundError:
        return []
    if not entries:
        return []
    refs = references(store, path, ignore)
    if refs is None:
        log.warning("block store of %s: a manifest under the root cannot be read; no block directory is deleted",
                    store.url(path))  # fmt: skip
        return []
    done = set(done)
    now = time.time()
    removed = []
    for e in entries:
        if e.name in refs:
            if parts:
                removed += _sweep_parts(store, store.join(blocks, e.name), now, older_than_s, dry_run)
            continue
        full = store.join(blocks, e.name)
        try:
            if e.name not in done and not _idle(store, full, e, now, older_than_s):
                continue
            removed.append(store.url(full))
            if not dry_run:
                store.remove(full, recursive=True)
                crash_point("sweep:removed")
        except (OSError, DistCheckpointError) as err:
            log.warning("block store: could not remove %s: %s", store.url(full), err)
    if removed:
        log.info("block store: %s %s", "would remove" if dry_run else "removed", ", ".join(removed))
    return removed


def _sweep_parts(store: Store, path: str, now: float, older_than_s: float, dry_run: bool) -> list[str]:
    out = []
    for f in store.listdir(path):
        if f.type == "file" and f.name.startswith(".") and ".part-" in f.name and (
                older_than_s == 0 or (f.mtime and now - f.mtime >= older_than_s)):  # fmt: skip
            out.append(store.url(store.join(path, f.name)))
            if not dry_run:
                store.remove(store.join(path, f.name))
    return out


def data_ids_of(store: Store, path: str) -> set[str]:
    """The block directories the committed checkpoint at ``path`` uses (empty for a self-contained one, or if it is
    not committed): read before a removal, they are complete and exempt from the sweep's idle test afterwards."""
    try:
        return read_manifest(Source(store, path)).data_ids()
    except (DistCheckpointError, OSError):
        return set()


def sweep_after_removal(store: Store, path: str, ids: set[str], options: StorageLike = None) -> list[str]:
    """After the checkpoint at ``path`` (which used the block directories ``ids``) was removed: delete those of them
    that nothing references any more. Never raises (a failure is logged; the next sweep tries again)."""
    if not ids:
        return []
    try:
        return sweep_blocks(store.url(store.parent(path)), options, done=ids)
    except Exception as e:  # noqa: BLE001 - a removal never fails because garbage stays a while longer
        log.warning("block store of %s: sweep after removing %s failed: %s", store.url(store.parent(path)),
                    store.url(path), e)  # fmt: skip
        return []
