"""What exists under a root: checkpoint directories, committed or not, and the newest across roots.

A root directory holds checkpoint directories side by side. Only directories with a valid commit marker
count; names starting with ``.`` are staging or trash directories of saves in progress or crashed.
Not collective: call on one rank (rank 0) or on every rank independently.

One bad entry never hides the others: whatever is wrong with one directory (a malformed manifest, a FIFO
as its marker, a permission error) is reported in its `Listed` row, and the rest is listed.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.documents import read_manifest
from lightning_distckpt.errors import (
    CorruptCheckpointError,
    DistCheckpointError,
    NewerFormatError,
    NotACheckpointError,
    StorageError,
    UncommittedCheckpointError,
)
from lightning_distckpt.storage import Entry, Source, StorageLike, Store, open_store

log = logging.getLogger(__name__)

#: Listed.status values
COMMITTED, UNCOMMITTED, NEWER_FORMAT, CORRUPT, NOT_A_CHECKPOINT, UNREADABLE = (
    "committed", "uncommitted", "newer format", "corrupt", "not a checkpoint", "unreadable")  # fmt: skip


@dataclass(frozen=True)
class Listed:
    """A checkpoint directory under a root, committed or not.

    ``status`` is ``"committed"``, ``"uncommitted"`` (no marker: a crashed or running save), ``"newer format"``
    (committed by a newer lightning-distckpt: not loadable here, never garbage), ``"corrupt"`` (a marker that
    does not verify, a malformed manifest), ``"unreadable"`` (the storage failed reading its marker or
    manifest after its retries: it may well be committed; never garbage, and ``"last"`` refuses to pass it
    over) or ``"not a checkpoint"``; ``problem`` says what is wrong.
    ``created`` orders entries whose manifest could not be used (best effort; 0 if unknown).
    """

    name: str
    url: str
    committed: bool
    manifest: ondisk.Manifest | None
    problem: str = ""
    status: str = ""
    created: float = 0.0

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", COMMITTED if self.committed else UNCOMMITTED)

    @property
    def newer_format(self) -> bool:
        return self.status == NEWER_FORMAT

    @property
    def order(self) -> tuple[float, int, str]:
        m = self.manifest
        return (m.created if m else self.created, (m.global_step or 0) if m else 0, self.name)


@dataclass
class Group:
    """Everything under a root that belongs to one checkpoint name: the directory itself (if any), its trash
    directories (overwrites in progress or crashed) and staging directories (saves or copies)."""

    name: str
    entry: Entry | None = None
    trash: list[Entry] = field(default_factory=list)
    staging: list[Entry] = field(default_factory=list)


def scan(store: Store, path: str) -> tuple[list[Entry], dict[str, Group]]:
    """The root's entries and, by checkpoint name, what belongs to each. Names of staging and trash
    directories are parsed strictly (`ondisk.trashed_name()`); anything else starting with ``.`` is
    not the package's and is ignored."""
    entries = store.listdir(path)
    groups: dict[str, Group] = {}
    for e in entries:
        if not e.name.startswith("."):
            groups.setdefault(e.name, Group(e.name)).entry = e
        elif (name := ondisk.trashed_name(e.name)) is not None:
            groups.setdefault(name, Group(name)).trash.append(e)
        elif (name := ondisk.staged_name(e.name)) is not None:
            groups.setdefault(name, Group(name)).staging.append(e)
    return entries, groups


def examine(source: Source, name: str) -> Listed:
    """One directory as a `Listed` row (listed under ``name``); never raises for a bad directory."""
    try:
        return Listed(name, source.url(), True, read_manifest(source))
    except NewerFormatError as err:
        return Listed(name, source.url(), False, None, str(err), NEWER_FORMAT, _created(source))
    except UncommittedCheckpointError as err:
        return Listed(name, source.url(), False, None, str(err), UNCOMMITTED)
    except NotACheckpointError as err:
        return Listed(name, source.url(), False, None, str(err), NOT_A_CHECKPOINT)
    except FileNotFoundError as err:  # removed while it was being read
        return Listed(name, source.url(), False, None, str(err), NOT_A_CHECKPOINT)
    except (OSError, RuntimeError) as err:  # the storage failed, not the checkpoint (StorageError is an OSError)
        problem = str(err) if isinstance(err, StorageError) else f"{source.url()}: {type(err).__name__}: {err}"
        return Listed(name, source.url(), False, None, problem, UNREADABLE)
    except (DistCheckpointError, EOFError) as err:
        status = CORRUPT if isinstance(err, CorruptCheckpointError) else NOT_A_CHECKPOINT
        return Listed(name, source.url(), False, None, str(err), status)


