"""Never lose a committed checkpoint, never hang (issue 12, the on-disk, catalog and clean-up side): crashed
overwrites, links, keep_last, crafted and odd checkpoints, and what clean-up may delete. Each test reproduces
a finding of the issue against real files (FIFOs, symlinks, /dev/zero, real Trainers where the finding is
about one)."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import shutil
import threading
import time

import lightning as L
import pytest
import torch
from conftest import make_idle, rewrite_document, uncommitted_copy
from workloads.common import Net, data

from lightning_distckpt import (
    CheckpointSaveError,
    CorruptCheckpointError,
    DistCheckpoint,
    DistCheckpointError,
    DistCheckpointIO,
    NewerFormatError,
    StateMismatchError,
    UnsafeCheckpointError,
    list_checkpoints,
    load_checkpoint,
    verify,
)
from lightning_distckpt import catalog
from lightning_distckpt import ondisk as fmt
from lightning_distckpt.catalog.replication import copy_checkpoint
from lightning_distckpt.cli.main import main as cli
from lightning_distckpt.storage import LocalStore


def save(url, step: int = 1, **extra) -> str:
    """A small committed checkpoint at ``url`` (this process alone), holding ``w`` = arange + step."""
    ck = {"state_dict": {"w": torch.arange(12.0).reshape(3, 4) + step}, "global_step": step, **extra}
    DistCheckpointIO().save_checkpoint(ck, str(url))
    return str(url)


def committed_names(root) -> dict[str, str]:
    return {c.name: c.url for c in list_checkpoints(str(root)) if c.committed}


def run_cli(*args) -> int:
    return cli([str(a) for a in args])


def bounded(fn, timeout: float = 20.0):
    """Call ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} did not return within {timeout} s (it hangs)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


# ---- 1. a crashed overwrite ---------------------------------------------------------------------------
def crashed_overwrite(root, name="X") -> tuple[str, str]:
    """The state a crash between the rename of the new copy and its marker leaves (issue 12, item 1)."""
    x = save(root / name, step=1)
    trash = str(root / fmt.trash_name(name, "tok1"))
    os.rename(x, trash)
    uncommitted_copy(trash, x, idle=False)
    return x, trash


def test_a_crashed_overwrite_keeps_the_committed_copy_listed_loadable_and_restores_it(tmp_path):
    x, trash = crashed_overwrite(tmp_path)
    assert committed_names(tmp_path) == {"X": trash}  # listed under its name, from the trash directory
    assert torch.equal(load_checkpoint(trash)["state_dict"]["w"], torch.arange(12.0).reshape(3, 4) + 1)
    assert catalog.clean_stale(str(tmp_path)) == []  # the uncommitted X just changed: maybe a live save
    assert os.path.isdir(trash) and committed_names(tmp_path) == {"X": trash}
    make_idle(x)
    removed = catalog.clean_stale(str(tmp_path))
    assert removed == [x]  # the uncommitted copy, set aside and deleted; the committed one moved back
    assert sorted(os.listdir(tmp_path)) == ["X"] and committed_names(tmp_path) == {"X": x}
    assert verify(x).ok and load_checkpoint(x)["global_step"] == 1


def test_clean_up_without_age_never_deletes_the_committed_copy_of_a_crashed_overwrite(tmp_path):
    x, trash = crashed_overwrite(tmp_path)
    catalog.clean_stale(str(tmp_path), older_than_s=0)
    assert committed_names(tmp_path) == {"X": x} and verify(x).ok


def test_a_name_whose_new_copy_committed_drops_its_trash_copy(tmp_path):
    save(tmp_path / "X", step=1)
    shutil.copytree(tmp_path / "X", tmp_path / fmt.trash_name("X", "old"))  # the overwrite's last step crashed
    save(tmp_path / "X", step=2)
    assert committed_names(tmp_path) == {"X": str(tmp_path / "X")}
    assert catalog.clean_stale(str(tmp_path), older_than_s=0) == [str(tmp_path / fmt.trash_name("X", "old"))]
    assert load_checkpoint(str(tmp_path / "X"))["global_step"] == 2


