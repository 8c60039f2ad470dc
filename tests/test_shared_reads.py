"""Same-host balanced reads. By cross-memory attach (``same_host_reads="auto"``, the default on one host): DDP
resumes exactly with each rank's half copied out of the other rank's memory, and a rank whose memory may not be
read makes every rank fall back to broadcasts. Through shared-memory segments (``same_host_reads="segments"``):
DDP resumes exactly with the bytes shared through /dev/shm-style segments (no broadcast), segments never outlive
a load (also when it fails), stale ones of dead processes are removed, and a rank that cannot map shared memory
makes every rank fall back to broadcasts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORKLOADS, env, free_port, load_json, run, torchrun_cmd, train
from test_distributed import assert_same_state

from lightning_distckpt import import_checkpoint, list_checkpoints
from lightning_distckpt.engine import attach
from lightning_distckpt.engine import balanced_read as br
from lightning_distckpt.parallel.comm import Comm


def leftovers(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith("distckpt-")] if d.exists() else []


@pytest.mark.slow
def test_ddp_resume_shares_bytes_through_shared_memory_and_leaves_nothing(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setenv("DISTCKPT_SHM_DIR", str(shm))
    ck = tmp_path / "ck"
    train("ddp", 2, ck, "--max-steps", 4, "--save-every", 2, "--keep-last", 2, "--digest-dir", tmp_path, "--width", 128)
    train("ddp", 2, ck, "--max-steps", 4, "--resume", "last", "--final-digest", tmp_path / "restored.json",
          "--stats", tmp_path / "stats.json", "--width", 128, "--same-host-reads", "segments")
    assert_same_state(load_json(tmp_path / "saved-4.json"), load_json(tmp_path / "restored.json"))
    stats = load_json(tmp_path / "stats.json")
    assert stats["same_host"] == "segments" and stats["bytes_received"] > 0
    assert leftovers(shm) == []

    # a load that fails halfway (every data file of the newest checkpoint corrupted): no segment survives,
    # and the run falls back to the previous checkpoint, exactly
    newest = list_checkpoints(str(ck))[-1].url
    for f in os.listdir(newest):
        if f.endswith(".distcp"):
            data = bytearray(open(os.path.join(newest, f), "rb").read())
            data[len(data) // 2] ^= 0xFF
            open(os.path.join(newest, f), "wb").write(bytes(data))
    train("ddp", 2, ck, "--max-steps", 2, "--resume", "last", "--final-digest", tmp_path / "older.json",
          "--stats", tmp_path / "stats2.json", "--width", 128, "--same-host-reads", "segments")
    assert load_json(tmp_path / "stats2.json")["loaded_from"].endswith("step=2")
    assert_same_state(load_json(tmp_path / "saved-2.json"), load_json(tmp_path / "older.json"))
    assert leftovers(shm) == []


@pytest.mark.slow
def test_ddp_resume_attaches_to_the_peer_and_every_refusal_falls_back_to_broadcasts(tmp_path):
    ck = tmp_path / "ck"
    train("ddp", 2, ck, "--max-steps", 2, "--save-every", 2, "--digest-dir", tmp_path, "--width", 128)

    def resume(name: str, *args: str, prefix: tuple[str, ...] = (), **env: str) -> tuple[dict, str]:
        cmd = torchrun_cmd(WORKLOADS / "train.py", 2, "--strategy", "ddp", "--ckpt-dir", ck, "--max-steps", 2, "--resume",
                           "last", "--final-digest", tmp_path / f"{name}.json", "--stats", tmp_path / f"{name}-stats.json",
                           "--width", 128, *args)  # fmt: skip
        proc = run([*prefix, *cmd], **env)
        assert_same_state(load_json(tmp_path / "saved-2.json"), load_json(tmp_path / f"{name}.json"))
        return load_json(tmp_path / f"{name}-stats.json"), proc.stdout + proc.stderr

    # the default on one host: each rank copies the other rank's half straight out of its memory
    stats, _ = resume("attached")
    assert stats["same_host"] == "attach" and stats["bytes_received"] > 0
    # the kernel refuses: rank 1 is not dumpable and no process holds CAP_SYS_PTRACE (setpriv drops it)
    stats, out = resume("refused", "--same-host-reads", "attach", "--undumpable-rank", "1",
                        prefix=("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"))
    assert stats["same_host"] == "broadcast" and stats["bytes_received"] > 0
    assert "balanced reads fall back to broadcasts: rank 0 cannot read rank 1's memory" in out, out[-3000:]
    # no shared memory to map segments in
    stats, _ = resume("no-shm", "--same-host-reads", "segments", DISTCKPT_SHM_DIR=str(tmp_path / "does-not-exist"))
    assert stats["same_host"] == "broadcast" and stats["bytes_received"] > 0


def test_same_host_reads_names_its_choices():
    from lightning_distckpt import DistCheckpointIO

    with pytest.raises(ValueError, match="same_host_reads='tcp': must be one of auto, attach, segments, broadcast"):
        DistCheckpointIO(same_host_reads="tcp")  # type: ignore[arg-type]


def test_copy_from_reads_a_process_and_names_what_went_wrong():
    import numpy as np

    src, dst = np.arange(1000, dtype=np.int64), np.zeros(1000, dtype=np.int64)
    attach.copy_from(os.getpid(), src.ctypes.data, dst.ctypes.data, src.nbytes)
    assert (src == dst).all()
    with pytest.raises(OSError, match="Bad address"):
        attach.copy_from(os.getpid(), 8, dst.ctypes.data, 8)  # nothing is mapped at address 8
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with pytest.raises(OSError, match="No such process"):
        attach.copy_from(int(dead.stdout), src.ctypes.data, dst.ctypes.data, 8)


def test_segments_map_views_and_are_unlinked_at_once(tmp_path):
    t = {"a": torch.arange(100.0).reshape(10, 10), "s": torch.tensor(3.0)}
    owned = br.deal(t, Comm(), chunk_bytes=80)
    seg = br.SharedSegments(Comm(), owned, [0], directory=str(tmp_path))
    assert seg.ok and leftovers(tmp_path) == []  # mapped, and the name is already gone
    for c in owned[0]:
        v = seg.view(c, t[c.key])
        v.copy_(t[c.key] if t[c.key].dim() == 0 else t[c.key].narrow(0, c.start, c.rows))
    for c in owned[0]:
        assert torch.equal(seg.view(c, t[c.key]), t[c.key] if t[c.key].dim() == 0 else t[c.key].narrow(0, c.start, c.rows))
    seg.close()


def test_a_directory_that_cannot_hold_segments_is_reported_not_fatal(tmp_path):
    seg = br.SharedSegments(Comm(), [[br._Chunk("a", 0, 1, 8)]], [0], directory=str(tmp_path / "missing"))
    assert not seg.ok


def test_stale_segments_of_dead_processes_are_removed_in_this_pid_namespace_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    ns = os.stat("/proc/self/ns/pid").st_ino
    (tmp_path / f"distckpt-{ns}-abc-{pid}-0").write_bytes(b"x")  # this namespace, creator gone: removed
    kept = [f"distckpt-{ns}-abc-{os.getpid()}-1",  # creator alive
            f"distckpt-{ns + 1}-abc-{pid}-0",  # another PID namespace: that pid may be alive there
            f"distckpt-abc-{pid}-0",  # no namespace in the name: cannot be judged
            "other-file"]  # fmt: skip
    for name in kept:
        (tmp_path / name).write_bytes(b"x")
    assert br.clean_stale_segments(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert br.segment_name("tok", 3) == f"distckpt-{ns}-tok-{os.getpid()}-3"


def _ranks(workload: str, args: list[str], nodes: list[str], **extra: str) -> list[subprocess.CompletedProcess]:
    """Run tests/workloads/``workload`` as len(nodes) gloo ranks (rank r on simulated host nodes[r]), concurrently."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKLOADS / workload), *args],
                              env=env(RANK=str(r), WORLD_SIZE=str(len(nodes)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                      DISTCKPT_NODE_ID=node, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r, node in enumerate(nodes)]  # fmt: skip
    outs = [p.communicate(timeout=180)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)]


