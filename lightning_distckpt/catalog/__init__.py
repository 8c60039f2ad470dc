"""What exists: committed checkpoints under a root, opening and verifying one, retention and clean-up,
and replication to other roots.

Depends on `storage`, `ondisk` and
`transforms` (to know which codecs a checkpoint may name); never on Lightning.
"""

from lightning_distckpt.catalog.blocks import references, sweep_blocks
from lightning_distckpt.catalog.cleanup import (
    DEFAULT_STALE_AGE_S,
    HEARTBEAT_S,
    Heartbeat,
    check_keep_last,
    clean_stale,
    publish,
    remove_checkpoint,
    retention_victims,
)
from lightning_distckpt.catalog.documents import Checkpoint, open_checkpoint, read_document, read_manifest, source_of
from lightning_distckpt.catalog.listing import Listed, committed, latest, list_checkpoints
from lightning_distckpt.catalog.verify import FileReport, VerifyReport, blocks_by_file, is_borrowed, verify, verify_file

__all__ = [
    "DEFAULT_STALE_AGE_S", "HEARTBEAT_S", "Checkpoint", "FileReport", "Heartbeat", "Listed", "VerifyReport",
    "blocks_by_file", "is_borrowed", "check_keep_last", "clean_stale", "committed", "latest", "list_checkpoints", "open_checkpoint",
    "publish", "read_document", "read_manifest", "remove_checkpoint", "retention_victims", "source_of", "verify",
    "verify_file", "references", "sweep_blocks",
]  # fmt: skip
