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


def check_checkpoint_name(name: Any, where: str) -> str:
    """A checkpoint directory's name under its root: whatever Lightning's ``ModelCheckpoint`` accepts as a file
    name (spaces, ``@``, ``,``, ``~``, a leading ``.`` as in the Tuner's ``.lr_find_<uuid>.ckpt``), as long as it
    is one path component that cannot be mistaken for a staging or trash directory of this package.

    Refused: not a str, empty, ``.``, ``..``, a ``/``, a ``\\``, a NUL or other control character, more than 255
    bytes, or a name containing ``.staging-`` / ``.trash-`` (clean-up could not tell it apart from a crashed save).
    File names *inside* a checkpoint follow the stricter :func:`check_name`.
    """
    problem = ""
    if not isinstance(name, str) or not name:
        problem = "must be a non-empty string"
    elif name in (".", ".."):
        problem = "is not a name"
    elif "/" in name or "\\" in name:
        problem = "must be one path component (no '/' or '\\')"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > 255:
        problem = "is longer than 255 bytes"
    elif STAGING_INFIX in name or TRASH_INFIX in name:
        problem = f"contains {STAGING_INFIX!r} or {TRASH_INFIX!r}, reserved for saves in progress"
    if problem:
        raise UnsafeCheckpointError(f"{where}: refusing checkpoint name {name!r}: it {problem}")
    return name


#: The only file in a directory that stands for an asynchronous save still in flight under that name: the
#: name counts as taken (Lightning's version counter sees it), the directory is never a committed checkpoint,
#: and the commit replaces it.
PENDING = "PENDING"
