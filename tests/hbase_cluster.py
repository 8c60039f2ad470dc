"""A real HBase for tests: ``TestingHBaseCluster`` (ZooKeeper, master, region server) + the Thrift1 gateway.

No pytest in here, so it can be used from fixtures, benchmarks and a REPL alike::

    from tests.hbase_cluster import MiniHBase

    with MiniHBase.start("/tmp/hb") as hb:            # local-filesystem mode
        hb.thrift_url                                 # "hbase://127.0.0.1:PORT"
        hb.stop_thrift(); hb.start_thrift()           # the gateway goes away and comes back (same port)
        hb.stop_regionserver(); hb.start_regionserver(); hb.restart_master()
    MiniHBase.start("/tmp/hb2", dfs="hdfs://127.0.0.1:PORT")   # HBase's data on the project's MiniDFS

The JVM side is ``tools/minihbase`` (built once into a cache outside the repo by its ``build.sh``), run on
Java 17 found like MiniDFS's (see :func:`hdfs_cluster.java_home_or_none`).

AppCDS: the first start on a machine also dumps a class-data archive next to the built jars
(``-XX:ArchiveClassesAtExit``, written when that JVM exits); later starts map it (``-XX:SharedArchiveFile``),
which takes about a third off the JVM's start. ``DISTCKPT_MINIHBASE_NO_CDS=1`` turns that off.

Environment knobs:
  DISTCKPT_JAVA_HOME              JDK/JRE home to run the cluster (and Maven) with
  DISTCKPT_MINIHBASE_CACHE        cache root for the built launcher (see tools/minihbase/build.sh)
  DISTCKPT_MINIHBASE_LOG_LEVEL    log4j level for <base_dir>/minihbase.log (default WARN)
  DISTCKPT_MINIHBASE_JVM_OPTS     extra JVM options (whitespace separated)
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hdfs_cluster import JVM_FLAGS as _DFS_JVM_FLAGS  # noqa: E402
from hdfs_cluster import _kill, _tail_file, _tail_text, java_home_or_none  # noqa: E402

__all__ = ["MiniHBase", "java_home_or_none", "build_launcher", "JVM_FLAGS"]

REPO_ROOT = Path(__file__).resolve().parent.parent
MINIHBASE_DIR = REPO_ROOT / "tools" / "minihbase"
LAUNCHER_CLASS = "io.distckpt.minihbase.MiniHBaseLauncher"

# MiniDFS's module opens, plus what HBase needs on Java 17 (measured: jdk.internal.misc for its unsafe
# access, netty's reflective access to direct buffers), and a smaller heap.
JVM_FLAGS = [f for f in _DFS_JVM_FLAGS if not f.startswith("-Xmx")] + [
    "--add-opens=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Xmx768m",
    "-XX:TieredStopAtLevel=1",
    "-Xshare:auto",
]

_START_TIMEOUT_S = 240.0
_COMMAND_TIMEOUT_S = 150.0  # the launcher bounds each command at 120 s itself

_build_lock = threading.Lock()
_built: Dict[str, Path] = {}


def build_launcher(java_home: Optional[str] = None) -> Path:
    """Run ``tools/minihbase/build.sh`` (quick no-op when its cache is warm); return the cache dir."""
    java_home = java_home or java_home_or_none()[0]
    key = java_home or ""
    with _build_lock:
        if key in _built and (_built[key] / ".complete").exists():
            return _built[key]
        env = dict(os.environ)
        if java_home:
            env["DISTCKPT_JAVA_HOME"] = java_home
            env["JAVA_HOME"] = java_home
        proc = subprocess.run(["bash", str(MINIHBASE_DIR / "build.sh")], capture_output=True, text=True, env=env,
                              timeout=1800)  # fmt: skip
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"tools/minihbase/build.sh failed (rc={proc.returncode}):\n"
                               f"{_tail_text(proc.stderr, 60)}\n{_tail_text(proc.stdout, 10)}")  # fmt: skip
        cache = Path(lines[-1])
        if not (cache / "classpath").exists():
            raise RuntimeError(f"build.sh printed {cache}, which has no classpath file")
        _built[key] = cache
        return cache


class MiniHBase:
    """Handle on a running mini HBase JVM. Create with :meth:`start`; use as a context manager.

    Thread safety: commands are serialized by a lock; the attributes are read-only after start.
    """

    thrift_host: str
    thrift_port: int
    info: Dict[str, Any]

    def __init__(self, proc: subprocess.Popen, base_dir: Path, log_path: Path, cds_tmp: Optional[Path],
                 cds_final: Optional[Path]) -> None:  # fmt: skip
        self._proc = proc
        self.base_dir = base_dir
        self.log_path = log_path
        self._cds = (cds_tmp, cds_final)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill, proc)
        self._reader = threading.Thread(target=self._read_stdout, name="minihbase-stdout", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, base_dir: os.PathLike | str, dfs: Optional[str] = None, regionservers: int = 1,
              timeout: float = _START_TIMEOUT_S, java_home: Optional[str] = None) -> "MiniHBase":
        """Build the launcher if needed, start HBase under ``base_dir`` (or on the HDFS ``dfs``) and wait for READY.

        Raises ``RuntimeError`` (with the JVM log's tail) if Java is missing or startup fails.
        """
        if java_home is None:
            java_home, reason = java_home_or_none()
            if java_home is None:
                raise RuntimeError(f"MiniHBase needs Java 17: {reason}")
        java = os.path.join(java_home, "bin", "java")
        cache = build_launcher(java_home)
        classpath = (cache / "classpath").read_text().strip()
        base = Path(base_dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
        (base / "tmp").mkdir(exist_ok=True)
        log_path = base / "minihbase.log"
        cds_flags, cds_tmp, cds_final = [], None, None
        if os.environ.get("DISTCKPT_MINIHBASE_NO_CDS") != "1":
            cds_final = cache / "appcds.jsa"
            if cds_final.exists():
                cds_flags = [f"-XX:SharedArchiveFile={cds_final}"]
            else:  # this run records the classes it loads; the archive is renamed into place after exit
                cds_tmp = cache / f".appcds-{os.getpid()}-{time.monotonic_ns()}.jsa"
                cds_flags = [f"-XX:ArchiveClassesAtExit={cds_tmp}"]
        level = os.environ.get("DISTCKPT_MINIHBASE_LOG_LEVEL", "WARN")
        cmd = [java, *JVM_FLAGS, *cds_flags, f"-Djava.io.tmpdir={base / 'tmp'}", f"-Dminihbase.log.level={level}",
               *shlex.split(os.environ.get("DISTCKPT_MINIHBASE_JVM_OPTS", "")),
               "-cp", classpath, LAUNCHER_CLASS, str(base), "--regionservers", str(int(regionservers))]  # fmt: skip
        if dfs:
            cmd += ["--dfs", dfs]
        env = dict(os.environ)
        env["JAVA_HOME"] = java_home
        for k in ("HADOOP_CONF_DIR", "HADOOP_HOME", "HBASE_CONF_DIR", "CLASSPATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS"):
            env.pop(k, None)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=str(base),
                                    env=env, bufsize=0)  # fmt: skip
        hb = cls(proc, base, log_path, cds_tmp, cds_final)
        try:
            hb._await_ready(timeout)
        except BaseException:
            hb._finalizer()
            raise
        return hb

    # -- protocol --------------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self._lines.put(None)

    def _next_line(self, deadline: float, what: str) -> str:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(self._failure(f"timed out waiting for {what}"))
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                rc = self._proc.wait(timeout=10) if self._proc.poll() is None else self._proc.returncode
                raise RuntimeError(self._failure(f"mini HBase JVM exited (rc={rc}) while waiting for {what}"))
            if line.startswith(("READY ", "OK", "ERR")):
                return line

    def _failure(self, msg: str) -> str:
        return f"{msg}\n--- tail of {self.log_path} ---\n{_tail_file(self.log_path)}"

    def _await_ready(self, timeout: float) -> None:
        line = self._next_line(time.monotonic() + timeout, "HBase to start (READY line)")
        if not line.startswith("READY "):
            raise RuntimeError(self._failure(f"mini HBase failed to start: {line}"))
        self.info = json.loads(line[len("READY "):])
        self.thrift_host = self.info["thrift_host"]
        self.thrift_port = int(self.info["thrift_port"])

    def _command(self, line: str, timeout: float = _COMMAND_TIMEOUT_S) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("MiniHBase is closed")
            if self._proc.poll() is not None:
                raise RuntimeError(self._failure(f"mini HBase JVM is gone (rc={self._proc.returncode})"))
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write((line + "\n").encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(self._failure("mini HBase JVM closed its stdin")) from None
            reply = self._next_line(time.monotonic() + timeout, f"reply to {line!r}")
        if reply.startswith("ERR"):
            raise RuntimeError(f"mini HBase command {line!r} failed: {reply[3:].strip()}")
        return reply[2:].strip()

    # -- commands --------------------------------------------------------------------------------
    @property
    def thrift_url(self) -> str:
        """``hbase://HOST:PORT`` of the Thrift gateway (append ``/TABLE`` for a catalog URL)."""
        return f"hbase://{self.thrift_host}:{self.thrift_port}"

    def catalog_url(self, table: str) -> str:
        return f"{self.thrift_url}/{table}"

    def status(self) -> Dict[str, Any]:
        return json.loads(self._command("status"))

    def stop_thrift(self) -> str:
        """Stop the Thrift gateway (its port refuses connections until :meth:`start_thrift`)."""
        return self._command("stop_thrift")

    def start_thrift(self) -> str:
        """Start the Thrift gateway again, on the same port."""
        return self._command("start_thrift")

    def stop_regionserver(self, i: int = 0) -> str:
        return self._command(f"stop_regionserver {int(i)}")

    def start_regionserver(self) -> str:
        return self._command("start_regionserver")

    def restart_master(self) -> str:
        return self._command("restart_master")

    def flush(self, table: str) -> str:
        """Flush a table's memstores to store files (old cell versions are dropped on the way)."""
        return self._command(f"flush {table}")

    def create_namespace(self, name: str) -> str:
        return self._command(f"create_namespace {name}")

    # -- shutdown --------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def close(self, timeout: float = 60.0) -> None:
        """Shut down cleanly (``quit``, then EOF); kill the JVM if it hangs. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        proc = self._proc
        try:
            if proc.poll() is None and proc.stdin is not None:
                for data in (b"quit\n", None):
                    try:
                        proc.stdin.write(data) if data else proc.stdin.close()
                        if data:
                            proc.stdin.flush()
                    except (BrokenPipeError, OSError):
                        pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._finalizer()
            tmp, final = self._cds
            if tmp is not None and final is not None:
                try:
                    if proc.returncode == 0 and tmp.exists() and tmp.stat().st_size > 0 and not final.exists():
                        os.replace(tmp, final)
                finally:
                    tmp.unlink(missing_ok=True)

    def __enter__(self) -> "MiniHBase":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MiniHBase({getattr(self, 'thrift_url', '?')}, {'alive' if self.alive else 'closed'})"


if __name__ == "__main__":  # manual smoke test: python tests/hbase_cluster.py [BASE_DIR]
    import tempfile

    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="minihbase-")
    t0 = time.monotonic()
    with MiniHBase.start(base) as hb:
        print(f"up in {time.monotonic() - t0:.1f}s: {hb!r} {hb.info}")
        print(hb.status())
    print(f"closed after {time.monotonic() - t0:.1f}s")
