"""Names inside a checkpoint root: the documents of a checkpoint, staging and trash directories, data files.

Every name the package creates or reads back goes through here, so that what clean-up may touch is decided
in one place: a checkpoint name is one safe path component, never ``.``, ``..`` or empty.
"""

from __future__ import annotations

import re
from typing import Any

from lightning_distckpt.errors import UnsafeCheckpointError

MANIFEST = "manifest.json"
METADATA = "metadata.json"
STATE = "state.json"
MARKER = "COMMITTED"
STAGING_INFIX = ".staging-"
TRASH_INFIX = ".trash-"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,254}$")


def check_name(name: Any, where: str) -> str:
    """A file name inside a checkpoint: one path component, no escape (``..``, ``/``, absolute)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise UnsafeCheckpointError(f"{where}: refusing file name {name!r} (must be a plain name inside the checkpoint)")
    return name


def staging_name(name: str, token: str) -> str:
    return f".{name}{STAGING_INFIX}{token}"


def trash_name(name: str, token: str) -> str:
    return f".{name}{TRASH_INFIX}{token}"


def trashed_name(dirname: str) -> str | None:
    """The checkpoint name a trash directory (an overwrite in progress or crashed) belongs to, else None."""
    if dirname.startswith(".") and TRASH_INFIX in dirname:
        return dirname[1:].rsplit(TRASH_INFIX, 1)[0]
    return None


def data_file_name(rank: int, k: int) -> str:
    return f"__{rank}_{k}.distcp"
