"""The load tester's options: command-line flags, or the same as YAML (`--config`), flags winning.

The YAML file has the shape of vllm_mxext's `performance_config.yaml`: `server`, `test_params`,
`prompts` (a list) and `output`; its key names (`url`, `concurrent_requests`, `log_dir`,
`save_individual_metrics`, `console_output`) are accepted next to this tool's own. Unknown keys are
an error, not ignored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class OptionsError(ValueError):
    """Bad options: the message says which and why."""


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # server
    server_url: str = Field("http://localhost:8000", description="Base URL of the server (no /v1).")
    api_key: str | None = Field(None, description="Bearer key; default: $OPENAI_API_KEY.")
    model: str | None = Field(None, description="Model to ask; default: the first of /v1/models.")
    metrics_url: str | None = Field(
        None,
        description="Prometheus text to read the prefix cache from; default: SERVER_URL/metrics "
        "(and URL2/metrics for --compare); 'off': none.",
    )
    # what to send
    prompts_file: str | None = Field(None, description="Prompts, one per line.")
    prompts: list[str] | None = Field(None, description="Prompts (YAML only).")
    num_prompts: int | None = Field(
        None,
        ge=1,
        description="How many prompts: of the built-in ones (10), the file's first N, or random ones (1000).",
    )
    random_input_len: int | None = Field(None, ge=1, description="Random prompts of about this many tokens.")
    max_tokens: int = Field(128, ge=1, description="max_tokens of each request (single-turn mode).")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature.")
    ignore_eos: bool = Field(
        False, description="Ask vLLM to generate exactly max_tokens (vLLM's ignore_eos)."
    )
    extra_body: dict[str, Any] | None = Field(None, description="JSON object merged into every request body.")
    stream: bool = Field(True, description="Stream (TTFT and TPOT are measured on streams only).")
    # how
    concurrency: int | None = Field(
        None, ge=1, description="Requests in flight at most; default 1 (multi-round: the number of users)."
    )
    qps: float | None = Field(
        None, gt=0, description="Poisson arrivals at this rate; default: as fast as allowed."
    )
    duration: float | None = Field(
        None,
        gt=0,
        description="Stop starting requests after this many seconds (multi-round, --compare: checked "
        "between rounds and blocks).",
    )
    num_requests: int | None = Field(None, ge=1, description="Requests to send; default: one per prompt.")
    timeout: float = Field(
        600.0, gt=0, description="Seconds one request may take before it counts as failed."
    )
    seed: int | None = Field(
        None, description="Seed for random text and arrivals; default: a new one each run."
    )
    max_error_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Exit 1 if the failed share of requests is above this."
    )
    # multi-round conversations
    users: int | None = Field(None, ge=1, description="Multi-round mode: conversations at once (4).")
    rounds: int | None = Field(None, ge=1, description="Multi-round mode: questions per conversation (3).")
    system_prompt_tokens: int = Field(
        256, ge=0, description="Multi-round: tokens of the system prompt all users share."
    )
    question_len: int = Field(32, ge=1, description="Multi-round: tokens of each question.")
    answer_len: int = Field(64, ge=1, description="Multi-round: max_tokens of each answer.")
    history: bool = Field(True, description="Multi-round: each round sends the whole conversation so far.")
    # side by side
    compare: str | None = Field(
        None, description="A second base URL: the same schedule against both, interleaved."
    )
    compare_block: int | None = Field(
        None, ge=1, description="Compare: requests per block (A B B A ...); default max(8, 2 x concurrency)."
    )
    # output
    save: str | None = Field(None, description="Directory for the JSON result file.")
    save_requests: bool = Field(
        True, description="Put every request in the JSON file, not only the aggregate."
    )
    console_output: bool = Field(True, description="Print the summary table.")
    progress: bool | None = Field(
        None, description="Progress bar on stderr; default: when stderr is a terminal."
    )

    @model_validator(mode="after")
    def _check(self) -> Options:
        for name in ("server_url", "compare", "metrics_url"):
            url = getattr(self, name)
            off = name == "metrics_url" and url is not None and url.lower() == "off"
            if url is not None and not off and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name}: {url!r} is not an http:// or https:// URL")
        sources = [n for n in ("prompts_file", "prompts", "random_input_len") if getattr(self, n) is not None]
        if len(sources) > 1:
            raise ValueError(f"give one prompt source, not {' and '.join(sources)}")
        if self.multi_round and (sources or self.num_prompts is not None):
            raise ValueError(
                "multi-round mode (--users/--rounds) makes its own questions: no prompts options"
            )
        if self.multi_round and self.num_requests is not None:
            raise ValueError("multi-round mode sends users x rounds requests: no --num-requests")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise ValueError("prompts: the list is empty")
        return self

    @property
    def multi_round(self) -> bool:
        return self.users is not None or self.rounds is not None

    def safe_dump(self) -> dict[str, Any]:
        """The options for the result file: the key masked, the prompt list summarised."""
        out = self.model_dump()
        if out["api_key"]:
            out["api_key"] = "***"
        if out["prompts"] is not None:
            out["prompts"] = f"{len(out['prompts'])} prompts"
        return out


# YAML section -> {key in the file: option}; a section's own option names are accepted too.
YAML_ALIASES: dict[str, dict[str, str]] = {
    "server": {"url": "server_url"},
    "test_params": {"concurrent_requests": "concurrency"},
    "output": {"log_dir": "save", "save_dir": "save", "save_individual_metrics": "save_requests"},
}
YAML_SECTIONS: dict[str, set[str]] = {
    "server": {"server_url", "api_key", "model", "metrics_url", "compare"},
    "test_params": set(Options.model_fields)
    - {"server_url", "api_key", "model", "metrics_url", "prompts", "save", "save_requests", "console_output"},
    "output": {"save", "save_requests", "console_output", "progress"},
}


def from_yaml(path: str | Path) -> dict[str, Any]:
    """The options a YAML file sets, as {option: value}."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise OptionsError(f"--config {path}: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise OptionsError(f"--config {path}: expected a mapping with server, test_params, prompts, output")
    out: dict[str, Any] = {}
    for section, value in doc.items():
        if section == "prompts":
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise OptionsError(f"--config {path}: prompts must be a list of strings")
            out["prompts"] = value
            continue
        if section not in YAML_SECTIONS:
            raise OptionsError(
                f"--config {path}: unknown section {section!r} (server, test_params, prompts, output)"
            )
        if not isinstance(value, dict):
            raise OptionsError(f"--config {path}: {section} must be a mapping")
        for key, item in value.items():
            name = YAML_ALIASES.get(section, {}).get(key, key)
            if name not in YAML_SECTIONS[section]:
                raise OptionsError(f"--config {path}: unknown key {section}.{key}")
            out[name] = item
    return out


