#!/usr/bin/env bash
# Create (once per lock file) and activate the project's virtual environment, outside the checkout.
#
# The venv lives in ${DISTCKPT_CACHE:-~/.cache/lightning-distckpt}/venv-<hash of requirements/lock.txt>,
# so a warm machine reuses it and a new machine builds it from PyPI (pip's cache makes rebuilds quick).
# Source this file: `source scripts/env.sh`. It installs this checkout into the venv (editable, no deps).
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cache="${DISTCKPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-distckpt}"
_lock="$_root/requirements/lock.txt"
_nodeps="$_root/requirements/nodeps.txt"   # packages whose own dependencies we do not want (data-only wheels)
_hash="$(cat "$_lock" "$_nodeps" | sha256sum | cut -c1-12)"
_venv="$_cache/venv-$_hash"
_python="${PYTHON:-python3}"

# Several runs may start at once on a new machine (the example and the tests, two checkouts): the one that builds
# the venv holds a lock on it, and the others wait for it instead of deleting a venv under construction.
mkdir -p "$_cache"
_flock="$(command -v flock || true)"
if [ -n "$_flock" ]; then
  exec 9>"$_venv.lock"
  flock 9
fi
if [ ! -x "$_venv/bin/python" ] || [ ! -f "$_venv/.complete" ]; then
  echo ">> creating $_venv (first run on this machine: installs torch and friends from PyPI)" >&2
  rm -rf "$_venv"
  "$_python" -m venv "$_venv"
  "$_venv/bin/pip" install -q --upgrade pip "setuptools>=77" >&2
  "$_venv/bin/pip" install -q -r "$_lock" >&2
  "$_venv/bin/pip" install -q --no-deps -r "$_nodeps" >&2
  touch "$_venv/.complete"
fi
# optional extras (requirements/extras.txt, e.g. the HBase client): installed on top, once per version of that file
_extras="$_root/requirements/extras.txt"
if [ -f "$_extras" ]; then
  _xhash="$(sha256sum < "$_extras" | cut -c1-12)"
  if [ ! -f "$_venv/.extras-$_xhash" ]; then
    "$_venv/bin/pip" install -q --no-deps -r "$_extras" >&2 && touch "$_venv/.extras-$_xhash"
  fi
fi
# the `distckpt` command and package metadata, once per venv; which checkout is imported is decided by
# PYTHONPATH below, so several checkouts (git worktrees, a fresh clone) can share one venv safely
if [ ! -x "$_venv/bin/distckpt" ]; then
  "$_venv/bin/pip" install -q --no-deps --no-build-isolation -e "$_root" >&2
fi
if [ -n "$_flock" ]; then
  exec 9>&-   # the lock goes with the descriptor
fi
export VIRTUAL_ENV="$_venv"
export PATH="$_venv/bin:$PATH"
export DISTCKPT_ROOT="$_root"
# this checkout first on the path, whichever checkout the shared venv's editable install points at
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
set +euo pipefail
