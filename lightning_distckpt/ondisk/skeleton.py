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
import collections
import datetime
import io
import math
import pathlib
import pickle
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_distckpt.errors import UnsafeCheckpointError
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


def join(skeleton: Any, tensor: Callable[[str], Any], safe_globals: Iterable[str] = ()) -> Any:
    """Rebuild the checkpoint dict; ``tensor(key)`` supplies the value of every tensor reference."""
    allowed = _ALLOWED_GLOBALS | set(safe_globals)

    def dec(obj: Any, path: str) -> Any:
        if isinstance(obj, list):
            return [dec(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if not isinstance(obj, dict):
            return obj
        if len(obj) == 1:
            (tag, val), = obj.items()
            if tag == "__tensor__":
                return tensor(val)
            if tag == "__tuple__":
                return tuple(dec(v, f"{path}[{i}]") for i, v in enumerate(val))
            if tag == "__dict__":
                return {dec(k, path): dec(v, f"{path}/{k}") for k, v in val}
            if tag == "__float__":
                return float(val)
            if tag == "__bytes__":
                return base64.b64decode(val)
            if tag == "__dtype__":
                return parse_dtype(val, f"state.json at {path}")
            if tag == "__device__":
                return torch.device(val)
            if tag == "__size__":
                return torch.Size(val)
            if tag == "__pickle__":
                return SafeUnpickler.loads(base64.b64decode(val), allowed, f"state.json at {path or '/'}")
        return {k: dec(v, f"{path}/{k}") for k, v in obj.items()}

    return dec(skeleton, "")


def tensor_refs(skeleton: Any) -> list[str]:
    """Every tensor key the skeleton refers to, in order."""
    out: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, list):
            for v in obj:
                walk(v)
        elif isinstance(obj, dict):
            if len(obj) == 1 and "__tensor__" in obj:
                out.append(obj["__tensor__"])
            else:
                for v in obj.values():
                    walk(v)

    walk(skeleton)
    return out


# ---- encoding -----------------------------------------------------------------------------------
def _encode(obj: Any, child: Callable[[Any, Any], Any]) -> Any:
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
def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


_ALLOWED_GLOBALS: frozenset[str] = frozenset(
    _qualname(t)
    for t in (
        set, frozenset, complex, slice, range, bytearray,
        collections.OrderedDict, collections.defaultdict, collections.deque, collections.Counter,
        datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone,
        argparse.Namespace, pathlib.PurePosixPath, pathlib.PosixPath, uuid.UUID,
    )
) | {"copyreg._reconstructor", "builtins.object", "copyreg.__newobj__", "lightning.fabric.utilities.data.AttributeDict"}  # fmt: skip


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allowlisted globals; anything else is refused before it runs."""

    def __init__(self, data: bytes, allowed: set[str] | frozenset[str], where: str) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in self._allowed:
            raise UnsafeCheckpointError(
                f"{self._where}: refusing to load {module}.{name} from a checkpoint (not an allowlisted type); "
                f"if you trust this checkpoint, pass safe_globals=[{f'{module}.{name}'!r}] to DistCheckpointIO"
            )
        return super().find_class(module, name)

    @classmethod
    def loads(cls, data: bytes, allowed: set[str] | frozenset[str], where: str) -> Any:
        try:
            return cls(data, allowed, where).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed pickle is a corrupt checkpoint
            raise UnsafeCheckpointError(f"{where}: cannot decode stored object: {e}") from None
