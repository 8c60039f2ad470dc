#!/usr/bin/env bash
# Re-run every CPU benchmark by its documented command, one after the other, then render docs/benchmarks.md.
#
#   bash benchmarks/run_all.sh            # everything but the two long ones (about 1.5 h on 2 cores)
#   bash benchmarks/run_all.sh --long     # also the 100-kill recovery torture (~1 h) and Lightning's own tests (~1 h)
#   bash benchmarks/run_all.sh hdfs_ddp planning   # only these (names as in the list below)
#
# Run it on an otherwise idle machine (the numbers are ratios measured in one run, but a busy machine widens their
# spread), after the last change to lightning_distckpt/ or benchmarks/: a table measured before such a change is
# marked Stale by report.py. Each benchmark's output goes to benchmarks/results/logs/<name>.log (not committed); a
# benchmark that fails is reported at the end and the others still run. The GPU check needs a GPU:
# python benchmarks/gpu_check.py --out DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -uo pipefail
export OMP_NUM_THREADS=1

declare -A CMD=(
  [save_load_ddp]="torchrun --nproc_per_node=2 benchmarks/bench_save_load.py --strategy ddp"
  [save_load_mp]="torchrun --nproc_per_node=2 benchmarks/bench_save_load.py --strategy mp"
  [async]="torchrun --nproc_per_node=2 benchmarks/bench_async.py"
  [scaling]="python benchmarks/bench_scaling.py"
  [hdfs_mp]="python benchmarks/bench_hdfs.py --strategy mp"
  [hdfs_ddp]="python benchmarks/bench_hdfs.py --strategy ddp"
  [hdfs_ddp_thp]="python benchmarks/bench_hdfs.py --strategy ddp --thp --no-compression-rows"
  [hosts]="python benchmarks/bench_hosts.py"
  [recovery]="python benchmarks/bench_recovery.py --parts unreachable,resume"
  [compression]="python benchmarks/bench_compression.py"
  [planning]="python benchmarks/bench_planning.py"
  [incremental]="python benchmarks/bench_incremental.py"
  [distill]="python benchmarks/bench_distill.py"
  [cli]="python benchmarks/bench_cli.py --repeats 7"
  [catalog]="python benchmarks/bench_catalog.py"
  [torture]="python benchmarks/bench_recovery.py --parts torture --kills 100 --seed 2026"
  [lightning_compat]="bash tools/lightning_compat/run.sh"
)
ORDER=(planning save_load_ddp save_load_mp async scaling hdfs_mp hdfs_ddp hdfs_ddp_thp hosts recovery compression
       incremental distill cli catalog)
LONG=(torture lightning_compat)

names=()
if [ "${1:-}" = "--long" ]; then
  names=("${ORDER[@]}" "${LONG[@]}")
elif [ $# -gt 0 ]; then
  names=("$@")
else
  names=("${ORDER[@]}")
fi
mkdir -p benchmarks/results/logs
failed=()
for name in "${names[@]}"; do
  cmd="${CMD[$name]:-}"
  if [ -z "$cmd" ]; then
    echo "run_all: no benchmark named $name (known: ${ORDER[*]} ${LONG[*]})" >&2
    exit 2
  fi
  start=$(date +%s)
  echo ">> $name: $cmd"
  if $cmd > "benchmarks/results/logs/$name.log" 2>&1; then
    echo "   done in $(( $(date +%s) - start )) s"
  else
    echo "   FAILED after $(( $(date +%s) - start )) s: see benchmarks/results/logs/$name.log"
    failed+=("$name")
  fi
done
python benchmarks/report.py
if [ ${#failed[@]} -gt 0 ]; then
  echo "run_all: failed: ${failed[*]}" >&2
  exit 1
fi
