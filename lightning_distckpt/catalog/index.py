"""A catalog of committed checkpoints across runs: the interface, its rows, and what the storage says.

The catalog is an *index*: each committed checkpoint of each run is one row (key = run + inverted step + name,
so a run's rows come newest first), and each run has pointers (``latest``, ``best/<metric>``) and an
``owner_epoch`` that fences zombie jobs. The storage stays the source of truth: a row is used only after the
checkpoint it names verifies on storage (commit marker naming the same manifest digest, documents' checksums,
data file sizes), and everything in the catalog can be rebuilt from storage (:func:`reconcile`).

Implementations: :class:`~lightning_distckpt.catalog.hbase.HBaseIndex` (``hbase://HOST:PORT/TABLE``), opened
by :func:`open_index`. Nothing here imports an HBase client.

Thread safety: an index object serializes its own calls (one connection, one lock); use one per thread for
parallel calls. Which rank: the training integration calls it on global rank 0 only; tools call it anywhere.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lightning_distckpt import ondisk
from lightning_distckpt.catalog.documents import open_checkpoint, read_manifest, source_of
from lightning_distckpt.catalog.listing import committed
from lightning_distckpt.errors import CatalogError, DistCheckpointError
from lightning_distckpt.storage import StorageLike

log = logging.getLogger(__name__)

__all__ = ["CatalogEntry", "CatalogOptions", "CheckpointIndex", "Pointer", "RunInfo", "entry_from_manifest",
           "manifest_digest", "open_index", "reconcile", "register_index", "row_key", "verify_entry"]  # fmt: skip

PRIMARY = "primary"
_RUN_RE = re.compile(r"^[^/\x00-\x1f\x7f]{1,200}$")


@dataclass(frozen=True, kw_only=True)
class CatalogOptions:
    """How a catalog client talks to its server. Every field has a safe default."""

    #: Seconds one call to the server may take (connect, send, receive) before it counts as failed.
    timeout_s: float = 5.0
    #: Further attempts of a call after a transport failure (each on a new connection).
    retries: int = 2
    #: Pause before the first retry; doubles with each further one.
    retry_backoff_s: float = 0.2
    #: Server-side namespace of the table ("" = the default namespace). It must exist already
    #: (HBase: ``create_namespace 'NS'`` in the HBase shell); the table is created on first use.
    namespace: str = ""
    #: Create the table (with its column families) when it does not exist.
    create_table: bool = True
    #: Upper bound of compare-and-set attempts of one pointer update before it gives up (contention).
    cas_attempts: int = 64
    #: Thrift transport and protocol of the gateway ("buffered"/"framed", "binary"/"compact").
    transport: Literal["buffered", "framed"] = "buffered"
    protocol: Literal["binary", "compact"] = "binary"


def row_key(run: str, step: int, name: str) -> str:
    """``run/<inverted step, 16 hex digits>/name``: a prefix scan of ``run/`` returns the newest step first."""
    check_run(run)
    if "/" in name or not name:
        raise CatalogError(f"checkpoint name {name!r} cannot be a catalog key (empty or contains '/')")
    return f"{run}/{(2**64 - 1 - max(0, int(step))):016x}/{name}"


def check_run(run: str) -> str:
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise CatalogError(f"run name {run!r} is not usable: 1-200 characters, no '/' and no control characters")
    return run


@dataclass
class CatalogEntry:
    """One row: a committed checkpoint of one run, where its copies are, and what was logged when it was saved."""

    run: str
    name: str
    step: int
    digest: int  # xxh3 of manifest.json, as named by the COMMITTED marker
    epoch: int | None = None
    created: float = 0.0
    world_size: int = 1
    strategy: str = ""
    format_version: int = ondisk.FORMAT_VERSION
    bytes: int = 0
    compression: str | None = None
    monitor: str | None = None
    monitor_value: float | None = None
    mode: str = "min"
    metrics: dict[str, float] = field(default_factory=dict)
    locations: dict[str, str] = field(default_factory=dict)  # column ("primary", "replica:<root>") -> URL
    state: str = "committed"  # or "deleting" (retention in progress)
    owner_epoch: int = 0

    @property
    def row(self) -> str:
        return row_key(self.run, self.step, self.name)

    @property
    def url(self) -> str:
        return self.locations.get(PRIMARY) or next(iter(self.locations.values()), "")

    @property
    def copies(self) -> list[str]:
        """Every known copy's URL, the primary first."""
        urls = [self.locations[PRIMARY]] if PRIMARY in self.locations else []
        return urls + [u for k, u in sorted(self.locations.items()) if k != PRIMARY]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "row": self.row}


