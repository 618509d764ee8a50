#!/usr/bin/env bash
# Stage 1 of the `paper` preset at full size on one GPU (an H200), random weights, no Hub: scripts/gpu_stage1.py under
# a time limit, after installing the wheels that scripts/gpu_stage1_wheels.sh downloaded (the GPU machine has PyTorch,
# transformers and accelerate, not all of vlv's dependencies, and no network). Results in $OUT (default
# runs/gpu-stage1): gpu_stage1.json, gpu_stage1.log (everything printed), log.jsonl, recon.png.
#
# Prepare, where there is network:   bash scripts/gpu_stage1_wheels.sh /path/to/venv     # -> .whl/ (about 11 MB)
# On the device machine (the device tool: command 'bash scripts/gpu_stage1.sh', carry ['.whl'], timeout_s 540):
#     bash scripts/gpu_stage1.sh [gpu_stage1.py options, e.g. --batch-size 32]
# Knobs (environment): OUT, GPU_STAGE1_LIMIT (seconds, default 480), PYTHON (default python3), WHEEL_DIR (default .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-stage1}; mkdir -p "$out"
py=${PYTHON:-python3}
logfile="$out/gpu_stage1.log"; : > "$logfile"
. scripts/gpu_wheels.sh "${WHEEL_DIR:-.whl}" "$logfile"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$logfile"
timeout -k 20 "${GPU_STAGE1_LIMIT:-480}" $py scripts/gpu_stage1.py --out "$out" "$@" 2>&1 | tee -a "$logfile"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_stage1.py hit its ${GPU_STAGE1_LIMIT:-480} s limit: $out/gpu_stage1.json holds the phases that finished" | tee -a "$logfile"
exit "$rc"
