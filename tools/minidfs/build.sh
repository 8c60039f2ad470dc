#!/usr/bin/env bash
# Build the MiniDFS launcher jar and its runtime classpath into a cache directory OUTSIDE the repo:
#   ${DISTCKPT_MINIDFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-distckpt/minidfs}/<hash>/
#     minidfs-launcher.jar  lib/*.jar  classpath  .complete
# <hash> covers pom.xml, the Java sources, this script and the Maven profile, so edits rebuild.
# Idempotent: with a warm cache it only hashes and prints the directory. Reuses ~/.m2; tries
# Maven offline first and goes online (Maven Central) only when something is missing.
# The cache directory is printed as the LAST line of stdout; Maven's output goes to stderr.
#
# Env:
#   DISTCKPT_JAVA_HOME      JDK used to run Maven (default: $JAVA_HOME, else /usr/lib/jvm/*17*)
#   DISTCKPT_MINIDFS_CACHE  cache root (see above)
#   MINIDFS_MAVEN_PROFILE   "shaded" (default: hadoop-client-minicluster) or "unshaded"
#                           (hadoop-minicluster, the fallback if a class is missing at start)
#   MINIDFS_FORCE_BUILD=1   rebuild even if the cache is warm
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
profile="${MINIDFS_MAVEN_PROFILE:-shaded}"
cache_root="${DISTCKPT_MINIDFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-distckpt/minidfs}"

hash="$(
  cd "$here"
  {
    echo "profile=$profile"
    cat pom.xml build.sh
    find src -type f -name '*.java' | LC_ALL=C sort | while read -r f; do echo "== $f"; cat "$f"; done
  } | sha256sum | cut -c1-16
)"
out="$cache_root/$hash"

if [[ -f "$out/.complete" && -f "$out/minidfs-launcher.jar" && "${MINIDFS_FORCE_BUILD:-0}" != 1 ]]; then
  echo "$out"
  exit 0
fi

command -v mvn >/dev/null 2>&1 || { echo "build.sh: mvn (Maven) not found on PATH" >&2; exit 3; }

# Maven itself needs a JDK; prefer Java 17 (Hadoop 3.5 targets it; Java 23+ breaks Hadoop).
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

if [[ -f "$out/.complete" && -f "$out/minidfs-launcher.jar" && "${MINIDFS_FORCE_BUILD:-0}" != 1 ]]; then
  echo "$out"
  exit 0
fi

tmp="$(mktemp -d "$cache_root/.build-$hash.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp -r "$here/pom.xml" "$here/src" "$tmp/"
mkdir -p "$tmp/out/lib"

goals=(-B -f "$tmp/pom.xml" -P "$profile" package dependency:copy-dependencies
       -DincludeScope=runtime "-DoutputDirectory=$tmp/out/lib" -DskipTests)
echo "build.sh: building MiniDFS launcher into $out (JAVA_HOME=${JAVA_HOME:-unset}) ..." >&2
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

cp "$tmp/target/minidfs-launcher.jar" "$tmp/out/minidfs-launcher.jar"

# Startup speed: Jetty/Jersey scan the (deflated) Hadoop jars entry by entry while starting the
# NameNode/DataNode web apps (WebHDFS). Re-packing those jars *uncompressed* cuts cluster startup
# from ~13 s to ~5 s on 2 cores (and NameNode/DataNode restarts likewise). Costs ~10 s and ~280 MB
# once. MINIDFS_NO_REPACK=1 skips it.
jar_tool=""
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/jar" ]]; then jar_tool="$JAVA_HOME/bin/jar";
elif command -v jar >/dev/null 2>&1; then jar_tool="$(command -v jar)"; fi
if [[ "${MINIDFS_NO_REPACK:-0}" != 1 && -n "$jar_tool" ]]; then
  echo "build.sh: re-packing Hadoop jars uncompressed (faster startup) ..." >&2
  for j in "$tmp"/out/lib/hadoop-*.jar; do
    [[ -f "$j" ]] || continue
    x="$tmp/repack"
    rm -rf "$x" && mkdir -p "$x"
    if (cd "$x" && "$jar_tool" xf "$j") && [[ -f "$x/META-INF/MANIFEST.MF" ]] \
       && "$jar_tool" --create --no-compress --file "$j.new" --manifest "$x/META-INF/MANIFEST.MF" -C "$x" . >&2; then
      mv "$j.new" "$j"
    else
      echo "build.sh: re-packing $(basename "$j") failed; keeping it as is" >&2
      rm -f "$j.new"
    fi
    rm -rf "$x"
  done
fi
(
  printf '%s' "$out/minidfs-launcher.jar"
  for j in "$tmp"/out/lib/*.jar; do printf ':%s' "$out/lib/$(basename "$j")"; done
  echo
) >"$tmp/out/classpath"
echo "$hash profile=$profile built=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$tmp/out/.complete"

rm -rf "$out"
mv "$tmp/out" "$out"

# Keep the cache bounded: drop all but the 3 most recently built launchers (~280 MB each).
# MINIDFS_KEEP_BUILDS=0 disables pruning.
keep="${MINIDFS_KEEP_BUILDS:-3}"
if [[ "$keep" -gt 0 ]]; then
  ls -1t "$cache_root"/*/.complete 2>/dev/null | tail -n +"$((keep + 1))" | while read -r c; do
    d="$(dirname "$c")"
    [[ "$d" == "$out" ]] && continue
    echo "build.sh: pruning old launcher build $d" >&2
    rm -rf "$d" "$cache_root/.lock-$(basename "$d")"
  done || true
fi
echo "$out"
