#!/usr/bin/env bash
# `vlv bench` at paper size on one GPU (an H200): stage 1, captioning and reconstruction, the reference code's
# configuration and ours in the same process each, in about 8 minutes. Results: $OUT/bench.json (every report, merged
# after each phase) and $OUT/bench_gpu.log (everything printed); $OUT defaults to runs/bench-gpu.
#
# Prepare, on a machine with network (the GPU machine has PyTorch but not all of vlv's dependencies, and no network):
#     bash scripts/bench_gpu_wheels.sh            # -> .whl/ (about 25 MB, git-ignored)
# then, from the repo root on the GPU machine (with the device tool: command 'bash scripts/bench_gpu.sh',
# carry ['.whl'], timeout_s 600):
#     bash scripts/bench_gpu.sh
#
# Each benchmark runs as its own process under a time limit (and within BENCH_BUDGET seconds for the whole script,
# default 480): the core rows first, then the compiled variants while time is left. A failing configuration (out of
# memory, a compiler error) is a row with its error; a process killed at its limit keeps the rows it finished (the
# report is rewritten after every configuration).
# Knobs (environment): OUT, BENCH_BUDGET (s), PYTHON, BENCH_SIZE (paper; 'tiny' to try the script on a CPU),
# BENCH_WHEELS=0 (skip installing .whl/), BENCH_EXTRAS=0 (skip the compiled variants).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/bench-gpu}; mkdir -p "$out"
budget=${BENCH_BUDGET:-480}
py=${PYTHON:-python3}
size=${BENCH_SIZE:-paper}
start=$(date +%s)
logfile="$out/bench_gpu.log"
log() { echo "[bench_gpu +$(( $(date +%s) - start ))s] $*" | tee -a "$logfile"; }

# 1. what vlv needs beyond the machine's own packages (scripts/gpu_wheels.sh; BENCH_WHEELS=0: none)
. scripts/gpu_wheels.sh "$([ "${BENCH_WHEELS:-1}" != 0 ] && echo .whl || echo /nonexistent)" "$logfile"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if ! $py -c "import torch, transformers, diffusers, vlv.bench
print('torch', torch.__version__, '| transformers', transformers.__version__, '| diffusers', diffusers.__version__,
      '| cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$logfile"; then
  log "cannot import vlv.bench (see above)"; exit 1
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>&1 | tee -a "$logfile"

# 2. phase NAME LIMIT ARGS...: `python -m vlv.bench ARGS --size $size` limited to LIMIT seconds and to the budget left;
#    its report is merged into $out/bench.json under NAME
phase() {
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 45 ]; then log "skip $name: ${left}s left of the ${budget}s budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "start $name (limit ${limit}s): python -m vlv.bench $* --size $size"
  timeout -k 15 "$limit" $py -m vlv.bench "$@" --size "$size" --json "$out/$name.json" 2>&1 | tee -a "$logfile"
  local rc=${PIPESTATUS[0]}
  log "end $name: exit $rc$( [ "$rc" = 124 ] && echo ' (time limit: the rows finished before it are kept)')"
  $py - "$out" "$name" <<'EOF' 2>&1 | tee -a "$logfile"
import json, sys
from pathlib import Path
folder, name = Path(sys.argv[1]), sys.argv[2]
part, merged = folder / f'{name}.json', folder / 'bench.json'
reports = json.loads(merged.read_text()) if merged.exists() else {}
if part.exists():
    for bench, report in json.loads(part.read_text()).items(): reports[name] = report
    merged.write_text(json.dumps(reports, indent=2)); part.unlink()
else: print(f'{name}: no report written')
EOF
}

# 3. the core rows: reference vs ours for each job
phase stage1 210 stage1 --configs reference,ours,ours-features
phase caption 240 caption --configs reference,greedy,beam
phase reconstruct 130 reconstruct --configs reference,ours,ours-few
# 4. compiled variants while time is left (each with its own reference row, so the ratio is measured in the same process)
if [ "${BENCH_EXTRAS:-1}" != 0 ]; then
phase stage1_compile 240 stage1 --configs reference,ours-compile-features --warmup 2 --steps 3
phase reconstruct_compile 150 reconstruct --configs reference,ours-compile,ours-compile-few
phase caption_inductor 200 caption --configs reference,greedy-inductor,beam-inductor --no-check
fi

# 5. the issue's targets, from whatever finished
$py - "$out" <<'EOF' 2>&1 | tee -a "$logfile"
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / 'bench.json'
reports = json.loads(path.read_text()) if path.exists() else {}
best = lambda bench, names: max(((r['ratio'], f"{p}/{r['name']}", r['img_per_s']) for p, rep in reports.items()
                                 if rep.get('benchmark') == bench for r in rep.get('rows', [])
                                 if r['name'] in names and not r.get('error') and r.get('ratio')), default=None)
targets = [('stage 1, batch 64', 'stage1', ('ours', 'ours-features', 'ours-compile', 'ours-compile-features'), 10),
           ('captioning, greedy', 'caption', ('greedy', 'greedy-inductor'), 50),
           ('captioning, beam 4', 'caption', ('beam', 'beam-inductor'), 20),
           ('reconstruction, 50 steps', 'reconstruct', ('ours', 'ours-compile'), 10),
           ('reconstruction, few steps', 'reconstruct', ('ours-few', 'ours-compile-few'), None)]
print('\nagainst the issue (best row; ratio to the reference row of the same process):')
for label, bench, names, target in targets:
    b = best(bench, names)
    verdict = '' if b is None or target is None else ('  meets' if b[0] >= target else '  below') + f' the {target}x target'
    print(f"  {label:28s} " + ('no result' if b is None else f"{b[0]:7.1f}x  ({b[2]:.3g} img/s, {b[1]}){verdict}"))
for p, rep in reports.items():
    for r in rep.get('rows', []):
        if r.get('error'): print(f"  {p}/{r['name']}: error: {r['error']}")
    if rep.get('error'): print(f"  {p}: error: {rep['error']}")
EOF
log "done in $(( $(date +%s) - start ))s; reports in $out/bench.json"
