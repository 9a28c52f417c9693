"""The launcher's whole life, run for real through scripts/start.sh: start-up failures, SIGTERM
under load, the engine dying."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from stack import ROOT, Stack, free_port, wait_for

pytestmark = pytest.mark.integration


def _error_lines(stack: Stack) -> list[dict]:
    return [r for r in stack.records() if r.get("level") == "error"]


def _no_traceback(stack: Stack) -> None:
    assert "Traceback" not in stack.log_path.read_text()


def test_no_gpu_is_one_clear_line_and_exit_1(stack_logs, tiny_models):
    stack = Stack(stack_logs, "no-gpu", MODEL_NAME=str(tiny_models["text"]), DEVICE="auto").start(wait=False)
    assert stack.wait_exit(30) == 1
    errors = _error_lines(stack)
    assert len(errors) == 1 and errors[0]["event"].startswith("No NVIDIA GPU found")
    _no_traceback(stack)


def test_invalid_settings_exit_2_naming_the_setting(stack_logs, tiny_models):
    stack = Stack(stack_logs, "bad-setting", MODEL_NAME=str(tiny_models["text"]), GPU_MEMORY_UTIL="2").start(
        wait=False
    )
    assert stack.wait_exit(30) == 2
    assert "invalid setting GPU_MEMORY_UTIL" in stack.tail()
    _no_traceback(stack)


def test_missing_model_name_is_refused_by_start_sh(stack_logs):
    stack = Stack(stack_logs, "no-model", MODEL_NAME="").start(wait=False)
    assert stack.wait_exit(30) == 2
    assert "MODEL_NAME is required" in stack.tail()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/model", "looks like a path but no such directory exists"),
        ("someorg/not-cached-model", "is not in the cache"),
    ],
)
def test_a_model_that_cannot_be_had_exits_1_saying_why(stack_logs, tmp_path, model, message):
    stack = Stack(stack_logs, "model-missing", MODEL_NAME=model, HF_HOME=str(tmp_path)).start(wait=False)
    assert stack.wait_exit(30) == 1
    errors = _error_lines(stack)
    assert len(errors) == 1 and message in errors[0]["event"]
    _no_traceback(stack)


def test_an_hf_cache_the_image_user_cannot_write_exits_1_before_any_download(stack_logs):
    """RunPod's volumes are root-owned and the image runs as uid 10001: the real launcher, run as
    that user (setpriv, when the tests run as root), against a root-owned 0755 folder as HF_HOME.
    It is started as start.sh would exec it (`python -m app.launcher`): start.sh, as that user,
    could not run this machine's venv interpreter, which lives under root's home."""
    volume = Path(tempfile.mkdtemp(prefix="volume-"))
    volume.chmod(0o755 if os.geteuid() == 0 else 0o555)
    stack = Stack(
        stack_logs,
        "cache-unwritable",
        MODEL_NAME="someorg/some-model",
        HF_HOME=str(volume / "huggingface"),
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing there: no download could start
    )
    as_user = ["setpriv", "--reuid=10001", "--regid=0", "--clear-groups"] if os.geteuid() == 0 else []
    try:
        with open(stack.log_path, "wb") as out:
            code = subprocess.run(
                [*as_user, sys.executable, "-m", "app.launcher"],
                cwd=ROOT,
                env=stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
            ).returncode
    finally:
        volume.chmod(0o755)
        shutil.rmtree(volume)
    assert code == 1, stack.tail()
    errors = _error_lines(stack)
    assert len(errors) == 1 and "is not writable by this container's user (uid 10001" in errors[0]["event"]
    assert not any(
        r.get("event") in ("downloading model", "hub unreachable, trying the cache") for r in stack.records()
    )
    _no_traceback(stack)


def test_engine_refusing_its_flags_exits_1(stack_logs, tiny_models):
    stack = Stack(
        stack_logs, "bad-flag", MODEL_NAME=str(tiny_models["text"]), ENGINE_EXTRA_ARGS="--no-such-flag"
    ).start(wait=False)
    assert stack.wait_exit(120) == 1
    assert any(r.get("event") == "engine exited during start-up" for r in stack.records())
    # vLLM's own argparse message, as one sentence that says what to fix.
    assert any(
        r.get("failure") == "flag" and r["event"].startswith("This vLLM does not know --no-such-flag")
        for r in _error_lines(stack)
    )


def test_engine_not_healthy_within_startup_timeout_exits_1_and_leaves_no_engine(stack_logs, tiny_models):
    stack = Stack(stack_logs, "slow-start", MODEL_NAME=str(tiny_models["text"]), STARTUP_TIMEOUT="2").start(
        wait=False
    )
    assert stack.wait_exit(60) == 1
    assert any(r.get("event") == "engine not healthy in time" for r in stack.records())
    pid = next(r["pid"] for r in stack.records() if r.get("event") == "engine started")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _long_stream(stack: Stack, out: dict, max_tokens: int = 2500) -> threading.Thread:
    def run():
        body = {"model": "m", "prompt": "x", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        chunks = []
        try:
            with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=60) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line:
                        chunks.append(line)
                        out["first"] = True
        except httpx.HTTPError as exc:
            out["exc"] = exc
        out["lines"] = chunks

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: "first" in out, 30, lambda: str(out))
    return thread


def test_sigterm_lets_the_stream_finish_refuses_new_requests_and_exits_0(stack_logs, tiny_models):
    stack = Stack(
        stack_logs,
        "sigterm",
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME="m",
        MAX_MODEL_LEN="4096",
        # The drain must outlast the stream whatever the machine's load: at load 7-13 on two cores
        # vLLM makes 7-20 tokens/s, and with the default 60 s a long stream outlasts the drain, which
        # then ends "cut short" (the stream finishing, or not, in the server's 5 s grace).
        DRAIN_TIMEOUT="600",
    ).start(wait=False)
    # While the engine loads, RunPod's /ping says 204 and requests get 503 with Retry-After.
    seen, deadline = set(), time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            status = httpx.get(stack.url + "/ping", timeout=2).status_code
        except httpx.HTTPError:
            status = None
        if status == 204 and 204 not in seen:
            early = httpx.post(stack.url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=5)
            assert early.status_code == 503 and early.headers["retry-after"]
        seen.add(status)
        if status == 200:
            break
        time.sleep(0.05)
    assert {204, 200} <= seen

    out: dict = {}
    # Long enough to be in flight through the checks below (a few seconds on an idle machine; the
    # `draining` record shows it was), short enough for a loaded one (~40 s at 15 tokens/s).
    tokens = 600
    thread = _long_stream(stack, out, max_tokens=tokens)
    stack.signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(stack.url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=5)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert httpx.get(stack.url + "/health", timeout=5).status_code == 503
    thread.join(600)
    assert stack.wait_exit(60) == 0
    assert out["status"] == 200 and "exc" not in out
    data = [line for line in out["lines"] if line.startswith("data: {")]
    assert len(data) >= tokens * 0.5 and out["lines"][-1] == "data: [DONE]"
    events = [r.get("event") for r in stack.records()]
    drain = [r for r in stack.records() if r.get("event") in ("draining", "drained", "drain cut short")]
    assert drain[0]["event"] == "draining" and drain[0]["in_flight"] == 1, drain
    assert "drained" in events, drain
    assert events.index("draining") < events.index("drained") < events.index("engine stopped")


def test_engine_dying_ends_streams_cleanly_and_the_launcher_exits_1(stack_logs, tiny_models):
    stack = Stack(
        stack_logs,
        "engine-killed",
        MODEL_NAME=str(tiny_models["text"]),
        SERVED_MODEL_NAME="m",
        MAX_MODEL_LEN="4096",
    ).start()
    out: dict = {}
    thread = _long_stream(stack, out, max_tokens=4000)
    pid = next(r["pid"] for r in stack.records() if r.get("event") == "engine started")
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    # The client saw the stream end with an error event (not a hang, not a silent cut).
    assert "error" in out["lines"][-1] or "exc" in out
    assert stack.wait_exit(30) == 1
    assert any(r.get("event", "").startswith("engine exited") for r in stack.records())
    with pytest.raises(ProcessLookupError):  # nothing of the engine is left (vLLM's core process)
        os.killpg(pid, 0)


def test_sigterm_while_the_engine_loads_stops_at_once_with_exit_0(stack_logs, tiny_models):
    stack = Stack(stack_logs, "sigterm-loading", MODEL_NAME=str(tiny_models["text"])).start(wait=False)
    wait_for(
        lambda: any(r.get("event") == "engine started" for r in stack.records()), 30, "engine started", 0.05
    )
    stack.signal(signal.SIGTERM)
    assert stack.wait_exit(30) == 0
    pid = next(r["pid"] for r in stack.records() if r.get("event") == "engine started")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_external_engine_mode_runs_the_proxy_alone_in_front_of_it(stack_logs, text_stack):
    proxy = Stack(
        stack_logs, "external", ENGINE="external", ENGINE_URL=text_stack.engine_url, MODEL_NAME=""
    ).start(timeout=30)
    try:
        r = httpx.post(
            proxy.url + "/v1/completions", json={"model": "tiny-text", "prompt": "x", "max_tokens": 3}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        info = httpx.get(proxy.url + "/info").json()
        assert info["engine"]["name"] == "external" and info["engine"]["url"] == text_stack.engine_url
        assert info["engine"]["version"]
        assert not any(r.get("event") == "starting engine" for r in proxy.records())
    finally:
        proxy.stop()
    assert proxy.proc.returncode == 0
    assert httpx.get(text_stack.url + "/health").status_code == 200  # the engine it fronted lives on


def test_external_mode_needs_an_engine_url(stack_logs):
    stack = Stack(stack_logs, "external-no-url", ENGINE="external", MODEL_NAME="").start(wait=False)
    assert stack.wait_exit(30) == 2
    assert "ENGINE_URL" in stack.tail()