@dataclass
class Pointer:
    """A run's ``latest`` or ``best/<metric>`` pointer: the row it names and enough to use it without a read."""

    row: str
    name: str
    step: int
    created: float
    locations: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    mode: str | None = None
    digest: int = 0

    @property
    def url(self) -> str:
        return self.locations.get(PRIMARY) or next(iter(self.locations.values()), "")

    @property
    def copies(self) -> list[str]:
        urls = [self.locations[PRIMARY]] if PRIMARY in self.locations else []
        return urls + [u for k, u in sorted(self.locations.items()) if k != PRIMARY]

    @staticmethod
    def of(entry: CatalogEntry, metric: str | None = None) -> Pointer:
        value = None if metric is None else entry.monitor_value if metric == entry.monitor else entry.metrics.get(metric)
        return Pointer(entry.row, entry.name, entry.step, entry.created, dict(entry.locations), value,
                       entry.mode if metric else None, entry.digest)  # fmt: skip


@dataclass
class RunInfo:
    """A run's row: owner epoch, pointers, rows being deleted, and how many zombie attempts it refused."""

    run: str
    owner_epoch: int = 0
    owner: str = ""
    latest: Pointer | None = None
    best: dict[str, Pointer] = field(default_factory=dict)
    deleting: list[str] = field(default_factory=list)
    refused: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CheckpointIndex(ABC):
    """What a catalog server offers. Every mutating call takes the caller's ``owner_epoch`` and raises
    :class:`~lightning_distckpt.errors.StaleOwnerError` (changing nothing, counting the attempt) when the run
    belongs to a newer epoch. Transport failures raise :class:`~lightning_distckpt.errors.CatalogUnavailableError`
    after the configured retries. Blocking: every call is one or a few round trips, bounded by ``timeout_s``.
    """

    url: str

    @abstractmethod
    def take_ownership(self, run: str, owner: str = "") -> int:
        """Make the caller the run's owner: compare-and-set ``owner_epoch`` to one more than it was; return it."""

    @abstractmethod
    def register(self, entry: CatalogEntry, owner_epoch: int) -> bool:
        """Add ``entry``'s row (compare-and-set on absence) and advance ``latest`` and ``best/<monitor>``.

        Idempotent: a row with the same digest is a no-op (its pointers are still advanced if needed) and
        returns False; a row with another digest raises :class:`~lightning_distckpt.errors.CatalogConflictError`.
        """

    @abstractmethod
    def add_location(self, run: str, step: int, name: str, column: str, url: str, owner_epoch: int) -> None:
        """Record one more copy of a registered checkpoint (e.g. ``replica:<root>``), in its row and pointers."""

    @abstractmethod
    def entries(self, run: str, limit: int | None = None, include_deleting: bool = False) -> list[CatalogEntry]:
        """A run's rows, newest step first (one prefix scan)."""

    @abstractmethod
    def run_info(self, run: str) -> RunInfo | None:
        """A run's pointers and owner (one read); None if the run has no row."""

    @abstractmethod
    def runs(self) -> list[RunInfo]:
        """Every run's pointers (one scan of the run rows only)."""

    @abstractmethod
    def begin_delete(self, entry: CatalogEntry, owner_epoch: int, force: bool = False) -> None:
        """Retention, step 1: mark the row ``deleting`` (compare-and-set, fenced). Refuses a row that a pointer
        names unless ``force`` (a repair; call :meth:`repair_pointers` afterwards)."""

    @abstractmethod
    def finish_delete(self, entry: CatalogEntry) -> None:
        """Retention, last step (after the marker and then the data are gone): remove the row."""

    @abstractmethod
    def restore(self, entry: CatalogEntry) -> None:
        """Undo :meth:`begin_delete` of a checkpoint that is still committed on storage (after a crash)."""

    @abstractmethod
    def repair_pointers(self, run: str, owner_epoch: int) -> RunInfo:
        """Recompute ``latest`` and every ``best/<metric>`` from the run's committed rows (fenced)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection. Idempotent."""

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Catalog implementations by URL scheme: a factory ``(url, options) -> CheckpointIndex``, or "module:Class"
#: imported on first use (so that importing this module imports no client library).
_INDEXES: dict[str, Any] = {"hbase": "lightning_distckpt.catalog.hbase:HBaseIndex"}


