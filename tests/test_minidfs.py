"""The test HDFS (tools/minidfs + tests/hdfs_cluster.py) really works with the Python clients.

Runs a real MiniDFSCluster (1 NameNode, 4 DataNodes, replication 3) in a JVM on Java 17 and
talks to it with ``hdfs-native`` (fsspec ``hdfs://``) and fsspec ``webhdfs://``.
Skipped, with the reason shown, only when no usable Java is found.

Run:  pytest -m hdfs tests/test_minidfs.py -v
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from fsspec.core import url_to_fs

pytestmark = pytest.mark.hdfs

MB = 1 << 20

# hdfs-native storage options: values MUST be strings (an int/bool raises TypeError).
# Without these a call against a dead NameNode retries for ~3 minutes (Hadoop's defaults:
# 15 failover attempts, exponential backoff 500 ms .. 15 s); with them it fails in < 1 s.
FAST_FAIL = {
    "dfs.client.failover.max.attempts": "1",
    "dfs.client.failover.sleep.base.millis": "100",
    "dfs.client.failover.sleep.max.millis": "500",
    "dfs.client.socket-timeout": "10000",  # DataNode reads/acks (ms); default 60000
}


@pytest.fixture
def hdfs(minidfs):
    """hdfs-native fsspec filesystem for the cluster (fast failure when the NameNode is down)."""
    fs, _ = url_to_fs(minidfs.namenode_url + "/", **FAST_FAIL)
    # hdfs-native registers fsspec's hdfs:// protocol; make sure it is what we got (not pyarrow).
    assert type(fs).__module__ == "hdfs_native.fsspec", type(fs)
    return fs


@pytest.fixture
def webhdfs(minidfs):
    # insecure cluster: the user is just the user.name query parameter (permissions are off)
    fs, _ = url_to_fs(minidfs.webhdfs_url + "/", user="root")
    return fs


def _payload(n: int = 10 * MB) -> bytes:
    return os.urandom(n)


def _write_native(fs, path: str, data: bytes, **open_kwargs) -> None:
    with fs.open(path, "wb", **open_kwargs) as f:
        f.write(data)


def _read_native(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def test_cluster_ready(minidfs):
    assert minidfs.namenode_url == f"hdfs://{minidfs.host}:{minidfs.rpc_port}"
    assert minidfs.webhdfs_url == f"webhdfs://{minidfs.host}:{minidfs.http_port}"
    st = minidfs.status()
    assert st["namenode_up"] and not st["safemode"]
    assert st["live_datanodes"] == 4
    assert minidfs.replication == 3
    assert (minidfs.conf_dir / "core-site.xml").exists()


def test_hdfs_native_10mb_roundtrip(minidfs, hdfs):
    data = _payload()
    _write_native(hdfs, "/native/ten.bin", data)
    assert hdfs.info("/native/ten.bin")["size"] == len(data)
    assert _read_native(hdfs, "/native/ten.bin") == data
    st = hdfs.client.get_file_info("/native/ten.bin")
    assert st.replication == minidfs.replication  # server default (dfs.replication)

    # Replication and HDFS block size are per file, chosen at open() (ints here, unlike
    # storage options). 1 MiB blocks -> a multi-block file.
    _write_native(hdfs, "/native/r2.bin", data[: 3 * MB + 17], replication=2, block_size=MB)
    st = hdfs.client.get_file_info("/native/r2.bin")
    assert (st.replication, st.blocksize, st.length) == (2, MB, 3 * MB + 17)
    with hdfs.open("/native/r2.bin", "rb") as f:
        assert f.read_range(MB - 5, 10) == data[MB - 5 : MB + 5]  # across a block boundary


def test_webhdfs_10mb_roundtrip(minidfs, webhdfs, hdfs):
    data = _payload()
    with webhdfs.open("/web/ten.bin", "wb") as f:
        f.write(data)
    assert webhdfs.cat("/web/ten.bin") == data
    assert _read_native(hdfs, "/web/ten.bin") == data  # same namespace, both clients

    # WebHDFS RENAME onto an existing file fails SILENTLY (HTTP 200, {"boolean": false});
    # fsspec's mv() ignores the result. renameoptions=OVERWRITE makes it replace the target.
    webhdfs.pipe("/web/a", b"A")
    webhdfs.pipe("/web/b", b"B")
    webhdfs.mv("/web/a", "/web/b")  # no exception ...
    assert webhdfs.cat("/web/b") == b"B"  # ... and nothing happened
    r = webhdfs._call("RENAME", method="put", path="/web/a", destination="/web/b")
    assert r.json() == {"boolean": False}
    webhdfs._call("RENAME", method="put", path="/web/a", destination="/web/b", renameoptions="OVERWRITE")
    assert webhdfs.cat("/web/b") == b"A" and not webhdfs.exists("/web/a")


def test_datanode_loss(minidfs, hdfs, webhdfs):
    before = _payload()
    _write_native(hdfs, "/dn/before.bin", before)
    minidfs.stop_datanode(0)
    try:
        # The NameNode treats it as dead right away (no 10-minute heartbeat expiry).
        assert minidfs.status()["live_datanodes"] == 3
        # A file with a replica on the stopped node is still readable from the others.
        assert _read_native(hdfs, "/dn/before.bin") == before
        # New writes get a full pipeline from the 3 remaining nodes.
        after = _payload()
        _write_native(hdfs, "/dn/after.bin", after)
        assert _read_native(hdfs, "/dn/after.bin") == after
        assert hdfs.client.get_file_info("/dn/after.bin").replication == 3
        with webhdfs.open("/dn/web.bin", "wb") as f:
            f.write(after[:MB])
        assert webhdfs.cat("/dn/web.bin") == after[:MB]
    finally:
        minidfs.restart_datanode(0)
    assert minidfs.status()["live_datanodes"] == 4

    # A DataNode dies in the middle of a write: the pipeline recovers (best-effort replacement).
    data = _payload(6 * MB)
    f = hdfs.open("/dn/mid.bin", "wb", block_size=MB)
    try:
        f.write(data[: 3 * MB])
        minidfs.stop_datanode(1)
        f.write(data[3 * MB :])
    finally:
        f.close()
        if 1 in minidfs.status()["stopped_datanodes"]:
            minidfs.restart_datanode(1)
    assert _read_native(hdfs, "/dn/mid.bin") == data
    assert minidfs.status()["live_datanodes"] == 4


def test_a_datanode_whose_port_was_taken_restarts_on_new_ports(minidfs, hdfs):
    minidfs.stop_datanode(2)
    port = minidfs.status()["stopped_ipc_ports"]["2"]
    with socket.socket() as squatter:  # its ports were ephemeral: any socket may take one meanwhile
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        reply = minidfs.restart_datanode(2)
    assert "kept_ports=false" in reply, reply
    assert minidfs.status()["live_datanodes"] == 4
    data = _payload()
    _write_native(hdfs, "/dn/after-restart.bin", data)
    assert _read_native(hdfs, "/dn/after-restart.bin") == data


def test_namenode_restart(minidfs, hdfs, webhdfs):
    data = _payload()
    _write_native(hdfs, "/nn/keep.bin", data)
    rpc_port, http_port = minidfs.rpc_port, minidfs.http_port

    minidfs.stop_namenode()
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):  # hdfs-native: "Connection refused (os error 111)"
            hdfs.info("/nn/keep.bin")
        with pytest.raises(OSError):
            _write_native(hdfs, "/nn/new.bin", b"x")
        assert time.monotonic() - t0 < 10, "dead NameNode must fail fast with FAST_FAIL options"

        t0 = time.monotonic()
        with pytest.raises(Exception) as exc:  # requests.ConnectionError (an OSError subclass)
            webhdfs.info("/nn/keep.bin")
        assert isinstance(exc.value, OSError), repr(exc.value)
        assert time.monotonic() - t0 < 10
    finally:
        minidfs.restart_namenode()

    # Same ports, so existing clients reconnect; the earlier file survived the restart.
    assert (minidfs.rpc_port, minidfs.http_port) == (rpc_port, http_port)
    assert hdfs.info("/nn/keep.bin")["size"] == len(data)
    assert _read_native(hdfs, "/nn/keep.bin") == data
    assert webhdfs.cat("/nn/keep.bin")[:MB] == data[:MB]
    _write_native(hdfs, "/nn/new.bin", b"after restart")
    assert _read_native(hdfs, "/nn/new.bin") == b"after restart"
