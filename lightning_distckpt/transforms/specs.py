"""What the built-in tensor codecs store, as data (no torch): their versions and the shape and dtype of every
part they write. The codecs themselves (`lightning_distckpt.transforms.tensor_codecs`) take their part shapes
from here, so that checking a checkpoint's encodings (the catalog, ``distckpt verify``) needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

PART = "::"  #: a part of an encoded tensor is stored under ``<key>::<part>``
BF16 = "bf16"  #: the bf16 "codec": the tensor stored under its own key as bfloat16 (version 1)

PartSpecs = dict[str, tuple[list[int], str]]  #: part name -> (global shape, dtype name)


def int8_rows_parts(shape: Sequence[int], block: int) -> PartSpecs:
    """``int8-rows``: the int8 codes in the tensor's shape, one float32 scale per row."""
    return {"q": (list(shape), "int8"), "scale": ([shape[0]], "float32")}


def dynamic8_parts(shape: Sequence[int], block: int) -> PartSpecs:
    """``dyn8`` and ``dyn8-sqrt``: uint8 codes in the tensor's shape, one float32 absmax per block of a row."""
    n = math.prod(shape[1:]) if len(shape) > 1 else 1
    return {"q": (list(shape), "uint8"), "absmax": ([shape[0], math.ceil(n / block)], "float32")}


#: built-in tensor codec name -> (version, its parts)
BUILTIN_SPECS: dict[str, tuple[int, Callable[[Sequence[int], int], PartSpecs]]] = {
    "int8-rows": (1, int8_rows_parts),
    "dyn8": (1, dynamic8_parts),
    "dyn8-sqrt": (1, dynamic8_parts),
}
