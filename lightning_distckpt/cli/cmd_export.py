"""``distckpt export CKPT OUT``: one file (or safetensors shards) loadable without this package."""

from __future__ import annotations

import argparse
import os
import time

from lightning_distckpt.cli.common import EXIT_OK, UsageError, basename, out, progress, size, storage

#: output suffix -> format (``--format`` may be omitted for these)
SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".ckpt": "torch", ".bin": "torch"}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("export", parents=[common], help="one file loadable without this package",
                       description="Write CKPT as one plain file: a torch.save file (.pt, .pth, .ckpt) that "
                                   "Lightning resumes from without this package, or model weights only "
                                   "(--weights-only, safetensors, --dtype/--prune/--quantize). The format follows "
                                   "OUT's suffix unless --format is given; an existing OUT is kept unless --force.")  # fmt: skip
    s.add_argument("ckpt", metavar="CKPT", help="committed checkpoint to export (path or URL)")
    s.add_argument("out", metavar="OUT",
                   help="local output file (a directory with --shard-size-mb); its suffix picks the format")  # fmt: skip
    s.add_argument("--format", choices=["torch", "safetensors"], default=None,
                   help="output format (default: from OUT's suffix: .safetensors, or .pt/.pth/.ckpt/.bin for torch)")  # fmt: skip
    s.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    s.add_argument("--weights-only", action="store_true",
                   help="torch format: model weights only ({'state_dict': ...}, loads with weights_only=True)")  # fmt: skip
    s.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="cast floating-point weights to this dtype")  # fmt: skip
    s.add_argument("--prune", type=float, default=None, metavar="FRACTION",
                   help="zero this fraction (0..1) of each large weight matrix, smallest magnitudes first")  # fmt: skip
    s.add_argument("--prune-threshold", type=float, default=None, metavar="X",
                   help="zero weights with |w| < X in each large weight matrix")  # fmt: skip
    s.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 per-row quantization of large weight matrices (adds NAME.scale tensors)")  # fmt: skip
    s.add_argument("--shard-size-mb", type=int, default=None, metavar="MIB",
                   help="safetensors: split into shards of at most MIB MiB in directory OUT, with an index")  # fmt: skip
    s.set_defaults(fn=run)


def output_format(out_path: str, given: str | None, sharded: bool) -> str:
    """The format ``export`` writes: ``given``, else the one ``out_path``'s suffix names; a mismatch between the
    two, or no way to tell, is a usage error (exit 2)."""
    if sharded:
        if given not in (None, "safetensors"):
            raise UsageError("--shard-size-mb writes safetensors shards; drop --format torch")
        return "safetensors"
    suffix = os.path.splitext(out_path)[1].lower()
    implied = SUFFIXES.get(suffix)
    if given and implied and given != implied:
        raise UsageError(f"{out_path}: the suffix {suffix} means {implied}, but --format {given} was given")
    if not (given or implied):
        raise UsageError(f"{out_path}: cannot tell the format from the suffix {suffix or '(none)'}; "
                         f"name it .safetensors or .pt/.pth/.ckpt, or pass --format")  # fmt: skip
    return given or implied  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from lightning_distckpt.errors import DestinationExistsError

    if args.prune is not None and not 0 <= args.prune <= 1:
        raise UsageError(f"--prune is a fraction between 0 and 1, got {args.prune}")
    if args.prune is not None and args.prune_threshold is not None:
        raise UsageError("give --prune FRACTION or --prune-threshold X, not both")
    if args.shard_size_mb is not None and args.shard_size_mb <= 0:
        raise UsageError(f"--shard-size-mb must be positive, got {args.shard_size_mb}")
    sharded = args.shard_size_mb is not None
    fmt = output_format(args.out, args.format, sharded)
    if "://" in args.out:
        raise UsageError(f"{args.out}: export writes a local file; export locally, then copy it")
    if os.path.isdir(args.out) and not sharded:
        raise DestinationExistsError(f"{args.out}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{args.out}: its directory {parent} does not exist (or is not a directory)")
    from lightning_distckpt.catalog import source_of
    from lightning_distckpt.catalog.replication import within

    if within(source_of(args.out), source_of(args.ckpt, storage(args))):
        raise DestinationExistsError(f"{args.out}: lies inside the checkpoint it exports ({args.ckpt}); "
                                     "write it elsewhere (removing the checkpoint would remove it too)")
    empty_dir = sharded and os.path.isdir(args.out) and not os.listdir(args.out)
    if os.path.lexists(args.out) and not empty_dir and not args.force:
        raise DestinationExistsError(f"{args.out}: already exists; pass --force to overwrite")

    import torch  # only export needs torch

    from lightning_distckpt.ops.export import export_checkpoint, export_sharded_safetensors, export_size

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    config = storage(args)
    lossy = args.prune is not None or args.prune_threshold is not None or args.quantize is not None
    weights_only = args.weights_only or fmt == "safetensors" or lossy
    t0 = time.perf_counter()
    with progress(args, export_size(args.ckpt, config, weights_only), f"export {basename(args.ckpt)}") as advance:
        if sharded:
            files = export_sharded_safetensors(args.ckpt, args.out, args.shard_size_mb << 20, dtype=dtype,
                                               prune=args.prune, prune_threshold=args.prune_threshold,
                                               quantize=args.quantize, storage_options=config, progress=advance)  # fmt: skip
        else:
            files = [export_checkpoint(args.ckpt, args.out, weights_only=args.weights_only, dtype=dtype, format=fmt,
                                       prune=args.prune, prune_threshold=args.prune_threshold, quantize=args.quantize,
                                       storage_options=config, progress=advance)]  # fmt: skip
    sizes = {f: os.path.getsize(f) for f in files}
    out(args, {"format": fmt, "files": sizes, "seconds": time.perf_counter() - t0},
        lambda: "\n".join(f"wrote {f} ({size(s)}, {fmt})" for f, s in sizes.items()))
    return EXIT_OK
