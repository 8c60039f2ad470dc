"""A training run for the multi-process tests: ``torchrun --nproc_per_node=N train.py --strategy ddp ...``.

Saves with DistCheckpointIO + DistCheckpoint, optionally resumes, and writes JSON digests of the state
at save time (``--digest-dir``/saved-<step>.json) and at the end (``--final-digest``; with
``--resume`` and ``--max-steps`` equal to the checkpoint's step, that is the restored state), so that tests
can compare states bitwise across strategies and world sizes.
"""

from __future__ import annotations

import argparse
import os
import time
import sys
from typing import Any

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Net, accelerator, data, end_process, full_state_digest, strategy, write_json  # noqa: E402

from lightning_distckpt import DistCheckpoint, DistCheckpointIO, HdfsOptions  # noqa: E402


class Probe(L.Callback):
    """Records state digests: after each save (rank 0 writes) and at train start after a restore."""

    def __init__(self, out: str | None, digests: bool = True) -> None:
        self.out = out
        self.digests = digests  # False: only write started.json (timing runs)
        self.restored = False
        self.loaded_loops: Any = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # called on every rank inside Trainer.save_checkpoint, before the state is written
        if not self.out or not self.digests:
            return
        digest = full_state_digest(trainer)
        digest.update({"loops": checkpoint["loops"], "epoch": checkpoint["epoch"]})
        if trainer.is_global_zero:
            write_json(os.path.join(self.out, f"saved-{trainer.global_step}.json"), digest)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.restored = True
        self.loaded_loops = {"loops": checkpoint["loops"], "epoch": checkpoint["epoch"]}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a restore: what was restored, then a marker that training runs (the crash tests wait for it)
        if not self.out:
            return
        if self.restored and self.digests:
            digest = full_state_digest(trainer)
            digest.update(self.loaded_loops)
            if trainer.is_global_zero:
                write_json(os.path.join(self.out, f"restored-{trainer.global_step}.json"), digest)
        if trainer.is_global_zero:
            write_json(os.path.join(self.out, "started.json"), {"step": trainer.global_step, "pid": os.getpid(),
                                                                "time": time.time()})



def fault_injection() -> None:
    """Deterministic faults for the tests, without hooks in the package.

    ``DISTCKPT_TEST_CRASH=<rank>:<LocalStore method>:<n>``: that rank SIGKILLs itself at the n-th call.
    ``DISTCKPT_TEST_PAUSE=<rank>:<HdfsStore method>:<n>:<dir>``: at the n-th call that rank creates
    ``<dir>/paused`` and waits for ``<dir>/resume`` (the test stops DataNodes meanwhile). For
    ``open_write`` the pause happens after the first block written to that stream (its pipeline is open).
    ``DISTCKPT_TEST_HIDE=<rank>:<name>``: that rank's local directory listings leave out entries named
    ``<name>`` (ranks see different listings, as with a lagging replica or an eventually consistent store).
    ``DISTCKPT_TEST_FREE_MEMORY=<rank>:<bytes>``: that rank sees only ``<bytes>`` of free host memory.
    """
    import signal
    import time

    rank_here = os.environ.get("LOCAL_RANK", "0")
    hide = os.environ.get("DISTCKPT_TEST_HIDE")
    if hide and hide.split(":", 1)[0] == rank_here:
        from lightning_distckpt.storage.local import LocalStore

        hidden, listdir = hide.split(":", 1)[1], LocalStore.listdir
        LocalStore.listdir = lambda self, path: [e for e in listdir(self, path) if e.name != hidden]
    free = os.environ.get("DISTCKPT_TEST_FREE_MEMORY")
    if free and free.split(":", 1)[0] == rank_here:
        import psutil

        real, nbytes = psutil.virtual_memory, int(free.split(":", 1)[1])
        psutil.virtual_memory = lambda: real()._replace(available=nbytes)
    crash = os.environ.get("DISTCKPT_TEST_CRASH")
    if crash:
        rank, method, n = crash.split(":")
        if rank == rank_here:
            from lightning_distckpt.storage.local import LocalStore

            _wrap(LocalStore, method, int(n), lambda: os.kill(os.getpid(), signal.SIGKILL))
    pause = os.environ.get("DISTCKPT_TEST_PAUSE")
    if pause:
        rank, method, n, folder = pause.split(":", 3)
        if rank == rank_here:
            from lightning_distckpt.storage.fsspec_store import FsspecStore
            from lightning_distckpt.storage.hdfs import HdfsStore

            def wait() -> None:
                open(os.path.join(folder, "paused"), "w").close()
                while not os.path.exists(os.path.join(folder, "resume")):
                    time.sleep(0.05)

            if method == "open_write":
                original = HdfsStore.open_write
                calls = {"n": 0}

                def open_write(self: Any, path: str) -> Any:
                    stream = original(self, path)
                    calls["n"] += 1
                    if calls["n"] != int(n):
                        return stream
                    write, written = stream.write, {"paused": False}

                    def paused_write(data: Any) -> Any:
                        out = write(data)
                        if not written["paused"]:
                            written["paused"] = True
                            wait()
                        return out

                    stream.write = paused_write
                    return stream

                HdfsStore.open_write = open_write
            else:
                _wrap(HdfsStore if method in vars(HdfsStore) else FsspecStore, method, int(n), wait)


