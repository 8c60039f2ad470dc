"""The documents that make a checkpoint visible: ``manifest.json`` and the ``COMMITTED`` marker, as JSON.

The manifest lists every file of the checkpoint with its size and digest; the marker, written last, names
the manifest's digest. Nothing here is a pickle: documents are parsed JSON, validated field by field.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any

from lightning_distckpt.errors import CorruptCheckpointError, NewerFormatError
from lightning_distckpt.gcpause import without_gc
from lightning_distckpt.ondisk.digests import digest
from lightning_distckpt.ondisk.names import (
    MANIFEST,
    METADATA,
    STATE,
    check_file_key,
    check_name,
    is_checkpoint_name,
    is_token,
    parse_blocks_key,
)

FORMAT_NAME = "lightning-distckpt"
#: the newest format version this package reads. Version 1: a self-contained checkpoint directory. Version 2 (written
#: only by incremental saves, so that a plain checkpoint stays readable by older releases): data files live in the
#: root's block store and may be shared with other checkpoints (``manifest.data_id``, ``borrows``; docs/incremental.md)
FORMAT_VERSION = 2
#: the version of a self-contained checkpoint (what a save without ``incremental`` writes)
PLAIN_VERSION = 1
#: how deeply documents may nest (the skeleton of non-tensor state is walked recursively on load)
MAX_DEPTH = 128
_U64 = 1 << 64
_MAX_SIZE = 1 << 62  # larger than any file or tensor; keeps arithmetic on declared sizes exact and bounded


def check_version(version: Any, where: str) -> None:
    """Raise unless ``version`` is the format version this package reads; a newer one is
    `NewerFormatError` (the checkpoint is fine, this package is too old)."""
    if type(version) is int and PLAIN_VERSION <= version <= FORMAT_VERSION:
        return
    if type(version) is int and version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{where}: written in format version {version}, newer than the version {FORMAT_VERSION} this "
            f"lightning-distckpt reads; upgrade lightning-distckpt to read it"
        )
    raise CorruptCheckpointError(
        f"{where}: format version {version!r} is not supported (this lightning-distckpt reads version "
        f"{FORMAT_VERSION}); upgrade lightning-distckpt to read it"
    )


def check_int(value: Any, where: str, key: str, lo: int = 0, hi: int = _MAX_SIZE) -> int:
    """``value`` as an int in [lo, hi); anything else (bool, float, string, out of range) is a
    `CorruptCheckpointError` naming ``where`` and ``key``."""
    if type(value) is not int or not lo <= value < hi:
        raise CorruptCheckpointError(f"{where}: {key} must be an integer in [{lo}, {hi}), found {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _opt_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    return None if value is None else check_int(value, where, key, -_MAX_SIZE)


def _listed_int(value: Any) -> int | None:
    """``value`` as an int a manifest may list (in [-2**62, 2**62)), or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if -_MAX_SIZE <= n < _MAX_SIZE else None