def test_an_overwrite_in_flight_is_not_undone(tmp_path):
    """The old copy was just moved to trash by a live save whose staging directory is still being written."""
    save(tmp_path / "X")
    os.rename(tmp_path / "X", tmp_path / fmt.trash_name("X", "live1"))
    os.mkdir(tmp_path / fmt.staging_name("X", "live1"))
    assert catalog.clean_stale(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == sorted([fmt.trash_name("X", "live1"), fmt.staging_name("X", "live1")])


# ---- 2. removal never follows symlinks -----------------------------------------------------------------
def test_removing_a_link_removes_the_link_only(tmp_path):
    target = save(tmp_path / "epoch=0-step=2")
    link = tmp_path / "last"
    os.symlink("epoch=0-step=2", link)
    catalog.remove_checkpoint(LocalStore(), str(link))
    assert not os.path.lexists(link) and committed_names(tmp_path) == {"epoch=0-step=2": target}
    os.symlink("epoch=0-step=2", link)
    LocalStore().remove(str(link), recursive=True)
    assert not os.path.lexists(link) and os.path.exists(os.path.join(target, fmt.MARKER))
    os.symlink("epoch=0-step=2", link)
    DistCheckpointIO().remove_checkpoint(str(link))
    assert not os.path.lexists(link) and verify(target).ok


class LinkedLast(DistCheckpoint):
    CHECKPOINT_NAME_LAST = "last-{step}"  # a templated last name: ModelCheckpoint removes the previous link


def test_save_last_link_keeps_every_checkpoint_it_linked(tmp_path):
    def run(steps, resume=None):
        torch.manual_seed(0)
        t = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, plugins=[DistCheckpointIO()],
                      callbacks=[LinkedLast(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1,
                                            save_last="link")])  # fmt: skip
        t.fit(Net(), data(), ckpt_path=resume)
        return t

    run(6)
    links = [n for n in os.listdir(tmp_path) if os.path.islink(tmp_path / n)]
    assert links == ["last-step=6"]  # the earlier links were removed (as links)
    names = ["epoch=0-step=2", "epoch=0-step=4", "epoch=0-step=6"]
    assert sorted(committed_names(tmp_path)) == names
    run(8, resume=str(tmp_path / "epoch=0-step=6"))  # the next setup's clean-up keeps them all
    assert set(names) <= set(committed_names(tmp_path)) and all(verify(str(tmp_path / n)).ok for n in names)


# ---- 3. keep_last: one rule -------------------------------------------------------------------------------
@pytest.mark.parametrize("count", ["-3", "0", "-1"])
def test_gc_refuses_a_bad_keep_last_before_touching_anything(tmp_path, count, capsys):
    for step in (1, 2, 3):
        save(tmp_path / f"s{step}", step=step)
    before = sorted(os.listdir(tmp_path))
    assert run_cli("gc", tmp_path, "--keep-last", count, "--apply") == 2
    assert "keep-last" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before and len(committed_names(tmp_path)) == 3


@pytest.mark.parametrize("count", [0, -3, True, 2.0])
def test_distcheckpoint_refuses_the_same_counts(count):
    with pytest.raises(ValueError, match="keep_last"):
        DistCheckpoint(keep_last=count)


def test_gc_keep_last_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path / f"s{step}", step=step)
    assert run_cli("gc", tmp_path, "--keep-last", 2, "--apply", "--quiet") == 0
    assert sorted(committed_names(tmp_path)) == ["s2", "s3"]


