"""A Lightning checkpoint dict <-> (a JSON skeleton, a flat dict of tensors).

``split`` walks the checkpoint and replaces every tensor by a reference ``{"__tensor__": key}``. Keys
are normalized so that checkpoints are portable between strategies:

* ``model/<fqn>``                 model state (``checkpoint["state_dict"]``), fqn relative to the LightningModule
* ``optim/<i>/<fqn>/<name>``      state ``name`` of parameter ``fqn`` in optimizer ``i``
* ``extra/<n>``                   any other tensor (callback state, user additions), in traversal order

Everything else (loops, schedulers, hparams ...) becomes JSON with a few tagged types. Objects that JSON
cannot express are pickled and, on load, unpickled only through an allowlist of harmless types
(`SafeUnpickler`); loading never runs code that the checkpoint names.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import datetime
import io
import math
import os
import pathlib
import pickle
import uuid
from collections.abc import Callable, Iterable
from typing import Any


from lightning_distckpt.errors import CorruptCheckpointError, DistCheckpointError, UnsafeCheckpointError
from lightning_distckpt.ondisk.metadata import dtype_name, parse_dtype

MODEL = "model/"
OPTIM = "optim/"
EXTRA = "extra/"
_TAGS = frozenset(
    {"__tensor__", "__tuple__", "__dict__", "__float__", "__bytes__", "__dtype__", "__device__", "__size__", "__pickle__"}
)


def model_key(fqn: str) -> str:
    return MODEL + fqn


def optim_key(i: int, fqn: Any, name: Any) -> str:
    return f"{OPTIM}{i}/{fqn}/{name}"


def split(checkpoint: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Return ``(skeleton, tensors)``; ``skeleton`` is JSON-serializable, ``tensors`` maps key -> tensor.

    Tensors may be plain, ``DTensor`` or ``ShardedTensor``; they are not copied.
    """
    import torch  # lazily: reading the skeleton (tensor_refs, the distckpt command) needs no torch

    tensors: dict[str, Any] = {}

    def key_for(path: tuple[Any, ...]) -> str:
        if len(path) == 2 and path[0] == "state_dict":
            return model_key(path[1])
        if len(path) == 5 and path[0] == "optimizer_states" and path[2] == "state":
            return optim_key(path[1], path[3], path[4])
        return f"{EXTRA}{sum(k.startswith(EXTRA) for k in tensors)}"

    def enc(obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            key = key_for(path)
            if key in tensors:
                raise ValueError(f"two tensors of the checkpoint map to the state key {key!r}")
            tensors[key] = obj
            return {"__tensor__": key}
        return _encode(obj, lambda child, k: enc(child, path + (k,)))

    skeleton = enc(checkpoint, ())
    return skeleton, tensors


def join(skeleton: Any, tensor: Callable[[str], Any], safe_globals: Iterable[str] = (), where: str = "state.json", *,
         trusted: bool = False) -> Any:
    """Rebuild the checkpoint dict; ``tensor(key)`` supplies the value of every tensor reference.

    A malformed tag (a ``__float__`` that is no float, a ``__dict__`` that is no list of pairs, an unknown
    device, base64 that does not decode ...) is a `CorruptCheckpointError` naming ``where`` and the
    path inside the skeleton. Nesting depth is bounded by the caller (``ondisk.loads(max_depth=...)``).
    Pickled objects are unpickled through the allowlist plus ``safe_globals`` (``module.Name`` strings), or
    without restriction when ``trusted`` (the caller passed ``weights_only=False``, as to ``torch.load``).
    """
    allowed = None if trusted else _ALLOWED_GLOBALS | set(safe_globals)

    def dec(obj: Any, path: str) -> Any:
        if isinstance(obj, list):
            return [dec(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if not isinstance(obj, dict):
            return obj
        if len(obj) == 1:
            (tag, val), = obj.items()
            if tag in _TAGS:
                try:
                    return tagged(tag, val, path)
                except DistCheckpointError:
                    raise
                except (TypeError, ValueError, OverflowError, RuntimeError, KeyError, AttributeError, binascii.Error) as e:
                    raise CorruptCheckpointError(f"{where} at {path or '/'}: malformed {tag} value ({e})") from None
        return {k: dec(v, f"{path}/{k}") for k, v in obj.items()}

    def tagged(tag: str, val: Any, path: str) -> Any:
        import torch
        if tag == "__tensor__":
            if not isinstance(val, str):
                raise TypeError(f"a tensor reference must be a string, found {type(val).__name__}")
            return tensor(val)
        if tag == "__tuple__":
            return tuple(dec(v, f"{path}[{i}]") for i, v in enumerate(_list(val)))
        if tag == "__dict__":
            out = {}
            for pair in _list(val):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise TypeError("a __dict__ item must be a [key, value] pair")
                key = dec(pair[0], path)
                out[key] = dec(pair[1], f"{path}/{key}")
            return out
        if tag == "__float__":
            if not isinstance(val, str):
                raise TypeError("__float__ holds the float's text")
            return float(val)
        if tag == "__bytes__":
            if not isinstance(val, str):
                raise TypeError("__bytes__ holds base64 text")
            return base64.b64decode(val, validate=True)
        if tag == "__dtype__":
            return parse_dtype(val, f"{where} at {path}")
        if tag == "__device__":
            if not isinstance(val, str):
                raise TypeError("__device__ holds the device's name")
            return torch.device(val)
        if tag == "__size__":
            if not all(type(v) is int and 0 <= v < 1 << 62 for v in _list(val)):
                raise ValueError("__size__ holds non-negative integers")
            return torch.Size(val)
        if not isinstance(val, str):
            raise TypeError("__pickle__ holds base64 text")
        return SafeUnpickler.loads(base64.b64decode(val, validate=True), allowed, f"{where} at {path or '/'}")

    return dec(skeleton, "")


def _list(val: Any) -> list[Any]:
    if not isinstance(val, list):
        raise TypeError(f"expected a list, found {type(val).__name__}")
    return val


def tensor_refs(skeleton: Any) -> list[str]:
    """Every tensor key the skeleton refers to, in order."""
    out: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, list):
            for v in obj:
                walk(v)
        elif isinstance(obj, dict):
            if len(obj) == 1 and "__tensor__" in obj:
                if not isinstance(obj["__tensor__"], str):
                    raise CorruptCheckpointError(f"state.json: a tensor reference must be a string, found {obj['__tensor__']!r:.80}")
                out.append(obj["__tensor__"])
            else:
                for v in obj.values():
                    walk(v)

    walk(skeleton)
    return out


# ---- encoding -----------------------------------------------------------------------------------
def _encode(obj: Any, child: Callable[[Any, Any], Any]) -> Any:
    import torch
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int) and type(obj) in (int, bool):
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if type(obj) in (dict, collections.OrderedDict):
        if all(type(k) is str for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS):
            return {k: child(v, k) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, lambda c, _: c), child(v, k)] for k, v in obj.items()]}
    if type(obj) is list:
        return [child(v, i) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {"__tuple__": [child(v, i) for i, v in enumerate(obj)]}
    if type(obj) is bytes:
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": dtype_name(obj)}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if type(obj) is torch.Size:
        return {"__size__": list(obj)}
    try:
        return {"__pickle__": base64.b64encode(pickle.dumps(obj, protocol=4)).decode()}
    except Exception as e:  # noqa: BLE001 - any pickling failure is the user's object
        raise TypeError(f"cannot store {type(obj).__qualname__} object in a checkpoint: {e}") from e


# ---- allowlist unpickling -----------------------------------------------------------------------
def weights_only_trusted(weights_only: bool | None) -> bool:
    """Whether pickled objects may be unpickled without an allowlist, by ``torch.load``'s rule: only with
    ``weights_only=False``, or ``None`` and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set; never with
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set."""
    truthy = ("1", "y", "yes", "true")
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in truthy:
        return False
    if weights_only is not None:
        return not weights_only
    return os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in truthy


def torch_safe_globals(extra: list[str] | None = None) -> list[str]:
    """``extra`` plus every type registered with ``torch.serialization.add_safe_globals`` (or inside a
    ``torch.serialization.safe_globals`` block), as ``module.Name`` strings."""
    import torch

    out = list(extra or [])
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        out.append(name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}")
    return out


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


_ALLOWED_GLOBALS: frozenset[str] = frozenset(
    _qualname(t)
    for t in (
        set, frozenset, complex, slice,
        collections.OrderedDict, collections.defaultdict, collections.deque, collections.Counter,
        datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone,
        argparse.Namespace, pathlib.PurePosixPath, pathlib.PosixPath, uuid.UUID,
    )
) | {"copyreg._reconstructor", "builtins.object", "copyreg.__newobj__", "lightning.fabric.utilities.data.AttributeDict"}  # fmt: skip


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allowlisted globals (all of them when ``allowed`` is None); anything
    else is refused before it runs."""

    def __init__(self, data: bytes, allowed: set[str] | frozenset[str] | None, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if self._allowed is not None and f"{module}.{name}" not in self._allowed:
            raise UnsafeCheckpointError(
                f"{self._where}: refusing to load {module}.{name} from a checkpoint (not an allowlisted type); "
                f"if you trust this checkpoint, load it with weights_only=False or pass "
                f"safe_globals=[{f'{module}.{name}'!r}] to DistCheckpointIO"
            )
        return super().find_class(module, name)

    @classmethod
    def loads(cls, data: bytes, allowed: set[str] | frozenset[str] | None, where: str) -> Any:
        try:
            return cls(data, allowed, where).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed pickle is a corrupt checkpoint
            raise UnsafeCheckpointError(f"{where}: cannot decode stored object: {type(e).__name__}"
                                        f"{': ' + str(e) if str(e) else ''}") from None