def _lose_a_rank(tmp_path: Path, how: str, nodes: list[str], victim: int = 1) -> dict[int, dict]:
    """Run tests/workloads/peer_loss.py on len(nodes) gloo ranks (rank r on simulated host nodes[r]); rank
    ``victim`` dies during the load. Every survivor's report."""
    stock = tmp_path / "stock.ckpt"
    torch.save({"state_dict": {f"w{i}": torch.randn(256, 512) for i in range(2 * len(nodes))}, "global_step": 1,
                "epoch": 0}, stock)  # fmt: skip
    url = str(tmp_path / "ck")
    import_checkpoint(str(stock), url)
    shm = tmp_path / "shm"
    shm.mkdir()
    procs = _ranks("peer_loss.py", [url, how, str(tmp_path / "out")], nodes, DISTCKPT_SHM_DIR=str(shm),
                   VICTIM=str(victim))
    assert procs[victim].returncode == 9, procs[victim].stdout[-3000:]
    survivors = [r for r in range(len(nodes)) if r != victim]
    for r in survivors:
        assert procs[r].returncode == 0, procs[r].stdout[-3000:]
    return {r: load_json(tmp_path / f"out.{r}.json") for r in survivors}


@pytest.mark.slow
def test_a_peer_lost_during_attach_copies_is_a_package_error_on_the_survivor(tmp_path):
    (got,) = _lose_a_rank(tmp_path, "attach", ["A", "A"]).values()
    assert got["module"].startswith("lightning_distckpt") and got["type"] == "DistCheckpointError", got
    assert str(tmp_path / "ck") in got["message"] and "lost one of their peers" in got["message"], got


