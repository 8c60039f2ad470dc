#!/usr/bin/env bash
# The test suite on a fresh or warm machine: venv, the MiniDFS jars (Maven, cached in ~/.m2), pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
if command -v mvn >/dev/null 2>&1 && command -v java >/dev/null 2>&1; then
  bash tools/minidfs/build.sh >/dev/null   # builds the HDFS test launcher and fetches its jars once
  bash tools/minihbase/build.sh >/dev/null  # the mini HBase + Thrift gateway launcher (catalog tests), once
else
  echo ">> no Java/Maven: HDFS and HBase tests will be skipped (they say why)" >&2
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # the docs are checked in a real browser (tests/test_docs.py); without Chromium that test skips and says why
  echo ">> installing Debian's chromium for the docs browser check" >&2
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
     apt-get install -y -qq chromium >/dev/null 2>&1; }) || echo ">> could not install chromium" >&2
fi
export OMP_NUM_THREADS=1
# The default run includes the fixed fuzz subset (tests/test_fuzz.py) but not the long fuzz run (-m fuzz), and
# the fresh-install check (tests/test_packaging.py: the built wheel in a venv with only its declared core
# dependencies, ~30 s; by hand: python scripts/wheel_check.py). --durations=25 lists the slowest tests (the suite must stay
# under 25 minutes on 2 cores).
# Two pytest-xdist workers (DISTCKPT_TEST_WORKERS, 0: none): one worker alone leaves about a third of 2 cores idle
# (interpreter start-ups, Java clusters starting, single-process tests); each worker starts its own MiniDFS and
# mini HBase. worksteal: a worker that finishes early takes tests queued on the other.
workers="${DISTCKPT_TEST_WORKERS:-2}"
xdist=()
[ "$workers" = 0 ] || xdist=(-n "$workers" --dist worksteal)
exec python -m pytest -q --durations=25 "${xdist[@]}" "$@"
