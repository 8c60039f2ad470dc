"""Names inside a checkpoint root: the documents of a checkpoint, staging and trash directories, data files.

Every name the package creates or reads back goes through here, so that what clean-up may touch is decided
in one place: a checkpoint name is one safe path component, never ``.``, ``..`` or empty, and a staging or
trash directory is recognised only if the checkpoint name inside it is such a name and its token is one the
package could have made (letters and digits).
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
#: refreshed by a writer while it fills a staging directory; removed before the directory is published
HEARTBEAT = ".heartbeat"
#: the block store of a root: incremental checkpoints keep their data files in ``<root>/.distckpt-blocks/<id>/``
#: (one directory per save, named by its token, never renamed) so that other checkpoints can borrow their blocks
BLOCKS = ".distckpt-blocks"
#: written into a staging directory before an incremental save (or a copy) relies on blocks of other saves: the
#: ids of the block directories it may reference, which clean-up keeps while the staging directory exists
BORROWS = "BORROWS"

#: the most bytes a document may have; checked before it is read (a FIFO or /dev/zero is refused earlier)
DOCUMENT_LIMITS = {MARKER: 4 << 10, MANIFEST: 64 << 20, METADATA: 1 << 30, STATE: 1 << 30, BORROWS: 1 << 20}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,254}$")
_TOKEN = re.compile(r"^[A-Za-z0-9]{1,64}$")


def is_safe_name(name: Any) -> bool:
    """True for a plain name the package may create: one path component, not ``.``/``..``/empty, no
    separators, control characters or leading dot."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and name not in (".", "..")


def check_name(name: Any, where: str) -> str:
    """A file name inside a checkpoint: one path component, no escape (``..``, ``/``, absolute)."""
    if not is_safe_name(name):
        raise UnsafeCheckpointError(f"{where}: refusing file name {name!r} (must be a plain name inside the checkpoint)")
    return name


def is_token(value: Any) -> bool:
    """A token the package could have made (letters and digits): staging and trash suffixes, block directory ids."""
    return isinstance(value, str) and bool(_TOKEN.match(value))


def blocks_key(data_id: str, name: str) -> str:
    """How a checkpoint names a data file of the block store: ``.distckpt-blocks/<id>/<file>``, relative to the
    checkpoint's root (plain names stay relative to the checkpoint directory)."""
    return f"{BLOCKS}/{data_id}/{name}"


def parse_blocks_key(key: Any) -> tuple[str, str] | None:
    """``(id, file)`` of a block-store key made by `blocks_key()`, else None (a plain name, or anything else)."""
    if not isinstance(key, str) or not key.startswith(BLOCKS + "/"):
        return None
    parts = key.split("/")
    if len(parts) != 3 or not is_token(parts[1]) or not is_safe_name(parts[2]):
        return None
    return parts[1], parts[2]


def check_file_key(key: Any, where: str) -> str:
    """A file a checkpoint lists: a plain name inside the checkpoint directory, or a block-store key
    (`blocks_key()`) that can only lead into ``<root>/.distckpt-blocks/<id>/``; anything else (``..``, absolute,
    more components) is refused."""
    if is_safe_name(key) or parse_blocks_key(key) is not None:
        return key
    raise UnsafeCheckpointError(f"{where}: refusing file name {key!r} (must be a plain name inside the checkpoint "
                                f"or {BLOCKS}/<id>/<name>)")


def staging_name(name: str, token: str) -> str:
    return f".{name}{STAGING_INFIX}{token}"


def trash_name(name: str, token: str) -> str:
    return f".{name}{TRASH_INFIX}{token}"


def _parse(dirname: Any, infix: str) -> tuple[str, str] | None:
    if not isinstance(dirname, str) or not dirname.startswith(".") or infix not in dirname[1:]:
        return None
    name, token = dirname[1:].rsplit(infix, 1)
    if not is_checkpoint_name(name) or not _TOKEN.match(token):
        return None
    return name, token


def trashed_name(dirname: str) -> str | None:
    """The checkpoint name a trash directory (an overwrite in progress or crashed) belongs to, else None.

    None unless ``dirname`` is exactly ``.<name>.trash-<token>`` with a valid checkpoint ``name`` (never ``.``,
    ``..`` or empty, whatever dots the directory name holds; `check_checkpoint_name()`) and an alphanumeric
    ``token``.
    """
    parsed = _parse(dirname, TRASH_INFIX)
    return parsed[0] if parsed else None


def staged_name(dirname: str) -> str | None:
    """The checkpoint name a staging directory (a save or copy in progress or crashed) is for, else None;
    the same rules as `trashed_name()`."""
    parsed = _parse(dirname, STAGING_INFIX)
    return parsed[0] if parsed else None


def token_of(dirname: str) -> str | None:
    """The token of a staging or trash directory name (an overwrite's trash and staging share it)."""
    parsed = _parse(dirname, TRASH_INFIX) or _parse(dirname, STAGING_INFIX)
    return parsed[1] if parsed else None


def data_file_name(rank: int, k: int) -> str:
    return f"__{rank}_{k}.distcp"


#: staging and clean-up names add up to 24 bytes (``.<name>.staging-rm<12 hex>``) to a checkpoint's name
MAX_CHECKPOINT_NAME = 255 - 24


def _checkpoint_name_problem(name: Any) -> str:
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if name in (".", ".."):
        return "is not a name"
    if "/" in name or "\\" in name:
        return "must be one path component (no '/' or '\\')"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_CHECKPOINT_NAME:
        return f"is longer than {MAX_CHECKPOINT_NAME} bytes (its staging directory's name must fit in 255)"
    if STAGING_INFIX in name or TRASH_INFIX in name:
        return f"contains {STAGING_INFIX!r} or {TRASH_INFIX!r}, reserved for saves in progress"
    return ""


def is_checkpoint_name(name: Any) -> bool:
    """True for a name a checkpoint directory may have under its root (see `check_checkpoint_name()`)."""
    return not _checkpoint_name_problem(name)


def check_checkpoint_name(name: Any, where: str) -> str:
    """A checkpoint directory's name under its root: whatever Lightning's ``ModelCheckpoint`` accepts as a file
    name (spaces, ``@``, ``,``, ``~``, a leading ``.`` as in the Tuner's ``.lr_find_<uuid>.ckpt``), as long as it
    is one path component that cannot be mistaken for a staging or trash directory of this package.

    Refused: not a str, empty, ``.``, ``..``, a ``/``, a ``\\``, a NUL or other control character, more than 231
    bytes, or a name containing ``.staging-`` / ``.trash-`` (clean-up could not tell it apart from a crashed save).
    A name starting with ``.`` is valid but not listed (``ckpt_path="last"``, retention and clean-up skip it).
    File names *inside* a checkpoint follow the stricter `check_name()`.
    """
    problem = _checkpoint_name_problem(name)
    if problem:
        raise UnsafeCheckpointError(f"{where}: refusing checkpoint name {name!r}: it {problem}")
    return name


#: The only file in a directory that stands for an asynchronous save still in flight under that name: the
#: name counts as taken (Lightning's version counter sees it), the directory is never a committed checkpoint,
#: and the commit replaces it.
PENDING = "PENDING"
