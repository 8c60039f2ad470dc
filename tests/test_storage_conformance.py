"""One conformance suite for every storage backend (local here; HDFS and webhdfs add their fixtures)."""

from __future__ import annotations

import os
import uuid

import pytest

from lightning_distckpt.errors import StorageError
from lightning_distckpt.storage import HdfsOptions, StorageConfig, Store, open_store


@pytest.fixture(params=["local", "file-url", "memory", pytest.param("hdfs", marks=pytest.mark.hdfs),
                        pytest.param("webhdfs", marks=pytest.mark.hdfs)])
def store_root(request, tmp_path) -> tuple[Store, str]:
    if request.param in ("local", "file-url"):
        return open_store(str(tmp_path) if request.param == "local" else f"file://{tmp_path}")
    if request.param == "memory":  # fsspec's in-process filesystem through the plain FsspecStore
        store, root = open_store(f"memory://conformance-{uuid.uuid4().hex[:8]}")
        store.makedirs(root)
        return store, root
    dfs = request.getfixturevalue("healthy_minidfs")
    base = dfs.namenode_url if request.param == "hdfs" else dfs.webhdfs_url
    store, root = open_store(f"{base}/conformance-{uuid.uuid4().hex[:8]}", StorageConfig(hdfs=HdfsOptions(user="root")))
    store.makedirs(root)
    return store, root


def test_write_read_list_rename_remove(store_root):
    store, root = store_root
    d = store.join(root, "ckpt")
    store.makedirs(d)
    store.makedirs(d)  # idempotent
    data = os.urandom(3 * 1024 * 1024 + 17)
    s = store.open_write(store.join(d, "a.bin"))
    s.write(data[:1000])
    s.write(memoryview(data)[1000:])
    s.close()
    s.close()  # a second close is harmless
    assert store.size(store.join(d, "a.bin")) == len(data)
    assert store.read_bytes(store.join(d, "a.bin")) == data
    buf = bytearray(100)
    store.read_into(store.join(d, "a.bin"), 12345, memoryview(buf))
    assert bytes(buf) == data[12345:12445]
    with pytest.raises(EOFError, match="a.bin"):
        store.read_into(store.join(d, "a.bin"), len(data) - 10, memoryview(bytearray(100)))
    names = {e.name: e for e in store.listdir(d)}
    assert names["a.bin"].size == len(data) and not names["a.bin"].is_dir
    store.rename(d, store.join(root, "final"))
    assert not store.exists(d) and store.isdir(store.join(root, "final"))
    store.makedirs(d)
    with pytest.raises(StorageError):  # never rename onto an existing name
        store.rename(d, store.join(root, "final"))
    store.remove(store.join(root, "final"), recursive=True)
    store.remove(store.join(root, "final"), recursive=True)  # already gone: no error
    assert not store.exists(store.join(root, "final"))
    with pytest.raises(FileNotFoundError):
        store.listdir(store.join(root, "nope"))
    assert store.url(root).endswith(root.rsplit("/", 1)[-1])


def test_info_and_bounded_reads(store_root):
    """``info`` describes the entry itself; ``read_limited`` reads a regular file only up to its limit."""
    store, root = store_root
    d = store.join(root, "docs")
    store.makedirs(d)
    store.write_bytes(store.join(d, "m.json"), b"x" * 100)
    assert store.info(store.join(d, "m.json")).type == "file" and store.info(store.join(d, "m.json")).size == 100
    assert store.info(d).type == "dir"
    assert {e.name: e.type for e in store.listdir(d)} == {"m.json": "file"}
    assert store.read_limited(store.join(d, "m.json"), 100) == b"x" * 100
    with pytest.raises(ValueError, match="100 bytes, more than the 99"):
        store.read_limited(store.join(d, "m.json"), 99)
    with pytest.raises(ValueError, match="not a regular file"):
        store.read_limited(d, 1000)
    with pytest.raises(FileNotFoundError):
        store.info(store.join(d, "nope"))


def test_local_links_and_special_files(tmp_path):
    store, root = open_store(str(tmp_path))
    os.makedirs(tmp_path / "target")
    (tmp_path / "target" / "COMMITTED").write_text("{}")
    os.symlink("target", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    assert store.info(str(tmp_path / "link")).type == "link" and store.info(str(tmp_path / "fifo")).type == "other"
    assert {e.name: e.type for e in store.listdir(root)} == {"target": "dir", "link": "link", "fifo": "other"}
    with pytest.raises(OSError, match="not a regular file"):
        store.open_read(str(tmp_path / "fifo"))  # refused at once: opening a FIFO would block
    store.remove(str(tmp_path / "link"), recursive=True)  # the link goes, never what it points to
    assert not os.path.lexists(tmp_path / "link") and (tmp_path / "target" / "COMMITTED").exists()
    with pytest.raises(IsADirectoryError):
        store.remove(str(tmp_path / "target"))


def test_local_writes_never_go_through_a_link_or_into_a_fifo(tmp_path):
    store, _ = open_store(str(tmp_path))
    canary = tmp_path / "canary"
    canary.write_text("precious")
    os.symlink(canary, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StorageError, match="link.*symbolic link"):
        store.write_bytes(str(tmp_path / "link"), b"overwritten")
    with pytest.raises(StorageError, match="fifo.*not a regular file"):  # at once: opening a FIFO would block
        store.write_bytes(str(tmp_path / "fifo"), b"x")
    assert canary.read_text() == "precious"
    store.write_bytes(str(canary), b"new")  # a regular file is still replaced
    assert canary.read_text() == "new"


def test_a_path_that_cannot_resolve_is_refused_at_once_not_retried_as_unreachable(tmp_path):
    import time

    from lightning_distckpt.storage.reach import probe

    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for url in (str(tmp_path / "loop"), str(tmp_path / ("a" * 300))):
        start = time.monotonic()
        with pytest.raises(StorageError) as got:
            probe(url, timeout_s=30)
        assert time.monotonic() - start < 5 and "unreachable" not in str(got.value), got.value


def test_urls_stay_strings(tmp_path):
    with pytest.raises(TypeError, match="str"):
        open_store(tmp_path)  # a pathlib.Path is refused, never silently converted
    store, path = open_store("memory://bucket/x")
    assert store.url(path).startswith("memory://")


@pytest.mark.parametrize("error,transient", [
    (RuntimeError('OperationFailed("Failed to complete file in time")'), True),  # hdfs-native, DataNodes lost
    (RuntimeError("Connection reset by peer"), True),
    (ConnectionRefusedError(111, "refused"), True),
    (FileNotFoundError(2, "gone"), False),
    (OSError(28, "No space left on device"), False),
    (OSError(40, "Too many levels of symbolic links"), False),  # what the path is: asking again cannot help
    (OSError(36, "File name too long"), False),
    (OSError(5, "Input/output error"), True),
    (RuntimeError("checksum mismatch in block"), False),
])
def test_transient_errors_are_retried_and_others_raised_at_once(error, transient):
    from lightning_distckpt.storage.retry import RetryPolicy, is_transient

    assert is_transient(error) is transient
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise error
        return "done"

    if transient:
        assert RetryPolicy(attempts=3, backoff_s=0.01).run(flaky, "op") == "done" and len(calls) == 3
    else:
        with pytest.raises(type(error)):
            RetryPolicy(attempts=3, backoff_s=0.01).run(flaky, "op")
        assert len(calls) == 1