# ---- 8. errors are not swallowed; counters are locked; the original error is re-raised --------------------
def test_a_failed_retry_clean_up_is_logged_with_what_it_was(caplog):
    from lightning_distckpt.storage.retry import RetryPolicy

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    def cleanup():
        raise PermissionError("cannot remove hdfs://nn/x/.part")

    with caplog.at_level(logging.WARNING):
        assert RetryPolicy(2, 0.0).run(flaky, "write hdfs://nn/x/file", cleanup) == "ok"
    assert any("write hdfs://nn/x/file" in r.getMessage() and "clean-up" in r.getMessage() for r in caplog.records)


def test_replica_counters_are_updated_atomically():
    from lightning_distckpt.catalog.replication import ReplicaStats, describe

    stats = ReplicaStats()

    def work():
        for _ in range(20000):
            stats.update(pending=1)
            stats.update(pending=-1, copied=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert describe(stats) == {"copied": 80000, "failures": 0, "pending": 0}


class TwoArgError(CorruptCheckpointError):
    """An error type whose constructor takes more than a message (``type(e)(str(e))`` cannot rebuild it)."""

    def __init__(self, url: str, block: int) -> None:
        super().__init__(f"{url}: block {block} is bad")
        self.url, self.block = url, block


def test_a_load_raises_the_original_inner_error(tmp_path):
    from lightning_distckpt.transforms import BlockCodec, register_block_codec

    class Failing(BlockCodec):
        name = "test-failing-1"

        def encode(self, raw, itemsize=1):
            return bytes(raw)

        def decode(self, stored, raw_len):
            raise TwoArgError("codec://x", 7)

    register_block_codec("test-failing-1", Failing, replace=True)
    from lightning_distckpt import CompressionConfig

    io = DistCheckpointIO(compression=CompressionConfig(block_codec="test-failing-1"))
    io.save_checkpoint({"state_dict": {"w": torch.ones(64, 64)}}, str(tmp_path / "c"))
    with pytest.raises(TwoArgError) as info:
        io.load_checkpoint(str(tmp_path / "c"))
    assert info.value.block == 7 and info.value.__cause__ is not None  # DCP's wrapper, chained


# ---- 9. crafted and odd checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("dirname", ["....trash-X", "...trash-X", "..trash-X", ".trash-X", "..staging-X",
                                     "....staging-X", ".a/b.trash-X", ".a.trash-", ".a.trash-x/y"])
def test_crafted_trash_and_staging_names_are_not_ours(dirname):
    assert fmt.trashed_name(dirname) is None and fmt.staged_name(dirname) is None


def test_gc_never_leaves_the_root(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data").write_text("keep me")
    root = tmp_path / "root"
    root.mkdir()
    for d in ("....trash-X", "...trash-X", "..trash-X"):
        (root / d).mkdir()
        make_idle(root / d)
    save(root / "ok")
    assert run_cli("gc", root, "--apply", "--older-than", "0", "--quiet") == 0
    assert (outside / "data").read_text() == "keep me" and sorted(os.listdir(root)) == sorted(
        ["....trash-X", "...trash-X", "..trash-X", "ok"])  # fmt: skip


def test_retention_deletes_only_what_this_run_wrote_under_its_dirpath(tmp_path):
    elsewhere = save(tmp_path / "other-run" / "epoch=0-step=2")
    mine = tmp_path / "mine"
    cb = DistCheckpoint(dirpath=str(mine), keep_last=1)
    cb._io = DistCheckpointIO()  # what setup does
    save(mine / "epoch=0-step=4")
    save(mine / "epoch=0-step=6")
    # a crafted callback state (from a checkpoint's state.json): paths outside dirpath, escaping names
    cb.load_state_dict({**cb.state_dict(), "saved": [elsewhere, f"{cb.dirpath}/../other-run/epoch=0-step=2",
                                                         f"{cb.dirpath}/epoch=0-step=4", f"{cb.dirpath}/epoch=0-step=6"],
                        "ever": ["..", "epoch=0-step=4"]})  # fmt: skip
    assert cb.apply_retention() == [f"{cb.dirpath}/epoch=0-step=4"]
    assert verify(elsewhere).ok and committed_names(mine) == {"epoch=0-step=6": f"{cb.dirpath}/epoch=0-step=6"}
    assert cb._ever == {"epoch=0-step=4"}


def test_clean_up_keeps_folders_it_cannot_prove_are_its_own(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"experiment": "mine"}')  # someone else's manifest
    (foreign / "__0_0.distcp").write_bytes(b"x")
    renamed = uncommitted_copy(save(tmp_path / "a"), tmp_path / "b")
    manifest = json.load(open(os.path.join(renamed, fmt.MANIFEST)))
    manifest["name"] = "not-b"  # ours, but it does not name this directory: not a crashed save of "b"
    open(os.path.join(renamed, fmt.MANIFEST), "wb").write(fmt.dumps(manifest))
    unreadable = tmp_path / "c"
    shutil.copytree(tmp_path / "a", unreadable)
    os.remove(unreadable / fmt.MARKER)
    (unreadable / fmt.MANIFEST).write_bytes(b"{not json")
    for d in (foreign, renamed, unreadable):
        make_idle(d)
    assert catalog.clean_stale(str(tmp_path), older_than_s=0) == []
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "results"]


