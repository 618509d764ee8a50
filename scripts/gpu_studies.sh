#!/usr/bin/env bash
# The comparisons of `vlv seeds --preset toy` on a lent GPU (scripts/gpu_studies.py), then only their summaries back.
#   prepare here:  mkdir -p .gpu_in && for s in 0 1 2; do cp -r runs/toy-seeds/seed-$s/stage1/encoder .gpu_in/seed-$s; done
#                  (.gpu_in and the wheel folder in .git/info/exclude; wheels: scripts/gpu_stage1_wheels.sh)
#   device tool:   command 'bash scripts/gpu_studies.sh', carry ['.whl2', '.gpu_in'], WHEEL_DIR=.whl2, timeout_s 540
#   back here:     for s in 0 1 2; do cp -r $OUT/seed-$s/* runs/toy-seeds/seed-$s/; done, then nbs/04 and nbs/06 per seed
# Knobs (environment): OUT, LIMIT (seconds of training, default 470), WHEEL_DIR (default .whl), ENCODERS (default .gpu_in).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-studies}; work=$(mktemp -d /tmp/gpu-studies-XXXXXX); mkdir -p "$out"
wheels=${WHEEL_DIR:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/vlv-site-XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl 2>&1 | tail -2
  export PYTHONPATH="$site"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 30 > "$out/gpu_use.csv" 2>&1 &
timeout -k 5 "${LIMIT:-470}" python3 scripts/gpu_studies.py --encoders "${ENCODERS:-.gpu_in}" --out "$work" "$@" 2>&1 \
  | grep --line-buffered -v 'Loading weights' | tee "$out/gpu_studies.log"
pkill -f "multiprocessing.spawn import" 2>/dev/null; kill %1 2>/dev/null
(cd "$work" && find . \( -name summary.json -o -name log.jsonl -o -name gpu_studies.json \)) | while read -r f; do
  mkdir -p "$out/$(dirname "$f")"; cp "$work/$f" "$out/$f"; done
echo "summaries back: $(find "$out" -name summary.json | wc -l)"
