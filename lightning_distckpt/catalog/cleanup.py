"""The commit protocol, removing checkpoints, and clean-up of what crashed saves left: only provable garbage.

**Commit** (`publish()`): the new copy is complete in ``.<name>.staging-<token>`` (every file and the
manifest written). If ``<name>`` exists it is renamed to ``.<name>.trash-<token>``; the staging directory
is renamed to ``<name>``; the ``COMMITTED`` marker is written into it; the trash directory is removed
(marker first). A crash after any step leaves every committed copy listed and loadable (see
`lightning_distckpt.catalog.list_checkpoints()`) and recoverable by `clean_stale()`.

**What clean-up may delete** (`clean_stale()`), only among names the package itself makes (parsed
strictly: never ``.``, ``..`` or empty, never a symbolic link, only directly under the root), and only
when *idle*: nothing in the directory (nor the directory itself) changed for ``older_than_s`` seconds
(default `DEFAULT_STALE_AGE_S`; a writer refreshes a heartbeat file every `HEARTBEAT_S` while it
works, so a live save, copy or replication is never idle):

* ``.<name>.staging-<token>`` without a commit marker: a save, copy or replication that never published;
* ``<name>`` without a marker whose manifest is a valid manifest of this package naming ``<name>``: a save
  that crashed between its rename and its marker (a directory whose manifest cannot be read, or that has
  none, is never deleted: it is not provably ours);
* ``.<name>.trash-<token>``: when ``<name>`` is committed (the overwrite finished), or when the trash copy
  itself is not committed (a removal that crashed after deleting its marker) and its manifest, if any, is ours.

What it restores: when ``<name>`` is absent, or is an uncommitted save of ours that is idle, the newest
committed trash copy of ``<name>`` is moved back: the uncommitted directory is first renamed aside to a
staging name (so a crash leaves the trash copy listed), then the trash copy is renamed to ``<name>``, then the
set-aside directory is deleted. Nothing committed is ever deleted unless a newer committed copy of the same
name exists; corrupt, foreign or newer-format directories are left for a human.

Then the block store (``<root>/.distckpt-blocks``, incremental checkpoints): `lightning_distckpt.catalog.blocks`
deletes the block directories that no manifest under the root references any more (its docstring has the rule).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.blocks import sweep_blocks
from lightning_distckpt.catalog.documents import read_manifest, read_uncommitted_manifest
from lightning_distckpt.catalog.listing import Group, examine, scan
from lightning_distckpt.errors import (
    DestinationExistsError,
    DistCheckpointError,
    NotACheckpointError,
    UncommittedCheckpointError,
)
from lightning_distckpt.faults import crash_point
from lightning_distckpt.storage import Entry, Source, StorageLike, Store, open_store

log = logging.getLogger(__name__)

#: clean-up leaves alone what changed more recently than this (seconds); also ``distckpt gc``'s default
DEFAULT_STALE_AGE_S = 600.0
#: how often a writer refreshes the heartbeat file of the staging directory it fills (seconds)
HEARTBEAT_S = 30.0


def check_keep_last(value: object, where: str = "keep_last") -> int:
    """The one rule for ``keep_last`` (``DistCheckpoint(keep_last=)`` and ``distckpt gc --keep-last``): an
    integer of at least 1, the number of newest committed checkpoints kept (the newest is never removed).
    0, negative numbers, bools and non-integers raise ``ValueError`` naming ``where``; "keep everything" is
    saying nothing (``None`` / no ``--keep-last``)."""
    if type(value) is not int or value < 1:
        raise ValueError(f"{where}={value!r}: must be an integer of at least 1 (the number of newest checkpoints to "
                         f"keep; leave it unset to keep all)")  # fmt: skip
    return value


def retention_victims(committed: list, keep_last: int) -> list:
    """Of ``committed`` (oldest first), those beyond the newest ``keep_last`` (validated by
    `check_keep_last()`, so never a slice that takes everything)."""
    keep_last = check_keep_last(keep_last)
    return list(committed[: max(0, len(committed) - keep_last)])


def remove_checkpoint(store: Store, path: str) -> None:
    """Remove a checkpoint so that it is invisible before any data goes: marker first, then the rest.

    Never follows a symbolic link: a link (e.g. ModelCheckpoint's ``save_last="link"``) is removed as a link
    and the checkpoint it points to keeps its marker. In a directory, the manifest goes last (after the marker
    and every other file), so a crash midway leaves an uncommitted directory whose manifest proves it is this
    package's garbage (`clean_stale` takes it); no rename is needed, which object stores pay for by copying. A
    plain file at ``path`` (e.g. a checkpoint of Lightning's own format being overwritten) is removed too.
    """
    try:
        entry = store.info(path)
    except FileNotFoundError:
        return
    if entry.type != "dir":
        store.remove(path)  # a file, or a link as a link
        crash_point("remove:link" if entry.type == "link" else "remove:file")
        return
    store.remove(store.join(path, ondisk.MARKER))
    crash_point("remove:unmarked")
    for e in store.listdir(path):
        if e.name != ondisk.MANIFEST:
            store.remove(store.join(path, e.name), recursive=e.type == "dir")
    crash_point("remove:emptied")
    store.remove(path, recursive=True)


def foreign(store: Store, path: str) -> str:
    """Why a save must not replace what is at ``path`` ("" when it may: nothing there, a file, as Lightning overwrites
    its files, a link, an empty directory, a checkpoint of this package, committed or not, or the placeholder of an
    asynchronous save in flight). A non-empty directory without this package's manifest or marker is somebody's
    data: a save refuses to move it aside and delete it."""
    try:
        entry = store.info(path)
    except FileNotFoundError:
        return ""
    if entry.type != "dir":
        return ""
    names = {e.name for e in store.listdir(path)}
    if not names or names & {ondisk.MANIFEST, ondisk.MARKER, ondisk.PENDING}:  # PENDING: an async save's placeholder
        return ""
    return (f"{store.url(path)}: is a directory that is not a checkpoint of lightning-distckpt (no {ondisk.MANIFEST}); "
            "a save does not replace it: choose another path or remove it")


def publish(store: Store, staging: str, final: str, manifest_bytes: bytes, token: str) -> None:
    """Make the complete copy in ``staging`` the checkpoint ``final``: the commit protocol (module docstring).

    ``staging`` holds every file and the manifest ``manifest_bytes``; ``token`` names the trash directory of
    an overwritten ``final``. Every step is a crash point (``publish:old-moved``, ``publish:renamed``,
    ``publish:committed``).
    """
    trash = None
    try:
        store.info(final)
        exists = True
    except FileNotFoundError:
        exists = False
    refused = foreign(store, final) if exists else ""
    if refused:
        raise DestinationExistsError(refused)
    if exists:  # overwrite: move the old one aside, it stays listed and recoverable until the new one commits
        trash = store.join(store.parent(final), ondisk.trash_name(store.basename(final), token))
        store.rename(final, trash)
        crash_point("publish:old-moved")
    store.rename(staging, final)
    crash_point("publish:renamed")
    store.write_bytes(store.join(final, ondisk.MARKER), ondisk.marker_bytes(manifest_bytes))
    crash_point("publish:committed")
    if trash is not None:
        remove_checkpoint(store, trash)


class Heartbeat:
    """While a writer fills a staging directory, rewrite ``<staging>/.heartbeat`` every ``every_s`` seconds so
    that no clean-up (another job's start-up, ``distckpt gc``) takes the directory for a crashed one, however
    long a file takes (HDFS updates a file's time only when it is closed). ``stop`` ends the thread and
    removes the file. Costs nothing for writes shorter than ``every_s``."""

    def __init__(self, store: Store, staging: str, every_s: float = HEARTBEAT_S) -> None:
        self.store, self.path, self.every_s = store, store.join(staging, ondisk.HEARTBEAT), every_s
        self._stop = threading.Event()
        self._beat = False
        self._thread = threading.Thread(target=self._run, name="distckpt-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.store.write_bytes(self.path, b"%d" % int(time.time()))
                self._beat = True
            except Exception as e:  # noqa: BLE001 - the save goes on; only the liveness signal is missing
                log.warning("could not refresh %s: %s", self.store.url(self.path), e)

    def stop(self) -> None:
        """End the thread and remove the heartbeat file (idempotent)."""
        self._stop.set()
        self._thread.join()
        if self._beat:
            self._beat = False
            self.store.remove(self.path)


def _age(store: Store, path: str, entry: Entry, now: float) -> float:
    """Seconds since anything in the directory (or the directory itself) last changed; 0 if unknown."""
    times = [entry.mtime] + [e.mtime for e in store.listdir(path)]
    if not all(times):
        return 0.0  # a store that reports no times: nothing can be shown to be idle
    return now - max(times)


def clean_stale(root: str, options: StorageLike = None, older_than_s: float = DEFAULT_STALE_AGE_S,
                dry_run: bool = False) -> list[str]:
    """Remove the garbage of crashed saves under ``root`` and restore committed copies that crashed
    overwrites left aside (module docstring: what may be deleted, in which order). Returns the URLs removed
    (or, with ``dry_run``, that would be). Restorations are logged as warnings.

    ``older_than_s=0`` also takes directories that changed just now: use it only when no writer can be
    running on ``root``. One entry that cannot be examined is logged and skipped; it never stops the rest.
    """
    if older_than_s < 0:
        raise ValueError(f"older_than_s={older_than_s}: must be >= 0")
    store, path = open_store(root, options)
    try:
        _, groups = scan(store, path)
    except FileNotFoundError:
        return []
    removed: list[str] = []
    now = time.time()
    for group in groups.values():
        try:
            _clean_group(store, path, group, older_than_s, now, dry_run, removed)
        except (OSError, DistCheckpointError) as e:
            log.warning("clean-up of %s skipped: %s", store.url(store.join(path, group.name)), e)
    try:  # then the block store: directories of incremental saves that nothing references any more
        removed += sweep_blocks(root, options, older_than_s, dry_run, parts=True)
    except (OSError, DistCheckpointError) as e:
        log.warning("clean-up of the block store of %s skipped: %s", store.url(path), e)
    return removed


def _clean_group(store: Store, root: str, g: Group, older_than_s: float, now: float, dry_run: bool,
                 removed: list[str]) -> None:
    def idle(e: Entry) -> bool:
        return older_than_s == 0 or _age(store, store.join(root, e.name), e, now) >= older_than_s

    def delete(e: Entry) -> None:
        full = store.join(root, e.name)
        removed.append(store.url(full))
        if not dry_run:  # marker (if any) first, manifest last: a crash midway leaves provable garbage again
            remove_checkpoint(store, full)

    live_tokens = set()
    for s in g.staging:
        if s.type != "dir":
            continue  # a link or a file with our name: not ours to touch
        if not idle(s):
            live_tokens.add(ondisk.token_of(s.name))
        elif not store.exists(store.join(root, s.name, ondisk.MARKER)):
            delete(s)

    trash = []
    for t in g.trash:
        if t.type == "dir":
            trash.append((t, examine(Source(store, store.join(root, t.name)), g.name)))
    good = sorted((t for t in trash if t[1].committed), key=lambda t: t[1].order)

    own = None
    if g.entry is not None and g.entry.type == "dir":
        own = examine(Source(store, store.join(root, g.entry.name)), g.name)
    elif g.entry is not None:
        return  # a link or a file under the checkpoint's name: leave everything of this name alone

    if own is not None and own.committed:  # the newest copy is committed: every trash copy is superseded
        for t, row in trash:
            if row.committed or _uncommitted_ours(store, root, t, g.name):
                delete(t)
        return

    if own is not None:
        ours = own.status == "uncommitted" and _named(store, root, g.entry, g.name)  # type: ignore[arg-type]
        if not ours or not idle(g.entry):  # type: ignore[arg-type]
            return  # not provably ours, or a save between its rename and its marker
        if not good:
            delete(g.entry)  # type: ignore[arg-type]
            return

    # the name is absent (or is our idle uncommitted save): restore the newest committed trash copy
    if good:
        best, row = good[-1]
        if ondisk.token_of(best.name) in live_tokens:
            return  # an overwrite in flight moved it aside a moment ago
        final = store.join(root, g.name)
        log.warning("%s %s from %s (an overwrite crashed before its new copy committed)",
                    "would restore" if dry_run else "restoring", store.url(final), row.url)  # fmt: skip
        if not dry_run:
            aside = None
            if own is not None:
                aside = store.join(root, ondisk.staging_name(g.name, "aside" + uuid.uuid4().hex[:12]))
                store.rename(final, aside)
                crash_point("clean:aside")
            store.rename(store.join(root, best.name), final)
            crash_point("clean:restored")
            if aside is not None:
                store.remove(aside, recursive=True)
        if own is not None:
            removed.append(store.url(final))  # its uncommitted copy, replaced by the committed one
        return
    for t, row in trash:  # no committed copy anywhere: trash that is not committed is garbage
        if not row.committed and _uncommitted_ours(store, root, t, g.name) and ondisk.token_of(t.name) not in live_tokens:
            delete(t)


def _named(store: Store, root: str, e: Entry, name: str) -> bool:
    """The directory holds a valid manifest of this package that names ``name``: a save of ours."""
    m = read_uncommitted_manifest(Source(store, store.join(root, e.name)))
    return m is not None and m.name == name


def _uncommitted_ours(store: Store, root: str, e: Entry, name: str) -> bool:
    """A trash directory without a valid marker whose manifest, if it has one, is ours (a removal that
    crashed after deleting the marker may also have deleted the manifest already)."""
    src = Source(store, store.join(root, e.name))
    try:
        read_manifest(src)
        return False  # committed after all
    except DistCheckpointError as err:
        if not isinstance(err, (UncommittedCheckpointError, NotACheckpointError)):
            return False  # corrupt or newer format: leave it for a human
    if not store.exists(store.join(src.path, ondisk.MANIFEST)):
        return True
    m = read_uncommitted_manifest(src)
    return m is not None and m.name == name