def test_a_live_writers_staging_directory_is_left_alone(tmp_path):
    save(tmp_path / "a")
    live = tmp_path / fmt.staging_name("b", "w1")
    live.mkdir()
    (live / "__0_0.distcp").write_bytes(b"being written")
    assert catalog.clean_stale(str(tmp_path)) == []  # default: idle for 10 minutes first
    make_idle(live)
    beat = catalog.Heartbeat(LocalStore(), str(live), every_s=0.05)  # the writer is alive on another host
    try:
        deadline = time.time() + 10
        while not (live / fmt.HEARTBEAT).exists() and time.time() < deadline:
            time.sleep(0.02)
        assert catalog.clean_stale(str(tmp_path)) == [] and live.exists()
    finally:
        beat.stop()
    assert not (live / fmt.HEARTBEAT).exists()
    make_idle(live)
    assert catalog.clean_stale(str(tmp_path)) == [str(live)]  # crashed an hour ago: garbage


@pytest.mark.parametrize("victim", [fmt.MANIFEST, fmt.MARKER, fmt.STATE, fmt.METADATA])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "link", "device"])
def test_special_files_as_documents_are_refused_without_hanging(tmp_path, victim, kind):
    root = tmp_path / "root"
    good = save(root / "good", step=1)
    bad = save(root / "bad", step=2)
    path = os.path.join(bad, victim)
    os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "device":
        import stat

        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # a character device reading as /dev/zero
        except PermissionError as e:
            pytest.skip(f"cannot create a device node here (needs CAP_MKNOD): {e}")
    else:
        os.symlink(os.path.join(good, victim), path)  # even a link to a good document is refused
    rows = bounded(lambda: {c.name: c for c in list_checkpoints(str(root))})
    assert rows["good"].committed  # one bad checkpoint never hides the others
    if victim in (fmt.MANIFEST, fmt.MARKER):
        assert not rows["bad"].committed and "regular file" in rows["bad"].problem
    report = bounded(lambda: verify(bad))
    assert not report.ok
    with pytest.raises(UnsafeCheckpointError, match=victim.replace(".", r"\.")):
        bounded(lambda: load_checkpoint(bad))
    bounded(lambda: catalog.clean_stale(str(root), older_than_s=0))
    assert os.path.lexists(path) and verify(good).ok
    assert bounded(lambda: run_cli("ls", root, "--quiet")) == 0


@pytest.mark.parametrize("field,value", [("created", "yesterday"), ("world_size", float("inf")), ("files", []),
                                         ("world_size", True), ("global_step", 1.5), ("files", {"a": 1}),
                                         ("versions", [1]), ("created", 1e300), ("tensor_bytes", -1)])
