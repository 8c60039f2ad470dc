"""The documents that make a checkpoint visible: ``manifest.json`` and the ``COMMITTED`` marker, as JSON.

The manifest lists every file of the checkpoint with its size and digest; the marker, written last, names
the manifest's digest. Nothing here is a pickle: documents are parsed JSON, validated field by field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk.digests import digest
from lightning_distckpt.ondisk.names import MANIFEST, METADATA, STATE, check_name

FORMAT_NAME = "lightning-distckpt"
FORMAT_VERSION = 1


def check_version(version: Any, where: str) -> None:
    if version != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: format version {version!r} is not supported (this lightning-distckpt reads version "
            f"{FORMAT_VERSION}); upgrade lightning-distckpt to read it"
        )


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

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **self.__dict__}

    @staticmethod
    def from_json(obj: Any, where: str) -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} manifest")
        check_version(obj.get("version"), where)
        fields = {k: obj[k] for k in Manifest.__dataclass_fields__ if k in obj}
        try:
            m = Manifest(**fields)
            m.files = {check_name(n, where): {"size": int(f["size"]), "xxh3": int(f["xxh3"])} for n, f in m.files.items()}
            m.world_size = int(m.world_size)
        except (TypeError, ValueError, KeyError) as e:
            raise CorruptCheckpointError(f"{where}: malformed manifest: {e}") from None
        for required in (METADATA, STATE):
            if required not in m.files:
                raise CorruptCheckpointError(f"{where}: manifest does not list {required}")
        return m


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({e})") from None


def marker_bytes(manifest_bytes: bytes) -> bytes:
    return dumps({"format": FORMAT_NAME, "manifest_xxh3": digest(manifest_bytes)})


def check_marker(marker: bytes, manifest_bytes: bytes, where: str) -> None:
    """Raise unless ``marker`` is a complete commit marker naming exactly this manifest."""
    obj = loads(marker, where)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME or "manifest_xxh3" not in obj:
        raise CorruptCheckpointError(f"{where}: not a {FORMAT_NAME} commit marker")
    if obj["manifest_xxh3"] != digest(manifest_bytes):
        raise CorruptCheckpointError(f"{where}: commit marker does not match {MANIFEST} (manifest changed or corrupt)")
