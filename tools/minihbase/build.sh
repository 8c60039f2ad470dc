#!/usr/bin/env bash
# Build the mini HBase launcher jar and its runtime classpath into a cache directory OUTSIDE the repo:
#   ${DISTCKPT_MINIHBASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-distckpt/minihbase}/<hash>/
#     minihbase-launcher.jar  lib/*.jar  classpath  hbase-thrift-idl/Hbase.thrift  .complete
# <hash> covers pom.xml, the Java sources and resources and this script, so edits rebuild.
# Idempotent: with a warm cache it only hashes and prints the directory. Reuses ~/.m2; tries Maven offline
# first and goes online (Maven Central) only when something is missing.
# The cache directory is printed as the LAST line of stdout; Maven's output goes to stderr.
# The AppCDS archive (faster JVM start) is made later, by the first cluster start (tests/hbase_cluster.py).
#
# Env:
#   DISTCKPT_JAVA_HOME          JDK used to run Maven (default: $JAVA_HOME, else /usr/lib/jvm/*17*)
#   DISTCKPT_MINIHBASE_CACHE    cache root (see above)
#   MINIHBASE_FORCE_BUILD=1     rebuild even if the cache is warm
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${DISTCKPT_MINIHBASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-distckpt/minihbase}"

hash="$(
  cd "$here"
  {
    cat pom.xml build.sh
    find src -type f | LC_ALL=C sort | while read -r f; do echo "== $f"; cat "$f"; done
  } | sha256sum | cut -c1-16
)"
out="$cache_root/$hash"

if [[ -f "$out/.complete" && -f "$out/minihbase-launcher.jar" && "${MINIHBASE_FORCE_BUILD:-0}" != 1 ]]; then
  echo "$out"
  exit 0
fi

command -v mvn >/dev/null 2>&1 || { echo "build.sh: mvn (Maven) not found on PATH" >&2; exit 3; }

# Maven needs a JDK; prefer Java 17 (HBase 2.6 / Hadoop 3.3 break on Java 23+).
if [[ -n "${DISTCKPT_JAVA_HOME:-}" ]]; then
  export JAVA_HOME="$DISTCKPT_JAVA_HOME"
elif [[ -z "${JAVA_HOME:-}" ]]; then
  for d in /usr/lib/jvm/*17*; do
    if [[ -x "$d/bin/javac" ]]; then export JAVA_HOME="$d"; break; fi
  done
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock-$hash"
flock 9   # concurrent test workers: one builds, the others wait and reuse

if [[ -f "$out/.complete" && -f "$out/minihbase-launcher.jar" && "${MINIHBASE_FORCE_BUILD:-0}" != 1 ]]; then
  echo "$out"
  exit 0
fi

tmp="$(mktemp -d "$cache_root/.build-$hash.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp -r "$here/pom.xml" "$here/src" "$tmp/"
mkdir -p "$tmp/out/lib"

goals=(-B -f "$tmp/pom.xml" package dependency:copy-dependencies
       -DincludeScope=runtime "-DoutputDirectory=$tmp/out/lib" -DskipTests)
echo "build.sh: building mini HBase launcher into $out (JAVA_HOME=${JAVA_HOME:-unset}) ..." >&2
ok=0
if [[ -d "$HOME/.m2/repository" ]] && mvn -o -q "${goals[@]}" >"$tmp/build-offline.log" 2>&1; then
  ok=1
else
  echo "build.sh: offline build not possible, using Maven Central ..." >&2
  if mvn -q "${goals[@]}" >"$tmp/build.log" 2>&1; then
    ok=1
  fi
fi
if [[ $ok != 1 ]]; then
  echo "build.sh: Maven build failed; last lines:" >&2
  tail -n 60 "$tmp/build.log" >&2 || true
  exit 1
fi

cp "$tmp/target/minihbase-launcher.jar" "$tmp/out/minihbase-launcher.jar"

# The Thrift1 IDL as shipped inside the hbase-thrift jar (for reference and for a Thrift2/thriftpy2 client);
# read out at build time, never copied into the repository.
jar_tool=""
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/jar" ]]; then jar_tool="$JAVA_HOME/bin/jar";
elif command -v jar >/dev/null 2>&1; then jar_tool="$(command -v jar)"; fi
if [[ -n "$jar_tool" ]]; then
  for j in "$tmp"/out/lib/hbase-thrift-*.jar; do
    (mkdir -p "$tmp/out/hbase-thrift-idl" && cd "$tmp/out/hbase-thrift-idl" \
      && "$jar_tool" xf "$j" org/apache/hadoop/hbase/thrift/Hbase.thrift org/apache/hadoop/hbase/thrift2/hbase.thrift \
      && find . -name '*.thrift' -exec mv {} . \; ) || echo "build.sh: no IDL found in $j" >&2
  done
fi

(
  printf '%s' "$out/minihbase-launcher.jar"
  for j in "$tmp"/out/lib/*.jar; do printf ':%s' "$out/lib/$(basename "$j")"; done
  echo
) >"$tmp/out/classpath"
echo "$hash built=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$tmp/out/.complete"

rm -rf "$out"
mv "$tmp/out" "$out"

# Keep the cache bounded: drop all but the 3 most recently built launchers (~140 MB each).
keep="${MINIHBASE_KEEP_BUILDS:-3}"
if [[ "$keep" -gt 0 ]]; then
  ls -1t "$cache_root"/*/.complete 2>/dev/null | tail -n +"$((keep + 1))" | while read -r c; do
    d="$(dirname "$c")"
    [[ "$d" == "$out" ]] && continue
    echo "build.sh: pruning old launcher build $d" >&2
    rm -rf "$d" "$cache_root/.lock-$(basename "$d")"
  done || true
fi
echo "$out"
