"""LoRA adapters: configured, checked before the engine starts, loaded at run time, listed
truthfully, measured per adapter, and managed from a CLI.

- `config`: what is configured (LORA_MODULES, LORA_CONFIG, LORA_DIR and the LoRA settings) and the
  start plan the launcher builds from it (`build_plan`): every adapter resolved to a local folder
  (Hugging Face ids and `s3://` downloaded like the model) and checked.
- `adapter`: one adapter folder checked as vLLM checks it (adapter_config.json, weights, rank,
  features), the rank vLLM needs, where an adapter comes from.
- `service`: inside the proxy: what the engine serves (read from `/v1/models` after every change),
  the admin routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) and `GET /v1/lora_adapters`,
  per-adapter counters, loading on first use, the LORA_DIR scan, `<base>:<adapter>` names.
- `cli`: `python -m app.lora list|load|unload|test`.
"""
