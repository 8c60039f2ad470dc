"""The codec registry: block codecs and tensor codecs by name, built-in or added by a third party.

A checkpoint names the codec of every block (``metadata.json``, per chunk) and of every encoded tensor; a
reader looks the name up here, and an unknown name is a clear `CorruptCheckpointError`, never a guess.

Adding a codec from outside the package, either by a call::

    from lightning_distckpt.transforms import register_block_codec
    register_block_codec("my-lz4-1", MyLz4Codec)          # a factory returning a BlockCodec

or by a Python entry point in the distribution that provides it (looked up the first time a name is not
found)::

    [project.entry-points."lightning_distckpt.block_codecs"]
    my-lz4-1 = "my_package.codecs:MyLz4Codec"
    [project.entry-points."lightning_distckpt.tensor_codecs"]
    my-fp8-rows = "my_package.codecs:FP8_ROWS"             # a Codec instance

Names are part of the on-disk format: never reuse a name for different bytes; bump the name or version.
Thread safety: registration takes a lock; lookups read a dict.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.metadata import entry_points

from lightning_distckpt.errors import CorruptCheckpointError
from typing import TYPE_CHECKING

from lightning_distckpt.transforms.block import BlockCodec
from lightning_distckpt.transforms.lossless import ShuffleZstd
from lightning_distckpt.transforms.specs import BUILTIN_SPECS

if TYPE_CHECKING:
    from lightning_distckpt.transforms.tensor_codecs import Codec

BLOCK_GROUP = "lightning_distckpt.block_codecs"
TENSOR_GROUP = "lightning_distckpt.tensor_codecs"

_lock = threading.Lock()
_block_factories: dict[str, Callable[[], BlockCodec]] = {"": BlockCodec, ShuffleZstd.name: ShuffleZstd}
_block_instances: dict[str, BlockCodec] = {}
_tensor: dict[str, Codec] = {}  # the built-in ones are added on first use (they import torch)
_builtin_loaded = False
_scanned: set[str] = set()


def register_block_codec(name: str, factory: Callable[[], BlockCodec], *, replace: bool = False) -> None:
    """Make block codec ``name`` known; ``factory()`` returns a (thread-safe) `BlockCodec` whose
    ``name`` is ``name``. Registering a taken name raises ``ValueError`` unless ``replace``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a block codec needs a non-empty name, got {name!r}")
    with _lock:
        if name in _block_factories and not replace and _block_factories[name] is not factory:
            raise ValueError(f"block codec {name!r} is already registered")
        _block_factories[name] = factory
        _block_instances.pop(name, None)


def register_tensor_codec(codec: Codec, *, replace: bool = False) -> None:
    """Make the tensor codec ``codec`` (a `Codec`) known
    under ``codec.name``. Registering a taken name raises ``ValueError`` unless ``replace``."""
    from lightning_distckpt.transforms.tensor_codecs import Codec

    _load_builtin()
    if not isinstance(codec, Codec):
        raise TypeError(f"register_tensor_codec expects a Codec, got {type(codec).__name__}")
    with _lock:
        if codec.name in _tensor and not replace and _tensor[codec.name] is not codec:
            raise ValueError(f"tensor codec {codec.name!r} is already registered")
        _tensor[codec.name] = codec


def _scan(group: str) -> None:
    """Register what installed distributions declare under the entry point ``group`` (once per process)."""
    if group in _scanned:
        return
    _scanned.add(group)
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break reading other codecs
            import logging

            logging.getLogger(__name__).warning("cannot load codec entry point %s (%s): %s", ep.name, ep.value, e)
            continue
        if group == BLOCK_GROUP and ep.name not in _block_factories:
            register_block_codec(ep.name, obj)
        elif group == TENSOR_GROUP and ep.name not in _tensor:
            register_tensor_codec(obj)


def block_codec(name: str) -> BlockCodec:
    """The block codec named ``name`` in a checkpoint (one shared instance per name)."""
    codec = _block_instances.get(name)
    if codec is not None:
        return codec
    if name not in _block_factories:
        _scan(BLOCK_GROUP)
    factory = _block_factories.get(name)
    if factory is None:
        raise CorruptCheckpointError(
            f"block codec {name!r} is not supported by this lightning-distckpt (it knows {sorted(n for n in _block_factories if n)}); "
            f"upgrade lightning-distckpt or install the package that registers it"
        )
    with _lock:
        return _block_instances.setdefault(name, factory())


def _load_builtin() -> None:
    """Register the built-in tensor codecs (importing torch), once."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    from lightning_distckpt.transforms.tensor_codecs import BUILTIN

    with _lock:
        if not _builtin_loaded:
            for c in BUILTIN:
                _tensor.setdefault(c.name, c)
            _builtin_loaded = True


def tensor_codec(name: str) -> Codec | None:
    """The tensor codec named ``name``, or None if no one registered it. Imports torch (codecs are torch code);
    checking names and parts of built-in codecs without torch: `lightning_distckpt.transforms.specs`."""
    _load_builtin()
    if name not in _tensor:
        _scan(TENSOR_GROUP)
    return _tensor.get(name)


def tensor_codec_names() -> list[str]:
    """Names of the tensor codecs known so far (built-in and registered), without importing torch."""
    return sorted(set(_tensor) | set(BUILTIN_SPECS))