def test_a_malformed_manifest_field_is_a_package_error_naming_file_and_key(tmp_path, field, value):
    root = tmp_path / "root"
    save(root / "good")
    bad = save(root / "bad")
    manifest = json.load(open(os.path.join(bad, fmt.MANIFEST)))
    manifest[field] = value
    data = json.dumps(manifest).encode()  # Infinity included: an author not using this package's writer
    open(os.path.join(bad, fmt.MANIFEST), "wb").write(data)
    open(os.path.join(bad, fmt.MARKER), "wb").write(fmt.marker_bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        catalog.read_manifest(catalog.source_of(bad))
    assert fmt.MANIFEST in str(info.value) and (field in str(info.value) or "Infinity" in str(info.value))
    rows = {c.name: c for c in list_checkpoints(str(root))}
    assert rows["good"].committed and rows["bad"].status == "corrupt"
    assert not verify(bad).ok  # a report, never an exception
    assert run_cli("gc", root, "--keep-last", 1, "--apply", "--quiet") == 0 and verify(str(root / "good")).ok
    assert catalog.latest([str(root)])[0].name == "good"


def reseal(url, name, obj) -> None:
    rewrite_document(url, name, obj if isinstance(obj, bytes) else fmt.dumps(obj))


def test_deep_json_malformed_tags_and_encodings_are_package_errors(tmp_path):
    base = save(tmp_path / "base")
    cases = {
        "deep": (fmt.STATE, b"[" * 200_000 + b"]" * 200_000),
        "deep-but-parses": (fmt.STATE, b"[" * 500 + b"]" * 500),
        "float-tag": (fmt.STATE, {"global_step": {"__float__": 3}}),
        "dict-tag": (fmt.STATE, {"x": {"__dict__": [[1]]}}),
        "bytes-tag": (fmt.STATE, {"x": {"__bytes__": "!!!"}}),
        "device-tag": (fmt.STATE, {"x": {"__device__": "warp-drive"}}),
        "size-tag": (fmt.STATE, {"x": {"__size__": [10 ** 30]}}),
        "tensor-ref": (fmt.STATE, {"x": {"__tensor__": ["a"]}}),
        "unknown-ref": (fmt.STATE, {"x": {"__tensor__": "extra/99"}}),
        "utf8": (fmt.STATE, b'{"x": "\xff\xfe"}'),
        "nan": (fmt.STATE, b'{"x": NaN}'),
    }
    md = json.load(open(os.path.join(base, fmt.METADATA)))
    for i, enc in enumerate([[1], {"codec": "int8-rows"}, {"codec": "int8-rows", "version": 1, "dtype": "float32",
                             "size": [3, 4], "block": 0}, {"codec": "bf16", "version": 1, "dtype": "float32",
                             "size": [3, 4]}]):  # fmt: skip
        cases[f"encoding-{i}"] = (fmt.METADATA, {**md, "encodings": {"model/w": enc}})
    for case, (doc, obj) in cases.items():
        url = str(tmp_path / case)
        shutil.copytree(base, url)
        reseal(url, doc, obj)
        with pytest.raises(CorruptCheckpointError, match=doc.replace(".", r"\.")):
            load_checkpoint(url)
        assert not verify(url).ok or doc != fmt.METADATA


def test_chunks_that_overlap_are_refused_although_their_count_is_right():
    def doc(chunks):
        return {"format": fmt.FORMAT_NAME, "version": 1, "encodings": {}, "tensors": {"w": {
            "dtype": "float32", "size": [4, 2], "chunks": [
                {"offsets": o, "sizes": s, "f": "__0_0.distcp", "o": 0, "b": [[s[0] * s[1] * 4, s[0] * s[1] * 4, 0]]}
                for o, s in chunks]}}}  # fmt: skip

    fmt.metadata_from_json(doc([([0, 0], [2, 2]), ([2, 0], [2, 2])]), "m")  # exact cover
    fmt.metadata_from_json(doc([([0, 0], [4, 1]), ([0, 1], [4, 1])]), "m")  # column chunks
    for bad in ([([0, 0], [2, 2]), ([1, 0], [2, 2])],  # rows 1 overlap, row 3 uncovered
                [([0, 0], [4, 1]), ([0, 0], [4, 1])],  # the same chunk twice (column 1 uncovered)
                [([0, 0], [3, 2]), ([1, 1], [1, 1]), ([3, 0], [1, 1])]):  # fmt: skip
        with pytest.raises(CorruptCheckpointError, match="overlap|two chunks|cover"):
            fmt.metadata_from_json(doc(bad), "m")


def test_a_declared_dtype_is_checked_against_the_target(tmp_path):
    from lightning_distckpt.engine.loading import load_weights

    url = str(tmp_path / "c")
    DistCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(6, dtype=torch.int32)}}, url)
    module = torch.nn.Module()
    module.register_buffer("w", torch.zeros(6, dtype=torch.float32))
    with pytest.raises(StateMismatchError, match="dtype mismatch.*int32.*float32"):
        load_weights(url, module)
    module.w = torch.zeros(6, dtype=torch.int32)
    load_weights(url, module)
    assert torch.equal(module.w, torch.arange(6, dtype=torch.int32))


