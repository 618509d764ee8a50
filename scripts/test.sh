#!/usr/bin/env bash
# The whole test suite, in order: notebooks clean, export in sync, nbdev_test (smoke preset), pytest.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
# One torch thread per process: nbdev_test runs two notebooks at once on a 2-core machine, and oversubscribed
# OpenMP threads make small torch ops orders of magnitude slower.
export PATH="$PWD/$venv/bin:$PATH" JUPYTER_PREFER_ENV_PATH=1 MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fingerprint() { find nbs vlv -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | sort | xargs md5sum; }
step() { printf '\n=== %s ===\n' "$1"; }

step "1/4 notebooks are clean (nbdev_clean changes nothing)"
before=$(fingerprint); nbdev_clean; after=$(fingerprint)
if [ "$before" != "$after" ]; then
  diff <(echo "$before") <(echo "$after") || true
  echo "FAIL: nbdev_clean changed the files above: run nbdev_clean and commit"; exit 1
fi

step "2/4 package is in sync with the notebooks (nbdev_export changes nothing)"
before=$(fingerprint); nbdev_export; after=$(fingerprint)
if [ "$before" != "$after" ]; then
  diff <(echo "$before") <(echo "$after") || true
  echo "FAIL: nbdev_export changed the files above: export and commit"; exit 1
fi

step "3/4 notebooks run (nbdev_test, smoke preset)"
time nbdev_test --n_workers 2 --timing

step "4/4 pytest (every test, the slow ones too; the 15 slowest listed)"
time pytest -q --durations=15 tests
