"""The on-disk format, as data: names, digests, the JSON documents and the skeleton of non-tensor state.

A checkpoint is a directory::

    <root>/<name>/
        __<rank>_<k>.distcp   tensor bytes, stored in blocks (raw or compressed)
        metadata.json         every tensor, its chunks, where each chunk's blocks lie   (`.metadata`), or, for
                              a regular save, every tensor by its sharding rule          (`.layout`, version 3)
        state.json            everything that is not a tensor                           (`.skeleton`)
        manifest.json         format version, step, world size, every file with size and digest (`.documents`)
        COMMITTED             the commit marker, written last; it names the manifest's digest

Nothing in a checkpoint is a pickle that loading executes: JSON is parsed, tensor bytes are copied.
This layer does no I/O, imports nothing of the package but `lightning_distckpt.errors`, and does not import
torch (the skeleton imports it when it converts tensors; `DTYPES` and `parse_dtype` when used).
"""

from lightning_distckpt.ondisk.digests import BlockDigests, blocks_digest, digest
from lightning_distckpt.ondisk.documents import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_DEPTH,
    PLAIN_VERSION,
    Manifest,
    check_depth,
    check_int,
    check_marker,
    check_version,
    dumps,
    loads,
    marker_bytes,
)
from lightning_distckpt.ondisk.metadata import (
    FLOATING,
    ITEMSIZE,
    Block,
    CheckpointMetadata,
    Chunk,
    ChunkIndex,
    Fingerprint,
    Location,
    Ref,
    TensorEntry,
    check_dtype,
    dtype_name,
    metadata_from_json,
    metadata_to_json,
    parse_dtype,
)
from lightning_distckpt.ondisk.layout import (
    LAYOUT_VERSION,
    FileIndex,
    Layout,
    RegularTensor,
    check_writer,
    index_tail,
    layout_metadata,
    layout_to_json,
    parse_index,
    parse_metadata,
    tail_length,
)
from lightning_distckpt.ondisk.names import (
    BLOCKS,
    BORROWS,
    DOCUMENT_LIMITS,
    HEARTBEAT,
    MANIFEST,
    MARKER,
    METADATA,
    STAGING_INFIX,
    STATE,
    PENDING,
    TRASH_INFIX,
    blocks_key,
    check_checkpoint_name,
    check_file_key,
    check_name,
    data_file_name,
    is_checkpoint_name,
    is_safe_name,
    is_token,
    parse_blocks_key,
    staged_name,
    staging_name,
    token_of,
    trash_name,
    trashed_name,
)

__all__ = [
    "CheckpointMetadata", "Chunk", "ChunkIndex", "FLOATING", "ITEMSIZE", "TensorEntry", "check_dtype",
    "DOCUMENT_LIMITS", "DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "HEARTBEAT", "MANIFEST", "MARKER", "MAX_DEPTH",
    "METADATA", "PENDING", "STAGING_INFIX", "STATE", "TRASH_INFIX", "Block", "BlockDigests", "Location", "Manifest",
    "blocks_digest", "check_checkpoint_name", "check_depth", "check_int", "check_marker", "check_name", "check_version", "data_file_name",
    "digest", "dtype_name", "dumps", "is_checkpoint_name", "is_safe_name", "loads", "marker_bytes", "metadata_from_json", "metadata_to_json",
    "parse_dtype", "staged_name", "staging_name", "token_of", "trash_name", "trashed_name",
    "BLOCKS", "BORROWS", "Fingerprint", "PLAIN_VERSION", "Ref", "blocks_key", "check_file_key", "is_token",
    "parse_blocks_key",
    "LAYOUT_VERSION", "FileIndex", "Layout", "RegularTensor", "check_writer", "index_tail", "layout_metadata",
    "layout_to_json", "parse_index", "parse_metadata", "tail_length",
]  # fmt: skip


def __getattr__(name: str) -> object:  # DTYPES maps names to torch dtypes: torch is imported on first use only
    if name == "DTYPES":
        from lightning_distckpt.ondisk import metadata

        return metadata.DTYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
