"""Checks that a parsed checkpoint names only codecs this installation can decode, with the parts they write.

Plain Python (no torch): `lightning_distckpt.catalog.open_checkpoint` runs these on every open, so that
``distckpt verify`` and ``info`` report an undecodable checkpoint without importing torch, and a load fails when
the checkpoint is opened, not halfway through a read. Built-in codecs are checked from
`lightning_distckpt.transforms.specs`; a third-party tensor codec through its own ``part_shapes``.
"""

from __future__ import annotations

from typing import Any

from lightning_distckpt.errors import CorruptCheckpointError
from lightning_distckpt.ondisk.metadata import FLOATING, check_dtype, dtype_name
from lightning_distckpt.transforms.registry import block_codec, tensor_codec, tensor_codec_names
from lightning_distckpt.transforms.specs import BF16, BUILTIN_SPECS, PART, PartSpecs


def _known(codec: str) -> tuple[int, Any] | None:
    """(version, part specs function) of a known tensor codec, without importing torch for built-in ones."""
    if codec == BF16:
        return 1, None
    if codec in BUILTIN_SPECS:
        return BUILTIN_SPECS[codec]
    c = tensor_codec(codec)  # registered by a third party (or by an entry point)
    if c is None:
        return None

    def parts(shape: list[int], block: int) -> PartSpecs:
        import torch

        return {p: (list(s), dtype_name(d)) for p, (s, d) in c.part_shapes(torch.Size(shape), block).items()}

    return c.version, parts


def check_encodings(encodings: Any, where: str, metadata: Any = None) -> dict[str, Any]:
    """Validate the encodings section of metadata.json; an unknown codec or version is a clear error.

    With ``metadata`` (a parsed ``CheckpointMetadata``), every encoded tensor's stored parts must exist with
    exactly the shapes and dtypes its codec produces (a bf16 tensor: its own key, stored as bfloat16), so no
    part is ever read as another dtype.
    """
    if not isinstance(encodings, dict):
        raise CorruptCheckpointError(f"{where}: malformed encodings")
    for key, e in encodings.items():
        here = f"{where}: encodings[{key!r}]"
        if not isinstance(e, dict):
            raise CorruptCheckpointError(f"{here}: must be an object")
        codec, version = e.get("codec"), e.get("version")
        known = _known(codec) if isinstance(codec, str) else None
        if known is None or version != known[0] or type(version) is not int:
            raise CorruptCheckpointError(
                f"{where}: tensor {key!r} uses codec {codec!r} version {version!r}, which this lightning-distckpt "
                f"cannot decode (it knows {sorted({BF16, *BUILTIN_SPECS, *tensor_codec_names()})}); upgrade "
                "lightning-distckpt"
            )
        dtype = check_dtype(e.get("dtype"), here)
        size = e.get("size")
        if not isinstance(size, list) or not all(type(n) is int and 0 <= n < 1 << 48 for n in size) or len(size) > 64:
            raise CorruptCheckpointError(f"{here}: size must be a list of non-negative integers")
        if codec != BF16 and (type(e.get("block")) is not int or not 1 <= e["block"] <= 1 << 24):
            raise CorruptCheckpointError(f"{here}: block must be a positive integer")
        if codec != BF16 and (len(size) < 2 or dtype not in FLOATING):
            raise CorruptCheckpointError(f"{here}: codec {codec!r} encodes floating-point tensors of 2 or more dims")
        if metadata is None:
            continue
        stored = metadata.tensors
        if codec == BF16:
            want = {key: (list(size), "bfloat16")}
        else:
            want = {f"{key}{PART}{part}": spec for part, spec in known[1](size, e["block"]).items()}
        for k, (shape, dt) in want.items():
            t = stored.get(k)
            if t is None or list(t.size) != list(shape) or t.dtype != dt:
                found = "absent" if t is None else f"{list(t.size)} {t.dtype}"
                raise CorruptCheckpointError(f"{here}: stored part {k!r} must be {list(shape)} {dt}, found {found}")
    return encodings


def check_codecs(metadata: Any, where: str) -> None:
    """Every block codec and tensor codec that parsed ``metadata`` (a ``CheckpointMetadata``) names is known
    (else a clear error naming ``where``), so a checkpoint this version cannot decode fails when it is opened,
    not halfway through a read."""
    layout = getattr(metadata, "layout", None)  # compact documents name one block codec for every block
    for codec in {layout.codec} if layout is not None else {c.location.codec for _, c in metadata.chunks()}:
        if codec:
            try:
                block_codec(codec)
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{where}: {e}") from None
    check_encodings(metadata.encodings, where, metadata)
