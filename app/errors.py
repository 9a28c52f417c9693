"""OpenAI-shaped error bodies, sent from plain ASGI code (no framework on the hot path)."""

from __future__ import annotations

from typing import Any

import orjson

# Status -> OpenAI error type (the SDK maps the status to its exception class; `type` is for people).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "client_closed_request",
    500: "internal_server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}` as the OpenAI API and vLLM send it."""
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _TYPES.get(status, "api_error"),
                "param": param,
                "code": code,
            }
        }
    )


async def send_error(
    send: Any,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_body(status, message, code=code, param=param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_message(body: bytes) -> str | None:
    """The message of an error body in any of the shapes engines send, or None."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return text or None
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
    elif isinstance(err, str):
        msg = err
    else:  # vLLM's older shape: {"object": "error", "message": ...}; FastAPI's {"detail": ...}
        msg = obj.get("message") or obj.get("detail")
    if msg is None:
        return None
    return str(msg)[:500]
