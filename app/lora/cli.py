"""`python -m app.lora`: manage a running server's LoRA adapters (vllm_mxext's `lora_manager`).

    python -m app.lora list
    python -m app.lora load NAME PATH          # a folder on the server, a Hugging Face id or s3://
    python -m app.lora unload NAME
    python -m app.lora test NAME "prompt"      # the answer, TTFT and tokens/s

`--server-url` (default $LORA_SERVER_URL, else http://localhost:8000), `--api-key` (default
$API_KEY, else $OPENAI_API_KEY) for `list` and `test`, `--admin-key` (default $ADMIN_API_KEY) for
`load` and `unload`. Exit status: 0 done, 1 the server refused or failed, 2 bad usage or no server.
Standard library only, so it runs anywhere the image's Python does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any


class ServerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _message(body: bytes) -> str:
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500]
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message"))
    return str(obj)[:500]


def _request(url: str, key: str | None, payload: Any = None, timeout: float = 600) -> urllib.request.Request:
    headers = {"content-type": "application/json"} if payload is not None else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(payload).encode() if payload is not None else None
    return urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")


def call(url: str, key: str | None, payload: Any = None, timeout: float = 600) -> bytes:
    try:
        with urllib.request.urlopen(_request(url, key, payload), timeout=timeout) as resp:  # noqa: S310
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise ServerError(exc.code, _message(exc.read())) from None


def list_adapters(args: argparse.Namespace) -> int:
    body = json.loads(call(f"{args.server_url}/v1/lora_adapters", args.api_key))
    rows = body.get("data", [])
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(
        f"base model: {body.get('base_model')}   runtime loading: {body.get('runtime_loading')}   "
        f"max rank: {body.get('max_lora_rank')}"
    )
    if not rows:
        print("no adapters")
        return 0
    head = ("NAME", "LOADED", "ORIGIN", "RANK", "REQUESTS", "TOKENS", "ERRORS", "LAST USED", "SOURCE")
    table = [head] + [
        (
            r["name"],
            "yes" if r["loaded"] else "no",
            r["origin"],
            str(r["rank"] if r["rank"] is not None else "-"),
            str(r["requests"]),
            str(r["completion_tokens"]),
            str(r["errors"]),
            r["last_used"] or "-",
            r["source"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def load(args: argparse.Namespace) -> int:
    payload = {"lora_name": args.name, "lora_path": args.path}
    if args.inplace:
        payload["load_inplace"] = True
    print(call(f"{args.server_url}/v1/load_lora_adapter", args.admin_key, payload).decode().strip())
    return 0


def unload(args: argparse.Namespace) -> int:
    print(
        call(f"{args.server_url}/v1/unload_lora_adapter", args.admin_key, {"lora_name": args.name})
        .decode()
        .strip()
    )
    return 0


def test(args: argparse.Namespace) -> int:
    """One streamed chat completion through the adapter: its text, TTFT, tokens and tokens/s."""
    payload = {
        "model": args.name,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = None
    text = []
    try:
        resp = urllib.request.urlopen(  # noqa: S310 - the operator's URL
            _request(f"{args.server_url}/v1/chat/completions", args.api_key, payload), timeout=args.timeout
        )
    except urllib.error.HTTPError as exc:
        raise ServerError(exc.code, _message(exc.read())) from None
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ServerError(500, _message(data.encode()))
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(piece)
                    if not args.quiet:
                        print(piece, end="", flush=True)
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    total = time.perf_counter() - start
    if args.quiet:
        print("".join(text), end="")
    print()
    rate = f"{tokens / total:.1f}" if tokens else "-"
    ttft_text = f"{ttft * 1000:.1f} ms" if ttft is not None else "-"
    print(
        f"adapter {args.name}: TTFT {ttft_text}, {tokens if tokens is not None else '-'} tokens in {total:.2f} s, {rate} tokens/s"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.lora", description=__doc__.splitlines()[0])
    p.add_argument(
        "--server-url",
        default=os.environ.get("LORA_SERVER_URL", "http://localhost:8000"),
        help="the server's base URL, no /v1 (default: $LORA_SERVER_URL or http://localhost:8000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="API key for list and test (default: $API_KEY, else $OPENAI_API_KEY)",
    )
    p.add_argument(
        "--admin-key", default=os.environ.get("ADMIN_API_KEY"), help="ADMIN_API_KEY for load and unload"
    )
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every adapter: loaded or not, origin, rank, requests, tokens")
    ls.add_argument("--json", action="store_true", help="the server's JSON as is")
    ls.set_defaults(run=list_adapters)
    ld = sub.add_parser("load", help="load an adapter (checked by the server first)")
    ld.add_argument("name")
    ld.add_argument(
        "path", help="a folder on the server, a Hugging Face id (org/repo[@rev]) or s3://bucket/prefix"
    )
    ld.add_argument(
        "--inplace", action="store_true", help="replace an adapter of that name (vLLM's load_inplace)"
    )
    ld.set_defaults(run=load)
    ul = sub.add_parser("unload", help="unload an adapter")
    ul.add_argument("name")
    ul.set_defaults(run=unload)
    ts = sub.add_parser("test", help="one streamed answer through the adapter: text, TTFT, tokens/s")
    ts.add_argument("name")
    ts.add_argument("prompt")
    ts.add_argument("--max-tokens", type=int, default=64)
    ts.add_argument("--temperature", type=float, default=0.0)
    ts.add_argument("--timeout", type=float, default=300)
    ts.add_argument("--quiet", action="store_true", help="print the answer at the end, not as it streams")
    ts.set_defaults(run=test)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.server_url = args.server_url.rstrip("/")
    try:
        return args.run(args)
    except ServerError as exc:
        print(f"error: the server answered {exc.status}: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach {args.server_url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
