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
    if not is_safe_name(name) or not _TOKEN.match(token):
        return None
    return name, token


def trashed_name(dirname: str) -> str | None:
    """The checkpoint name a trash directory (an overwrite in progress or crashed) belongs to, else None.

    None unless ``dirname`` is exactly ``.<name>.trash-<token>`` with a safe ``name`` (never ``.``, ``..`` or
    empty, whatever dots the directory name holds) and an alphanumeric ``token``.
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
