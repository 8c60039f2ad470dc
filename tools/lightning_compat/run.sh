#!/usr/bin/env bash
# Run Lightning's own tests against lightning-distckpt and print counts (docs/lightning-compat.md).
#
# Usage:  tools/lightning_compat/run.sh [SET ...] [-- MODE ...]
#   SET:  core | wider            (default: core wider)
#   MODE: stock | plugin | adapted | async   (default: all four; see distckpt_compat.py)
#
# Environment:
#   LIGHTNING_GIT   a Lightning git directory or clone URL
#                   (default: the fetched mirror if present, else https://github.com/Lightning-AI/pytorch-lightning)
#   LIGHTNING_REF   tag to take tests/tests_pytorch from (default: 2.6.5, the tag nearest the locked 2.6.6)
#   COMPAT_WORK     scratch folder outside the repository (default: /tmp/lightning-compat)
#   PYTEST_ARGS     extra pytest arguments (e.g. "-k lr_find")
#
# Lightning's test code is extracted into COMPAT_WORK and never copied into this repository. Test-only
# dependencies that the project does not need (tensorboardX, protobuf, omegaconf) are installed with
# --no-deps into COMPAT_WORK/deps, which only this script puts on PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/env.sh"

ref="${LIGHTNING_REF:-2.6.5}"
mirror=/work/.mirror/Lightning-AI+pytorch-lightning/repo
git_src="${LIGHTNING_GIT:-$([ -d "$mirror" ] && echo "$mirror" || echo https://github.com/Lightning-AI/pytorch-lightning)}"
work="${COMPAT_WORK:-/tmp/lightning-compat}"
src="$work/src-$ref"
results="$work/results"
deps="$work/deps"
mkdir -p "$work" "$results"

sets=(); modes=()
seen_dash=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen_dash=1; elif [ $seen_dash = 0 ]; then sets+=("$a"); else modes+=("$a"); fi
done
[ ${#sets[@]} -gt 0 ] || sets=(core wider)
[ ${#modes[@]} -gt 0 ] || modes=(stock plugin adapted async)

# 1. Lightning's tests at $ref
if [ ! -d "$src/tests/tests_pytorch" ]; then
  echo ">> extracting tests/tests_pytorch and tests/legacy of Lightning $ref from $git_src" >&2
  mkdir -p "$src/tests"
  if [ -d "$git_src" ]; then
    gd="$git_src"; [ -d "$git_src/.git" ] && gd="$git_src/.git"
    git --git-dir="$gd" archive "$ref:tests" tests_pytorch legacy | tar -x -C "$src/tests"
  else
    tmp="$work/clone-$ref"; rm -rf "$tmp"
    git clone -q --depth 1 --branch "$ref" "$git_src" "$tmp"
    cp -r "$tmp/tests/tests_pytorch" "$tmp/tests/legacy" "$src/tests/"; rm -rf "$tmp"
  fi
  # Lightning's pytest settings (pyproject.toml of that tag), with the markers of plugins not installed here
  cat > "$src/tests/pytest.ini" <<'EOF'
[pytest]
norecursedirs = .git dist build docs
addopts = --strict-markers --color=no --disable-pytest-warnings --ignore=legacy/checkpoints
filterwarnings =
    error::FutureWarning
    ignore:You are using `torch.load` with `weights_only=False`.*:FutureWarning
    ignore::FutureWarning:torch.distributed.algorithms.ddp_comm_hooks
    ignore:`isinstance\(treespec, LeafSpec\)` is deprecated.*:FutureWarning
xfail_strict = true
markers =
    flaky: pytest-rerunfailures marker (that plugin is not installed here)
    cloud: cloud tests
EOF
fi

# 2. test-only dependencies, outside the shared venv
for spec in "tensorboardX:tensorboardX" "google.protobuf:protobuf" "omegaconf:omegaconf" "antlr4:antlr4-python3-runtime==4.9.3"; do
  mod="${spec%%:*}"; pkg="${spec#*:}"
  if ! PYTHONPATH="$PYTHONPATH:$deps" python -c "import $mod" 2>/dev/null; then
    pip install -q --no-deps --target "$deps" "$pkg" >&2
  fi
done
export PYTHONPATH="$here:$src/tests:$PYTHONPATH:$deps"

# 3. the "local" legacy checkpoint, written by stock Lightning (the legacy tests resume from it)
legacy="$src/tests/legacy/checkpoints/local"
if ! ls "$legacy"/*.ckpt >/dev/null 2>&1; then
  echo ">> writing the stock 'local' legacy checkpoint" >&2
  mkdir -p "$legacy"
  (cd "$src/tests/legacy" && nice -n 10 python simple_classif_training.py local >/dev/null 2>&1)
  cp "$src/tests/legacy/simple_classif_training.py" "$legacy/"
  mv "$legacy"/lightning_logs/version_0/checkpoints/*.ckpt "$legacy/"
  rm -rf "$legacy/lightning_logs"
fi

files_core=(checkpointing trainer/connectors/test_checkpoint_connector.py plugins/test_checkpoint_io_plugin.py
            callbacks/test_model_checkpoint_additional_cases.py callbacks/test_model_checkpoint_edge_cases.py
            callbacks/test_model_checkpoint_manual_opt.py callbacks/test_model_checkpoint_step_interval_val_metric.py)
files_wider=(tuner models/test_restore.py models/test_hparams.py core/test_saving.py callbacks/test_early_stopping.py
             callbacks/test_timer.py callbacks/test_finetuning_callback.py callbacks/test_stochastic_weight_avg.py
             callbacks/test_weight_averaging.py loops/test_loops.py trainer/connectors/test_signal_connector.py)

# 4. run each set in each mode
cd "$src/tests"
status=0
for set in "${sets[@]}"; do
  declare -n files="files_$set"
  paths=(); for f in "${files[@]}"; do paths+=("tests_pytorch/$f"); done
  for mode in "${modes[@]}"; do
    case "$mode" in
      async) export DISTCKPT_COMPAT=adapted DISTCKPT_COMPAT_ASYNC=1 ;;
      *)     export DISTCKPT_COMPAT="$mode" DISTCKPT_COMPAT_ASYNC=0 ;;
    esac
    echo ">> $set / $mode" >&2
    # shellcheck disable=SC2086
    nice -n 10 python -m pytest -q -p no:cacheprovider -p distckpt_compat --timeout=300 -o junit_family=xunit1 \
      --junitxml="$results/$set-$mode.xml" ${PYTEST_ARGS:-} "${paths[@]}" > "$results/$set-$mode.log" 2>&1 || true
    tail -1 "$results/$set-$mode.log" >&2
  done
  python "$here/summarize.py" "$results" "$set" --expected "$here/expected_failures.txt" \
    --json "$root/benchmarks/results/lightning_compat.json" || status=1
done
exit $status
