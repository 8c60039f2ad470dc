package io.distckpt.minihbase;

import java.io.BufferedReader;
import java.io.File;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.io.PrintWriter;
import java.io.StringWriter;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hbase.HBaseConfiguration;
import org.apache.hadoop.hbase.NamespaceDescriptor;
import org.apache.hadoop.hbase.ServerName;
import org.apache.hadoop.hbase.client.Admin;
import org.apache.hadoop.hbase.client.Connection;
import org.apache.hadoop.hbase.client.ConnectionFactory;
import org.apache.hadoop.hbase.testing.TestingHBaseCluster;
import org.apache.hadoop.hbase.testing.TestingHBaseClusterOption;
import org.apache.hadoop.hbase.thrift.ThriftServer;

/**
 * A mini HBase (ZooKeeper, one master, region servers; {@link TestingHBaseCluster}) plus the Thrift1
 * gateway (what happybase talks to), in one JVM, for tests. Test-only; nothing here ships with the package.
 *
 * <pre>
 * java FLAGS -cp CLASSPATH io.distckpt.minihbase.MiniHBaseLauncher BASE_DIR [--dfs URI] [--regionservers N]
 * </pre>
 *
 * Without {@code --dfs} HBase keeps its data on the local filesystem under BASE_DIR (no HDFS started); with
 * {@code --dfs hdfs://host:port} it runs on that (external) HDFS. stdout carries only protocol lines:
 * {@code READY {json}} once the cluster and the gateway answer, then one {@code OK ...} or {@code ERR ...}
 * per command read from stdin. EOF on stdin (or {@code quit}) shuts everything down.
 */
public final class MiniHBaseLauncher {
  private static final long WAIT_TIMEOUT_MS = 120_000;

  private static PrintStream proto;
  private static File baseDir;
  private static String dfsUri;
  private static int numRegionServers = 1;
  private static TestingHBaseCluster cluster;
  private static volatile ThriftServer thrift;
  private static volatile Thread thriftThread;
  private static int thriftPort;
  private static final AtomicBoolean shutDown = new AtomicBoolean();

  private MiniHBaseLauncher() {}

