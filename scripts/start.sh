#!/usr/bin/env bash
# Container entrypoint: hands over to the Python launcher (app/launcher.py), which checks the GPU,
# resolves the model, starts the engine on loopback, serves the proxy on $PORT, supervises both and
# drains in-flight requests on SIGTERM. `exec` makes the launcher receive the signals directly.
set -Eeuo pipefail

here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname -- "$here")"

# The interpreter that has both the engine and the app installed: $PYTHON, the repo's venv, or
# the image's python3.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
command -v "$python" >/dev/null || { echo "start.sh: no Python interpreter at '$python'" >&2; exit 1; }

if [[ "${ENGINE:-vllm}" == external ]]; then
  if [[ -z "${ENGINE_URL:-}" ]]; then
    echo "start.sh: ENGINE=external needs ENGINE_URL (the engine's base URL)" >&2
    exit 2
  fi
elif [[ -z "${MODEL_NAME:-}" ]]; then
  echo "start.sh: MODEL_NAME is required (a Hugging Face model id or a local directory)" >&2
  exit 2
fi

# RUNPOD_MODE=queue: a RunPod queue-based Serverless worker (app/runpod_worker.py) in front of the
# same stack; anything else: the stack itself, serving on $PORT.
module=app.launcher
case "${RUNPOD_MODE:-http}" in
  queue) module=app.runpod_worker ;;
  http) ;;
  *) echo "start.sh: RUNPOD_MODE must be http or queue, not '${RUNPOD_MODE}'" >&2; exit 2 ;;
esac
# BATCH_INPUT: one-shot batch mode (app/batch/oneshot.py): run the file through the stack, then exit.
if [[ -n "${BATCH_INPUT:-}" ]]; then module=app.batch.oneshot; fi

cd -- "$root"
export PYTHONUNBUFFERED=1
exec "$python" -m "$module" "$@"
