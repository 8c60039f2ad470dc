"""HDFS: ``hdfs://`` and ``viewfs://`` through hdfs-native (no JVM), ``webhdfs://`` through fsspec, and
``pyarrow.fs.HadoopFileSystem`` where a Hadoop installation with libhdfs exists.

Client quirks handled here rather than by users (measured with hdfs-native 0.14, see tools/minidfs/NOTES.md):

* every client option must be a string; replication and block size are per file, given at open;
* the writer has no ``tell()``/``commit()`` and a failed ``close()`` fails again when repeated: our
  writer never calls the former and closes exactly once;
* without failover settings a dead NameNode makes every call retry for ~3 minutes: we fail fast per call
  and retry in our own bounded policy instead (``HdfsOptions.retries``);
* webhdfs answers a rename that did not happen with success: every rename is verified;
* clients do not survive ``fork``: they are created lazily in the process that uses them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_distckpt.storage.fsspec_store import FsspecStore, _OnceClosing
from lightning_distckpt.storage.retry import RetryPolicy

#: hdfs-native options that make a dead NameNode fail a call in well under a second (our policy retries).
FAST_FAIL = {
    "dfs.client.failover.max.attempts": "1",
    "dfs.client.failover.sleep.base.millis": "100",
    "dfs.client.failover.sleep.max.millis": "500",
    "dfs.client.block.write.replace-datanode-on-failure.enable": "true",
    "dfs.client.block.write.replace-datanode-on-failure.best-effort": "true",
}


@dataclass(kw_only=True)
class HdfsOptions:
    """How checkpoints are written to and read from HDFS.

    Args:
        replication: Replication factor of every file of a checkpoint (``None``: the cluster's default).
        block_size_mb: HDFS block size of checkpoint files in MiB (``None``: the cluster's default).
        user: User name for simple authentication (``HADOOP_USER_NAME`` for hdfs-native, ``user.name`` for
            webhdfs).
        conf_dir: A Hadoop configuration directory (``core-site.xml``, ``hdfs-site.xml``), e.g. for
            ``viewfs://`` mount tables or HA name services; sets ``HADOOP_CONF_DIR`` for this process.
        client: ``"hdfs-native"`` (default, no JVM) or ``"pyarrow"`` (needs Hadoop, a JVM and libhdfs).
        retries: Attempts per operation on transient errors (DataNode down, connection reset, NameNode
            unreachable); whole files are rewritten when a write fails.
        backoff_s: First wait between attempts; doubles each time.
        config: Extra Hadoop client settings (``{"dfs.client.socket-timeout": "30000"}``), strings only.
        connect_timeout_s: How long reaching the NameNode (or the webhdfs gateway) may take at setup and in
            ModelCheckpoint's own calls before a `StorageUnreachableError` names the
            URL (``None``: the plugin's ``connect_timeout_s``, 30 s by default).
    """

    replication: int | None = None
    block_size_mb: int | None = None
    user: str | None = None
    conf_dir: str | None = None
    client: Literal["hdfs-native", "pyarrow"] = "hdfs-native"
    retries: int = 4
    backoff_s: float = 0.5
    config: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.connect_timeout_s is not None and not self.connect_timeout_s > 0:
            raise ValueError(f"HdfsOptions(connect_timeout_s={self.connect_timeout_s}): must be positive (or None)")
        if self.replication is not None and self.replication < 1:
            raise ValueError(f"HdfsOptions(replication={self.replication}): must be at least 1")
        if self.block_size_mb is not None and self.block_size_mb < 1:
            raise ValueError(f"HdfsOptions(block_size_mb={self.block_size_mb}): must be at least 1")
        if self.retries < 1:
            raise ValueError(f"HdfsOptions(retries={self.retries}): must be at least 1")

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.backoff_s)

    def file_options(self) -> dict[str, int]:
        out = {}
        if self.replication is not None:
            out["replication"] = self.replication
        if self.block_size_mb is not None:
            out["block_size"] = self.block_size_mb << 20
        return out


class HdfsStore(FsspecStore):
    """``hdfs://`` and ``viewfs://`` through hdfs-native (or pyarrow's HadoopFileSystem)."""

    def __init__(self, url: str, hdfs: HdfsOptions, storage_options: dict[str, Any] | None = None) -> None:
        options = {**FAST_FAIL, **{k: str(v) for k, v in (storage_options or {}).items()}, **hdfs.config}
        super().__init__(url, options, hdfs.policy)
        self.hdfs = hdfs

    def _make_fs(self) -> Any:
        if self.hdfs.conf_dir:
            os.environ["HADOOP_CONF_DIR"] = self.hdfs.conf_dir
        if self.hdfs.user:
            os.environ["HADOOP_USER_NAME"] = self.hdfs.user
        if self.hdfs.client == "pyarrow":
            return _pyarrow_fs(self._root_url)
        try:
            from hdfs_native.fsspec import HdfsFileSystem  # noqa: F401 - registers the protocols
        except ImportError:
            raise ImportError(
                f"{self._root_url}: HDFS needs hdfs-native: pip install 'lightning-distckpt[hdfs]'"
            ) from None
        return super()._make_fs()

    def open_write(self, path: str) -> Any:
        kwargs = self.hdfs.file_options() if self.hdfs.client == "hdfs-native" else {}
        return _OnceClosing(self._do("create", self.fs.open, path, "wb", **kwargs))

    def write_bytes(self, path: str, data: bytes) -> None:
        def once() -> None:
            stream = self.open_write(path)
            try:
                stream.write(data)
            finally:
                stream.close()

        self.retry.run(once, f"write {self.url(path)}")


def webhdfs_store(url: str, hdfs: HdfsOptions, storage_options: dict[str, Any] | None = None) -> FsspecStore:
    """``webhdfs://host:port/path`` (Hadoop 3's NameNode HTTP port is 9870) through fsspec."""
    options = dict(storage_options or {})
    if hdfs.user and "user" not in options:
        options["user"] = hdfs.user
    return FsspecStore(url, options, hdfs.policy)


def _pyarrow_fs(url: str) -> Any:
    try:
        from fsspec.implementations.arrow import ArrowFSWrapper
        from pyarrow import fs as pafs
    except ImportError:
        raise ImportError(f"{url}: HdfsOptions(client='pyarrow') needs pyarrow") from None
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        return ArrowFSWrapper(pafs.HadoopFileSystem(u.hostname or "default", u.port or 0))
    except OSError as e:
        raise ImportError(
            f"{url}: pyarrow's HadoopFileSystem needs a Hadoop installation (JAVA_HOME, HADOOP_HOME, CLASSPATH from "
            f"`hadoop classpath --glob`, and libhdfs.so via ARROW_LIBHDFS_DIR): {e}"
        ) from None