@pytest.mark.slow
def test_a_peer_lost_inside_the_collective_read_is_a_package_error_on_the_survivor(tmp_path):
    (got,) = _lose_a_rank(tmp_path, "read", ["A", "A"]).values()  # gloo's own error before the wrap: a RuntimeError
    assert got["module"].startswith("lightning_distckpt") and got["type"] == "DistCheckpointError", got
    assert str(tmp_path / "ck") in got["message"] and "lost one of their peers" in got["message"], got


@pytest.mark.slow
def test_a_rank_lost_during_the_sends_between_hosts_is_a_package_error_on_every_survivor(tmp_path):
    got = _lose_a_rank(tmp_path, "send", ["A", "A", "B", "B"], victim=3)
    for r, g in got.items():  # its partner (rank 1) fails in the sends, the others at the next collective
        assert g["module"].startswith("lightning_distckpt") and g["type"] == "DistCheckpointError", (r, g)
        assert str(tmp_path / "ck") in g["message"], (r, g)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [2, 0], ids=["the-lone-rank-of-a-host", "a-rank-with-a-local-peer"])
def test_a_rank_lost_on_unequal_hosts_is_a_package_error_on_every_survivor(tmp_path, victim):
    """Hosts of 2 and 1 ranks (attach inside host A, sends between A and B): whichever rank dies instead of sending,
    every survivor (its local peer, if any, and the other host's) raises the package's error naming the checkpoint."""
    got = _lose_a_rank(tmp_path, "send", ["A", "A", "B"], victim=victim)
    assert sorted(got) == sorted({0, 1, 2} - {victim})
    for r, g in got.items():
        assert g["module"].startswith("lightning_distckpt") and g["type"] == "DistCheckpointError", (r, g)
        assert str(tmp_path / "ck") in g["message"], (r, g)


@pytest.mark.slow
def test_a_peer_lost_while_segments_are_set_up_leaves_no_file_of_the_survivor(tmp_path):
    (got,) = _lose_a_rank(tmp_path, "segments", ["A", "A"]).values()
    assert got["type"] and got["message"] != "returned", got  # the survivor raised (gloo's error: a rank is gone)
    mine, theirs = [n for n in got["left"] if n.endswith("-0")], [n for n in got["left"] if n.endswith("-1")]
    assert mine == [] and len(theirs) == 1, got  # the survivor unlinked its own; the dead rank's is stale
    assert br.clean_stale_segments(str(tmp_path / "shm")) == 1  # the next load (any same_host_reads) removes it
    assert leftovers(tmp_path / "shm") == []


def _load_on_hosts(tmp_path: Path, url: str, how: str, nodes: list[str]) -> list[dict]:
    """tests/workloads/hosts_load.py on len(nodes) gloo ranks, rank r on simulated host nodes[r]; each rank's report."""
    out = tmp_path / f"{how}-{''.join(nodes)}"
    for p in _ranks("hosts_load.py", [url, how, str(out)], nodes):
        assert p.returncode == 0, p.stdout[-3000:]
    return [load_json(Path(f"{out}.{r}.json")) for r in range(len(nodes))]


