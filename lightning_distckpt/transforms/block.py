"""The block codec interface: how a stored block's bytes are made from its raw bytes, and back.

Writers cut every chunk into blocks of at most 8 MiB raw bytes and pass each through a block codec before
it is checksummed and stored; the codec's ``name`` is recorded in the chunk's location, so a reader finds
the decoder in the registry (`lightning_distckpt.transforms.registry`). The identity codec (name ``""``)
stores raw bytes. Implementations must be thread-safe: writers and readers call them from several threads.
"""

from __future__ import annotations


class BlockCodec:
    """Encodes raw blocks into stored blocks and back. ``name`` goes into the metadata (``""``: identity)."""

    name = ""

    def encode(self, raw: memoryview, itemsize: int = 1) -> bytes | memoryview:
        """The stored form of ``raw`` (a block of elements of ``itemsize`` bytes)."""
        return raw

    def decode(self, stored: memoryview, raw_len: int) -> bytes | memoryview:
        """The ``raw_len`` raw bytes of a stored block; raise ``CorruptCheckpointError`` if it cannot be decoded."""
        return stored
