"""What exists: committed checkpoints under a root, opening and verifying one, retention and clean-up,
and replication to other roots.

Depends on `storage`, `ondisk` and
`transforms` (to know which codecs a checkpoint may name); never on Lightning.
"""

from lightning_distckpt.catalog.cleanup import clean_stale, remove_checkpoint
from lightning_distckpt.catalog.documents import Checkpoint, open_checkpoint, read_manifest, source_of
from lightning_distckpt.catalog.listing import Listed, committed, latest, list_checkpoints
from lightning_distckpt.catalog.verify import FileReport, VerifyReport, blocks_by_file, verify, verify_file

__all__ = [
    "Checkpoint", "FileReport", "Listed", "VerifyReport", "blocks_by_file", "clean_stale", "committed", "latest",
    "list_checkpoints", "open_checkpoint", "read_manifest", "remove_checkpoint", "source_of", "verify", "verify_file",
]  # fmt: skip