@dataclass
class Manifest:
    """What ``manifest.json`` says about a checkpoint. ``files`` maps name -> {"size", "xxh3"}."""

    name: str
    created: float
    world_size: int
    global_step: int | None = None
    epoch: int | None = None
    strategy: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    tensor_bytes: int = 0
    #: incremental checkpoints (format 2): the id of the block-store directory this checkpoint's own data files are
    #: in (``<root>/.distckpt-blocks/<data_id>/``); "" for a self-contained checkpoint (format 1)
    data_id: str = ""
    #: incremental checkpoints: the block-store directories it borrows blocks from (id -> the name of the checkpoint
    #: that wrote them, for people: the checkpoint may be gone, its blocks stay while they are referenced)
    borrows: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # what a writer passes from the state (``checkpoint["global_step"]``): kept only as the integer a reader
        # accepts (numpy and 0-d tensor integers too); anything else (a float, a bool, a string, out of range) is
        # not shown in listings rather than making the committed manifest unreadable
        self.global_step, self.epoch = _listed_int(self.global_step), _listed_int(self.epoch)

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.data_id else PLAIN_VERSION

    def data_ids(self) -> set[str]:
        """Every block-store directory this checkpoint's files lie in (its own and those it borrows from)."""
        return {p[0] for k in self.files if (p := parse_blocks_key(k)) is not None}

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT_NAME, "version": self.version, **self.__dict__}
        if not self.data_id:  # a self-contained checkpoint: the format-1 document, field for field
            del out["data_id"], out["borrows"]
        return out

    @staticmethod
    def from_json(obj: Any, where: str) -> Manifest:
        """Validate every field's type and range; any problem is a `CorruptCheckpointError` (or
        `NewerFormatError`) naming ``where`` and the key, never a ``TypeError`` or ``OverflowError``."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} manifest")
        check_version(obj.get("version"), where)
        name = obj.get("name", "")
        created = obj.get("created")
        if not isinstance(name, str):
            raise CorruptCheckpointError(f"{where}: name must be a string, found {_short(name)}")
        if type(created) not in (int, float) or not math.isfinite(created) or not 0 <= created < 1e12:
            raise CorruptCheckpointError(f"{where}: created must be a time in seconds, found {_short(created)}")
        world_size = check_int(obj.get("world_size"), where, "world_size", 1, 1 << 24)
        strategy = obj.get("strategy", "")
        versions = obj.get("versions", {})
        compression = obj.get("compression")
        if not isinstance(strategy, str):
            raise CorruptCheckpointError(f"{where}: strategy must be a string, found {_short(strategy)}")
        if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):
            raise CorruptCheckpointError(f"{where}: versions must map names to version strings")
        if compression is not None and not isinstance(compression, dict):
            raise CorruptCheckpointError(f"{where}: compression must be an object or null, found {_short(compression)}")
        raw_files = obj.get("files")
        if not isinstance(raw_files, dict):
            raise CorruptCheckpointError(f"{where}: files must be an object of file name -> size and xxh3")
        files: dict[str, dict[str, int]] = {}
        version = obj["version"]
        data_id, borrows = obj.get("data_id", ""), obj.get("borrows", {})
        if version == PLAIN_VERSION and ("data_id" in obj or "borrows" in obj):
            raise CorruptCheckpointError(f"{where}: data_id and borrows need format version {FORMAT_VERSION}")
        if version > PLAIN_VERSION and not is_token(data_id):
            raise CorruptCheckpointError(f"{where}: data_id must be a block directory id (letters and digits), found "
                                         f"{_short(data_id)}")  # fmt: skip
        if not isinstance(borrows, dict) or not all(is_token(k) and k != data_id and is_checkpoint_name(v)
                                                    for k, v in borrows.items()):  # names, shown only (`distckpt info`)
            raise CorruptCheckpointError(f"{where}: borrows must map block directory ids to checkpoint names")
        for n, f in raw_files.items():
            here = f"{where}: files[{_short(n)}]"
            if version == PLAIN_VERSION:
                check_name(n, where)
            else:
                check_file_key(n, where)
                if (p := parse_blocks_key(n)) is not None and p[0] != data_id and p[0] not in borrows:
                    raise CorruptCheckpointError(f"{here}: lies in block directory {p[0]!r}, which is neither the "
                                                 f"checkpoint's own nor one it borrows from")  # fmt: skip
            if not isinstance(f, dict):
                raise CorruptCheckpointError(f"{here} must be an object with size and xxh3")
            files[n] = {"size": check_int(f.get("size"), here, "size"), "xxh3": check_int(f.get("xxh3"), here, "xxh3", 0, _U64)}
        for required in (METADATA, STATE):
            if required not in files:
                raise CorruptCheckpointError(f"{where}: manifest does not list {required}")
        return Manifest(name=name, created=float(created), world_size=world_size,
                        global_step=_opt_int(obj, "global_step", where), epoch=_opt_int(obj, "epoch", where),
                        strategy=strategy, versions=dict(versions), compression=compression, files=files,
                        tensor_bytes=check_int(obj.get("tensor_bytes", 0), where, "tensor_bytes"),
                        data_id=data_id, borrows=dict(borrows))  # fmt: skip


@without_gc
def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


@without_gc
def loads(data: bytes, where: str, max_depth: int | None = None) -> Any:
    """Parse a JSON document; invalid UTF-8 or JSON, and nesting deeper than ``max_depth`` (or than the
    parser can take), are a `CorruptCheckpointError` naming ``where``."""
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({e})") from None
    if max_depth is not None:
        check_depth(obj, max_depth, where)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (documents are written without NaN or Infinity)")


def check_depth(obj: Any, max_depth: int, where: str) -> None:
    """Refuse lists and objects nested more than ``max_depth`` deep (iteratively: no recursion here)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > max_depth:
            raise CorruptCheckpointError(f"{where}: nested more than {max_depth} levels deep")
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))


def marker_bytes(manifest_bytes: bytes) -> bytes:
    return dumps({"format": FORMAT_NAME, "manifest_xxh3": digest(manifest_bytes)})


def check_marker(marker: bytes, manifest_bytes: bytes, where: str) -> None:
    """Raise unless ``marker`` is a complete commit marker naming exactly this manifest."""
    obj = loads(marker, where)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME or type(obj.get("manifest_xxh3")) is not int:
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} commit marker")
    if obj["manifest_xxh3"] != digest(manifest_bytes):
        raise CorruptCheckpointError(f"{where}: commit marker does not match {MANIFEST} (manifest changed or corrupt)")
