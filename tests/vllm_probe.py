"""What vLLM 0.32 itself does with a path or a body, asked of the installed vllm without an engine.

Run as a script (in its own process: importing vLLM's API server reconfigures logging), it prints
one JSON object:

- `routes`: every route template vLLM's API server can serve: its FastAPI app built with every
  optional router on (all tasks, dev mode, runtime LoRA updating, fault tolerance, tokenizer info),
  the pooling routers (built only with a pooling model), and every route literal in the source of
  `vllm.entrypoints` (for routers behind options the build cannot turn on, e.g. an SDK not
  installed); mounts as `{"mount": path, "regex": ...}`.
- `fetched`: for each body of tests/media_corpus.py, the URLs vLLM would fetch (and the error, if
  vLLM refuses the body: URLs asked for before it are kept), found by running
  the body through vLLM's own request model and parsers (chat content parts, the Responses API's
  input, the Anthropic conversion, the scoring inputs) with the media connector replaced by a
  recorder: nothing is fetched, no model is loaded.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import sys
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

# Servers in vllm.entrypoints that are not the API server the proxy fronts.
_OTHER_SERVERS = ("launchers/dp_supervisor.py", "cli/preload.py")
_ROUTE_CALLS = frozenset(
    {"get", "post", "put", "delete", "patch", "api_route", "websocket", "add_api_route", "mount"}
)


def source_routes() -> set[str]:
    import vllm.entrypoints

    root = pathlib.Path(vllm.entrypoints.__file__).parent
    found = set()
    for file in root.rglob("*.py"):
        if str(file.relative_to(root)) in _OTHER_SERVERS:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _ROUTE_CALLS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.startswith("/")
            ):
                found.add(("mount:" if node.func.attr == "mount" else "") + node.args[0].value)
    return found


def built_routes() -> list[Any]:
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.pooling.classify.api_router import router as classify
    from vllm.entrypoints.pooling.embed.api_router import router as embed
    from vllm.entrypoints.pooling.pooling.api_router import router as pooling
    from vllm.entrypoints.pooling.scoring.api_router import router as scoring
    from vllm.tasks import SupportedTask
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    args.enable_fault_tolerance = True
    args.enable_tokenizer_info_endpoint = True
    app = build_app(args, supported_tasks=tuple(SupportedTask.__args__))
    for router in (classify, embed, pooling, scoring):
        app.include_router(router)
    return app.routes


def routes() -> list[Any]:
    from starlette.routing import Mount

    out: list[Any] = []
    for route in built_routes():
        if isinstance(route, Mount):
            out.append({"mount": route.path, "regex": route.path_regex.pattern})
        else:
            out.append(route.path)
    for literal in sorted(source_routes()):
        if literal.startswith("mount:"):
            path = literal[len("mount:") :]
            out.append({"mount": path, "regex": f"^{path}/(?P<path>.*)$"})
        else:
            out.append(literal)
    return out


# --- media URLs --------------------------------------------------------------------------------


class Recorder:
    """Stands in for vLLM's MediaConnector: records each URL it is asked to fetch."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def fetch_image(self, url: str, *args: Any, **kw: Any) -> None:
        self.urls.append(url)

    def fetch_audio(self, url: str, *args: Any, **kw: Any) -> None:
        self.urls.append(url)

    def fetch_video(self, video_url: str, *args: Any, **kw: Any) -> None:
        self.urls.append(video_url)


def fetched() -> dict[str, dict[str, Any]]:
    from media_corpus import CASES
    from pydantic import TypeAdapter
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.openai.responses.utils import construct_input_messages
    from vllm.entrypoints.pooling.scoring import utils as scoring
    from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest
    from vllm.renderers import chat_utils

    recorder = Recorder()

    class Tracker(chat_utils.MultiModalItemTracker):
        """vLLM's tracker without a model: any number of items of any modality."""

        model_cls = SimpleNamespace(get_placeholder_str=lambda modality, n: f"<{modality}>")
        video_processor_name = None

        def _validate_add(self, modality: str) -> tuple[str, str, bool, int]:
            return modality.replace("_embeds", ""), modality, False, 1

        def resolve_items(self) -> tuple[None, None]:
            return None, None

    chat_utils.MultiModalContentParser._connector = property(lambda self: recorder)  # type: ignore
    chat_utils.MultiModalItemTracker = Tracker  # parse_chat_messages builds one
    scoring.MultiModalItemTracker = Tracker  # and so does the scoring input's parser
    model_config = SimpleNamespace(
        allowed_local_media_path=None,
        allowed_media_domains=None,
        multimodal_config=None,
        enable_prompt_embeds=False,
        is_multimodal_model=True,
        hf_config=SimpleNamespace(),
    )

    def chat(messages: Any) -> None:
        chat_utils.parse_chat_messages(list(messages), model_config, "openai")  # type: ignore[arg-type]

    def score(data_1: Any, data_2: Any) -> None:
        data = scoring.validate_score_input(data_1, data_2, is_multimodal_model=True, architecture="x")
        for item in data.data_1 + data.data_2:
            scoring.parse_score_data_single(item, "query", model_config)  # type: ignore[arg-type]

    def responses(body: dict[str, Any]) -> None:
        request = ResponsesRequest.model_validate(body)
        chat(construct_input_messages(request_instructions=request.instructions, request_input=request.input))

    def rerank(body: dict[str, Any]) -> None:
        request = RerankRequest.model_validate(body)
        score(request.query, request.documents)

    def score_request(body: dict[str, Any]) -> None:
        request = TypeAdapter(ScoreRequest).validate_python(body)
        score(request.data_1, request.data_2)

    parsers = {
        "/v1/chat/completions": lambda body: chat(ChatCompletionRequest.model_validate(body).messages),
        "/v1/responses": responses,
        "/v1/messages": lambda body: chat(
            AnthropicServingMessages.to_chat_completion_request(
                AnthropicMessagesRequest.model_validate(body)
            ).messages
        ),
        "/v1/rerank": rerank,
        "/score": score_request,
    }

    out: dict[str, dict[str, Any]] = {}
    for name, (route, body) in CASES.items():
        recorder.urls = []
        parse = parsers[route]  # a route without a parser here is the test's own error
        try:
            parse(body)
            error = None
        except Exception as exc:  # vLLM refuses the body: the URLs asked for up to there are kept
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        out[name] = {"urls": recorder.urls, "error": error}
    return out


if __name__ == "__main__":
    result = {"routes": routes(), "fetched": fetched()}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