def newer(url) -> None:
    manifest = json.load(open(os.path.join(url, fmt.MANIFEST)))
    manifest["version"] = fmt.FORMAT_VERSION + 1
    data = fmt.dumps(manifest)
    open(os.path.join(url, fmt.MANIFEST), "wb").write(data)
    open(os.path.join(url, fmt.MARKER), "wb").write(fmt.marker_bytes(data))


def test_a_newer_format_is_listed_as_such_and_last_refuses_to_start_over(tmp_path, capsys):
    root = tmp_path / "ck"
    torch.manual_seed(0)
    L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
              plugins=[DistCheckpointIO()], callbacks=[DistCheckpoint(dirpath=str(root), every_n_train_steps=2)]
              ).fit(Net(), data())  # fmt: skip
    for name in os.listdir(root):
        newer(str(root / name))
    rows = list_checkpoints(str(root))
    assert rows and all(r.status == "newer format" and not r.committed for r in rows)
    assert run_cli("ls", root) == 0 and "NEWER FORMAT" in capsys.readouterr().out
    make_idle(root / rows[-1].name)
    assert catalog.clean_stale(str(root), older_than_s=0) == [] and len(os.listdir(root)) == len(rows)
    t = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  plugins=[DistCheckpointIO()], callbacks=[DistCheckpoint(dirpath=str(root), every_n_train_steps=2)])
    with pytest.raises(NewerFormatError, match="upgrade|Upgrade"):
        t.fit(Net(), data(), ckpt_path="last")
    assert t.global_step == 0


def test_tiny_pickles_cannot_allocate(tmp_path):
    from lightning_distckpt.ondisk.skeleton import join

    class Grow:
        def __reduce__(self):
            return (bytearray, (10,))  # (10**10,) in the attack: 10 GB from a 40-byte pickle

    set_of_range = pickle.dumps(range(10))  # set(range(10**10)) needs range
    for payload in (pickle.dumps(Grow()), set_of_range):
        with pytest.raises(UnsafeCheckpointError, match="refusing"):
            join({"x": {"__pickle__": base64.b64encode(payload).decode()}}, lambda k: None)


def test_a_symlinked_data_file_is_refused_by_verify_and_load_alike(tmp_path):
    url = save(tmp_path / "c")
    data_file = os.path.join(url, "__0_0.distcp")
    os.rename(data_file, tmp_path / "elsewhere.distcp")
    os.symlink(tmp_path / "elsewhere.distcp", data_file)
    report = verify(url)
    assert not report.ok and "link" in report.error + " ".join(f.problem for f in report.files)
    with pytest.raises(UnsafeCheckpointError, match="link"):
        load_checkpoint(url)