  public static void main(String[] args) throws Exception {
    // Only protocol lines on stdout: everything else printed to System.out goes to stderr.
    proto = new PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out), true, "UTF-8");
    System.setOut(System.err);
    if (args.length < 1) {
      proto.println("ERR usage: MiniHBaseLauncher BASE_DIR [--dfs URI] [--regionservers N]");
      System.exit(2);
    }
    baseDir = new File(args[0]).getAbsoluteFile();
    for (int i = 1; i < args.length; i++) {
      if (args[i].equals("--dfs") && i + 1 < args.length) {
        dfsUri = args[++i];
      } else if (args[i].equals("--regionservers") && i + 1 < args.length) {
        numRegionServers = Integer.parseInt(args[++i]);
      } else {
        proto.println("ERR unknown argument: " + args[i]);
        System.exit(2);
      }
    }
    Runtime.getRuntime().addShutdownHook(new Thread(MiniHBaseLauncher::shutdown, "minihbase-shutdown"));
    long t0 = System.nanoTime();
    try {
      startCluster();
      thriftPort = freePort();
      startThrift();
    } catch (Throwable t) {
      log("startup failed:\n" + stackTrace(t));
      proto.println("ERR " + oneLine(t));
      shutdown();
      System.exit(1);
    }
    Map<String, Object> ready = status();
    ready.put("startup_s", (System.nanoTime() - t0) / 1e9);
    proto.println("READY " + toJson(ready));

    ExecutorService exec = Executors.newSingleThreadExecutor();
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    String line;
    while ((line = in.readLine()) != null) {
      line = line.trim();
      if (line.isEmpty()) {
        continue;
      }
      if (line.equals("quit")) {
        proto.println("OK bye");
        break;
      }
      final String cmd = line;
      String reply;
      try {
        Future<String> f = exec.submit(() -> handle(cmd));
        reply = "OK " + f.get(WAIT_TIMEOUT_MS, TimeUnit.MILLISECONDS);
      } catch (TimeoutException e) {
        reply = "ERR timed out after " + WAIT_TIMEOUT_MS + " ms: " + cmd;
      } catch (java.util.concurrent.ExecutionException e) {
        Throwable c = e.getCause() != null ? e.getCause() : e;
        log("command failed: " + cmd + "\n" + stackTrace(c));
        reply = "ERR " + oneLine(c);
      }
      proto.println(reply);
    }
    log("quitting (" + (line == null ? "EOF on stdin" : "quit command") + ")");
    shutdown();
    exec.shutdownNow();
    System.exit(0);
  }

  // ---------------------------------------------------------------------------------------------
  // lifecycle

  private static void startCluster() throws Exception {
    Files.createDirectories(baseDir.toPath());
    // HBaseTestingUtility puts its data (and the local-filesystem root dir) under this directory.
    System.setProperty("test.build.data.basedirectory", new File(baseDir, "data").getAbsolutePath());
    Configuration conf = HBaseConfiguration.create();
    // Free ports everywhere, no web UIs (Jetty start-up is the slow part on 2 cores).
    conf.setInt("hbase.master.port", 0);
    conf.setInt("hbase.master.info.port", -1);
    conf.setInt("hbase.regionserver.port", 0);
    conf.setInt("hbase.regionserver.info.port", -1);
    // Write-ahead log through the plain FileSystem API: works on file:// and on any HDFS version.
    conf.set("hbase.wal.provider", "filesystem");
    conf.setBoolean("hbase.unsafe.stream.capability.enforce", false);
    // Small pools and quick failure detection (a stopped region server is noticed in seconds).
    conf.setInt("hbase.regionserver.handler.count", 8);
    conf.setInt("hbase.master.handler.count", 8);
    conf.setInt("zookeeper.session.timeout", 10_000);
    conf.setInt("hbase.client.retries.number", 3);
    conf.setInt("hbase.client.pause", 100);
    conf.setInt("hbase.rpc.timeout", 5_000);
    conf.setInt("hbase.client.operation.timeout", 10_000);
    conf.setInt("hbase.client.meta.operation.timeout", 10_000);
    conf.setBoolean("hbase.procedure.store.wal.use.hsync", false);
    conf.setInt("hbase.master.wait.on.regionservers.mintostart", 1);
    conf.setBoolean("hbase.balancer.tablesOnMaster", false);
    TestingHBaseClusterOption.Builder b = TestingHBaseClusterOption.builder()
        .conf(conf)
        .numMasters(1)
        .numRegionServers(numRegionServers)
        .numDataNodes(1)
        .numZkServers(1);
    b.useExternalDfs(dfsUri != null ? dfsUri : "file:///");
    cluster = TestingHBaseCluster.create(b.build());
    cluster.start();
    waitUntil(() -> cluster.isHBaseClusterRunning() && cluster.getActiveMasterAddress().isPresent(), "the master");
  }

  private static void startThrift() throws Exception {
    Configuration tconf = new Configuration(cluster.getConf());
    tconf.setInt("hbase.thrift.info.port", -1);
    tconf.setInt("hbase.regionserver.thrift.port", thriftPort);
    tconf.set("hbase.regionserver.thrift.ipaddress", "127.0.0.1");
    tconf.setInt("hbase.thrift.minWorkerThreads", 4);
    // The thread-pool server's stop() waits (up to 60 s) for the threads serving open client connections, which
    // block reading an idle socket: close idle connections after 3 s, so stop_thrift takes seconds and drops
    // every client (like a gateway that dies). Clients reconnect (the catalog retries on a new connection).
    tconf.setInt("hbase.thrift.server.socket.read.timeout", 3_000);
    ThriftServer ts = new ThriftServer(tconf);
    Thread t = new Thread(() -> {
      try {
        ts.run(new String[] {"-b", "127.0.0.1", "-p", Integer.toString(thriftPort), "-threadpool", "start"});
      } catch (Throwable e) {
        log("thrift server ended: " + oneLine(e));
      }
    }, "minihbase-thrift");
    t.setDaemon(true);
    t.start();
    thrift = ts;
    thriftThread = t;
    waitUntil(() -> portOpen(thriftPort), "the Thrift gateway on port " + thriftPort);
  }

  private static void stopThrift() throws Exception {
    ThriftServer ts = thrift;
    if (ts == null) {
      throw new IllegalStateException("the Thrift gateway is not running");
    }
    thrift = null;
    ts.stop();
    Thread t = thriftThread;
    if (t != null) {
      t.join(WAIT_TIMEOUT_MS);
    }
    waitUntil(() -> !portOpen(thriftPort), "the Thrift gateway to close port " + thriftPort);
  }

  private static void shutdown() {
    if (!shutDown.compareAndSet(false, true)) {
      return;
    }
    try {
      if (thrift != null) {
        thrift.stop();
      }
    } catch (Throwable t) {
      log("thrift stop: " + oneLine(t));
    }
    try {
      if (cluster != null) {
        cluster.stop();
      }
    } catch (Throwable t) {
      log("cluster stop: " + oneLine(t));
    }
  }

  // ---------------------------------------------------------------------------------------------
  // commands

  private static String handle(String line) throws Exception {
    String[] p = line.split("\\s+");
    switch (p[0]) {
      case "status":
        return toJson(status());
      case "stop_thrift":
        stopThrift();
        return "stopped thrift port=" + thriftPort;
      case "start_thrift":
        if (thrift != null) {
          throw new IllegalStateException("the Thrift gateway is already running");
        }
        startThrift();
        return "started thrift port=" + thriftPort;
      case "stop_regionserver": {
        List<ServerName> rs = cluster.getRegionServerAddresses();
        int i = p.length > 1 ? Integer.parseInt(p[1]) : 0;
        if (i < 0 || i >= rs.size()) {
          throw new IllegalArgumentException("region server index out of range 0.." + (rs.size() - 1) + ": " + i);
        }
        ServerName sn = rs.get(i);
        cluster.stopRegionServer(sn).get(WAIT_TIMEOUT_MS, TimeUnit.MILLISECONDS);
        return "stopped regionserver " + sn + " running=" + cluster.getRegionServerAddresses().size();
      }
      case "start_regionserver": {
        int before = cluster.getRegionServerAddresses().size();
        cluster.startRegionServer();
        waitUntil(() -> cluster.getRegionServerAddresses().size() > before, "a new region server");
        return "started regionserver running=" + cluster.getRegionServerAddresses().size();
      }
      case "restart_master": {
        ServerName sn = cluster.getActiveMasterAddress().orElseThrow(() -> new IllegalStateException("no active master"));
        cluster.stopMaster(sn).get(WAIT_TIMEOUT_MS, TimeUnit.MILLISECONDS);
        cluster.startMaster();
        waitUntil(() -> cluster.getActiveMasterAddress().isPresent(), "a new active master");
        waitUntil(MiniHBaseLauncher::masterAnswers, "the new master to answer");
        return "restarted master " + cluster.getActiveMasterAddress().get();
      }
      case "flush": {
        if (p.length != 2) {
          throw new IllegalArgumentException("flush takes one table name");
        }
        try (Connection c = ConnectionFactory.createConnection(cluster.getConf()); Admin a = c.getAdmin()) {
          a.flush(org.apache.hadoop.hbase.TableName.valueOf(p[1]));
        }
        return "flushed " + p[1];
      }
      case "create_namespace": {
        if (p.length != 2) {
          throw new IllegalArgumentException("create_namespace takes one name");
        }
        try (Connection c = ConnectionFactory.createConnection(cluster.getConf()); Admin a = c.getAdmin()) {
          a.createNamespace(NamespaceDescriptor.create(p[1]).build());
        }
        return "created namespace " + p[1];
      }
      default:
        throw new IllegalArgumentException("unknown command: " + line
            + " (status, stop_thrift, start_thrift, stop_regionserver [I], start_regionserver, restart_master,"
            + " flush TABLE, create_namespace NAME, quit)");
    }
  }

  private static boolean masterAnswers() {
    try (Connection c = ConnectionFactory.createConnection(cluster.getConf()); Admin a = c.getAdmin()) {
      a.listNamespaceDescriptors();
      return true;
    } catch (Exception e) {
      return false;
    }
  }

  private static Map<String, Object> status() {
    Configuration conf = cluster.getConf();
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("thrift", "127.0.0.1:" + thriftPort);
    m.put("thrift_host", "127.0.0.1");
    m.put("thrift_port", thriftPort);
    m.put("thrift_up", thrift != null);
    m.put("zookeeper", conf.get("hbase.zookeeper.quorum") + ":" + conf.get("hbase.zookeeper.property.clientPort"));
    m.put("master", cluster.getActiveMasterAddress().map(ServerName::toString).orElse(null));
    List<Object> rs = new ArrayList<>();
    for (ServerName sn : cluster.getRegionServerAddresses()) {
      rs.add(sn.toString());
    }
    m.put("regionservers", rs);
    m.put("rootdir", conf.get("hbase.rootdir"));
    m.put("base_dir", baseDir.getAbsolutePath());
    m.put("hbase_version", org.apache.hadoop.hbase.util.VersionInfo.getVersion());
    m.put("java_version", System.getProperty("java.version"));
    return m;
  }

  // ---------------------------------------------------------------------------------------------
  // helpers

  private static int freePort() throws Exception {
    try (ServerSocket s = new ServerSocket()) {
      s.setReuseAddress(true);
      s.bind(new InetSocketAddress("127.0.0.1", 0));
      return s.getLocalPort();
    }
  }

  private static boolean portOpen(int port) {
    try (Socket s = new Socket()) {
      s.connect(new InetSocketAddress("127.0.0.1", port), 500);
      return true;
    } catch (Exception e) {
      return false;
    }
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
      Thread.sleep(50);
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
    return (t.getClass().getSimpleName() + ": " + t.getMessage()).replace('\n', ' ').replace('\r', ' ');
  }

  private static String stackTrace(Throwable t) {
    StringWriter sw = new StringWriter();
    t.printStackTrace(new PrintWriter(sw));
    return sw.toString();
  }

  private static void log(String msg) {
    System.err.println("[minihbase-launcher] " + msg);
    System.err.flush();
  }
}
