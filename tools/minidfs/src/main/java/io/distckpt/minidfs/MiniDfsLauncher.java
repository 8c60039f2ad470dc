package io.distckpt.minidfs;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.io.Writer;
import java.lang.reflect.Field;
import java.net.BindException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.HdfsConfiguration;
import org.apache.hadoop.hdfs.MiniDFSCluster;
import org.apache.hadoop.hdfs.MiniDFSCluster.DataNodeProperties;
import org.apache.hadoop.hdfs.server.datanode.DataNode;
import org.apache.hadoop.hdfs.server.namenode.FSNamesystem;
import org.apache.hadoop.hdfs.server.namenode.NameNode;

/**
 * Starts an in-process HDFS ({@link MiniDFSCluster}: one NameNode, N DataNodes) for tests and
 * drives it through a line protocol.
 *
 * <pre>
 * usage: MiniDfsLauncher BASE_DIR [NUM_DATANODES=4] [REPLICATION=min(3,N)]
 * </pre>
 *
 * <p>stdout carries ONLY protocol lines (Hadoop's own console output is redirected to stderr):
 * one {@code READY {json}} line once the cluster is up, then exactly one {@code OK ...} or
 * {@code ERR message} line per command read from stdin. Commands: {@code stop_datanode I},
 * {@code restart_datanode I}, {@code stop_namenode}, {@code restart_namenode}, {@code status},
 * {@code quit}. EOF on stdin means quit. DataNode indices are the logical indices of the initial
 * cluster (0..N-1); they stay stable across stops and restarts.
 */
public final class MiniDfsLauncher {

  /** Bound for any single command (cluster waits inside MiniDFSCluster are unbounded). */
  private static final long COMMAND_TIMEOUT_S = 120;
  private static final long WAIT_TIMEOUT_MS = 90_000;

  private static PrintStream proto;
  private static MiniDFSCluster cluster;
  private static Configuration conf;
  private static File baseDir;
  private static int numDataNodes;
  private static int replication;
  /** logical index -> DataNode UUID (persisted in the DataNode's storage, stable across restarts). */
  private static final Map<Integer, String> dnUuids = new TreeMap<>();
  /** logical index -> properties of a stopped DataNode (needed to restart it). */
  private static final Map<Integer, DataNodeProperties> stopped = new TreeMap<>();
  /** logical index -> IPC port of a DataNode when it was last stopped (tests occupy it). */
  private static final Map<Integer, Integer> lastIpcPorts = new TreeMap<>();
  private static boolean nameNodeUp = true;
  private static String nnHost;
  private static int nnRpcPort;
  private static int nnHttpPort;
  private static final AtomicBoolean shutDown = new AtomicBoolean(false);

  private MiniDfsLauncher() {}

