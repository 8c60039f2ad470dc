"""``distckpt info CKPT``: what a checkpoint holds: manifest, tensors (shape, dtype, chunks, codec), state keys."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_distckpt.cli.common import EXIT_OK, out, printable, size, storage

RAW = "raw"  #: the block codec column of blocks stored as they are


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("info", parents=[common], help="tensors, state keys and manifest of a checkpoint",
                       description="Show CKPT's manifest (step, epoch, world size, strategy, compression, versions), "
                                   "its non-tensor state keys and every tensor: shape, dtype, chunks, stored size "
                                   "and codec. Reads the documents (and, for compact metadata, the block indexes at "
                                   "the end of the data files), not the tensor bytes.")  # fmt: skip
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint directory (or URL)")
    s.set_defaults(fn=run)


def tensor_paths(skeleton: Any) -> dict[str, str]:
    """Where each tensor reference sits in the checkpoint dict, as a path (``callbacks/EMA/shadow[0]``), read
    from the JSON skeleton without importing torch. ``extra/N`` keys are only numbered; this names them."""
    paths: dict[str, str] = {}

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, dict):
            if len(obj) == 1:
                (tag, val), = obj.items()
                if tag == "__tensor__" and isinstance(val, str):
                    paths.setdefault(val, path or "/")
                    return
                if tag == "__tuple__" and isinstance(val, list):
                    return walk(val, path)
                if tag == "__dict__" and isinstance(val, list):
                    for item in val:
                        if isinstance(item, list) and len(item) == 2:
                            walk(item[1], f"{path}/{item[0]!r}" if path else repr(item[0]))
                    return
            for k, v in obj.items():
                walk(v, f"{path}/{k}" if path else k)

    walk(skeleton, "")
    return paths


def ownership(ckpt: Any) -> dict[str, Any]:
    """Stored tensor bytes the checkpoint owns (wrote itself) and borrows (references in files of earlier saves),
    and from which checkpoints, from its documents alone."""
    from lightning_distckpt import ondisk

    m = ckpt.manifest
    owned = borrowed = 0
    by_id: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    if ckpt.metadata.layout is not None:  # compact: never incremental; it owns its data files (index tails included)
        owned = sum(m.files[name]["size"] for _, name in ckpt.metadata.layout.all_files())
    for loc in ckpt.metadata.storage_data.values() if ckpt.metadata.layout is None else ():
        for (key, offset), b in zip(loc.places(), loc.blocks):
            parsed = ondisk.parse_blocks_key(key)
            if parsed is None or parsed[0] == m.data_id:
                owned += b.stored
            elif (key, offset) not in seen:  # a block borrowed by several chunks counts once
                seen.add((key, offset))
                borrowed += b.stored
                by_id[parsed[0]] = by_id.get(parsed[0], 0) + b.stored
    return {"incremental": bool(m.data_id), "data_id": m.data_id or None, "owned_bytes": owned, "borrowed_bytes": borrowed,
            "borrowed_from": [{"data_id": i, "checkpoint": m.borrows.get(i, ""), "bytes": n} for i, n in sorted(by_id.items())]}  # fmt: skip


def ownership_lines(d: dict[str, Any]) -> list[str]:
    if not d["incremental"]:
        return ["  data: self-contained (every block in the checkpoint directory)"]
    lines = [f"  data: owns {size(d['owned_bytes'])} (block directory {d['data_id']}), borrows "
             f"{size(d['borrowed_bytes'])}" + (" from:" if d["borrowed_from"] else "")]  # fmt: skip
    for b in d["borrowed_from"]:
        lines.append(f"    {size(b['bytes']):>10}  from {printable(b['checkpoint'])} (block directory {b['data_id']})")
    return lines


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog
    from lightning_distckpt.catalog import compact  # noqa: F401 - catalog.compact below
    from lightning_distckpt.transforms.specs import PART

    ckpt = catalog.open_checkpoint(catalog.source_of(args.ckpt, storage(args)), check_sizes=False)
    md = ckpt.metadata  # parsed metadata.json: plain Python, no torch
    stored: dict[str, int] = {}
    files: dict[str, set[str]] = {}
    parts: dict[str, dict[str, int]] = {}  # tensor -> stored part -> its number of chunks
    block_codecs: dict[str, set[str]] = {}
    if md.layout is not None:  # compact (metadata version 3): chunks and their bytes from the data files' indexes
        for key, (count, nbytes, names) in catalog.compact.stored_by_tensor(ckpt).items():
            base = key.split(PART)[0]
            parts.setdefault(base, {})[key] = count
            stored[base] = stored.get(base, 0) + nbytes
            files.setdefault(base, set()).update(names)
            block_codecs.setdefault(base, set()).add(md.layout.codec or RAW)
    for key, t in md.tensors.items() if md.layout is None else ():
        base = key.split(PART)[0]
        parts.setdefault(base, {})[key] = len(t.chunks)
        for c in t.chunks:
            stored[base] = stored.get(base, 0) + c.location.stored
            files.setdefault(base, set()).add(c.location.file)
            block_codecs.setdefault(base, set()).add(c.location.codec or RAW)
    shown = {k: (list(t.size), t.dtype) for k, t in md.tensors.items() if PART not in k}
    shown.update({k: (list(e["size"]), e["dtype"]) for k, e in md.encodings.items()})  # as the user sees them
    paths = tensor_paths(ckpt.skeleton)
    tensors = []
    for key, (shape, dtype) in sorted(shown.items()):
        e = md.encodings.get(key)
        tensors.append({"name": key, "shape": shape, "dtype": dtype, "chunks": max(parts.get(key, {"": 0}).values()),
                        "files": sorted(files.get(key, ())), "stored_bytes": stored.get(key, 0),
                        "tensor_codec": e["codec"] if e else None,
                        "block_codec": "+".join(sorted(block_codecs.get(key, {RAW}))), "path": paths.get(key)})  # fmt: skip
    state_keys = sorted(ckpt.skeleton) if isinstance(ckpt.skeleton, dict) else []
    info = {"url": ckpt.url, "manifest": ckpt.manifest.to_json(), "state_keys": state_keys, "tensors": tensors,
            "data": ownership(ckpt), "metadata_form": "compact" if md.layout is not None else "listed"}  # fmt: skip

    def text() -> str:
        m = ckpt.manifest
        used = sorted({t["tensor_codec"] for t in tensors if t["tensor_codec"]})
        blocks = sorted({c for t in tensors for c in t["block_codec"].split("+")})
        preset = (m.compression or {}).get("preset") if m.compression else None
        lines = [f"{printable(ckpt.url)}", f"  step {m.global_step}  epoch {m.epoch}  world size {m.world_size}  strategy {m.strategy}",
                 f"  {len(m.files)} files, {size(sum(f['size'] for f in m.files.values()))}; tensors {size(m.tensor_bytes)} raw",
                 f"  compression: {preset or ('lossless' if blocks not in ([RAW], []) else 'none')}; tensor codecs used: "
                 f"{', '.join(used) or 'none (every tensor exact)'}; block codecs: {', '.join(blocks) or '-'}",
                 f"  versions: {', '.join(f'{k} {v}' for k, v in sorted(m.versions.items()))}",
                 *ownership_lines(info["data"]),
                 "  metadata: " + ("compact (each tensor by its sharding rule; block indexes at the end of the data files)"
                                   if md.layout is not None else "listed (every chunk in metadata.json)"),
                 f"  non-tensor state: {', '.join(printable(k) for k in state_keys)}", "",
                 f"  {'TENSOR':<40} {'SHAPE':<16} {'DTYPE':<9} {'CHUNKS':>6} {'STORED':>10}  {'CODEC (tensor/block)':<24} HOLDS"]  # fmt: skip
        for t in tensors:
            codec = f"{t['tensor_codec'] or 'exact'}/{t['block_codec']}"
            holds = printable(t["path"]) if t["name"].startswith("extra/") and t["path"] else ""
            lines.append(f"  {printable(t['name']):<40} {str(t['shape']):<16} {t['dtype']:<9} {t['chunks']:>6} "
                         f"{size(t['stored_bytes']):>10}  {printable(codec):<24} {holds}".rstrip())  # fmt: skip
        return "\n".join(lines)

    out(args, info, text)
    return EXIT_OK