def _wrap(cls: type, method: str, n: int, action: Any) -> None:
    original = getattr(cls, method)
    calls = {"n": 0}

    def wrapped(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return original(self, *a, **k)

    setattr(cls, method, wrapped)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="ddp", choices=["single", "ddp", "fsdp", "mp"])
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--save-last", action="store_true", help="DistCheckpoint(save_last=True): overwrite 'last' too")
    p.add_argument("--resume", default=None, help='"last", a checkpoint URL, or nothing')
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--digest-dir", default=None)
    p.add_argument("--final-digest", default=None, help="write the full state digest at the end of fit here")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--devices", type=int, default=None, help="launch with Lightning's launcher instead of torchrun")
    p.add_argument("--replicas", nargs="*", default=None)
    p.add_argument("--compression", default=None)
    p.add_argument("--incremental", action="store_true", help="DistCheckpointIO(incremental=True)")
    p.add_argument("--freeze-first", action="store_true", help="freeze the first layer (unchanged between saves)")
    p.add_argument("--timing-only", action="store_true", help="no state digests (they take seconds at 1 GiB)")
    p.add_argument("--stats", default=None, help="write DistCheckpointIO's load statistics here (rank 0)")
    p.add_argument("--hdfs-user", default=None)
    p.add_argument("--node-local", action="store_true", help="DistCheckpointIO(node_local=True)")
    p.add_argument("--same-host-reads", default="auto", choices=["auto", "attach", "segments", "broadcast"],
                   help="DistCheckpointIO(same_host_reads=...)")
    p.add_argument("--undumpable-rank", type=int, default=None,
                   help="this rank makes itself non-dumpable (prctl): without CAP_SYS_PTRACE its peers may not read its memory")
    p.add_argument("--hdfs-replication", type=int, default=None)
    p.add_argument("--compact-metadata", default=None, choices=["on", "off"],
                   help="DistCheckpointIO(compact_metadata=True/False); default: the plugin's default (None)")
    p.add_argument("--stock-save", default=None, help="train with stock Lightning (no plugin) and save this .ckpt file")
    args = p.parse_args()

    torch.manual_seed(0)
    world = args.devices or int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("DISTCKPT_TEST_WORLD", str(world))
    fault_injection()
    if args.undumpable_rank is not None and int(os.environ.get("RANK", "0")) == args.undumpable_rank:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    model = Net(width=args.width)
    if args.freeze_first:
        model.net[0].requires_grad_(False)
    if args.digest_dir:
        os.makedirs(args.digest_dir, exist_ok=True)
    probe = Probe(args.digest_dir, digests=not args.timing_only)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun --nnodes=K: K nodes of `local` processes
    trainer = L.Trainer(
        accelerator=accelerator(),
        devices=local if args.strategy != "single" else 1,
        num_nodes=world // local if args.strategy != "single" else 1,
        strategy=strategy(args.strategy),
        max_steps=args.max_steps,
        plugins=[] if args.stock_save else [
            DistCheckpointIO(async_save=args.async_save, compression=args.compression,
                             incremental=args.incremental,
                             hdfs=HdfsOptions(user=args.hdfs_user, replication=args.hdfs_replication),
                             node_local=args.node_local, same_host_reads=args.same_host_reads,
                             compact_metadata=None if args.compact_metadata is None else args.compact_metadata == "on")],
        callbacks=([] if args.stock_save else [
            DistCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=args.save_every, keep_last=args.keep_last,
                           replicas=args.replicas, save_last=True if args.save_last else None)]) + [probe],
        enable_checkpointing=not args.stock_save,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=True,
    )
    trainer.fit(model, data(), ckpt_path=args.resume)
    if args.stock_save:
        trainer.save_checkpoint(args.stock_save)  # Lightning's own format; the probe writes saved-<step>.json
        return
    io = trainer.strategy.checkpoint_io
    if args.stats and trainer.is_global_zero:
        cb = trainer.checkpoint_callback
        write_json(args.stats, {"loaded_from": io.stats.loaded_from, "fallbacks": io.stats.load_fallbacks,
                                "bytes_by_source": io.stats.load_bytes_read, "replication": cb.replication,
                                "same_host": io.stats.load_same_host,
                                "bytes_received": io.stats.load_bytes_broadcast})
    if args.final_digest:
        digest = full_state_digest(trainer)
        if probe.loaded_loops is not None:
            digest.update(probe.loaded_loops)  # what the restore read (no step ran if max_steps was reached)
        if trainer.is_global_zero:
            write_json(args.final_digest, digest)


if __name__ == "__main__":
    main()
    end_process()
