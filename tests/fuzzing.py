"""Fuzzing the documents of a checkpoint: ``python tests/fuzzing.py --seed S --cases N [--work DIR]``.

Each case takes a committed checkpoint (uncompressed, lossless, int8-compressed, incremental, or compact with and
without compression, with non-tensor state of every tagged kind), mutates one of its documents (``manifest.json``,
``metadata.json``, ``state.json``, ``COMMITTED``, or, for a compact checkpoint, the block index at the end of a
data file: "index") at the byte level or the JSON level, or replaces it by a special file, and most of the time
reseals it as a malicious author would (the manifest's size and digest of the document and the marker
recomputed, so the mutation reaches the parsers behind the checksums). Then it runs, on a root that holds the
case beside an intact checkpoint:

* ``load_checkpoint``: success with every tensor's bytes exactly those of the intact checkpoint (and the
  non-tensor state too, unless the mutation was in it), or an error of the package's own hierarchy; a resealed
  index may point a chunk at other verified blocks of the same size in its file (the manifest is the root of trust,
  as for a resealed ``metadata.json``), so there every tensor must have its shape and dtype;
* ``verify``: a report, never an exception;
* ``list_checkpoints``, ``latest``: the intact checkpoint listed as committed; only package errors;
* ``clean_stale(older_than_s=0)`` (dry run, then for real): only package errors, the intact checkpoint kept.

Anything else fails the run: another exception type, a case that takes longer than ``--timeout`` (a hang),
or an allocation beyond 512 MiB over the process's size after warm-up (the address space is capped with
``RLIMIT_AS``, so allocating from a declared size instead of the real one fails loudly). Prints one JSON line
with the outcome counts; exits 1 with the failing case's seed and mutation otherwise. Deterministic per seed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import resource
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_distckpt import CompressionConfig, DistCheckpointError, DistCheckpointIO, load_checkpoint, verify  # noqa: E402
from lightning_distckpt import catalog  # noqa: E402
from lightning_distckpt import ondisk as fmt  # noqa: E402

DOCS = [fmt.MANIFEST, fmt.METADATA, fmt.STATE, fmt.MARKER]
HEADROOM = 512 << 20  # address space allowed above the warmed-up process (the checkpoints are ~100 KiB)


def sample_checkpoint() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "state_dict": {"net.0.weight": torch.randn(64, 48, generator=g), "net.0.bias": torch.randn(64, generator=g),
                       "bn.num_batches_tracked": torch.tensor(5), "mask": torch.rand(8, 8, generator=g) > 0.5,
                       "half": torch.randn(32, 16, generator=g).to(torch.bfloat16)},
        "optimizer_states": [{"state": {"net.0.weight": {"exp_avg": torch.randn(64, 48, generator=g),
                                                         "exp_avg_sq": torch.rand(64, 48, generator=g),
                                                         "step": torch.tensor(3.0)}},
                              "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": ["net.0.weight"]}]}],
        "global_step": 3, "epoch": 0, "loops": {"fit": {"nested": [1, 2.5, None, "x", {"k": (1, 2)}]}},
        "hyper_parameters": {"ns": argparse.Namespace(a=1), "when": datetime.datetime(2026, 1, 2),
                             "od": collections.OrderedDict(b=2), "inf": float("inf"), "raw": b"\x00\xff",
                             "dtype": torch.float16, "size": torch.Size([2, 3]), 7: "int key"},
    }  # fmt: skip


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_of(obj: Any, path: str = "") -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_of(v, f"{path}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{path}[{i}]"))
    return out


def without_tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return "<tensor>"
    if isinstance(obj, dict):
        return {k: without_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(without_tensors(v) for v in obj)
    return obj


# ---- mutations ----------------------------------------------------------------------------------------
VALUES = [0, 1, -1, 2, 255, 2**31, 2**63, 2**64, -(2**63), 10**30, 1e308, -1e-308, 0.5, "", "x", "../x", "..", ".",
          "/etc/passwd", "float32", "int8", "bfloat16", "__0_0.distcp", None, True, False, [], {}, [0], [[0, 0, 0]],
          {"__tensor__": "model/x"}, {"__pickle__": "gASV"}, {"__float__": "nan"}, "\x1b[2J"]  # fmt: skip


def nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += nodes(v, path + (i,))
    return out


def get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(obj: Any, rng: random.Random) -> tuple[Any, str]:
    paths = nodes(obj)
    path = rng.choice(paths[1:] or paths)
    parent, key = (get(obj, path[:-1]), path[-1]) if path else (None, None)
    value = get(obj, path)
    op = rng.choice(["replace", "replace", "number", "number", "delete", "insert", "deep", "duplicate", "type"])
    if parent is None:
        return rng.choice(VALUES), f"root -> {op}"
    if op == "replace":
        parent[key] = rng.choice(VALUES)
    elif op == "number" and type(value) in (int, float):
        parent[key] = rng.choice([value + 1, value - 1, -value, value * 1000, value * 2**40, float(value) + 0.5,
                                  str(value), value // 2 if type(value) is int else value / 3])  # fmt: skip
    elif op == "delete":
        del parent[key]
    elif op == "insert" and isinstance(value, dict):
        value[rng.choice(["x", "f", "o", "b", "c", "size", "dtype", "__dict__", "__tensor__"])] = rng.choice(VALUES)
    elif op == "insert" and isinstance(value, list):
        value.insert(rng.randrange(len(value) + 1), rng.choice(VALUES))
    elif op == "deep":  # spliced into the text after serialization (json.dumps cannot nest that deep)
        parent[key] = f"__DEEP_{rng.choice([150, 1000, 5000, 200_000])}__"
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(value)))
    elif op == "type":
        parent[key] = [value] if rng.random() < 0.5 else {"v": value}
    else:
        parent[key] = rng.choice(VALUES)
    return obj, f"{op} at {list(path)[:8]}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    op = rng.choice(["flip", "truncate", "junk", "empty", "utf8", "nan", "deep-text", "huge-int"])
    if op == "flip" and data:
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), op
    if op == "truncate":
        return data[: rng.randrange(len(data) + 1)], op
    if op == "junk":
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) + data[i:], op
    if op == "utf8":
        return data.replace(b'"', b'"\xff\xfe', 1), op
    if op == "nan":
        return data.replace(b"0", b"NaN", 1).replace(b"1", b"Infinity", 1), op
    if op == "deep-text":
        n = rng.choice([200_000, 2000])
        return b"[" * n + b"]" * n, op
    if op == "huge-int":
        return data.replace(b"1", b"9" * 5000, 1), op
    return b"", op


def reseal(case: Path, name: str) -> None:
    """What a malicious author does: the manifest lists the mutated document's size and digest, the marker
    names the new manifest."""
    if name in (fmt.METADATA, fmt.STATE):
        try:
            manifest = json.loads((case / fmt.MANIFEST).read_bytes())
            data = (case / name).read_bytes()
            manifest["files"][name] = {"size": len(data), "xxh3": fmt.digest(data)}
            (case / fmt.MANIFEST).write_bytes(fmt.dumps(manifest))
        except (ValueError, KeyError, TypeError, OSError):
            return
    if name != fmt.MARKER:
        (case / fmt.MARKER).write_bytes(fmt.marker_bytes((case / fmt.MANIFEST).read_bytes()))


def splice_deep(data: bytes) -> bytes:
    """Replace a ``"__DEEP_<n>__"`` marker (mutate_json's "deep") with ``n`` nested lists."""
    if b'"__DEEP_' not in data:
        return data
    head, rest = data.split(b'"__DEEP_', 1)
    n, tail = rest.split(b'__"', 1)
    return head + b"[" * int(n) + b"0" + b"]" * int(n) + tail


def compact(base: Path) -> bool:
    """Whether ``base`` has compact metadata (version 3): its data files end with their block index."""
    return json.loads((base / fmt.METADATA).read_bytes()).get("version") == fmt.LAYOUT_VERSION


def mutate_index(base: Path, case: Path, name: str, rng: random.Random) -> tuple[str, str]:
    """Mutate the block index at the end of data file ``name`` (a copy, not a link); mostly resealed: the manifest
    then lists the file's digest over the original blocks and the new index, as a malicious author would."""
    data = (base / name).read_bytes()
    n = int.from_bytes(data[-16:-8], "little")
    blocks, doc = data[: len(data) - n - 16], data[len(data) - n - 16 : -16]
    if rng.random() < 0.3:
        new_doc, what = mutate_bytes(doc, rng)
    else:
        obj, what = mutate_json(json.loads(doc), rng)
        new_doc = splice_deep(json.dumps(obj).encode())
    tail = new_doc + len(new_doc).to_bytes(8, "little") + fmt.layout.MAGIC
    if rng.random() < 0.15:  # the trailer itself: a length that points anywhere
        tail = new_doc + rng.choice([0, 1 << 40, len(data), len(new_doc) + 1]).to_bytes(8, "little") + fmt.layout.MAGIC
        what += ", bad length"
    (case / name).unlink()
    (case / name).write_bytes(blocks + tail)
    if rng.random() < 0.8:
        digests = json.loads(doc)["blocks"][2::3]
        manifest = json.loads((case / fmt.MANIFEST).read_bytes())
        manifest["files"][name] = {"size": len(blocks) + len(tail), "xxh3": fmt.blocks_digest(digests + [fmt.digest(tail)])}
        (case / fmt.MANIFEST).write_bytes(fmt.dumps(manifest))
        (case / fmt.MARKER).write_bytes(fmt.marker_bytes((case / fmt.MANIFEST).read_bytes()))
        what += ", resealed"
    return "index", what


def make_case(base: Path, case: Path, rng: random.Random) -> tuple[str, str]:
    """``case``: a copy of ``base`` (data files hard-linked) with one document mutated; (document, mutation)."""
    case.mkdir(parents=True)
    for f in base.iterdir():
        if f.name.endswith(".distcp"):
            os.link(f, case / f.name)
        else:
            shutil.copy(f, case / f.name)
    tails = sorted(f.name for f in base.iterdir() if f.name.endswith(".distcp")) if compact(base) else []
    if tails and rng.random() < 0.3:
        return mutate_index(base, case, rng.choice(tails), rng)
    name = rng.choice(DOCS)
    path = case / name
    r = rng.random()
    if r < 0.04:
        path.unlink()
        os.mkfifo(path)
        return name, "fifo"
    if r < 0.07:
        path.unlink()
        os.symlink("/dev/zero", path)
        return name, "link to /dev/zero"
    if r < 0.09:
        path.unlink()
        os.symlink(base / name, path)
        return name, "link to the intact document"
    data = path.read_bytes()
    if r < 0.35:
        data, what = mutate_bytes(data, rng)
    else:
        obj, what = mutate_json(json.loads(data), rng)
        data = splice_deep(json.dumps(obj).encode())
    path.write_bytes(data)
    if rng.random() < 0.75:
        reseal(case, name)
        what += ", resealed"
    return name, what


# ---- the oracle ---------------------------------------------------------------------------------------
class Failure(AssertionError):
    pass


def allowed(e: BaseException) -> bool:
    return isinstance(e, DistCheckpointError)


def run_case(root: Path, case: Path, doc: str, expected: dict[str, Any], expected_plain: Any) -> str:
    good = root / "good"
    try:
        got = load_checkpoint(str(case))
        outcome = "loaded"
    except Exception as e:  # noqa: BLE001 - the oracle judges it
        if not allowed(e):
            raise Failure(f"load_checkpoint raised {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
        outcome = type(e).__name__
        got = None
    if got is not None:
        stored = {raw_bytes(t) for t in expected.values()}
        for key, t in tensors_of(got).items():
            if doc == fmt.STATE:  # a resealed state.json may put any stored tensor anywhere, but only those
                if raw_bytes(t) not in stored:
                    raise Failure(f"load_checkpoint succeeded but tensor {key} holds bytes the checkpoint never stored")
            elif doc == "index":  # a resealed index may send a chunk to other verified blocks of its size in the file
                if t.shape != expected[key].shape or t.dtype != expected[key].dtype:
                    raise Failure(f"load_checkpoint succeeded but tensor {key} has another shape or dtype")
            elif raw_bytes(t) != raw_bytes(expected[key]):
                raise Failure(f"load_checkpoint succeeded but tensor {key} differs from the checkpoint's bytes")
        if doc != fmt.STATE and (without_tensors(got) != expected_plain or set(tensors_of(got)) != set(expected)):
            raise Failure("load_checkpoint succeeded but the non-tensor state differs")
    try:
        verify(str(case))
    except Exception as e:  # noqa: BLE001
        raise Failure(f"verify raised {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
    for what, fn in (("list_checkpoints", lambda: catalog.list_checkpoints(str(root))),
                     ("latest", lambda: catalog.latest([str(root)])),
                     ("clean_stale dry run", lambda: catalog.clean_stale(str(root), older_than_s=0, dry_run=True)),
                     ("clean_stale", lambda: catalog.clean_stale(str(root), older_than_s=0))):  # fmt: skip
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001
            if not allowed(e):
                raise Failure(f"{what} raised {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
            continue
        if what == "list_checkpoints" and not any(c.name == "good" and c.committed for c in result):
            raise Failure("the intact checkpoint beside the case is not listed as committed")
    if not (good / fmt.MARKER).exists() or not verify(str(good)).ok:
        raise Failure("the intact checkpoint beside the case was damaged")
    return outcome


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds one case may take")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="distckpt-fuzz-"))
    ck = sample_checkpoint()
    bases = []
    for name, compression, compact_md in (("plain", None, False), ("lossless", "lossless", False),
                                          ("int8", CompressionConfig(preset="int8", min_elements=16), False),
                                          ("compact", None, True), ("compact-lossless", "lossless", True)):  # fmt: skip
        base = work / "bases" / name
        DistCheckpointIO(compression=compression, compact_metadata=compact_md).save_checkpoint(ck, str(base))
        assert compact(base) == compact_md, f"{name}: metadata version"
        loaded = load_checkpoint(str(base))  # what an intact load gives (int8 is lossy)
        bases.append((base, tensors_of(loaded), without_tensors(loaded)))
        verify(str(base))
        catalog.list_checkpoints(str(work / "bases"))
    catalog.clean_stale(str(work / "bases"), older_than_s=0, dry_run=True)
    # an incremental checkpoint (format 2): its documents name block-store files and borrowed blocks of an earlier save
    io = DistCheckpointIO(incremental=True)
    io.save_checkpoint(ck, str(work / "incremental" / "first"))
    changed = {**ck, "global_step": 8, "state_dict": {**ck["state_dict"], "net.0.bias": ck["state_dict"]["net.0.bias"] + 1}}
    io.save_checkpoint(changed, str(work / "incremental" / "inc"))
    assert io.stats.last_save.bytes_borrowed > 0
    loaded = load_checkpoint(str(work / "incremental" / "inc"))
    bases.append((work / "incremental" / "inc", tensors_of(loaded), without_tensors(loaded)))

    status = Path("/proc/self/status").read_text()
    vm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))

    current: dict[str, Any] = {"case": None, "start": 0.0}

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            c = current["case"]
            if c is not None and time.monotonic() - current["start"] > args.timeout:
                print(f"FUZZ HANG: case {c} ran for more than {args.timeout} s", file=sys.stderr, flush=True)
                os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    counts: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    for i in range(args.cases):
        rng = random.Random(f"{args.seed}:{i}")
        base, expected, plain = bases[i % len(bases)]
        root = work / "cases" / f"{i:06d}"
        shutil.copytree(base, root / "good", copy_function=os.link)
        if (base.parent / fmt.BLOCKS).is_dir():  # the block store the incremental checkpoint's files lie in
            shutil.copytree(base.parent / fmt.BLOCKS, root / fmt.BLOCKS, copy_function=os.link)
        doc, what = make_case(base, root / "case", rng)
        current.update(case=f"seed {args.seed} #{i} ({base.name}, {doc}: {what})", start=time.monotonic())
        try:
            outcome = run_case(root, root / "case", doc, expected, plain)
        except (Failure, MemoryError, RecursionError) as e:
            print(f"FUZZ FAILURE in case {current['case']}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return 1
        current["case"] = None
        counts[f"{doc}: {outcome}"] += 1
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"seed": args.seed, "cases": args.cases, "seconds": round(time.monotonic() - start, 1),
                      "outcomes": dict(sorted(counts.items()))}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
