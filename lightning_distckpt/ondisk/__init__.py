"""The on-disk format, as data: names, digests, the JSON documents and the skeleton of non-tensor state.

A checkpoint is a directory::

    <root>/<name>/
        __<rank>_<k>.distcp   tensor bytes, stored in blocks (raw or compressed)
        metadata.json         every tensor, its chunks, where each chunk's blocks lie   (`.metadata`)
        state.json            everything that is not a tensor                           (`.skeleton`)
        manifest.json         format version, step, world size, every file with size and digest (`.documents`)
        COMMITTED             the commit marker, written last; it names the manifest's digest

Nothing in a checkpoint is a pickle that loading executes: JSON is parsed, tensor bytes are copied.
This layer does no I/O and imports nothing of the package but `lightning_distckpt.errors`.
"""

from lightning_distckpt.ondisk.digests import BlockDigests, blocks_digest, digest
from lightning_distckpt.ondisk.documents import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Manifest,
    check_marker,
    check_version,
    dumps,
    loads,
    marker_bytes,
)
from lightning_distckpt.ondisk.metadata import (
    DTYPES,
    Block,
    Location,
    dtype_name,
    metadata_from_json,
    metadata_to_json,
    parse_dtype,
)
from lightning_distckpt.ondisk.names import (
    MANIFEST,
    MARKER,
    METADATA,
    STAGING_INFIX,
    STATE,
    TRASH_INFIX,
    check_name,
    data_file_name,
    staging_name,
    trash_name,
    trashed_name,
)

__all__ = [
    "DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "MARKER", "METADATA", "STAGING_INFIX", "STATE",
    "TRASH_INFIX", "Block", "BlockDigests", "Location", "Manifest", "blocks_digest", "check_marker", "check_name",
    "check_version", "data_file_name", "digest", "dtype_name", "dumps", "loads", "marker_bytes", "metadata_from_json",
    "metadata_to_json", "parse_dtype", "staging_name", "trash_name", "trashed_name",
]  # fmt: skip