def register_index(scheme: str, factory: Any) -> None:
    """Serve ``scheme://...`` catalog URLs with ``factory(url, options)`` (a third party's catalog server)."""
    _INDEXES[scheme] = factory


def open_index(url: str, options: CatalogOptions | None = None) -> CheckpointIndex:
    """The index at ``url`` (``hbase://HOST[:PORT]/TABLE``). Connects lazily: no I/O happens here."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    factory = _INDEXES.get(scheme)
    if factory is None:
        raise CatalogError(f"{url}: unknown catalog scheme {scheme!r} (supported: {', '.join(f'{s}://' for s in _INDEXES)})")
    if isinstance(factory, str):
        import importlib

        module, _, name = factory.partition(":")
        factory = _INDEXES[scheme] = getattr(importlib.import_module(module), name)
    return factory(url, options or CatalogOptions())


# -------------------------------------------------------------------------------------------------
# storage side: what a row says, checked against what the storage holds
# -------------------------------------------------------------------------------------------------
def manifest_digest(manifest: ondisk.Manifest) -> int:
    """The digest the COMMITTED marker names for ``manifest`` (the writer serializes it exactly so)."""
    return ondisk.digest(ondisk.dumps(manifest.to_json()))


def entry_from_manifest(run: str, url: str, manifest: ondisk.Manifest, metrics: dict[str, float] | None = None,
                        monitor: str | None = None, mode: str = "min", digest: int | None = None) -> CatalogEntry:
    """The row for a committed checkpoint at ``url`` (its primary copy)."""
    metrics = dict(metrics or {})
    return CatalogEntry(
        run=run, name=manifest.name or url.rstrip("/").rsplit("/", 1)[-1], step=int(manifest.global_step or 0),
        digest=manifest_digest(manifest) if digest is None else digest, epoch=manifest.epoch,
        created=float(manifest.created), world_size=int(manifest.world_size), strategy=manifest.strategy,
        format_version=manifest.version, bytes=sum(int(f["size"]) for f in manifest.files.values()),
        compression=(manifest.compression or {}).get("preset") if manifest.compression else None,
        monitor=monitor, monitor_value=metrics.get(monitor) if monitor else None, mode=mode, metrics=metrics,
        locations={PRIMARY: url},
    )  # fmt: skip


def verify_entry(url: str, digest: int, options: StorageLike = None) -> str:
    """Check the copy at ``url`` against a row: committed, its marker naming manifest ``digest``, documents'
    checksums and data file sizes as the manifest says. Returns "" if it holds, else what is wrong. Reads the
    documents only (each data block is checked by the load that reads it)."""
    try:
        source = source_of(url, options)
        manifest = read_manifest(source)
        if manifest_digest(manifest) != digest:
            return f"{url}: its manifest (digest {manifest_digest(manifest)}) is not the one the catalog row names ({digest})"
        open_checkpoint(source, check_sizes=True)
    except (DistCheckpointError, OSError) as e:
        return str(e)
    return ""


@dataclass
class ReconcileReport:
    """What :func:`reconcile` did."""

    registered: list[str] = field(default_factory=list)  # rows added (crash between marker and row, or no catalog)
    present: list[str] = field(default_factory=list)  # rows that were already right
    removed: list[str] = field(default_factory=list)  # rows whose checkpoint is gone from storage
    restored: list[str] = field(default_factory=list)  # rows left "deleting" by a crash, checkpoint still committed
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def reconcile(index: CheckpointIndex, root: str, run: str, options: StorageLike = None, owner_epoch: int | None = None,
              remove_missing: bool = True) -> ReconcileReport:
    """Make the catalog agree with the committed checkpoints under ``root`` for ``run``.

    Registers every committed checkpoint that has no row, drops rows whose primary copy under ``root`` no
    longer exists, and puts rows left ``deleting`` by a crash back to ``committed`` when their checkpoint is
    still committed (nothing is deleted from storage here). Without ``owner_epoch`` it acts as the run's current
    owner epoch (an operator's repair; a live job keeps its epoch).
    """
    report = ReconcileReport()
    info = index.run_info(run)
    epoch = owner_epoch if owner_epoch is not None else (info.owner_epoch if info else 0)
    if info is None or (owner_epoch is None and epoch == 0):
        epoch = index.take_ownership(run, "distckpt reconcile")
    all_rows = index.entries(run, include_deleting=True)
    on_storage = {c.name: c for c in committed(root, options)}
    digests = {name: manifest_digest(c.manifest) for name, c in on_storage.items() if c.manifest is not None}
    # a name saved more than once (an overwrite, e.g. save_last) has one row per step: keep the one whose digest
    # is on storage, the others name replaced bytes
    rows: dict[str, CatalogEntry] = {}
    for e in all_rows:
        if e.name not in rows or (e.digest == digests.get(e.name) and rows[e.name].digest != digests.get(e.name)):
            rows[e.name] = e
    stale = [e for e in all_rows if rows.get(e.name) is not e]
    for name, listed in on_storage.items():
        assert listed.manifest is not None
        row = rows.get(name)
        try:
            digest = digests[name]
            if row is not None and row.digest == digest and row.state == "committed":
                report.present.append(row.row)
                continue
            if row is not None and row.state == "deleting" and row.digest == digest:
                index.restore(row)
                report.restored.append(row.row)
                continue
            if row is not None and row.digest != digest:  # the name was overwritten by a newer save
                index.begin_delete(row, epoch, force=True)
                index.finish_delete(row)
                report.removed.append(row.row)
            # metrics logged at save time are not on storage: a row rebuilt here has none
            index.register(entry_from_manifest(run, listed.url, listed.manifest, digest=digest), epoch)
            entry_row = row_key(run, int(listed.manifest.global_step or 0), name)
            report.registered.append(entry_row)
        except DistCheckpointError as e:
            report.problems.append(f"{listed.url}: {e}")
    if remove_missing:
        for row in stale:
            if row.state != "deleting":
                index.begin_delete(row, epoch, force=True)
            index.finish_delete(row)
            report.removed.append(row.row)
        for name, row in rows.items():
            primary = row.locations.get(PRIMARY, "")
            if name in on_storage or not primary.rstrip("/").startswith(root.rstrip("/") + "/"):
                continue
            try:
                if verify_entry(primary, row.digest, options):
                    if row.state != "deleting":
                        index.begin_delete(row, epoch, force=True)
                    index.finish_delete(row)
                    report.removed.append(row.row)
            except DistCheckpointError as e:
                report.problems.append(f"{row.row}: {e}")
    index.repair_pointers(run, epoch)
    return report
