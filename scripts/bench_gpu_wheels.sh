#!/usr/bin/env bash
# Download, here (with network), the wheels that scripts/bench_gpu.sh installs on the GPU machine (no network there).
# That machine's Python 3.12 already has torch, accelerate, safetensors, tokenizers, huggingface_hub, numpy, pillow,
# tqdm, pyyaml, aiohttp, ...; vlv needs more (pydantic, diffusers, fastcore, webdataset, papermill for vlv.cli) and
# the transformers of this checkout (its static KV cache API is what vlv.fast uses). Versions are pinned to this
# checkout's venv; the wheels go to .whl/ (git-ignored), which the device call carries.
#   usage: scripts/bench_gpu_wheels.sh [VENV]      (then: run(command='bash scripts/bench_gpu.sh', carry=['.whl']))
# Knobs (environment): WHEELS (the packages; default the list below), WHEEL_PYTHON (default 3.12, the GPU machine's).
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
packages=${WHEELS:-"transformers diffusers importlib_metadata pydantic pydantic_core annotated-types typing-inspection typing_extensions
          fastcore webdataset braceexpand papermill nbclient nbformat jupyter_client jupyter_core traitlets fastjsonschema
          jsonschema jsonschema-specifications referencing rpds-py pyzmq tornado entrypoints tenacity platformdirs
          huggingface_hub httpx2 httpcore2 truststore anyio idna h11 click regex"}
pins=()
for p in $packages; do
  v=$("$venv/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
  pins+=("$p==$v")
done
rm -rf .whl && mkdir -p .whl
"$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version ${WHEEL_PYTHON:-3.12} --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (the device call carries at most 64 MiB in all)"
