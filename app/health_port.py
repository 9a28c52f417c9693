"""The health port of a RunPod load-balancing endpoint (PORT_HEALTH, when it differs from PORT).

RunPod polls `GET /ping` on PORT_HEALTH: 200 ready, 204 initializing, anything else unhealthy. The
launcher serves `health_only(app)` there: the same app's `/ping` and `/health` (same answers, same
quiet logging), and 404 for every other path, so the API itself stays on PORT only.
"""

from __future__ import annotations

from typing import Any

HEALTH_PATHS = frozenset({"/ping", "/health"})
_NOT_FOUND = b'{"error":{"message":"only /ping and /health are served on this port","type":"not_found","param":null,"code":404}}'


def health_only(app: Any) -> Any:
    async def asgi(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] in HEALTH_PATHS:
            await app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_NOT_FOUND)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _NOT_FOUND})

    return asgi
