"""ENGINE=trtllm: settings to `trtllm-serve serve` flags and options file, and its metrics.

TensorRT-LLM cannot be installed here (it needs CUDA), so its command line is checked against a
transcription of `trtllm-serve serve`'s click options as TensorRT-LLM 1.2 defines them in
`tensorrt_llm/commands/serve.py` (names, aliases, types), parsed by click itself.
"""

import dataclasses
import json

import click
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app.engines import ENGINES, engine_for
from app.engines.trtllm import TRTLLM, build_command, config_files, llm_api_options, options_path, unmapped
from app.settings import Settings


def settings(**env) -> Settings:
    return Settings(MODEL_NAME="org/model", ENGINE="trtllm", **env)


@click.command("serve")
@click.argument("model", type=str)
@click.option("--tokenizer", type=str, default=None)
@click.option("--host", type=str, default="localhost")
@click.option("--port", type=int, default=8000)
@click.option(
    "--backend", type=click.Choice(["pytorch", "tensorrt", "_autodeploy", "trt"]), default="pytorch"
)
@click.option("--log_level", type=str, default="info")
@click.option("--max_beam_width", type=int, default=1)
@click.option("--max_batch_size", type=int, default=2048)
@click.option("--max_num_tokens", type=int, default=8192)
@click.option("--max_seq_len", type=int, default=None)
@click.option("--tensor_parallel_size", "--tp_size", type=int, default=1)
@click.option("--pipeline_parallel_size", "--pp_size", type=int, default=1)
@click.option("--moe_expert_parallel_size", "--ep_size", type=int, default=None)
@click.option("--gpus_per_node", type=int, default=None)
@click.option("--free_gpu_memory_fraction", "--kv_cache_free_gpu_memory_fraction", type=float, default=0.9)
@click.option("--num_postprocess_workers", type=int, default=0)
@click.option("--trust_remote_code", is_flag=True, default=False)
@click.option("--config", "--extra_llm_api_options", "extra_llm_api_options", type=str, default=None)
@click.option("--reasoning_parser", type=str, default=None)
@click.option("--chat_template", type=str, default=None)
def trtllm_serve(**params):
    return params


def parse(argv: list[str]) -> dict:
    assert argv[:2] == ["trtllm-serve", "serve"]
    return trtllm_serve.main(argv[2:], standalone_mode=False)


def test_unset_settings_pass_only_the_fixed_flags():
    s = settings()
    assert build_command(s, "/cache/snap") == [
        "trtllm-serve", "serve", "/cache/snap",
        "--host", "127.0.0.1",
        "--port", "8001",
        "--backend", "pytorch",
        "--extra_llm_api_options", options_path(s),
    ]  # fmt: skip
    assert llm_api_options(s) == {"return_perf_metrics": True, "enable_iter_perf_stats": True}
    assert unmapped(s) == []


def test_the_summary_card_settings_map_to_trtllm_serve_flags_its_parser_accepts():
    s = settings(
        ENGINE_PORT=9001,
        MAX_MODEL_LEN=32768,
        GPU_MEMORY_UTIL=0.95,
        TENSOR_PARALLEL_SIZE=2,
        MAX_NUM_SEQS=12,
        MAX_BATCHED_TOKENS=10240,
        TRUST_REMOTE_CODE=True,
        TRTLLM_BACKEND="tensorrt",
        ENGINE_EXTRA_ARGS="--log_level warning --reasoning_parser 'deepseek-r1'",
    )
    params = parse(build_command(s, "/models/qwen"))
    assert params["model"] == "/models/qwen"
    assert params["host"] == "127.0.0.1" and params["port"] == 9001
    assert params["backend"] == "tensorrt"
    assert params["max_seq_len"] == 32768
    assert params["free_gpu_memory_fraction"] == 0.95
    assert params["tensor_parallel_size"] == 2
    assert params["max_batch_size"] == 12
    assert params["max_num_tokens"] == 10240
    assert params["trust_remote_code"] is True
    assert params["extra_llm_api_options"] == options_path(s)
    assert params["log_level"] == "warning" and params["reasoning_parser"] == "deepseek-r1"


