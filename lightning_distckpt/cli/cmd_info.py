"""``distckpt info CKPT``: what a checkpoint holds: manifest, tensors (shape, dtype, chunks, codec), state keys."""

from __future__ import annotations

import argparse

from lightning_distckpt.cli.common import EXIT_OK, out, size, storage


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("info", parents=[common], help="tensors, state keys and manifest of a checkpoint",
                       description="Show CKPT's manifest (step, epoch, world size, strategy, compression, versions), "
                                   "its non-tensor state keys and every tensor: shape, dtype, chunks, stored size "
                                   "and codec. Reads the documents only, not the tensor bytes.")  # fmt: skip
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint directory (or URL)")
    s.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt import catalog, ondisk
    from lightning_distckpt.engine.loading import saved_tensors
    from lightning_distckpt.transforms import PART

    ckpt = catalog.open_checkpoint(catalog.source_of(args.ckpt, storage(args)), check_sizes=False)
    encodings = (ckpt.metadata.planner_data or {}).get("encodings", {})
    stored: dict[str, int] = {}
    chunks: dict[str, list[str]] = {}
    for index, loc in ckpt.metadata.storage_data.items():
        base = index.fqn.split(PART)[0]
        stored[base] = stored.get(base, 0) + loc.stored
        chunks.setdefault(base, []).append(loc.file)
    tensors = []
    for key, (shape, dtype) in sorted(saved_tensors(ckpt.metadata).items()):
        files = sorted(set(chunks.get(key, [])))
        tensors.append({"name": key, "shape": list(shape), "dtype": ondisk.dtype_name(dtype),
                        "chunks": len(chunks.get(key, [])), "files": files, "stored_bytes": stored.get(key, 0),
                        "codec": encodings.get(key, {}).get("codec")})  # fmt: skip
    state_keys = sorted(ckpt.skeleton) if isinstance(ckpt.skeleton, dict) else []
    info = {"url": ckpt.url, "manifest": ckpt.manifest.to_json(), "state_keys": state_keys, "tensors": tensors}

    def text() -> str:
        m = ckpt.manifest
        lines = [f"{ckpt.url}", f"  step {m.global_step}  epoch {m.epoch}  world size {m.world_size}  strategy {m.strategy}",
                 f"  {len(m.files)} files, {size(sum(f['size'] for f in m.files.values()))}; tensors {size(m.tensor_bytes)} raw",
                 f"  compression: {m.compression or 'none'}", f"  versions: {m.versions}",
                 f"  non-tensor state: {', '.join(state_keys)}", "",
                 f"  {'TENSOR':<48} {'SHAPE':<18} {'DTYPE':<9} {'CHUNKS':>6} {'STORED':>10} CODEC"]  # fmt: skip
        for t in tensors:
            lines.append(f"  {t['name']:<48} {str(t['shape']):<18} {t['dtype']:<9} {t['chunks']:>6} "
                         f"{size(t['stored_bytes']):>10} {t['codec'] or ''}")  # fmt: skip
        return "\n".join(lines)

    out(args, info, text)
    return EXIT_OK
