"""Same-host balanced reads by cross-memory attach: a rank copies the chunks that another rank of its host read
straight out of that rank's tensors, with one kernel copy (Linux ``process_vm_readv``, the transport MPI
libraries use for large messages inside a node). Nothing is staged: no segment to allocate and fill, no socket.

The kernel allows the call between two processes of one user when it would allow ``ptrace`` between them
(no Yama module, or ``kernel.yama.ptrace_scope = 0``; a container's seccomp profile may also forbid it).
`Peers` checks that on every pair of ranks of a host before anything is read, by copying a random token out of
each peer; when any rank cannot, every rank knows, and the caller uses broadcasts instead. Reading another
process's memory cannot corrupt it or crash either process: a bad address is an ``EFAULT`` error.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from lightning_distckpt.parallel.comm import Comm

CALL_BYTES = 64 << 20  # at most this many bytes per system call (a call is not interruptible)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@lru_cache(maxsize=1)
def _readv() -> Any:
    """libc's ``process_vm_readv``, or None where there is none (not Linux, or an old libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.c_ulong]  # fmt: skip
    fn.restype = ctypes.c_ssize_t
    return fn


def copy_from(pid: int, remote: int, local: int, nbytes: int) -> None:
    """Copy ``nbytes`` at address ``remote`` of process ``pid`` to address ``local`` of this one (thread-safe;
    the GIL is released during the copy). Raises `OSError` (``EPERM``: not allowed; ``ESRCH``: no such
    process; ``EFAULT``: not mapped there)."""
    fn = _readv()
    if fn is None:
        raise OSError(0, "process_vm_readv is not available on this platform")
    done = 0
    while done < nbytes:
        n = min(CALL_BYTES, nbytes - done)
        mine, theirs = _Iovec(local + done, n), _Iovec(remote + done, n)
        got = fn(pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)
        if got <= 0:
            err = ctypes.get_errno() if got < 0 else 0
            raise OSError(err, f"process_vm_readv from process {pid}: {os.strerror(err) if err else 'no progress'}")
        done += got


def host_key(node: str) -> str:
    """Which processes can attach to each other: those of one node (``node``, as balanced reads group ranks), one
    boot (a host name can repeat across machines) and one PID namespace (a pid means something only inside it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, pid_ns = "", 0
    return f"{node}|{boot}|{pid_ns}"


class Peers:
    """The other ranks of this host, and where each keeps the chunks it reads.

    Collective over ``comm`` (every rank constructs it, with the same ``owned``; ``hosts[r]`` is rank ``r``'s
    `host_key`). Each rank publishes its pid, a random token and the address of a table holding, in the order of
    ``owned[rank]``, where each of its chunks starts in its ``targets``. Each rank then copies every local peer's
    token out of that peer and compares it: ``ok`` is True on every rank only if every rank could. The tables are
    read in `addresses` (after a later collective: a rank fills its table before it enters one).
    """

    def __init__(self, comm: Comm, owned: Sequence[Sequence[Any]], targets: dict[str, Any], hosts: Sequence[str]) -> None:
        self.comm, self.owned = comm, owned
        self.local = [r for r, h in enumerate(hosts) if h == hosts[comm.rank]]
        self._token = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8).copy()
        self._table = np.array([chunk_address(targets, c) for c in owned[comm.rank]], dtype=np.uint64)
        table = self._table.ctypes.data if len(self._table) else 0
        info = (os.getpid(), self._token.ctypes.data, self._token.tobytes(), table)
        everyone = comm.all_gather(info)
        self.pids = {r: everyone[r][0] for r in self.local}
        self._tables = {r: everyone[r][3] for r in self.local}
        error = ""
        for r in self.local:
            if r == comm.rank:
                continue
            got = np.zeros(16, dtype=np.uint8)
            try:
                copy_from(everyone[r][0], everyone[r][1], got.ctypes.data, 16)
            except OSError as e:
                error = f"rank {comm.rank} cannot read rank {r}'s memory: {e}"
                break
            if got.tobytes() != everyone[r][2]:
                error = f"rank {comm.rank} read another process than rank {r} at pid {everyone[r][0]}"
                break
        errors = [e for e in comm.all_gather(error) if e]
        self.ok = not errors
        self.why = errors[0] if errors else ""

    def addresses(self) -> dict[tuple[str, int], tuple[int, int]]:
        """Every local peer's chunks: (key, first row) -> (pid, address), read from the peers' tables."""
        out: dict[tuple[str, int], tuple[int, int]] = {}
        for r in self.local:
            chunks = self.owned[r]
            if r == self.comm.rank or not chunks:
                continue
            table = np.zeros(len(chunks), dtype=np.uint64)
            copy_from(self.pids[r], self._tables[r], table.ctypes.data, table.nbytes)
            for c, address in zip(chunks, table.tolist()):
                out[(c.key, c.start)] = (self.pids[r], int(address))
        return out


def chunk_address(targets: dict[str, Any], c: Any) -> int:
    """Where chunk ``c`` (rows ``c.start`` onwards) of its contiguous CPU target starts in this process's memory."""
    t = targets[c.key]
    assert isinstance(t, torch.Tensor) and t.is_contiguous()
    return t.data_ptr() + (c.start * t.stride(0) * t.element_size() if t.dim() else 0)
