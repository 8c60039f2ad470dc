"""Unit tests of the checkpoint dict <-> (JSON skeleton, tensors) split, and of allowlist unpickling."""

from __future__ import annotations

import argparse
import collections
import math
import os

import pytest
import torch

from lightning_distckpt import UnsafeCheckpointError
from lightning_distckpt.ondisk import skeleton as state
from lightning_distckpt.ondisk import dumps, loads


def roundtrip(obj):
    skeleton, tensors = state.split(obj)
    return state.join(loads(dumps(skeleton), "test"), tensors.__getitem__), tensors


def test_lightning_checkpoint_keys_are_normalized():
    ck = {
        "state_dict": {"net.0.weight": torch.ones(2, 2), "net.0.bias": torch.zeros(2)},
        "optimizer_states": [{"state": {"net.0.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
                              "param_groups": [{"lr": 0.1, "params": ["net.0.weight"]}]}],
        "callbacks": {"cb": {"best": torch.tensor(0.5)}},
    }  # fmt: skip
    back, tensors = roundtrip(ck)
    assert sorted(tensors) == ["extra/0", "model/net.0.bias", "model/net.0.weight", "optim/0/net.0.weight/exp_avg",
                               "optim/0/net.0.weight/step"]  # fmt: skip
    assert back["optimizer_states"][0]["param_groups"] == [{"lr": 0.1, "params": ["net.0.weight"]}]
    assert back["state_dict"]["net.0.weight"] is ck["state_dict"]["net.0.weight"]


def test_non_json_types_survive_exactly():
    ck = {
        "tuple": (1, (2.5, "x")), "int_keys": {1: "a", 2: "b"}, "nan": float("nan"), "inf": -math.inf,
        "bytes": b"\x00\xff", "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "device": torch.device("cpu"),
        "ns": argparse.Namespace(a=1, b=[1, 2]), "od": collections.OrderedDict(b=1, a=2),
        "tag_like": {"__tensor__": "not a tensor"}, "bool": True, "none": None,
    }  # fmt: skip
    back, _ = roundtrip(ck)
    assert back["tuple"] == (1, (2.5, "x")) and isinstance(back["tuple"][1], tuple)
    assert back["int_keys"] == {1: "a", 2: "b"}
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["bytes"] == b"\x00\xff" and back["dtype"] is torch.bfloat16 and back["size"] == torch.Size([2, 3])
    assert back["ns"] == argparse.Namespace(a=1, b=[1, 2]) and back["tag_like"] == {"__tensor__": "not a tensor"}
    assert list(back["od"]) == ["b", "a"] and back["bool"] is True and back["none"] is None


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/distckpt-pwned",))


def test_crafted_pickle_is_refused_without_running():
    skeleton, _ = state.split({"hp": _Evil()})
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        state.join(loads(dumps(skeleton), "state.json"), lambda k: None)
    assert not os.path.exists("/tmp/distckpt-pwned")


class Custom:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Custom) and other.x == self.x


def test_custom_types_need_an_explicit_allowlist():
    skeleton, _ = state.split({"hp": Custom(3)})
    with pytest.raises(UnsafeCheckpointError, match="safe_globals"):
        state.join(skeleton, lambda k: None)
    assert state.join(skeleton, lambda k: None, safe_globals=[f"{__name__}.Custom"])["hp"] == Custom(3)


def test_tensor_refs_lists_every_reference_in_order():
    skeleton, tensors = state.split({"a": torch.ones(1), "state_dict": {"w": torch.ones(1)}, "b": [torch.zeros(1)]})
    assert state.tensor_refs(skeleton) == ["extra/0", "model/w", "extra/1"]
    assert set(tensors) == {"extra/0", "model/w", "extra/1"}