@pytest.mark.parametrize("step", [10.0, True, 2**63, "7"], ids=["float", "bool", "huge", "str"])
def test_a_step_that_is_no_listable_integer_still_commits_a_loadable_checkpoint(tmp_path, step):
    """The manifest lists global_step only as an integer its reader accepts; the state keeps the value as given."""
    url = save(tmp_path / "c", step=1, global_step=step)
    assert load_checkpoint(url)["global_step"] == step
    (listed,) = [c for c in list_checkpoints(str(tmp_path)) if c.committed]
    assert listed.manifest is not None and listed.manifest.global_step is None


def test_a_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    """A save over somebody's non-empty directory fails naming it, and leaves it as it was (an empty directory, a
    stock file and a checkpoint of this package are replaced, as Lightning overwrites its files)."""
    data = tmp_path / "mydata"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointSaveError, match=re.escape(str(data)) + ".*not a checkpoint"):
        save(data)
    assert (data / "sub" / "thesis.tex").read_text() == "years of work" and os.listdir(data) == ["sub"]
    assert [n for n in os.listdir(tmp_path) if n != "mydata"] == []  # no staging directory left behind
    (tmp_path / "empty").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "stock.ckpt")
    for replaced in (tmp_path / "empty", tmp_path / "stock.ckpt", tmp_path / "empty"):  # the last: a checkpoint now
        assert load_checkpoint(save(replaced, step=3))["global_step"] == 3


@pytest.mark.parametrize("edit", ["top level a list", "no state_dict", "state_dict a list", "hyper_parameters a list"])
def test_a_crafted_state_document_is_a_package_error_naming_it(tmp_path, edit):
    """state.json resealed with a shape Lightning's loaders index without checks: the package's error naming the
    document, from load_checkpoint (top level) and from LightningModule.load_from_checkpoint (the rest)."""
    url = save(tmp_path / "c", hyper_parameters={"n": 2})
    doc = json.load(open(os.path.join(url, fmt.STATE)))
    if edit == "top level a list":
        doc = [doc]
    elif edit == "no state_dict":
        del doc["state_dict"]
    else:
        doc[edit.split()[0]] = [1, 2]
    rewrite_document(url, fmt.STATE, fmt.dumps(doc))
    where = re.escape(os.path.join(url, fmt.STATE))
    if edit == "top level a list":
        with pytest.raises(CorruptCheckpointError, match=where):
            load_checkpoint(url)
    with pytest.raises(CorruptCheckpointError, match=where):
        Net.load_from_checkpoint(url)


