#!/usr/bin/env bash
# Issue 20 item 3 on a lent GPU: do the baselines learn from the shipped toy Florence-2 (encoder.pretrained='toy')?
# Four stage-2 runs side by side, every training caption (scripts/probes/supervised_study.py: toy preset,
# data.caption_fraction=1.0, 100 test scenes per split): the supervised captioner (psi + LM + the whole encoder, end to
# end, encoder lr 5e-4 as the former experiments.supervised_lr) and "without stage 1" (psi + LM + the encoder's language
# model, Table 7's recipe), each at 300 steps (nbs/06's study budget) and 1,500 steps. Results: $OUT/NAME.json.
#   with the device tool: command 'bash scripts/probes/gpu_baselines.sh', carry ['.whl'] (or a smaller set: WHL=.whl2 with carry ['.whl2'])
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/probes}; mkdir -p "$out" runs/probes
. scripts/gpu_wheels.sh "$([ "${WHEELS:-1}" != 0 ] && echo "${WHL:-.whl}" || echo /nonexistent)"
py=${PYTHON:-python3}
steps=${STEPS:-"300 1500"}
for n in $steps; do
  $py scripts/probes/supervised_study.py sup_pre_$n "decode.steps=$n decode.encoder_lr=5e-4 ${EXTRA:-}" > "$out/sup_pre_$n.log" 2>&1 &
  $py scripts/probes/supervised_study.py nos1_pre_$n "decode.steps=$n decode.train=psi+lm+encoder ${EXTRA:-}" > "$out/nos1_pre_$n.log" 2>&1 &
done
wait
for f in runs/probes/sup_pre_*.json runs/probes/nos1_pre_*.json; do [ -f "$f" ] && cp "$f" "$out/"; done
tail -n 2 "$out"/*.log