def _created(source: Source) -> float:
    """The ``created`` time a manifest of another format version states, if it states one (best effort)."""
    from lightning_distckpt.catalog.documents import read_document

    try:
        obj = ondisk.loads(read_document(source, ondisk.MANIFEST), source.url(ondisk.MANIFEST))
        created = obj.get("created") if isinstance(obj, dict) else None
        return float(created) if type(created) in (int, float) and 0 <= created < 1e12 else 0.0
    except (DistCheckpointError, OSError):
        return 0.0


def resolve(store: Store, path: str, group: Group) -> Listed | None:
    """What a name stands for: the directory if committed; else the newest committed copy that a crashed
    overwrite left in a trash directory (so nothing committed is ever invisible); else the directory as it
    is (uncommitted, newer format, corrupt ...). None if the name has no directory and no usable trash."""
    own = None
    if group.entry is not None and group.entry.type == "dir":
        own = examine(Source(store, store.join(path, group.entry.name)), group.name)
        if own.committed or own.status == UNREADABLE:  # an unreadable copy may be the newer one: not passed over
            return own
    trashed = [examine(Source(store, store.join(path, t.name)), group.name) for t in group.trash if t.type == "dir"]
    good = [t for t in trashed if t.committed]
    if good:
        return max(good, key=lambda c: c.order)
    if own is not None:
        return own
    newer = [t for t in trashed if t.newer_format]
    return max(newer, key=lambda c: c.order) if newer else None


def list_checkpoints(root: str, options: StorageLike = None) -> list[Listed]:
    """Checkpoint directories directly under ``root``, oldest first (by commit time); empty if none.

    A committed checkpoint that a crashed overwrite left in a trash directory is listed under its own
    name (with the trash directory's URL) whenever the directory of that name is absent or not committed,
    until `clean_stale()` moves it back: nothing committed is ever invisible. Symbolic links (e.g.
    ModelCheckpoint's ``save_last="link"``) are aliases, not checkpoints, and are not listed.
    """
    store, path = open_store(root, options)
    try:
        _, groups = scan(store, path)
    except FileNotFoundError:
        return []
    out = []
    for group in groups.values():
        try:
            row = resolve(store, path, group)
        except (OSError, DistCheckpointError) as err:  # e.g. removed while listing
            log.warning("cannot examine %s: %s", store.url(store.join(path, group.name)), err)
            continue
        if row is not None:
            out.append(row)
    return sorted(out, key=lambda c: c.order)


def committed(root: str, options: StorageLike = None) -> list[Listed]:
    return [c for c in list_checkpoints(root, options) if c.committed]


def latest(roots: list[str], options: StorageLike = None) -> list[Listed]:
    """Committed checkpoints across ``roots`` (primary first, then replicas), newest first, by name.

    When the same name exists in several roots, the first root's copy is listed (replicas are read from
    when its files fail). A root that cannot be listed is skipped with a warning.

    Raises `NewerFormatError` if a checkpoint of a newer format is newer than every committed one this
    package can read (or there is none): resuming from an older one, or from scratch, would silently lose
    training; upgrading lightning-distckpt is the fix.

    Raises `StorageError` naming the directory if a checkpoint could not be read (storage failure after the
    store's retries; listed ``"unreadable"``) and no root holds a committed copy of that name: it may be the
    newest, so passing it over could resume older training or start over without a word.
    """
    seen: dict[str, Listed] = {}
    newer: list[Listed] = []
    unreadable: list[Listed] = []
    for root in roots:
        try:
            found = list_checkpoints(root, options)
        except (OSError, DistCheckpointError) as e:  # an unreachable target is skipped, not fatal
            log.warning("cannot list checkpoints under %s: %s", root, e)
            continue
        for c in found:
            if c.committed:
                seen.setdefault(c.name, c)
            elif c.newer_format:
                newer.append(c)
            elif c.status == UNREADABLE:
                unreadable.append(c)
    unknown = [c for c in unreadable if c.name not in seen]
    if unknown:
        raise StorageError(
            errno.EIO,
            f"cannot tell which checkpoint is the newest: {unknown[0].problem}; refusing to pass it over (that could "
            f"resume older training, or start over). Retry once the storage recovers, pass an explicit ckpt_path, or "
            f"move {unknown[0].url} away" + (f" ({len(unknown) - 1} more unreadable)" if len(unknown) > 1 else ""),
        )
    out = sorted(seen.values(), key=lambda c: c.order, reverse=True)
    if newer:
        top = max(newer, key=lambda c: c.order)
        if not out or top.order[0] == 0.0 or top.order[0] >= out[0].order[0]:
            raise NewerFormatError(
                f"the newest checkpoint {top.url} cannot be read by this lightning-distckpt ({top.problem}); refusing "
                f"to resume from {'an older checkpoint' if out else 'scratch'}. Upgrade lightning-distckpt, or move it away"
            )
    return out