  public static void main(String[] args) throws Exception {
    // Keep the real stdout for the protocol; everything else that prints goes to stderr.
    proto = new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
    System.setOut(System.err);

    if (args.length < 1 || args.length > 3) {
      proto.println("ERR usage: MiniDfsLauncher BASE_DIR [NUM_DATANODES] [REPLICATION]");
      System.exit(2);
    }
    baseDir = new File(args[0]).getAbsoluteFile();
    numDataNodes = args.length > 1 ? Integer.parseInt(args[1]) : 4;
    replication = args.length > 2 ? Integer.parseInt(args[2]) : Math.min(3, numDataNodes);
    if (numDataNodes < 1 || replication < 1) {
      proto.println("ERR NUM_DATANODES and REPLICATION must be >= 1");
      System.exit(2);
    }

    Runtime.getRuntime().addShutdownHook(new Thread(MiniDfsLauncher::shutdownCluster, "minidfs-shutdown"));

    try {
      startCluster();
    } catch (Throwable t) {
      log("startup failed: " + stackTrace(t));
      proto.println("ERR startup failed: " + oneLine(t));
      shutdownCluster();
      System.exit(1);
    }
    proto.println("READY " + readyJson());
    proto.flush();

    ExecutorService exec = Executors.newSingleThreadExecutor(r -> {
      Thread t = new Thread(r, "minidfs-command");
      t.setDaemon(true);
      return t;
    });
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      line = line.trim();
      if (line.isEmpty()) {
        continue;
      }
      if (line.equals("quit") || line.equals("exit")) {
        proto.println("OK bye");
        break;
      }
      final String cmd = line;
      String reply;
      Future<String> f = exec.submit(() -> handle(cmd));
      try {
        reply = "OK " + f.get(COMMAND_TIMEOUT_S, TimeUnit.SECONDS);
      } catch (TimeoutException e) {
        f.cancel(true);
        reply = "ERR timeout after " + COMMAND_TIMEOUT_S + "s: " + cmd;
      } catch (java.util.concurrent.ExecutionException e) {
        Throwable c = e.getCause() != null ? e.getCause() : e;
        log("command failed: " + cmd + "\n" + stackTrace(c));
        reply = "ERR " + oneLine(c);
      }
      proto.println(reply);
      proto.flush();
    }
    log("quitting (" + (line == null ? "EOF on stdin" : "quit command") + ")");
    shutdownCluster();
    exec.shutdownNow();
    System.exit(0);
  }

  // ---------------------------------------------------------------------------------------------
  // cluster lifecycle

  private static void startCluster() throws Exception {
    File dfsDir = new File(baseDir, "dfs");
    Files.createDirectories(dfsDir.toPath());

    conf = new HdfsConfiguration();
    conf.set(MiniDFSCluster.HDFS_MINIDFS_BASEDIR, dfsDir.getAbsolutePath());
    conf.setInt("dfs.replication", replication);
    conf.setBoolean("dfs.webhdfs.enabled", true);
    conf.setBoolean("dfs.permissions.enabled", false);
    // Fast failure detection: heartbeat every 1 s, dead after 2*recheck + 10*heartbeat = 12 s.
    // stop_datanode additionally marks the node dead at once.
    conf.setLong("dfs.heartbeat.interval", 1);
    conf.setInt("dfs.namenode.heartbeat.recheck-interval", 1000);
    conf.setLong("dfs.namenode.stale.datanode.interval", 3000);
    conf.setBoolean("dfs.namenode.avoid.read.stale.datanode", true);
    conf.setBoolean("dfs.namenode.avoid.write.stale.datanode", true);
    // Writes survive a DataNode loss (these are client keys; they apply to the DataNodes'
    // own DFSClients, i.e. WebHDFS writes, and are written to the generated hdfs-site.xml).
    conf.setBoolean("dfs.client.block.write.replace-datanode-on-failure.enable", true);
    conf.set("dfs.client.block.write.replace-datanode-on-failure.policy", "DEFAULT");
    conf.setBoolean("dfs.client.block.write.replace-datanode-on-failure.best-effort", true);
    // Allow tiny block sizes so tests can create multi-block files cheaply.
    conf.setLong("dfs.namenode.fs-limits.min-block-size", 0);
    // After a NameNode restart, leave safe mode as soon as the blocks are reported.
    conf.setInt("dfs.namenode.safemode.extension", 0);
    // DataNodes reconnect quickly to a restarted NameNode.
    conf.setInt("ipc.client.connect.max.retries", 2);
    conf.setInt("ipc.client.connect.retry.interval", 300);
    conf.setInt("ipc.client.connect.timeout", 2000);
    // Java IPC clients inside this JVM (DataNode heartbeats, the DataNodes' WebHDFS DFSClients)
    // keep an idle connection until maxidletime; one opened to the NameNode before a restart
    // fails the next call with EOFException (WebHDFS then answers 500 once). 1 s makes such
    // stale connections go away before a restarted NameNode is up. (The server side only
    // closes idle connections above ipc.client.idlethreshold=4000 connections.)
    conf.setInt("ipc.client.connection.maxidletime", 1000);
    // Trash and friends off; small handler pools are plenty for tests.
    conf.setInt("dfs.namenode.handler.count", 10);
    conf.setInt("dfs.datanode.handler.count", 4);

    cluster = new MiniDFSCluster.Builder(conf, dfsDir)
        .numDataNodes(numDataNodes)
        .nameNodePort(0)
        .nameNodeHttpPort(0)
        .format(true)
        .checkExitOnShutdown(false)
        .build();
    cluster.waitActive();
    waitSafeModeOff();
    List<DataNode> dns = cluster.getDataNodes();
    for (int i = 0; i < dns.size(); i++) {
      dnUuids.put(i, dns.get(i).getDatanodeUuid());
    }
    nnHost = cluster.getNameNode(0).getNameNodeAddress().getAddress().getHostAddress();
    nnRpcPort = cluster.getNameNodePort();
    nnHttpPort = httpPort();
    writeClientConf();
  }

  private static void shutdownCluster() {
    if (!shutDown.compareAndSet(false, true)) {
      return;
    }
    MiniDFSCluster c = cluster;
    if (c != null) {
      try {
        c.shutdown();
      } catch (Throwable t) {
        log("shutdown: " + oneLine(t));
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // commands

  private static String handle(String line) throws Exception {
    String[] parts = line.split("\\s+");
    String cmd = parts[0];
    switch (cmd) {
      case "stop_datanode":
        return stopDataNode(index(parts));
      case "restart_datanode":
        return restartDataNode(index(parts));
      case "stop_namenode":
        return stopNameNode();
      case "restart_namenode":
        return restartNameNode();
      case "status":
        return statusJson();
      default:
        throw new IllegalArgumentException("unknown command: " + line);
    }
  }

  private static int index(String[] parts) {
    if (parts.length != 2) {
      throw new IllegalArgumentException(parts[0] + " takes one DataNode index");
    }
    int i = Integer.parseInt(parts[1]);
    if (i < 0 || i >= numDataNodes) {
      throw new IllegalArgumentException("DataNode index out of range 0.." + (numDataNodes - 1) + ": " + i);
    }
    return i;
  }

  /** Current position of logical DataNode {@code i} in cluster.getDataNodes(), or -1. */
  private static int position(int i) {
    String uuid = dnUuids.get(i);
    List<DataNode> dns = cluster.getDataNodes();
    for (int p = 0; p < dns.size(); p++) {
      if (uuid.equals(dns.get(p).getDatanodeUuid())) {
        return p;
      }
    }
    return -1;
  }

  private static String stopDataNode(int i) throws Exception {
    if (stopped.containsKey(i)) {
      throw new IllegalStateException("DataNode " + i + " is already stopped");
    }
    int p = position(i);
    if (p < 0) {
      throw new IllegalStateException("DataNode " + i + " not found");
    }
    int ipcPort = cluster.getDataNodes().get(p).getIpcPort();  // (not readable once it is stopped)
    DataNodeProperties props = cluster.stopDataNode(p);
    stopped.put(i, props);
    lastIpcPorts.put(i, ipcPort);
    if (nameNodeUp) {
      // Without this the NameNode keeps the node "live" until the heartbeat expiry.
      cluster.setDataNodeDead(props.getDatanode().getDatanodeId());
      waitUntil(() -> liveDataNodes() == cluster.getDataNodes().size(), "NameNode to see DataNode " + i + " dead");
    }
    return "stopped datanode " + i + " live=" + (nameNodeUp ? liveDataNodes() : -1);
  }

  private static String restartDataNode(int i) throws Exception {
    DataNodeProperties props = stopped.get(i);
    if (props == null) {
      throw new IllegalStateException("DataNode " + i + " is not stopped");
    }
    boolean keptPorts = true;
    try {
      cluster.restartDataNode(props, true);
    } catch (BindException e) {
      // Another socket took one of its old ports meanwhile (they were ephemeral). restartDataNode(props,
      // true) has already written the old ports into the DataNode's configuration: reset them to 0, or the
      // retry on "new" ports binds the same busy port again.
      log("restart_datanode " + i + ": ports busy, restarting on new ports: " + oneLine(e));
      keptPorts = false;
      anyPorts(props);
      cluster.restartDataNode(props, false);
    }
    stopped.remove(i);
    if (nameNodeUp) {
      cluster.waitActive();
      waitUntil(() -> liveDataNodes() == cluster.getDataNodes().size(), "DataNode " + i + " to register");
    }
    return "restarted datanode " + i + " kept_ports=" + keptPorts + " live=" + (nameNodeUp ? liveDataNodes() : -1);
  }

  /** Let a DataNode that restarts bind any free ports (its Configuration is package-private). */
  private static void anyPorts(DataNodeProperties props) throws ReflectiveOperationException {
    Field field = DataNodeProperties.class.getDeclaredField("conf");
    field.setAccessible(true);
    Configuration dnConf = (Configuration) field.get(props);
    for (String key : new String[] {"dfs.datanode.address", "dfs.datanode.ipc.address", "dfs.datanode.http.address"}) {
      dnConf.set(key, "127.0.0.1:0");
    }
  }

  private static String stopNameNode() {
    if (!nameNodeUp) {
      throw new IllegalStateException("NameNode is already stopped");
    }
    cluster.shutdownNameNode(0);
    nameNodeUp = false;
    return "stopped namenode";
  }

  private static String restartNameNode() throws Exception {
    // MiniDFSCluster wrote the bound RPC/HTTP addresses back into the NameNode's conf after the
    // first start, so the restarted NameNode binds the same ports.
    cluster.restartNameNode(0, false);
    nameNodeUp = true;
    cluster.waitClusterUp();
    cluster.waitActive(0);
    waitSafeModeOff();
    int rpc = cluster.getNameNodePort();
    int http = httpPort();
    if (rpc != nnRpcPort || http != nnHttpPort) {
      log("WARNING: NameNode ports changed " + nnRpcPort + "/" + nnHttpPort + " -> " + rpc + "/" + http);
      nnRpcPort = rpc;
      nnHttpPort = http;
    }
    return "restarted namenode rpc_port=" + rpc + " http_port=" + http + " live=" + liveDataNodes();
  }

  // ---------------------------------------------------------------------------------------------
  // helpers

  private static int liveDataNodes() {
    FSNamesystem ns = cluster.getNamesystem(0);
    return ns == null ? -1 : ns.getNumLiveDataNodes();
  }

  private static int httpPort() {
    NameNode nn = cluster.getNameNode(0);
    return nn == null ? -1 : nn.getHttpAddress().getPort();
  }

  private interface Cond {
    boolean get() throws Exception;
  }

  private static void waitUntil(Cond c, String what) throws Exception {
    long deadline = System.currentTimeMillis() + WAIT_TIMEOUT_MS;
    while (!c.get()) {
      if (System.currentTimeMillis() > deadline) {
        throw new TimeoutException("timed out waiting for " + what);
      }
      Thread.sleep(100);
    }
  }

  private static void waitSafeModeOff() throws Exception {
    waitUntil(() -> {
      FSNamesystem ns = cluster.getNamesystem(0);
      return ns != null && !ns.isInSafeMode();
    }, "NameNode to leave safe mode");
  }

  private static String readyJson() {
    String host = nnHost;
    int rpc = nnRpcPort;
    int http = nnHttpPort;
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("namenode", "hdfs://" + host + ":" + rpc);
    m.put("webhdfs", host + ":" + http);
    m.put("host", host);
    m.put("rpc_port", rpc);
    m.put("http_port", http);
    m.put("datanodes", numDataNodes);
    m.put("replication", replication);
    m.put("base_dir", baseDir.getAbsolutePath());
    m.put("conf_dir", new File(baseDir, "conf").getAbsolutePath());
    m.put("hadoop_version", org.apache.hadoop.util.VersionInfo.getVersion());
    m.put("java_version", System.getProperty("java.version"));
    return toJson(m);
  }

  private static String statusJson() {
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("namenode_up", nameNodeUp);
    m.put("rpc_port", nnRpcPort);
    m.put("http_port", nnHttpPort);
    m.put("running_datanodes", cluster.getDataNodes().size());
    m.put("live_datanodes", nameNodeUp ? liveDataNodes() : -1);
    m.put("stopped_datanodes", new ArrayList<>(stopped.keySet()));
    Map<String, Object> ports = new LinkedHashMap<>();
    lastIpcPorts.forEach((k, v) -> ports.put(String.valueOf(k), v));
    m.put("stopped_ipc_ports", ports);
    // logical index -> data transfer port of each running DataNode (how WebHDFS block locations name it)
    Map<String, Object> xfer = new LinkedHashMap<>();
    for (int i = 0; i < dnUuids.size(); i++) {
      int p = position(i);
      if (p >= 0) {
        xfer.put(String.valueOf(i), cluster.getDataNodes().get(p).getXferPort());
      }
    }
    m.put("datanode_xfer_ports", xfer);
    boolean safe = false;
    if (nameNodeUp) {
      FSNamesystem ns = cluster.getNamesystem(0);
      safe = ns != null && ns.isInSafeMode();
    }
    m.put("safemode", safe);
    return toJson(m);
  }

  /** core-site.xml + hdfs-site.xml for clients (HADOOP_CONF_DIR=&lt;base&gt;/conf). */
  private static void writeClientConf() throws IOException {
    File dir = new File(baseDir, "conf");
    Files.createDirectories(dir.toPath());
    Map<String, String> core = new LinkedHashMap<>();
    core.put("fs.defaultFS", "hdfs://" + nnHost + ":" + nnRpcPort);
    writeXml(new File(dir, "core-site.xml"), core);
    Map<String, String> hdfs = new LinkedHashMap<>();
    hdfs.put("dfs.replication", Integer.toString(replication));
    hdfs.put("dfs.namenode.http-address", nnHost + ":" + nnHttpPort);
    hdfs.put("dfs.client.block.write.replace-datanode-on-failure.enable", "true");
    hdfs.put("dfs.client.block.write.replace-datanode-on-failure.policy", "DEFAULT");
    hdfs.put("dfs.client.block.write.replace-datanode-on-failure.best-effort", "true");
    writeXml(new File(dir, "hdfs-site.xml"), hdfs);
  }

  private static void writeXml(File f, Map<String, String> props) throws IOException {
    StringBuilder sb = new StringBuilder("<?xml version=\"1.0\"?>\n<configuration>\n");
    for (Map.Entry<String, String> e : props.entrySet()) {
      sb.append("  <property><name>").append(e.getKey()).append("</name><value>")
          .append(e.getValue()).append("</value></property>\n");
    }
    sb.append("</configuration>\n");
    try (Writer w = Files.newBufferedWriter(f.toPath(), StandardCharsets.UTF_8)) {
      w.write(sb.toString());
    }
  }

  private static String toJson(Map<String, Object> m) {
    StringBuilder sb = new StringBuilder("{");
    boolean first = true;
    for (Map.Entry<String, Object> e : m.entrySet()) {
      if (!first) {
        sb.append(',');
      }
      first = false;
      sb.append(quote(e.getKey())).append(':').append(jsonValue(e.getValue()));
    }
    return sb.append('}').toString();
  }

  private static String jsonValue(Object v) {
    if (v == null) {
      return "null";
    }
    if (v instanceof Number || v instanceof Boolean) {
      return v.toString();
    }
    if (v instanceof Map) {
      @SuppressWarnings("unchecked")
      Map<String, Object> map = (Map<String, Object>) v;
      return toJson(map);
    }
    if (v instanceof List) {
      StringBuilder sb = new StringBuilder("[");
      List<?> l = (List<?>) v;
      for (int i = 0; i < l.size(); i++) {
        if (i > 0) {
          sb.append(',');
        }
        sb.append(jsonValue(l.get(i)));
      }
      return sb.append(']').toString();
    }
    return quote(v.toString());
  }

  private static String quote(String s) {
    StringBuilder sb = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      switch (c) {
        case '"': sb.append("\\\""); break;
        case '\\': sb.append("\\\\"); break;
        case '\n': sb.append("\\n"); break;
        case '\r': sb.append("\\r"); break;
        case '\t': sb.append("\\t"); break;
        default:
          if (c < 0x20) {
            sb.append(String.format("\\u%04x", (int) c));
          } else {
            sb.append(c);
          }
      }
    }
    return sb.append('"').toString();
  }

  private static String oneLine(Throwable t) {
    String msg = t.getClass().getSimpleName() + ": " + t.getMessage();
    return msg.replace('\n', ' ').replace('\r', ' ');
  }

  private static String stackTrace(Throwable t) {
    StringWriter sw = new StringWriter();
    t.printStackTrace(new PrintWriter(sw));
    return sw.toString();
  }

  private static void log(String msg) {
    System.err.println("[minidfs-launcher] " + msg);
    System.err.flush();
  }
}
