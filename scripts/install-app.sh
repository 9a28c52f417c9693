#!/usr/bin/env bash
# Install the app's Python requirements into the interpreter that runs the launcher, without
# changing what the engine installed there: the engine's key packages, at the versions found, are
# constraints, so a requirement that conflicts with them fails the install loudly instead of
# upgrading them under the engine.
#
#   scripts/install-app.sh PYTHON [REQUIREMENTS_FILE...]    (default: requirements.txt)
#
# Run by every image (vLLM, TensorRT-LLM, CPU) and by `make venv`, through install-cpu-engine.sh.
set -Eeuo pipefail

python="${1:?usage: install-app.sh PYTHON [REQUIREMENTS_FILE...]}"
shift
root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -eq 0 ]]; then set -- "$root/requirements.txt"; fi

"$python" -m pip --version >/dev/null 2>&1 || { echo "install-app.sh: $python has no pip" >&2; exit 1; }
# A system interpreter (the engine images' python3) is not a venv: pip must be told it may install.
if "$python" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi

constraints="$(mktemp)"
trap 'rm -f -- "$constraints"' EXIT
protected='^(vllm|vllm[-_]cpu|tensorrt[-_]llm|tensorrt|torch|torchvision|torchaudio|triton|xformers|flashinfer[-_]python|transformers|tokenizers|numpy|fastapi|starlette|pydantic|pydantic[-_]core|uvicorn|aiohttp|huggingface[-_]hub|prometheus[-_]client)=='
"$python" -m pip list --format=freeze 2>/dev/null | grep -iE "$protected" >"$constraints" || true
echo "install-app.sh: keeping $(wc -l <"$constraints") engine packages as installed"

args=()
for req in "$@"; do args+=(-r "$req"); done
"$python" -m pip install -q -c "$constraints" "${args[@]}"
