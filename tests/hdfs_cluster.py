"""A real HDFS (Hadoop ``MiniDFSCluster``: 1 NameNode + N DataNodes in one JVM) for tests.

No pytest in here, so it can be used from fixtures, scripts and a REPL alike::

    from tests.hdfs_cluster import MiniDfs, java_home_or_none

    with MiniDfs.start("/tmp/dfs", datanodes=4) as dfs:
        dfs.namenode_url      # "hdfs://127.0.0.1:PORT"
        dfs.webhdfs_url       # "webhdfs://127.0.0.1:HTTPPORT"
        dfs.stop_datanode(0); dfs.restart_datanode(0)
        dfs.stop_namenode(); dfs.restart_namenode()

The JVM side is ``tools/minidfs`` (built once into a cache outside the repo by ``build.sh``).
It runs on Java 17, picked explicitly: ``$DISTCKPT_JAVA_HOME``, else ``/usr/lib/jvm/*17*``,
else ``java`` on ``PATH`` if its version is 11..22 (Hadoop breaks on Java 23+).

Environment knobs:
  DISTCKPT_JAVA_HOME          JDK/JRE home to run the cluster (and Maven) with
  DISTCKPT_MINIDFS_CACHE      cache root for the built launcher (see tools/minidfs/build.sh)
  DISTCKPT_MINIDFS_LOG_LEVEL  slf4j level for Hadoop's log in <base_dir>/minidfs.log (default info)
  DISTCKPT_MINIDFS_JVM_OPTS   extra JVM options (whitespace separated)
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["MiniDfs", "java_home_or_none", "build_launcher", "JVM_FLAGS"]

REPO_ROOT = Path(__file__).resolve().parent.parent
MINIDFS_DIR = REPO_ROOT / "tools" / "minidfs"
LAUNCHER_CLASS = "io.distckpt.minidfs.MiniDfsLauncher"

_JAVA_MIN, _JAVA_MAX = 11, 22

# The module opens Hadoop's own tests use on Java 17 (hadoop-project/pom.xml), as a safety margin.
JVM_FLAGS: List[str] = [
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.math=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.text=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
    "--add-opens=java.base/java.util.regex=ALL-UNNAMED",
    "--add-opens=java.base/java.util.zip=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.cs=ALL-UNNAMED",
    "--add-opens=java.base/sun.security.action=ALL-UNNAMED",
    "--add-opens=java.base/sun.security.x509=ALL-UNNAMED",
    "--add-opens=java.base/sun.util.calendar=ALL-UNNAMED",
    "--add-opens=java.security.jgss/sun.security.krb5=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.dns=ALL-UNNAMED",
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "-Djava.net.preferIPv4Stack=true",
    "-Xmx1536m",
    "-XX:+UseSerialGC",
]

_START_TIMEOUT_S = 180.0
_COMMAND_TIMEOUT_S = 150.0  # the launcher bounds each command at 120 s itself


# --------------------------------------------------------------------------------------------
# Java discovery


def _java_major(java: str) -> Optional[int]:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8.0_x"
        major = int(m.group(2))
    return major


def java_home_or_none() -> Tuple[Optional[str], str]:
    """Return ``(java_home, reason)``: a usable Java (11..22, preferably 17) home, or ``None``.

    ``reason`` says where the home came from, or why none was found (for ``pytest.skip``).
    """
    env = os.environ.get("DISTCKPT_JAVA_HOME")
    if env:
        java = os.path.join(env, "bin", "java")
        if not os.access(java, os.X_OK):
            return None, f"DISTCKPT_JAVA_HOME={env} has no executable bin/java"
        major = _java_major(java)
        if major is None or not (_JAVA_MIN <= major <= _JAVA_MAX):
            return None, (
                f"DISTCKPT_JAVA_HOME={env} is Java {major}; Hadoop 3.5 needs Java "
                f"{_JAVA_MIN}..{_JAVA_MAX} (17 recommended)"
            )
        return env, f"DISTCKPT_JAVA_HOME (Java {major})"

    for home in sorted(glob.glob("/usr/lib/jvm/*17*")):
        java = os.path.join(home, "bin", "java")
        if os.access(java, os.X_OK) and _java_major(java) == 17:
            return os.path.realpath(home), "/usr/lib/jvm (Java 17)"

    java = shutil.which("java")
    if java:
        major = _java_major(java)
        if major is not None and _JAVA_MIN <= major <= _JAVA_MAX:
            return str(Path(os.path.realpath(java)).parent.parent), f"java on PATH (Java {major})"
        return None, (
            f"no Java 17 found (set DISTCKPT_JAVA_HOME); `java` on PATH is Java {major}, "
            f"Hadoop 3.5 needs {_JAVA_MIN}..{_JAVA_MAX}"
        )
    return None, "no Java found: install OpenJDK 17 or set DISTCKPT_JAVA_HOME"


# --------------------------------------------------------------------------------------------
# Launcher build

_build_lock = threading.Lock()
_built: Dict[str, Path] = {}


def build_launcher(java_home: Optional[str] = None) -> Path:
    """Run ``tools/minidfs/build.sh`` (quick no-op when its cache is warm); return the cache dir."""
    java_home = java_home or java_home_or_none()[0]
    key = java_home or ""
    with _build_lock:
        if key in _built and (_built[key] / ".complete").exists():
            return _built[key]
        env = dict(os.environ)
        if java_home:
            env["DISTCKPT_JAVA_HOME"] = java_home
            env["JAVA_HOME"] = java_home
        proc = subprocess.run(
            ["bash", str(MINIDFS_DIR / "build.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"tools/minidfs/build.sh failed (rc={proc.returncode}):\n"
                f"{_tail_text(proc.stderr, 60)}\n{_tail_text(proc.stdout, 10)}"
            )
        cache = Path(lines[-1])
        if not (cache / "classpath").exists():
            raise RuntimeError(f"build.sh printed {cache}, which has no classpath file")
        _built[key] = cache
        return cache


# --------------------------------------------------------------------------------------------
# The cluster


def _tail_text(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def _tail_file(path: Path, n: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return _tail_text(data, n)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
            proc.wait(timeout=10)
        except Exception:
            pass


class MiniDfs:
    """Handle on a running MiniDFSCluster JVM. Create with :meth:`start`; use as a context manager."""

    namenode_url: str
    webhdfs_url: str
    host: str
    rpc_port: int
    http_port: int
    datanodes: int
    replication: int
    base_dir: Path
    conf_dir: Path
    log_path: Path
    info: Dict[str, Any]

    def __init__(self, proc: subprocess.Popen, base_dir: Path, log_path: Path):
        self._proc = proc
        self.base_dir = base_dir
        self.log_path = log_path
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill, proc)
        self._reader = threading.Thread(target=self._read_stdout, name="minidfs-stdout", daemon=True)
        self._reader.start()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        base_dir: os.PathLike | str,
        datanodes: int = 4,
        replication: Optional[int] = None,
        timeout: float = _START_TIMEOUT_S,
        java_home: Optional[str] = None,
    ) -> "MiniDfs":
        """Build the launcher if needed, start the cluster under ``base_dir`` and wait until ready.

        ``replication`` defaults to ``min(3, datanodes)`` (the cluster's ``dfs.replication``).
        Raises ``RuntimeError`` (with the JVM log's tail) if Java is missing or startup fails.
        """
        if java_home is None:
            java_home, reason = java_home_or_none()
            if java_home is None:
                raise RuntimeError(f"MiniDfs needs Java 17: {reason}")
        java = os.path.join(java_home, "bin", "java")
        cache = build_launcher(java_home)
        classpath = (cache / "classpath").read_text().strip()

        base = Path(base_dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / "tmp"  # Jetty unpacks its web apps into java.io.tmpdir
        tmp.mkdir(exist_ok=True)
        log_path = base / "minidfs.log"
        level = os.environ.get("DISTCKPT_MINIDFS_LOG_LEVEL", "info")
        cmd = [
            java,
            *JVM_FLAGS,
            f"-Djava.io.tmpdir={tmp}",
            f"-Dorg.slf4j.simpleLogger.defaultLogLevel={level}",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
            *shlex.split(os.environ.get("DISTCKPT_MINIDFS_JVM_OPTS", "")),
            "-cp",
            classpath,
            LAUNCHER_CLASS,
            str(base),
            str(int(datanodes)),
        ]
        if replication is not None:
            cmd.append(str(int(replication)))
        env = dict(os.environ)
        env["JAVA_HOME"] = java_home
        for k in ("HADOOP_CONF_DIR", "HADOOP_HOME", "CLASSPATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS"):
            env.pop(k, None)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=str(base),
                env=env,
                bufsize=0,
            )
        dfs = cls(proc, base, log_path)
        try:
            dfs._await_ready(timeout)
        except BaseException:
            dfs._finalizer()
            raise
        return dfs

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self._lines.put(None)  # EOF

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
                self._lines.put(None)  # keep EOF visible to later callers
                rc = self._proc.wait(timeout=10) if self._proc.poll() is None else self._proc.returncode
                raise RuntimeError(self._failure(f"MiniDFS JVM exited (rc={rc}) while waiting for {what}"))
            if line.startswith(("READY ", "OK", "ERR")):
                return line
            # anything else on stdout is noise; the launcher routes Hadoop's output to stderr

    def _failure(self, msg: str) -> str:
        return f"{msg}\n--- tail of {self.log_path} ---\n{_tail_file(self.log_path)}"

    def _await_ready(self, timeout: float) -> None:
        line = self._next_line(time.monotonic() + timeout, "the cluster to start (READY line)")
        if not line.startswith("READY "):
            raise RuntimeError(self._failure(f"MiniDFS failed to start: {line}"))
        info = json.loads(line[len("READY "):])
        self.info = info
        self.host = info["host"]
        self.rpc_port = int(info["rpc_port"])
        self.http_port = int(info["http_port"])
        self.datanodes = int(info["datanodes"])
        self.replication = int(info["replication"])
        self.conf_dir = Path(info["conf_dir"])
        self._set_urls()

    def _set_urls(self) -> None:
        self.namenode_url = f"hdfs://{self.host}:{self.rpc_port}"
        self.webhdfs_url = f"webhdfs://{self.host}:{self.http_port}"

    # -- commands ------------------------------------------------------------------------------

    def _command(self, line: str, timeout: float = _COMMAND_TIMEOUT_S) -> str:
        with self._lock:
            if self._closed:
                raise RuntimeError("MiniDfs is closed")
            if self._proc.poll() is not None:
                raise RuntimeError(self._failure(f"MiniDFS JVM is gone (rc={self._proc.returncode})"))
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write((line + "\n").encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(self._failure("MiniDFS JVM closed its stdin")) from None
            reply = self._next_line(time.monotonic() + timeout, f"reply to {line!r}")
        if reply.startswith("ERR"):
            raise RuntimeError(f"MiniDFS command {line!r} failed: {reply[3:].strip()}")
        return reply[2:].strip()

    def stop_datanode(self, i: int) -> str:
        """Stop DataNode ``i`` (0-based, stable index) and make the NameNode treat it as dead now."""
        return self._command(f"stop_datanode {int(i)}")

    def restart_datanode(self, i: int) -> str:
        """Restart a stopped DataNode (same ports if free); waits until it is registered."""
        return self._command(f"restart_datanode {int(i)}")

    def stop_namenode(self) -> str:
        return self._command("stop_namenode")

    def restart_namenode(self) -> str:
        """Restart the NameNode on the same RPC/HTTP ports; waits until active and out of safe mode."""
        reply = self._command("restart_namenode")
        m = re.search(r"rpc_port=(\d+) http_port=(\d+)", reply)
        if m:
            self.rpc_port, self.http_port = int(m.group(1)), int(m.group(2))
            self._set_urls()
        return reply

    def status(self) -> Dict[str, Any]:
        return json.loads(self._command("status"))

    def block_holders(self, path: str) -> Dict[str, List[Set[int]]]:
        """The DataNodes (logical indices) holding a live replica of each block of each file under ``path`` (a
        path or an ``hdfs://`` URL), by file, as the NameNode reports them now (WebHDFS
        ``GETFILEBLOCKLOCATIONS``; a replica the NameNode knows to be stale or corrupt is not listed)."""
        from urllib.parse import quote, urlparse
        from urllib.request import urlopen

        base = f"http://{self.host}:{self.http_port}/webhdfs/v1"
        by_port = {int(port): int(i) for i, port in self.status().get("datanode_xfer_ports", {}).items()}
        out: Dict[str, List[Set[int]]] = {}

        def get(p: str, op: str) -> Any:
            with urlopen(f"{base}{quote(p)}?op={op}&user.name=root", timeout=30) as r:
                return json.load(r)

        def walk(p: str) -> None:
            for st in get(p, "LISTSTATUS")["FileStatuses"]["FileStatus"]:
                child = f"{p.rstrip('/')}/{st['pathSuffix']}" if st["pathSuffix"] else p
                if st["type"] == "DIRECTORY":
                    walk(child)
                else:
                    blocks = get(child, "GETFILEBLOCKLOCATIONS")["BlockLocations"]["BlockLocation"]
                    ports = ([int(n.rsplit(":", 1)[1]) for n in b["names"]] for b in blocks)
                    out[child] = [{by_port[p] for p in ps if p in by_port} for ps in ports]

        walk(urlparse(path).path or "/")
        return out

    def wait_losable(self, path: str, choices: Sequence[Tuple[int, ...]], timeout: float = 120.0) -> Tuple[int, ...]:
        """Wait until losing one of ``choices`` (sets of DataNodes, tried in order) would leave a live replica of
        every block under ``path``; return that choice. Blocks written while DataNodes were away live on the
        others only until the NameNode re-replicates them, and a DataNode that came back holding a stale
        replica of a block is no target for it, so which loss is survivable is read, not assumed."""
        deadline = time.monotonic() + timeout
        while True:
            holders = self.block_holders(path)
            for lost in choices:
                if all(h - set(lost) for blocks in holders.values() for h in blocks):
                    return lost
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:.0f} s, losing any of {list(choices)} would lose a block: {holders}")
            time.sleep(0.5)

    def client_env(self) -> Dict[str, str]:
        """Environment for clients that read Hadoop XML config (``HADOOP_CONF_DIR``)."""
        return {"HADOOP_CONF_DIR": str(self.conf_dir)}

    # -- shutdown ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def close(self, timeout: float = 60.0) -> None:
        """Shut the cluster down cleanly (``quit``, then EOF); kill the JVM if it hangs. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        proc = self._proc
        try:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(b"quit\n")
                    proc.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass
                try:
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._finalizer()  # kills only if still running
            if proc.stdout is not None:
                try:
                    proc.stdout.close()
                except OSError:
                    pass

    def __enter__(self) -> "MiniDfs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "closed"
        return f"MiniDfs({getattr(self, 'namenode_url', '?')}, {getattr(self, 'webhdfs_url', '?')}, {state})"


if __name__ == "__main__":  # manual smoke test: python tests/hdfs_cluster.py [BASE_DIR]
    import sys
    import tempfile

    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="minidfs-")
    t0 = time.monotonic()
    with MiniDfs.start(base) as dfs:
        print(f"up in {time.monotonic() - t0:.1f}s: {dfs!r}")
        print(dfs.status())
