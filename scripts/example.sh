#!/usr/bin/env bash
# The main job: a small model trained on CPU by 2 processes, checkpointing to ./example-ckpts,
# then a second run that resumes from the newest committed checkpoint and trains on.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
export OMP_NUM_THREADS=1
dir="${1:-./example-ckpts}"
echo ">> run 1: train 60 steps on 2 processes, checkpoint every 20 steps into $dir"
torchrun --nproc_per_node=2 --master_port="${MASTER_PORT:-29400}" examples/quickstart.py --ckpt-dir "$dir" --max-steps 60
echo ">> run 2: resume from the newest committed checkpoint and train to step 120"
torchrun --nproc_per_node=2 --master_port="${MASTER_PORT:-29400}" examples/quickstart.py --ckpt-dir "$dir" --max-steps 120
distckpt ls "$dir" 2>/dev/null || python -c "import lightning_distckpt as d; [print(c.name, c.committed) for c in d.list_checkpoints('$dir')]"