@pytest.mark.slow
def test_several_hosts_read_once_swap_between_partners_and_attach_inside_each_host(tmp_path):
    import hashlib

    torch.manual_seed(0)
    state_dict = {**{f"big{i}": torch.randn(300, 1000) for i in range(4)},  # 1.2 MB: sent one by one
                  **{f"mid{i}": torch.randn(100, 700) for i in range(4)},  # 280 kB: packed with the small ones
                  "small": torch.randn(7, 5), "bias": torch.randn(64), "step": torch.tensor(12.0)}  # fmt: skip
    torch.save({"state_dict": state_dict, "global_step": 1, "epoch": 0}, tmp_path / "stock.ckpt")
    url = str(tmp_path / "ck")
    import_checkpoint(str(tmp_path / "stock.ckpt"), url)
    want = {f"model/{k}": hashlib.sha256(v.view(-1).numpy().tobytes()).hexdigest() for k, v in state_dict.items()}
    total = sum(v.numel() * v.element_size() for v in state_dict.values())

    # 2 hosts x 2 ranks, the default: the job reads each byte once, partners swap, local ranks attach
    got = _load_on_hosts(tmp_path, url, "auto", ["A", "A", "B", "B"])
    for r, g in enumerate(got):
        assert {k: v for k, v in g["digests"].items() if k in want} == want, f"rank {r}"
        assert g["same_host"] == "attach+send", g
    assert sum(g["read"] for g in got) == pytest.approx(total, rel=0.05)  # once per job (stored bytes ~ raw)
    assert all(0 < g["by_group"] < g["received"] for g in got)  # only the partner's part crossed the "network"

    # each host reads everything with "attach" across hosts; broadcasts read once per job
    per_host = _load_on_hosts(tmp_path, url, "attach", ["A", "A", "B", "B"])
    assert all(g["digests"] == got[0]["digests"] and g["same_host"] == "attach" for g in per_host)
    assert sum(g["read"] for g in per_host) == pytest.approx(2 * total, rel=0.05)
    assert all(g["by_group"] == 0 for g in per_host)

    # hosts of unequal size: rank 2, alone on B, sends to rank 0 (local index 0 mod 2) and receives from both
    # ranks of A everything it did not read; rank 1 gets B's part by attaching to rank 0
    uneven = _load_on_hosts(tmp_path, url, "auto", ["A", "A", "B"])
    assert all(g["digests"] == got[0]["digests"] and g["same_host"] == "attach+send" for g in uneven)
    assert sum(g["read"] for g in uneven) == pytest.approx(total, rel=0.05)
    assert uneven[2]["by_group"] == uneven[2]["received"] > 0
    assert 0 < uneven[0]["by_group"] < uneven[0]["received"]
    assert uneven[1]["by_group"] == 0 < uneven[1]["received"]

    # one rank per host: nothing to attach to, so the default broadcasts
    alone = _load_on_hosts(tmp_path, url, "auto", ["A", "B"])
    assert all(g["digests"] == got[0]["digests"] and g["same_host"] == "broadcast" for g in alone)
    assert all(g["by_group"] == g["received"] > 0 for g in alone)


@pytest.mark.parametrize("sizes", [(2, 2), (2, 1), (3, 1, 2), (4, 3, 1, 1), (1, 5)])
def test_every_host_gets_each_chunk_once_from_the_hosts_it_did_not_read_it_on(sizes):
    from lightning_distckpt.engine import across_hosts

    hosts = [f"h{i}" for i, n in enumerate(sizes) for _ in range(n)]
    hosts = hosts[1::2] + hosts[::2]  # ranks of a host need not be adjacent
    owned = [[(r, k) for k in range(3)] for r in range(len(hosts))]  # rank r read chunks (r, 0..2)
    where = across_hosts.HostMap(hosts)
    for r in range(len(hosts)):  # who sends to whom: the same relation seen from either side
        assert all(r in where.senders(q) for q in where.receivers(r))
        assert all(r in where.receivers(q) for q in where.senders(r))
        assert len(where.receivers(r)) == len(sizes) - 1  # one per other host
    for h in set(hosts):
        ranks = [r for r, x in enumerate(hosts) if x == h]
        held = across_hosts.held(owned, hosts, ranks)
        on_host = [c for r in ranks for c in held[r]]
        assert sorted(on_host) == sorted(c for chunks in owned for c in chunks)  # every chunk, once per host
        assert all(held[r] == [] for r in range(len(hosts)) if r not in ranks)