@pytest.mark.parametrize("planted", ["a link for a file", "a link for the directory"])
def test_a_copy_never_writes_through_links_planted_in_its_staging_directory(tmp_path, planted):
    """A copy resumes into ``.<name>.staging-c<digest>``: links planted there (for one of its files, or for the whole
    directory) are refused with the package's error naming them; nothing outside the destination changes."""
    url = save(tmp_path / "c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / fmt.METADATA).write_text("precious")
    manifest = catalog.open_checkpoint(catalog.source_of(url)).manifest
    token = f"c{fmt.digest(fmt.dumps(manifest.to_json())):016x}"[:13]
    dst_root = tmp_path / "dst"
    dst_root.mkdir()
    staging = dst_root / fmt.staging_name("copy", token)
    if planted == "a link for a file":
        staging.mkdir()
        os.symlink(outside / fmt.METADATA, staging / fmt.METADATA)
    else:
        os.symlink(outside, staging)
    with pytest.raises(DistCheckpointError, match=str(staging)):
        copy_checkpoint(url, str(dst_root / "copy"))
    assert os.listdir(outside) == [fmt.METADATA] and (outside / fmt.METADATA).read_text() == "precious"
    assert not (dst_root / "copy").exists()


def test_terminal_escapes_in_names_are_printed_escaped(tmp_path, capsys):
    evil = "x\x1b]0;pwned\x07\x1b[2J"
    save(tmp_path / "ok")
    (tmp_path / evil).mkdir()
    (tmp_path / evil / fmt.MANIFEST).write_text("{}")
    run_cli("ls", tmp_path)
    run_cli("gc", tmp_path)
    run_cli("verify", tmp_path / evil)
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\\x1b" in out.out


@pytest.mark.parametrize("template", ["{epoch}/{step}", "{epoch:zz}", "../{step}", ".hidden-{step}", "{epoch}\t{step}",
                                      "{epoch}.trash-{step}"])
def test_a_bad_filename_template_is_refused_when_the_callback_is_made(template):
    with pytest.raises(ValueError, match="filename"):
        DistCheckpoint(filename=template)


def test_verify_never_raises(tmp_path):
    assert not verify(str(tmp_path / "nothing")).ok
    assert not verify("nosuchscheme-xyz://host/x").ok
    (tmp_path / "file").write_text("x")
    assert not verify(str(tmp_path / "file")).ok


def test_one_bad_checkpoint_never_breaks_last_for_the_rest(tmp_path):
    save(tmp_path / "a", step=1)
    bad = save(tmp_path / "b", step=2)
    reseal(bad, fmt.METADATA, b'{"format": "lightning-distckpt", "version": 1, "tensors": {"w": 5}}')
    os.mkfifo(tmp_path / "c")  # not even a directory
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / fmt.MARKER)
    found = bounded(lambda: catalog.latest([str(tmp_path)]))
    assert [c.name for c in found] == ["b", "a"]  # b's manifest is fine; its metadata fails at load
    with pytest.raises(CorruptCheckpointError, match=r"metadata\.json"):
        load_checkpoint(bad)


def test_errors_are_package_errors():
    assert issubclass(NewerFormatError, DistCheckpointError) and issubclass(UnsafeCheckpointError, DistCheckpointError)


def test_a_checkpoint_the_storage_cannot_read_is_never_passed_over_by_last(tmp_path, capsys):
    """A storage failure reading a committed checkpoint's marker (a lost DataNode, an I/O error) says nothing
    about the checkpoint: it is listed "unreadable" (naming the file), clean-up keeps it, and the newest
    committed checkpoint ("last") is an error instead of an older checkpoint or nothing at all."""
    from faulty_store import Fault, FaultyStore, register_faulty

    from lightning_distckpt import StorageError

    root = tmp_path / "ck"
    for step in (1, 2, 3):
        save(root / f"s{step}", step=step)
    store = FaultyStore(faults=[Fault(fmt.MARKER, 0, 1 << 20, "raise")])  # every marker read fails
    url = register_faulty("unreadable" + str(os.getpid()), store, str(root))
    rows = list_checkpoints(url)
    assert [(r.name, r.status) for r in rows] == [(f"s{s}", "unreadable") for s in (1, 2, 3)], rows
    assert all(f"s{s}/{fmt.MARKER}" in r.problem and "injected I/O error" in r.problem
               for s, r in zip((1, 2, 3), rows)), rows  # fmt: skip
    with pytest.raises(StorageError, match=rf"(?s)cannot tell which checkpoint is the newest.*{fmt.MARKER}.*2 more"):
        catalog.latest([url])
    for name in os.listdir(root):
        make_idle(root / name)
    assert catalog.clean_stale(url, older_than_s=0) == [] and sorted(os.listdir(root)) == ["s1", "s2", "s3"]
    assert run_cli("ls", url) == 0 and "UNREADABLE" in capsys.readouterr().out
    # (a Trainer resuming "last" past DataNodes that cannot serve the marker: test_hdfs.py)
    store.faults.clear()  # the storage recovers: the newest is listed again, nothing was lost
    assert [c.name for c in catalog.latest([url])] == ["s3", "s2", "s1"]
