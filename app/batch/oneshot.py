"""One-shot mode: BATCH_INPUT and BATCH_OUTPUT set, the container runs one batch file and exits.

    scripts/start.sh (BATCH_INPUT set) -> python -m app.batch.oneshot
        child:  python -m app.launcher, HOST=127.0.0.1: engine + proxy, exactly as served
        here:   the file goes through the child's own Batch API (upload, create, poll), the output
                and error files come back to BATCH_OUTPUT and `<name>.errors.jsonl` beside it

Local paths or `s3://` URLs (S3_ENDPOINT_URL and the AWS_* settings) on both sides. A progress line
every few seconds. Exit 0 when every line succeeded; 1 when any line failed (the error file is
beside the output), the batch failed, the stack failed, or a signal stopped the run before the end.

Resumable: the batch is found again by the input's SHA-256 and the output's name (batch metadata),
so a container restarted on the same BATCH_DIR (mount a volume) carries on with the same batch.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from app.batch import batch_dir
from app.batch.store import TERMINAL
from app.batch.validate import ENDPOINTS
from app.logs import configure_from, get_logger
from app.security import load_keys
from app.settings import Settings, load_settings
from app.sources import s3

log = get_logger("app.batch.oneshot")

POLL_INTERVAL = 1.0
PROGRESS_INTERVAL = 5.0
STOP_GRACE = 45.0
_CHUNK = 1 << 20


class OneShotError(Exception):
    """The message is the one line the user sees."""


def errors_path(output: str) -> str:
    """Where failed lines go: beside the output, `results.jsonl` -> `results.errors.jsonl`."""
    base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return base + ".errors.jsonl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Api:
    """The child's Batch API on loopback (stdlib HTTP: nothing to install for this mode)."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.headers = {"authorization": f"Bearer {key}"} if key else {}

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> bytes:
        data = body
        hdrs = {**self.headers, **(headers or {})}
        if isinstance(body, dict):
            data = orjson.dumps(body)
            hdrs["content-type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise OneShotError(f"{method} {path} answered {exc.code}: {detail}") from exc
        except OSError as exc:  # the stack went away
            raise OneShotError(f"{method} {path} failed: {exc}") from exc

    def json(self, method: str, path: str, body: Any = None) -> Any:
        return orjson.loads(self.call(method, path, body))

    def upload(self, path: Path, name: str) -> dict:
        boundary = secrets.token_hex(16)
        head = (
            f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="{name}"\r\n'
            "content-type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    yield chunk
            yield tail

        size = len(head) + path.stat().st_size + len(tail)
        raw = self.call(
            "POST",
            "/v1/files",
            body(),
            {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(size)},
        )
        return orjson.loads(raw)

    def batches(self) -> Iterator[dict]:
        after = None
        while True:
            page = self.json("GET", "/v1/batches?limit=100" + (f"&after={after}" if after else ""))
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]


class OneShot:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.PORT}"
        keys = load_keys(
            settings.API_KEY.get_secret_value() if settings.API_KEY else None, settings.API_KEY_FILE
        )
        self.api = Api(self.url, keys[0].decode() if keys else None)
        self.s3 = s3.S3Config.from_settings(settings)
        self.work = batch_dir(settings) / "oneshot"
        self.child: subprocess.Popen | None = None
        self.stopping = False

    # --- the stack ------------------------------------------------------------------------------

    def start_stack(self) -> None:
        env = {**os.environ, "HOST": "127.0.0.1", "RUNPOD_MODE": "http"}
        for name in ("BATCH_INPUT", "BATCH_OUTPUT", "PORT_HEALTH"):
            env.pop(name, None)
        self.child = subprocess.Popen([sys.executable, "-m", "app.launcher"], env=env)
        log.info("stack started", pid=self.child.pid, url=self.url)

    def wait_ready(self) -> None:
        assert self.child is not None
        while True:
            code = self.child.poll()
            if code is not None:
                raise OneShotError(f"the stack exited during start-up (exit code {code})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)

    def stop_stack(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)  # the launcher drains, then stops the engine
        try:
            child.wait(self.settings.DRAIN_TIMEOUT + STOP_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _check_child(self) -> None:
        if self.child is not None and self.child.poll() is not None:
            raise OneShotError(f"the stack exited while the batch ran (exit code {self.child.returncode})")

    # --- files ----------------------------------------------------------------------------------

    def local_input(self) -> Path:
        src = self.settings.BATCH_INPUT
        assert src is not None
        if src.startswith("s3://"):
            dest = self.work / ("input-" + hashlib.sha256(src.encode()).hexdigest()[:16] + ".jsonl")
            log.info("fetching the batch input", url=src)
            return s3.download_file(src, dest, self.s3)
        path = Path(src).expanduser()
        if not path.is_file():
            raise OneShotError(f"BATCH_INPUT {src} is not a readable file")
        return path

    def deliver(self, data: bytes | None, target: str) -> None:
        """Write one result file to a local path or to S3 (nothing when `data` is None)."""
        if target.startswith("s3://"):
            if data is None:
                return
            tmp = self.work / ("out-" + secrets.token_hex(8))
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            try:
                s3.upload_file(tmp, target, self.s3)
            finally:
                tmp.unlink(missing_ok=True)
            return
        path = Path(target).expanduser()
        if data is None:
            path.unlink(missing_ok=True)  # no stale error file from an earlier run
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    # --- the batch ------------------------------------------------------------------------------

    def find_or_create(self, path: Path) -> dict:
        digest = sha256_of(path)
        output = self.settings.BATCH_OUTPUT
        for batch in self.api.batches():
            meta = batch.get("metadata") or {}
            if (
                meta.get("oneshot_sha256") == digest
                and meta.get("oneshot_output") == output
                and batch["status"] not in ("cancelled", "expired")
            ):
                log.info(
                    "resuming the batch of an earlier start", batch_id=batch["id"], status=batch["status"]
                )
                return batch
        file = self.api.upload(path, path.name)
        return self.api.json(
            "POST",
            "/v1/batches",
            {
                "input_file_id": file["id"],
                "endpoint": self._endpoint(path),
                "completion_window": "24h",
                "metadata": {"oneshot_sha256": digest, "oneshot_output": str(output)[:512]},
            },
        )

    @staticmethod
    def _endpoint(path: Path) -> str:
        """The batch's endpoint: the first supported `url` of the file's lines."""
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    url = orjson.loads(raw).get("url")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if url in ENDPOINTS:
                    return url
        return ENDPOINTS[0]

    def wait(self, batch: dict) -> dict:
        last = 0.0
        while True:
            self._check_child()
            counts = batch.get("request_counts") or {}
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL or batch["status"] in TERMINAL:
                last = now
                done = counts.get("completed", 0) + counts.get("failed", 0)
                total = counts.get("total", 0)
                log.info(
                    "batch progress",
                    batch_id=batch["id"],
                    status=batch["status"],
                    completed=counts.get("completed", 0),
                    failed=counts.get("failed", 0),
                    total=total,
                    percent=round(100 * done / total, 1) if total else None,
                )
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(POLL_INTERVAL)
            batch = self.api.json("GET", f"/v1/batches/{batch['id']}")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            path = self.local_input()
            self.start_stack()
            self.wait_ready()
            batch = self.wait(self.find_or_create(path))
            output = self.settings.BATCH_OUTPUT
            assert output is not None
            out = (
                self.api.call("GET", f"/v1/files/{batch['output_file_id']}/content")
                if batch["output_file_id"]
                else b""
            )
            err = (
                self.api.call("GET", f"/v1/files/{batch['error_file_id']}/content")
                if batch["error_file_id"]
                else None
            )
            self.deliver(out, output)
            self.deliver(err, errors_path(output))
            counts = batch["request_counts"]
            ok = batch["status"] == "completed" and not counts["failed"]
            log.info(
                "batch done" if ok else "batch done with failures",
                batch_id=batch["id"],
                status=batch["status"],
                output=output,
                errors=errors_path(output) if err is not None else None,
                **counts,
                batch_errors=(batch.get("errors") or {}).get("data"),
            )
            return 0 if ok else 1
        except (OneShotError, s3.S3Error) as exc:
            log.error(str(exc))
            return 1
        finally:
            self.stopping = True
            self.stop_stack()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            return
        log.warning(
            "signal received: stopping; the batch resumes on the next start with the same BATCH_DIR",
            signal=signal.Signals(signum).name,
        )
        self.stopping = True
        self.stop_stack()
        sys.exit(1)


def main() -> int:
    settings = load_settings()
    if settings is None:
        return 2
    configure_from(settings)
    if not (settings.BATCH_INPUT and settings.BATCH_OUTPUT):
        log.error("one-shot mode needs BATCH_INPUT and BATCH_OUTPUT")
        return 2
    return OneShot(settings).run()


if __name__ == "__main__":
    sys.exit(main())