def test_options_only_a_file_can_carry_go_into_the_json_options_file():
    s = settings(
        DTYPE="bfloat16", ENABLE_CHUNKED_PREFILL=True, ENABLE_PREFIX_CACHING=False, GPU_MEMORY_UTIL=0.8
    )
    files = config_files(s)
    assert list(files) == [options_path(s)]
    assert json.loads(files[options_path(s)]) == {
        "return_perf_metrics": True,
        "enable_iter_perf_stats": True,
        "dtype": "bfloat16",
        "enable_chunked_prefill": True,
        # The section would replace the flag's KvCacheConfig: the fraction is carried into it.
        "kv_cache_config": {"enable_block_reuse": False, "free_gpu_memory_fraction": 0.8},
    }
    # Iteration stats are an option of the PyTorch backend only.
    assert "enable_iter_perf_stats" not in llm_api_options(settings(TRTLLM_BACKEND="tensorrt"))


def test_an_options_file_of_ones_own_wins_and_what_ours_would_have_carried_is_reported():
    s = settings(ENGINE_EXTRA_ARGS="--extra_llm_api_options=/cfg/mine.yaml", DTYPE="float16")
    argv = build_command(s, "/m")
    assert argv.count("--extra_llm_api_options") == 0 and argv[-1] == "--extra_llm_api_options=/cfg/mine.yaml"
    assert parse(argv)["extra_llm_api_options"] == "/cfg/mine.yaml"
    assert config_files(s) == {}
    assert unmapped(s) == ["DTYPE (ENGINE_EXTRA_ARGS brings its own options file)"]
    assert config_files(settings(ENGINE_EXTRA_ARGS="--config /cfg/mine.yaml")) == {}


def test_settings_without_an_equivalent_are_named_with_the_reason():
    s = settings(SERVED_MODEL_NAME="chat", QUANTIZATION="awq", IMAGE_LIMIT=5, VIDEO_LIMIT=0)
    assert unmapped(s) == [
        "SERVED_MODEL_NAME (trtllm-serve names the model after its directory)",
        "QUANTIZATION (TensorRT-LLM reads the quantization from the checkpoint)",
        "IMAGE_LIMIT (no per-prompt multimodal limits)",
        "VIDEO_LIMIT (no per-prompt multimodal limits)",
    ]
    # Honoured without a flag: the launcher downloads the revision and hands trtllm-serve the path.
    assert unmapped(settings(MODEL_REVISION="v2")) == []


def test_engine_is_selected_by_the_setting_and_trtllm_needs_a_gpu():
    assert engine_for(settings()) is TRTLLM and ENGINES["trtllm"] is TRTLLM
    assert TRTLLM.health_path == "/health" and TRTLLM.version_path == "/version"
    assert TRTLLM.metrics_path == "/prometheus/metrics"
    with pytest.raises(ValidationError, match="needs an NVIDIA GPU"):
        settings(DEVICE="cpu")


# What trtllm-serve 1.2 serves on /prometheus/metrics (names without a prefix), then a later
# release's (prefixed), each with the python_/process_/http_ families of its process.
UNPREFIXED = b"""# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 123.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.2e+09
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",method="POST",status="200"} 2.0
# HELP request_success_total Count of successfully processed requests.
# TYPE request_success_total counter
request_success_total{engine_type="undefined",finished_reason="stop",model_name="undefined"} 2.0
# HELP e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE e2e_request_latency_seconds histogram
e2e_request_latency_seconds_bucket{engine_type="undefined",le="0.3",model_name="undefined"} 0.0
e2e_request_latency_seconds_bucket{engine_type="undefined",le="+Inf",model_name="undefined"} 2.0
e2e_request_latency_seconds_count{engine_type="undefined",model_name="undefined"} 2.0
e2e_request_latency_seconds_sum{engine_type="undefined",model_name="undefined"} 3.48
"""
PREFIXED = b"""# HELP trtllm_num_requests_running Number of active requests
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{engine_type="trtllm",model_name="qwen"} 3.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
# HELP trtllm_kv_cache_utilization KV cache utilization
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{engine_type="trtllm",model_name="qwen"} 0.25"""


