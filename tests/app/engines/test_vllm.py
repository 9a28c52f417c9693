import pytest

from app.engines.base import mask_secrets, split_extra_args
from app.engines.vllm import build_command
from app.settings import Settings


def settings(**env) -> Settings:
    return Settings(MODEL_NAME="org/model", **env)


def flags(argv: list[str]) -> list[str]:
    return argv[3:]  # after `python -m vllm.entrypoints.openai.api_server`


def test_unset_settings_pass_no_flags_so_engine_defaults_stand():
    argv = build_command(settings(), "/cache/snap", python="py")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert flags(argv) == [
        "--model", "/cache/snap",
        "--host", "127.0.0.1",
        "--port", "8001",
        "--served-model-name", "org/model",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip


def test_every_setting_maps_to_its_flag():
    s = settings(
        SERVED_MODEL_NAME="chat",
        ENGINE_PORT=9001,
        MAX_MODEL_LEN=32768,
        GPU_MEMORY_UTIL=0.95,
        TENSOR_PARALLEL_SIZE=2,
        MAX_NUM_SEQS=12,
        MAX_BATCHED_TOKENS=10240,
        ENABLE_CHUNKED_PREFILL=True,
        ENABLE_PREFIX_CACHING=False,
        DTYPE="bfloat16",
        QUANTIZATION="awq",
        IMAGE_LIMIT=5,
        VIDEO_LIMIT=1,
        TRUST_REMOTE_CODE=True,
    )
    argv = " ".join(build_command(s, "/m", python="py"))
    for expected in [
        "--port 9001",
        "--served-model-name chat",
        "--max-model-len 32768",
        "--gpu-memory-utilization 0.95",
        "--tensor-parallel-size 2",
        "--max-num-seqs 12",
        "--max-num-batched-tokens 10240",
        "--enable-chunked-prefill",
        "--no-enable-prefix-caching",
        "--dtype bfloat16",
        "--quantization awq",
        '--limit-mm-per-prompt {"image":5,"video":1}',
        "--trust-remote-code",
    ]:
        assert expected in argv


def test_revision_is_passed_only_when_vllm_loads_the_hub_id_itself():
    s = settings(MODEL_REVISION="v2")
    assert "--revision" not in build_command(s, "/cache/snapshots/abc")
    assert build_command(s, "org/model")[-2:] == ["--revision", "v2"]


def test_extra_args_are_appended_verbatim_and_shell_split():
    s = settings(ENGINE_EXTRA_ARGS="--enforce-eager --chat-template '/a b/t.jinja' --kv-cache-dtype=fp8")
    assert build_command(s, "/m")[-4:] == [
        "--enforce-eager",
        "--chat-template",
        "/a b/t.jinja",
        "--kv-cache-dtype=fp8",
    ]
    assert split_extra_args("   ") == []


def test_secrets_are_masked_in_both_flag_forms():
    argv = ["x", "--api-key", "sk-1", "--hf-token=hf_2", "--model", "m"]
    assert mask_secrets(argv) == ["x", "--api-key", "***", "--hf-token=***", "--model", "m"]


def test_command_is_accepted_by_vllms_own_argument_parser():
    """The flags must exist in the vLLM we ship: parse them with vLLM's real parser."""
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    s = settings(
        MAX_MODEL_LEN=4096,
        GPU_MEMORY_UTIL=0.9,
        TENSOR_PARALLEL_SIZE=1,
        MAX_NUM_SEQS=8,
        MAX_BATCHED_TOKENS=2048,
        ENABLE_CHUNKED_PREFILL=False,
        ENABLE_PREFIX_CACHING=True,
        DTYPE="float32",
        QUANTIZATION="fp8",
        IMAGE_LIMIT=2,
        AUDIO_LIMIT=1,
        TRUST_REMOTE_CODE=True,
        MODEL_REVISION="main",
        ENGINE_EXTRA_ARGS="--enforce-eager",
        ALLOWED_MEDIA_DOMAINS="images.example.com",
    )
    argv = build_command(s, "org/model")
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(flags(argv))
    assert args.model == "org/model"
    assert args.host == "127.0.0.1" and args.port == 8001
    assert args.served_model_name == ["org/model"]
    assert args.max_model_len == 4096
    assert args.gpu_memory_utilization == 0.9
    assert args.max_num_seqs == 8
    assert args.max_num_batched_tokens == 2048
    assert args.enable_chunked_prefill is False
    assert args.enable_prefix_caching is True
    assert args.dtype == "float32"
    assert args.quantization == "fp8"
    assert args.limit_mm_per_prompt == {"image": 2, "audio": 1}
    assert args.trust_remote_code is True
    assert args.revision == "main"
    assert args.enforce_eager is True
    assert args.disable_uvicorn_access_log is True
    assert args.allowed_media_domains == ["images.example.com"]


def test_media_domains_are_passed_to_vllm_and_redirects_are_off_by_default():
    from app.launcher import engine_env

    s = settings(ALLOWED_MEDIA_DOMAINS="images.example.com, cdn.example.org")
    argv = build_command(s, "/m")
    i = argv.index("--allowed-media-domains")
    assert argv[i + 1 : i + 3] == ["images.example.com", "cdn.example.org"]
    assert engine_env({})["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert engine_env({"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "1"})["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "1"


def test_profile_settings_pass_their_flags_and_vllms_parser_takes_them():
    """PIPELINE_PARALLEL_SIZE, KV_CACHE_DTYPE and LOAD_FORMAT (model profiles, issue 16)."""


def test_lora_plan_becomes_flags_vllms_own_parser_reads():
    """LoRA (app/lora/): on, its limits, and the adapters loaded at start in --lora-modules' JSON
    form (a path with a comma or `=` survives), parsed by vLLM's real parser."""
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    s = settings(PIPELINE_PARALLEL_SIZE=2, KV_CACHE_DTYPE="fp8", LOAD_FORMAT="runai_streamer")
    argv = build_command(s, "/m")
    assert " ".join(argv[3:]).endswith(
        "--pipeline-parallel-size 2 --kv-cache-dtype fp8 --load-format runai_streamer"
    )
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(flags(argv))
    assert (args.pipeline_parallel_size, args.kv_cache_dtype, args.load_format) == (
        2,
        "fp8",
        "runai_streamer",
    )
    from app.lora.config import AdapterSpec, LoraPlan

    plan = LoraPlan(
        adapters=[
            AdapterSpec("sql", "/a/s,q=l", "static", base_model_name="org/model", path="/a/s,q=l"),
            AdapterSpec("lazy", "/a/lazy", "config", at_start=False, path="/a/lazy"),
            AdapterSpec("chat", "org/chat-lora", "dir", path="/cache/snap/chat"),
        ],
        enabled=True,
        max_lora_rank=32,
        max_loras=2,
        max_cpu_loras=4,
    )
    argv = build_command(settings(), "/m", lora=plan)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(flags(argv))
    assert args.enable_lora is True
    assert (args.max_lora_rank, args.max_loras, args.max_cpu_loras) == (32, 2, 4)
    assert [(m.name, m.path, m.base_model_name) for m in args.lora_modules] == [
        ("sql", "/a/s,q=l", "org/model"),
        ("chat", "/cache/snap/chat", None),
    ]  # `lazy` loads on first use, through the runtime route
    assert "--enable-lora" not in build_command(settings(), "/m", lora=LoraPlan())
