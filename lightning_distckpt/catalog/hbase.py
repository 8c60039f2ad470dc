"""The checkpoint catalog in Apache HBase, through its Thrift1 gateway (``happybase``).

``hbase://HOST[:PORT]/TABLE`` (port 9090 by default). One table, four column families:

================  =====================================================================================
row               cells
================  =====================================================================================
``RUN``           ``r:state`` (JSON: ``owner_epoch``, ``owner``, ``latest``, ``best`` per metric, ``deleting``),
                  ``r:refused`` (a counter of zombie attempts)
``RUN/INV/NAME``  ``c:digest`` ``c:step`` ``c:epoch`` ``c:created`` ``c:world_size`` ``c:strategy``
                  ``c:format_version`` ``c:bytes`` ``c:compression`` ``c:monitor`` ``c:monitor_value``
                  ``c:mode`` ``c:state`` ``c:owner_epoch`` ``c:name`` ``c:run``; ``m:<metric>`` per logged
                  metric; ``l:primary`` and ``l:replica:<root>`` per copy
================  =====================================================================================

``INV`` is the step inverted (``2**64-1-step``, 16 hex digits), so a prefix scan of ``RUN/`` returns the
newest first. Run rows hold only the ``r`` family, checkpoint rows never do: ``runs()`` scans family ``r``
alone (HBase stores each family apart, so it does not read checkpoint rows).

Compare-and-set: Thrift1's ``checkAndPut`` (one column equal to a value, or absent; one cell put). A run's
pointers and its owner epoch live in the one cell ``r:state``, so every pointer move is a CAS on the state
the writer read, and a takeover (new epoch) makes any CAS prepared under the old epoch fail: a zombie's next
read sees the newer epoch and is refused. Registration is a CAS on the absence of ``c:digest`` followed by
one atomic row mutation with the other columns; a row with ``c:digest`` but no ``c:state`` (crash in
between) is completed by the next registration of the same checkpoint or by ``reconcile``.

Thread safety: one connection per object behind a lock; calls from several threads are serialized.
Blocking: each call makes 1-4 round trips, each bounded by ``CatalogOptions.timeout_s``, with
``CatalogOptions.retries`` reconnecting retries.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from lightning_distckpt.catalog.index import (
    CatalogEntry,
    CatalogOptions,
    CheckpointIndex,
    Pointer,
    RunInfo,
    check_run,
    row_key,
)
from lightning_distckpt.errors import (
    CatalogConflictError,
    CatalogError,
    CatalogUnavailableError,
    StaleOwnerError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 9090
FAMILIES = ("c", "m", "l", "r")
STATE = b"r:state"
REFUSED = b"r:refused"
DIGEST = b"c:digest"
ROW_STATE = b"c:state"
_INSTALL_HINT = "the HBase catalog needs happybase: pip install 'lightning-distckpt[hbase]'"


class HBaseIndex(CheckpointIndex):
    """A :class:`~lightning_distckpt.catalog.index.CheckpointIndex` in one HBase table, via the Thrift1 gateway."""

    def __init__(self, url: str, options: CatalogOptions | None = None) -> None:
        parts = urlsplit(url)
        table = parts.path.strip("/")
        if parts.scheme != "hbase" or not parts.hostname or not table or "/" in table:
            raise CatalogError(f"{url}: not a catalog URL; expected hbase://HOST[:PORT]/TABLE")
        self.url = url
        self.options = options or CatalogOptions()
        self.host = parts.hostname
        self.port = parts.port or DEFAULT_PORT
        self.table_name = f"{self.options.namespace}:{table}" if self.options.namespace else table
        self._tbytes = self.table_name.encode()
        self._conn: Any = None
        self._lock = threading.RLock()
        self._mutation: Any = None
        self._thrift: Any = None
        self.calls = 0  # round trips made (for benchmarks and tests)

    # ------------------------------------------------------------------------------------------
    # connection, retries, errors
    # ------------------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        try:
            import happybase
        except ImportError:
            raise CatalogError(f"{self.url}: {_INSTALL_HINT}") from None
        self._thrift = sys.modules["Hbase_thrift"]  # the module happybase loads from its bundled Thrift1 IDL
        self._mutation = self._thrift.Mutation
        conn = happybase.Connection(self.host, self.port, timeout=int(self.options.timeout_s * 1000), autoconnect=False,
                                    transport=self.options.transport, protocol=self.options.protocol)  # fmt: skip
        conn.open()
        try:
            if self.options.create_table and self._tbytes not in conn.client.getTableNames():
                try:
                    conn.create_table(self.table_name, {f: {"max_versions": 1} for f in FAMILIES})
                    log.info("created catalog table %s at %s", self.table_name, self.url)
                except Exception as e:  # noqa: BLE001 - another client created it first
                    if "exist" not in str(e).lower():
                        raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` with reconnecting retries; map failures to catalog errors naming the URL."""
        from thriftpy2.thrift import TException

        delay = self.options.retry_backoff_s
        with self._lock:
            for attempt in range(self.options.retries + 1):
                try:
                    conn = self._connect()
                    self.calls += 1
                    return fn(conn.client)
                except CatalogError:
                    raise
                except (TException, OSError, EOFError) as e:
                    kind = type(e).__name__
                    if kind == "IllegalArgument":
                        raise CatalogError(f"{self.url}: {what}: refused by HBase: {_message(e)}") from None
                    self._drop()
                    if attempt >= self.options.retries:
                        raise CatalogUnavailableError(
                            f"{self.url}: {what} failed after {attempt + 1} attempt(s): {kind}: {_message(e)}"
                        ) from None
                    time.sleep(delay)
                    delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ------------------------------------------------------------------------------------------
    # cells
    # ------------------------------------------------------------------------------------------
    def _get(self, row: str, columns: list[bytes] | None = None) -> dict[bytes, bytes]:
        def get(client: Any) -> dict[bytes, bytes]:
            if columns:
                rows = client.getRowWithColumns(self._tbytes, row.encode(), columns, {})
            else:
                rows = client.getRow(self._tbytes, row.encode(), {})
            return {k: v.value for k, v in rows[0].columns.items()} if rows else {}

        return self._call(f"read row {row!r}", get)

    def _cas(self, row: str, column: bytes, expected: bytes | None, value: bytes) -> bool:
        mutation = None

        def cas(client: Any) -> bool:
            nonlocal mutation
            mutation = mutation or self._mutation(column=column, value=value, isDelete=False)
            return bool(client.checkAndPut(self._tbytes, row.encode(), column, expected, mutation, {}))

        return self._call(f"compare-and-set {column.decode()} of row {row!r}", cas)

    def _put(self, row: str, cells: dict[bytes, bytes], deletes: list[bytes] | None = None) -> None:
        def put(client: Any) -> None:
            muts = [self._mutation(column=k, value=v, isDelete=False) for k, v in cells.items()]
            muts += [self._mutation(column=k, isDelete=True) for k in deletes or []]
            client.mutateRow(self._tbytes, row.encode(), muts, {})

        self._call(f"write row {row!r}", put)

    def _scan(self, what: str, prefix: str | None, columns: list[bytes] | None, limit: int | None,
              batch: int = 1000) -> list[tuple[bytes, dict[bytes, bytes]]]:  # fmt: skip
        """One scanner: open, read up to ``limit`` rows (batches of ``batch``), close."""

        def scan(client: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
            kw: dict[str, Any] = {"columns": columns or None, "caching": min(batch, limit or batch)}
            if prefix is not None:
                kw["startRow"] = prefix.encode()
                kw["stopRow"] = _after_prefix(prefix.encode())
            sid = client.scannerOpenWithScan(self._tbytes, self._thrift.TScan(**kw), {})
            out: list[tuple[bytes, dict[bytes, bytes]]] = []
            try:
                while limit is None or len(out) < limit:
                    n = batch if limit is None else min(batch, limit - len(out))
                    got = client.scannerGetList(sid, n)
                    out += [(r.row, {k: v.value for k, v in r.columns.items()}) for r in got]
                    if len(got) < n:
                        break
            finally:
                client.scannerClose(sid)
            return out

        return self._call(what, scan)

    def _state(self, run: str) -> tuple[bytes | None, dict[str, Any]]:
        raw = self._get(run, [STATE]).get(STATE)
        return raw, (json.loads(raw) if raw else {})

    def _refuse(self, run: str, state: dict[str, Any], owner_epoch: int, what: str) -> None:
        current = int(state.get("owner_epoch", 0))
        if current == owner_epoch:
            return
        try:
            self._call(f"count a refusal of run {run!r}",
                       lambda c: c.atomicIncrement(self._tbytes, run.encode(), REFUSED, 1))  # fmt: skip
        except CatalogError as e:
            log.warning("could not count the refusal in the catalog: %s", e)
        raise StaleOwnerError(
            f"{self.url}: refused to {what}: run {run!r} is owned by epoch {current} ({state.get('owner') or 'unknown'}), "
            f"this job holds epoch {owner_epoch}. Another job took this run over; this one is a zombie and must stop."
        )

    def _update_state(self, run: str, owner_epoch: int | None, what: str, change: Callable[[dict[str, Any]], bool],
                      read: tuple[bytes | None, dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
        """CAS loop on ``r:state``: (re-)read, check the epoch (unless None), apply ``change`` (False: nothing to
        do), compare-and-set. ``read`` is a state just read, used for the first attempt (saves a round trip)."""
        for _ in range(self.options.cas_attempts):
            raw, state = read if read is not None else self._state(run)
            read = None
            if owner_epoch is not None:
                self._refuse(run, state, owner_epoch, what)
            if not change(state):
                return state
            if self._cas(run, STATE, raw, json.dumps(state, sort_keys=True).encode()):
                return state
        raise CatalogError(f"{self.url}: {what}: run {run!r} still contended after {self.options.cas_attempts} "
                           f"compare-and-set attempts")  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # the interface
    # ------------------------------------------------------------------------------------------
    def take_ownership(self, run: str, owner: str = "") -> int:
        check_run(run)

        def bump(state: dict[str, Any]) -> bool:
            state["owner_epoch"] = int(state.get("owner_epoch", 0)) + 1
            state["owner"] = owner
            state["since"] = time.time()
            return True

        return int(self._update_state(run, None, f"take ownership of run {run!r}", bump)["owner_epoch"])

    def register(self, entry: CatalogEntry, owner_epoch: int) -> bool:
        key = entry.row
        raw, state = self._state(entry.run)
        self._refuse(entry.run, state, owner_epoch, f"register {key!r}")
        new = self._cas(key, DIGEST, None, str(entry.digest).encode())
        stored = {DIGEST: str(entry.digest).encode()} if new else self._get(key)
        if int(stored.get(DIGEST, b"0")) != entry.digest:
            raise CatalogConflictError(f"{self.url}: row {key!r} names another checkpoint (manifest digest "
                                       f"{stored.get(DIGEST, b'?').decode()}, this one {entry.digest})")  # fmt: skip
        entry.owner_epoch = owner_epoch
        if ROW_STATE not in stored:  # new, or left incomplete by a crash between the CAS and this write
            self._put(key, _encode(entry))
        else:
            have = _decode(key.encode(), stored)
            missing = {k: v for k, v in entry.locations.items() if k not in have.locations}
            if missing:
                self._put(key, {f"l:{k}".encode(): v.encode() for k, v in missing.items()})
            have.locations.update(missing)
            entry = have
        if entry.state == "committed":
            replaced = self._advance(entry, owner_epoch, (raw, state))
            if replaced is not None:  # the same name saved again at another step (e.g. save_last): the old row
                # names bytes that the overwrite replaced; it can never verify again
                self._call(f"delete row {replaced!r}", lambda c: c.deleteAllRow(self._tbytes, replaced.encode(), {}))
                info = self.run_info(entry.run)
                if info is not None and any(p.row == replaced for p in info.best.values()):
                    self.repair_pointers(entry.run, owner_epoch)  # a best pointer named the replaced bytes
        return new

    def _advance(self, entry: CatalogEntry, owner_epoch: int,
                 read: tuple[bytes | None, dict[str, Any]] | None = None) -> str | None:  # fmt: skip
        """Move the pointers to ``entry`` where it is newer/better. Returns the row of a previous ``latest`` with
        the same name at another step (overwritten by this checkpoint), else None."""
        key = entry.row
        replaced: list[str | None] = [None]

        def change(state: dict[str, Any]) -> bool:
            changed = False
            latest = state.get("latest")
            replaced[0] = None
            if latest is None or latest["row"] == key or (entry.step, entry.created) > (latest["step"], latest["created"]):
                if latest and latest["name"] == entry.name and latest["row"] != key:
                    replaced[0] = latest["row"]
                new = _pointer_json(Pointer.of(entry))
                changed |= new != latest
                state["latest"] = new
            value = entry.monitor_value
            if entry.monitor and value is not None and math.isfinite(value):
                best = state.setdefault("best", {})
                cur = best.get(entry.monitor)
                if cur is None or cur["row"] == key or _better(value, cur["value"], entry.mode):
                    new = _pointer_json(Pointer.of(entry, entry.monitor))
                    changed |= new != cur
                    best[entry.monitor] = new
            return changed

        self._update_state(entry.run, owner_epoch, f"advance the pointers of run {entry.run!r} to {key!r}", change, read)
        return replaced[0]

    def add_location(self, run: str, step: int, name: str, column: str, url: str, owner_epoch: int) -> None:
        key = row_key(run, step, name)
        _, state = self._state(run)
        self._refuse(run, state, owner_epoch, f"add a location to {key!r}")
        digest = self._get(key, [DIGEST]).get(DIGEST)
        if digest is None:
            raise CatalogError(f"{self.url}: row {key!r} does not exist (register the checkpoint first)")
        # only while the row still names the same checkpoint
        if not self._cas(key, DIGEST, digest, digest):
            raise CatalogConflictError(f"{self.url}: row {key!r} changed while adding location {column}")
        self._put(key, {f"l:{column}".encode(): url.encode()})

        def change(state: dict[str, Any]) -> bool:
            pointers = [state.get("latest"), *state.get("best", {}).values()]
            hit = [p for p in pointers if p and p["row"] == key and p["locations"].get(column) != url]
            for p in hit:
                p["locations"][column] = url
            return bool(hit)

        self._update_state(run, owner_epoch, f"add a location to the pointers of run {run!r}", change)

    def entries(self, run: str, limit: int | None = None, include_deleting: bool = False) -> list[CatalogEntry]:
        check_run(run)
        rows = self._scan(f"scan the rows of run {run!r}", f"{run}/", None, limit)
        out = [_decode(k, cells) for k, cells in rows if ROW_STATE in cells]
        return [e for e in out if include_deleting or e.state == "committed"]

    def run_info(self, run: str) -> RunInfo | None:
        check_run(run)
        cells = self._get(run, [STATE, REFUSED])
        return _run_info(run, cells) if cells else None

    def runs(self) -> list[RunInfo]:
        rows = self._scan("scan the run rows", None, [b"r"], None)
        return [_run_info(k.decode(), cells) for k, cells in rows]

    def begin_delete(self, entry: CatalogEntry, owner_epoch: int, force: bool = False) -> None:
        key = entry.row

        def change(state: dict[str, Any]) -> bool:
            named = [p for p in [state.get("latest"), *state.get("best", {}).values()] if p and p["row"] == key]
            if named and not force:
                raise CatalogError(f"{self.url}: refusing to delete {key!r}: a pointer of run {entry.run!r} names it")
            if key in state.setdefault("deleting", []):
                return False
            state["deleting"].append(key)
            return True

        self._update_state(entry.run, owner_epoch, f"mark {key!r} deleting", change)
        if not self._cas(key, ROW_STATE, b"committed", b"deleting"):
            now = self._get(key, [ROW_STATE]).get(ROW_STATE)
            if now not in (b"deleting", None):
                raise CatalogError(f"{self.url}: row {key!r} is {now!r}, cannot mark it deleting")

    def finish_delete(self, entry: CatalogEntry) -> None:
        key = entry.row
        self._call(f"delete row {key!r}", lambda c: c.deleteAllRow(self._tbytes, key.encode(), {}))
        self._update_state(entry.run, None, f"finish deleting {key!r}", lambda s: _unlist(s, key))

    def restore(self, entry: CatalogEntry) -> None:
        key = entry.row
        self._cas(key, ROW_STATE, b"deleting", b"committed")
        self._update_state(entry.run, None, f"restore {key!r}", lambda s: _unlist(s, key))

    def repair_pointers(self, run: str, owner_epoch: int) -> RunInfo:
        rows = self.entries(run)

        def change(state: dict[str, Any]) -> bool:
            before = json.dumps(state, sort_keys=True)
            newest = max(rows, key=lambda e: (e.step, e.created), default=None)
            state["latest"] = _pointer_json(Pointer.of(newest)) if newest else None
            best = {}
            modes = {m: p.get("mode") for m, p in state.get("best", {}).items()}
            for e in rows:
                if e.monitor and e.monitor_value is not None and math.isfinite(e.monitor_value):
                    mode = modes.get(e.monitor) or e.mode
                    cur = best.get(e.monitor)
                    if cur is None or _better(e.monitor_value, cur["value"], mode):
                        best[e.monitor] = _pointer_json(Pointer.of(e, e.monitor))
            state["best"] = best
            return json.dumps(state, sort_keys=True) != before

        self._update_state(run, owner_epoch, f"repair the pointers of run {run!r}", change)
        info = self.run_info(run)
        assert info is not None
        return info

    def drop(self) -> None:
        """Disable and delete the whole table (tests, tools). Irreversible."""

        def drop(client: Any) -> None:
            if self._tbytes in client.getTableNames():
                client.disableTable(self._tbytes)
                client.deleteTable(self._tbytes)

        self._call(f"drop table {self.table_name}", drop)


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------
def _message(e: BaseException) -> str:
    return str(getattr(e, "message", "") or e or type(e).__name__).splitlines()[0][:300]


def _after_prefix(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b""
    p[-1] += 1
    return bytes(p)


def _better(value: float, current: float | None, mode: str) -> bool:
    if current is None or not math.isfinite(current):
        return True
    return value > current if mode == "max" else value < current


def _pointer_json(p: Pointer) -> dict[str, Any]:
    return {"row": p.row, "name": p.name, "step": p.step, "created": p.created, "locations": dict(p.locations),
            "value": p.value, "mode": p.mode, "digest": p.digest}  # fmt: skip


def _pointer(obj: dict[str, Any] | None) -> Pointer | None:
    if not obj:
        return None
    return Pointer(obj["row"], obj["name"], int(obj["step"]), float(obj["created"]), dict(obj.get("locations", {})),
                   obj.get("value"), obj.get("mode"), int(obj.get("digest", 0)))  # fmt: skip


def _unlist(state: dict[str, Any], key: str) -> bool:
    if key not in state.get("deleting", []):
        return False
    state["deleting"].remove(key)
    return True


def _run_info(run: str, cells: dict[bytes, bytes]) -> RunInfo:
    state = json.loads(cells[STATE]) if STATE in cells else {}
    refused = struct.unpack(">q", cells[REFUSED])[0] if len(cells.get(REFUSED, b"")) == 8 else 0
    return RunInfo(run=run, owner_epoch=int(state.get("owner_epoch", 0)), owner=state.get("owner", ""),
                   latest=_pointer(state.get("latest")),
                   best={m: p for m, obj in state.get("best", {}).items() if (p := _pointer(obj)) is not None},
                   deleting=list(state.get("deleting", [])), refused=refused)  # fmt: skip


def _s(v: Any) -> bytes:
    return b"" if v is None else (repr(float(v)) if isinstance(v, float) else str(v)).encode()


def _encode(e: CatalogEntry) -> dict[bytes, bytes]:
    cells = {
        b"c:run": e.run, b"c:name": e.name, b"c:step": e.step, b"c:epoch": e.epoch, b"c:created": float(e.created),
        b"c:world_size": e.world_size, b"c:strategy": e.strategy, b"c:format_version": e.format_version,
        b"c:bytes": e.bytes, b"c:compression": e.compression, b"c:monitor": e.monitor,
        b"c:monitor_value": None if e.monitor_value is None else float(e.monitor_value), b"c:mode": e.mode,
        b"c:owner_epoch": e.owner_epoch, DIGEST: e.digest, ROW_STATE: e.state,
    }  # fmt: skip
    out = {k: _s(v) for k, v in cells.items()}
    out.update({f"m:{k}".encode(): _s(float(v)) for k, v in e.metrics.items()})
    out.update({f"l:{k}".encode(): v.encode() for k, v in e.locations.items()})
    return out


def _decode(key: bytes, cells: dict[bytes, bytes]) -> CatalogEntry:
    def get(name: str, conv: Callable[[str], Any] = str, default: Any = None) -> Any:
        raw = cells.get(f"c:{name}".encode())
        return default if raw is None or raw == b"" else conv(raw.decode())

    run, _, name = key.decode().split("/", 2)
    return CatalogEntry(
        run=get("run", default=run), name=get("name", default=name), step=get("step", int, 0),
        digest=get("digest", int, 0), epoch=get("epoch", int), created=get("created", float, 0.0),
        world_size=get("world_size", int, 1), strategy=get("strategy", default=""),
        format_version=get("format_version", int, 0), bytes=get("bytes", int, 0), compression=get("compression"),
        monitor=get("monitor"), monitor_value=get("monitor_value", float), mode=get("mode", default="min"),
        metrics={k[2:].decode(): float(v) for k, v in cells.items() if k.startswith(b"m:")},
        locations={k[2:].decode(): v.decode() for k, v in cells.items() if k.startswith(b"l:")},
        state=get("state", default=""), owner_epoch=get("owner_epoch", int, 0),
    )  # fmt: skip