def families(text: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def test_engine_metrics_are_kept_under_one_prefix_without_the_families_that_would_clash():
    old = families(TRTLLM.select_metrics(UNPREFIXED))
    assert set(old) == {"trtllm_request_success", "trtllm_e2e_request_latency_seconds"}
    assert old["trtllm_request_success"][0].value == 2.0
    assert {s.name for s in old["trtllm_e2e_request_latency_seconds"]} == {
        "trtllm_e2e_request_latency_seconds_bucket",
        "trtllm_e2e_request_latency_seconds_count",
        "trtllm_e2e_request_latency_seconds_sum",
    }
    new = TRTLLM.select_metrics(PREFIXED)
    assert new.endswith(b"\n")  # appended after other text, the last sample must end its line
    assert set(families(new)) == {"trtllm_num_requests_running", "trtllm_kv_cache_utilization"}
    assert TRTLLM.select_metrics(b"") == b""
    assert TRTLLM.select_metrics(b'[{"iter": 1}]') == b""  # JSON iteration stats are not relayed


def test_the_proxy_in_front_of_a_trtllm_serve_stand_in_serves_one_scrape_and_its_health():
    """A stand-in for trtllm-serve's HTTP surface (health with an empty body, Prometheus text on
    /prometheus/metrics, JSON on /metrics): the proxy's /metrics and /health read the right paths."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from inproc import InProcessProxy

    paths = {
        "/health": (b"", "text/plain"),
        "/prometheus/metrics": (UNPREFIXED, "text/plain"),
        "/metrics": (b"[]", "application/json"),
    }

    class TrtllmServe(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body, ctype = paths.get(self.path, (b'{"detail":"Not Found"}', "application/json"))
            self.send_response(200 if self.path in paths else 404)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TrtllmServe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with InProcessProxy(f"http://127.0.0.1:{server.server_address[1]}", ENGINE="trtllm") as proxy:
            assert httpx.get(proxy.url + "/health").status_code == 200
            text = httpx.get(proxy.url + "/metrics").text
            names = set(families(text.encode()))
            assert {"trtllm_request_success", "trtllm_e2e_request_latency_seconds"} <= names
            assert any(n.startswith("vllm_api_") for n in names)  # the proxy's own come first
            assert not any(n.startswith("http_") for n in names)
    finally:
        server.shutdown()


def test_pipeline_parallel_maps_to_pp_size_and_the_other_profile_settings_are_named():
    """Settings added with model profiles (issue 16)."""
    s = settings(PIPELINE_PARALLEL_SIZE=2, KV_CACHE_DTYPE="fp8", LOAD_FORMAT="runai_streamer")
    assert parse(build_command(s, "/m"))["pipeline_parallel_size"] == 2
    assert unmapped(s) == [
        "KV_CACHE_DTYPE (set kv_cache_config.dtype in an options file of your own)",
        "LOAD_FORMAT (trtllm-serve loads checkpoints its own way)",
    ]


# `tensorrt_llm/lora_helper.py` LoraConfig (TensorRT-LLM 1.2), the LLM API's `lora_config` option, as
# a transcription: its fields and their types. What ours writes must be accepted by it.
@dataclasses.dataclass
class TrtllmLoraConfig:
    lora_dir: list = dataclasses.field(default_factory=list)
    lora_ckpt_source: str = "hf"
    max_lora_rank: int = 64
    lora_target_modules: list = dataclasses.field(default_factory=list)
    trtllm_modules_to_hf_modules: dict = dataclasses.field(default_factory=dict)
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    swap_gate_up_proj: bool = True


# get_default_trtllm_modules_to_hf_modules(), the dense entries
TRTLLM_TO_HF = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_dense": "o_proj",
    "mlp_h_to_4h": "gate_proj",
    "mlp_4h_to_h": "down_proj",
    "mlp_gate": "up_proj",
    "mlp_gate_up": "gate_up_proj",
}


def test_lora_adapters_go_into_the_options_files_lora_config_and_what_it_cannot_do_is_named(tmp_path):
    from app.lora.config import build_plan
    from scripts.tiny_adapters import build_adapter

    a8 = build_adapter(tmp_path / "a8", 8)
    a16 = build_adapter(tmp_path / "a16", 16, seed=2)
    s = settings(LORA_MODULES=f"a={a8},b={a16}", LORA_DYNAMIC=True, MAX_LORAS=2)
    plan = build_plan(s)
    options = json.loads(config_files(s, lora=plan)[options_path(s)])
    lora = TrtllmLoraConfig(**options["lora_config"])  # unknown keys would raise here
    assert lora.lora_dir == [str(a8), str(a16)]
    assert (lora.max_lora_rank, lora.max_loras, lora.max_cpu_loras) == (16, 2, None)
    assert {TRTLLM_TO_HF[m] for m in lora.lora_target_modules} == {"q_proj", "v_proj"}
    assert "lora" not in " ".join(build_command(s, "/m", lora=plan))  # the options file only
    assert unmapped(s) == [
        "LORA_DYNAMIC (trtllm-serve cannot load or unload LoRA adapters at run time)",
        "LoRA adapters by `model` (trtllm-serve loads the configured adapters at start; a request "
        "picks one with the body's `lora_request`: lora_name, lora_int_id, lora_path)",
    ]
    assert not plan.dynamic
