"""scripts/healthcheck.py, the images' HEALTHCHECK: 0 only when /health answers 200."""

import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from deploy_tools import ROOT, run


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_exit_code_follows_health(status, code):
    handler = type("H", (Health,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        assert run(sys.executable, str(ROOT / "scripts" / "healthcheck.py"), env=env).returncode == code
    finally:
        server.shutdown()


def test_nothing_listening_is_unhealthy():
    from stack import free_port

    env = {**os.environ, "PORT": str(free_port())}
    assert run(sys.executable, str(ROOT / "scripts" / "healthcheck.py"), env=env).returncode == 1
