#!/usr/bin/env bash
# The comparisons of `vlv seeds --preset toy` on a lent GPU (scripts/gpu_studies.py), then only their summaries back.
#   prepare here:  mkdir -p .gpu_in && for s in 0 1 2; do cp -r runs/toy-seeds/seed-$s/stage1/encoder .gpu_in/seed-$s; done
#                  (.gpu_in and the wheel folder in .git/info/exclude; wheels: scripts/gpu_stage1_wheels.sh)
#   device tool:   command 'bash scripts/gpu_studies.sh', carry ['.whl2', '.gpu_in'], WHEEL_DIR=.whl2, timeout_s 540
#   back here:     for f in $FILES/seed-*.json; do IFS=_ read -r seed kind spec <<< "$(basename "$f" .json)"
#                    mkdir -p runs/toy-seeds/$seed/$kind/$spec && cp "$f" runs/toy-seeds/$seed/$kind/$spec/summary.json; done
#                  then nbs/04 and nbs/06 per seed with the comparisons on (they read these runs from their caches)
# Keep LIMIT + install + start-up under the device tool's timeout: a run it stops brings nothing back.
# Knobs (environment): OUT, LIMIT (seconds of training, default 420), WHEEL_DIR (default .whl), ENCODERS (default .gpu_in).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-studies}; work=$(mktemp -d /tmp/gpu-studies-XXXXXX); mkdir -p "$out"
. scripts/gpu_wheels.sh "${WHEEL_DIR:-.whl}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 30 > "$out/gpu_use.csv" 2>&1 &
python3 scripts/gpu_studies.py --limit "${LIMIT:-420}" --encoders "${ENCODERS:-.gpu_in}" --out "$work" "$@" 2>&1 \
  | grep --line-buffered -v 'Loading weights' | tee "$out/gpu_studies.log"
status=${PIPESTATUS[0]}   # the script's own exit status, not the filter's
kill %1 2>/dev/null
# the device tool brings back no deep folders: each summary as OUT/seed-S_KIND_SPEC.json (KIND: studies, short-runs)
(cd "$work" && find . -name summary.json) | while IFS=/ read -r _ seed kind spec _; do cp "$work/$seed/$kind/$spec/summary.json" "$out/${seed}_${kind}_${spec}.json"; done
cp "$work/gpu_studies.json" "$out/" 2>/dev/null
echo "summaries back: $(ls "$out" | grep -c "^seed-")"
exit "$status"