def _help(name: str, extra: str = "") -> str:
    field = Options.model_fields[name]
    return (field.description or "") + extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.loadtest",
        description="Load test an OpenAI-compatible server: TTFT, TPOT and latency percentiles, multi-round "
        "conversations with the prefix-cache hit rate per round, and two URLs side by side.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="Options as YAML (flags given here win).")
    server = parser.add_argument_group("server")
    server.add_argument("--server-url", metavar="URL", help=_help("server_url"))
    server.add_argument("--api-key", metavar="KEY", help=_help("api_key"))
    server.add_argument("--model", help=_help("model"))
    server.add_argument("--metrics-url", metavar="URL", help=_help("metrics_url"))
    send = parser.add_argument_group("what to send")
    send.add_argument("--prompts-file", metavar="FILE", help=_help("prompts_file"))
    send.add_argument("--num-prompts", type=int, metavar="N", help=_help("num_prompts"))
    send.add_argument("--random-input-len", type=int, metavar="TOKENS", help=_help("random_input_len"))
    send.add_argument("--max-tokens", type=int, metavar="N", help=_help("max_tokens", " Default 128."))
    send.add_argument("--temperature", type=float, help=_help("temperature", " Default 0."))
    send.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, help=_help("ignore_eos"))
    send.add_argument("--extra-body", type=_json_object, metavar="JSON", help=_help("extra_body"))
    send.add_argument("--stream", action=argparse.BooleanOptionalAction, help=_help("stream", " Default on."))
    how = parser.add_argument_group("load")
    how.add_argument("--concurrency", type=int, metavar="N", help=_help("concurrency"))
    how.add_argument("--qps", type=float, help=_help("qps"))
    how.add_argument("--duration", type=float, metavar="SECONDS", help=_help("duration"))
    how.add_argument("--num-requests", type=int, metavar="N", help=_help("num_requests"))
    how.add_argument("--timeout", type=float, metavar="SECONDS", help=_help("timeout", " Default 600."))
    how.add_argument("--seed", type=int, help=_help("seed"))
    how.add_argument(
        "--max-error-rate", type=float, metavar="RATE", help=_help("max_error_rate", " Default 0.")
    )
    multi = parser.add_argument_group("multi-round conversations (on when --users or --rounds is given)")
    multi.add_argument("--users", type=int, metavar="N", help=_help("users"))
    multi.add_argument("--rounds", type=int, metavar="N", help=_help("rounds"))
    multi.add_argument(
        "--system-prompt-tokens", type=int, metavar="N", help=_help("system_prompt_tokens", " (256)")
    )
    multi.add_argument("--question-len", type=int, metavar="TOKENS", help=_help("question_len", " (32)"))
    multi.add_argument("--answer-len", type=int, metavar="TOKENS", help=_help("answer_len", " (64)"))
    multi.add_argument(
        "--history", action=argparse.BooleanOptionalAction, help=_help("history", " Default on.")
    )
    compare = parser.add_argument_group("side by side")
    compare.add_argument("--compare", metavar="URL2", help=_help("compare"))
    compare.add_argument("--compare-block", type=int, metavar="N", help=_help("compare_block"))
    out = parser.add_argument_group("output")
    out.add_argument("--save", metavar="DIR", help=_help("save"))
    out.add_argument("--save-requests", action=argparse.BooleanOptionalAction, help=_help("save_requests"))
    out.add_argument("--console-output", action=argparse.BooleanOptionalAction, help=_help("console_output"))
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, help=_help("progress"))
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def parse(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Options:
    """Flags over YAML over defaults. Raises OptionsError (or SystemExit from argparse for a
    malformed flag)."""
    given = vars(build_parser().parse_args(argv))
    values = from_yaml(given.pop("config")) if "config" in given else {}
    values.update(given)
    values = {key: value for key, value in values.items() if value != ""}  # empty means unset
    if not values.get("api_key") and env and env.get("OPENAI_API_KEY"):
        values["api_key"] = env["OPENAI_API_KEY"]
    try:
        return Options.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise OptionsError(problems) from exc
