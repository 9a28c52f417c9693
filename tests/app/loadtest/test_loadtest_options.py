"""Options of `python -m app.loadtest`: flags, YAML in the vllm_mxext shape, and their checks."""

from pathlib import Path

import pytest

from app.loadtest.options import Options, OptionsError, parse

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_flags():
    opts = parse([])
    assert opts == Options()
    assert (opts.server_url, opts.stream, opts.max_error_rate, opts.multi_round) == (
        "http://localhost:8000",
        True,
        0.0,
        False,
    )


def test_the_vllm_mxext_shape_maps_to_the_options(tmp_path):
    config = write(
        tmp_path,
        """
server: {url: "http://h:9", model: "m"}
test_params: {max_tokens: 150, temperature: 0.7, concurrent_requests: 4, stream: false}
prompts: ["a?", "b?"]
output: {log_dir: "/tmp/x", save_individual_metrics: false, console_output: false}
""",
    )
    opts = parse(["--config", config])
    assert (opts.server_url, opts.model, opts.max_tokens, opts.temperature) == ("http://h:9", "m", 150, 0.7)
    assert (opts.concurrency, opts.stream, opts.prompts) == (4, False, ["a?", "b?"])
    assert (opts.save, opts.save_requests, opts.console_output) == ("/tmp/x", False, False)


def test_flags_win_over_the_file(tmp_path):
    config = write(tmp_path, "test_params: {concurrency: 4, stream: true}\nserver: {url: 'http://h:9'}\n")
    opts = parse(["--config", config, "--concurrency", "2", "--no-stream"])
    assert (opts.concurrency, opts.stream, opts.server_url) == (2, False, "http://h:9")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("test_params: {concurency: 4}\n", "unknown key test_params.concurency"),
        ("servers: {url: x}\n", "unknown section 'servers'"),
        ("server: {max_tokens: 3}\n", "unknown key server.max_tokens"),
        ("prompts: 'one'\n", "prompts must be a list of strings"),
        ("test_params: {concurrency: 0}\n", "concurrency: Input should be greater than or equal to 1"),
        ("test_params: {qps: -1}\n", "qps: Input should be greater than 0"),
        ("- a\n", "expected a mapping"),
        ("server: [\n", "--config"),
    ],
)
def test_a_bad_file_is_refused_with_a_reason(tmp_path, text, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse(["--config", write(tmp_path, text)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts-file", "p.txt", "--random-input-len", "10"], "one prompt source"),
        (["--users", "2", "--prompts-file", "p.txt"], "multi-round mode"),
        (["--rounds", "2", "--num-requests", "5"], "multi-round mode sends users x rounds"),
        (["--max-error-rate", "2"], "max_error_rate"),
        (["--server-url", "localhost:8000"], "server_url: 'localhost:8000' is not an http"),
        (["--compare", "ftp://h"], "compare: 'ftp://h' is not an http"),
    ],
)
def test_contradictory_flags_are_refused(argv, message):
    with pytest.raises(OptionsError, match=message):
        parse(argv)


def test_an_empty_value_means_unset_and_the_key_may_come_from_the_environment(tmp_path):
    config = write(tmp_path, "server: {model: '', api_key: ''}\n")
    opts = parse(["--config", config], env={"OPENAI_API_KEY": "k1"})
    assert (opts.model, opts.api_key) == (None, "k1")
    assert parse(["--api-key", "k2"], env={"OPENAI_API_KEY": "k1"}).api_key == "k2"


def test_the_key_is_masked_in_what_is_saved():
    dumped = parse(["--api-key", "secret"]).safe_dump()
    assert dumped["api_key"] == "***" and "secret" not in str(dumped)


def test_the_shipped_example_config_parses():
    opts = parse(["--config", str(ROOT / "app" / "loadtest" / "example.yaml")])
    assert opts.concurrency == 4 and opts.prompts and opts.save == "results/loadtest"
