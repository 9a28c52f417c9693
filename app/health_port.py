"""The health port of a RunPod load-balancing endpoint (PORT_HEALTH, when it differs from PORT).

RunPod polls `GET /ping` on PORT_HEALTH: 200 ready, 204 initializing, anything else unhealthy. The
launcher serves `health_only(app)` there: the same app's `/ping` and `/health` (the routes the table
in app/routes.py marks `health_port`; same answers, same quiet logging), and 404 for every other
path, so the API itself stays on PORT only.
"""

from __future__ import annotations

from typing import Any

from app.errors import send_error
from app.routes import classify


def health_only(app: Any) -> Any:
    async def asgi(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        route = classify(scope["path"])
        if route is not None and route.health_port:
            await app(scope, receive, send)
            return
        await send_error(send, 404, "only /ping and /health are served on this port", code="not_found")

    return asgi
