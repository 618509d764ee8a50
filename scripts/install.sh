#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything it needs.
# torch is pinned to the CPU wheel first, so nothing later pulls a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0
$pip install -q -e ".[dev]"
# open-clip-torch only for its SD 2.x CLIP BPE vocabulary; its dependencies (torchvision) are not needed.
$pip install -q --no-deps open-clip-torch
# A kernelspec inside the venv, preferred over user-level ones (JUPYTER_PREFER_ENV_PATH=1 in our scripts),
# so papermill runs notebooks with this interpreter.
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
"$venv/bin/python" -c "import torch, vlv; print('vlv', vlv.__version__, '| torch', torch.__version__)"
touch "$venv/.vlv-installed"
