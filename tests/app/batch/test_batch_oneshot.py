"""One-shot mode's pieces against the Batch API served in this process (engine left loading, so no
line runs): a restart finds its batch again, results land beside each other, stale errors go.
The whole mode on the real stack: tests/integration/test_s3_stack.py."""

from __future__ import annotations

import orjson
import pytest

from app.batch.oneshot import OneShot, errors_path
from app.runtime import Runtime
from app.settings import Settings
from inproc import InProcessProxy

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    with InProcessProxy(
        "http://127.0.0.1:9", runtime=Runtime(), API_KEY="k1", BATCH_DIR=str(tmp_path_factory.mktemp("b"))
    ) as p:
        yield p


def oneshot(proxy, tmp_path, output: str) -> OneShot:
    settings = Settings(
        MODEL_NAME="m",
        PORT=proxy.port,
        API_KEY="k1",
        BATCH_DIR=proxy.settings.BATCH_DIR,
        BATCH_INPUT=str(tmp_path / "in.jsonl"),
        BATCH_OUTPUT=output,
    )
    return OneShot(settings)


def test_a_restart_finds_its_batch_again_and_another_output_gets_its_own(proxy, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(orjson.dumps(LINE) + b"\n" + b"junk\n")
    first = oneshot(proxy, tmp_path, str(tmp_path / "out.jsonl")).find_or_create(path)
    assert first["endpoint"] == "/v1/completions"  # taken from the file's lines
    again = oneshot(proxy, tmp_path, str(tmp_path / "out.jsonl")).find_or_create(path)
    assert again["id"] == first["id"]
    other = oneshot(proxy, tmp_path, str(tmp_path / "elsewhere.jsonl")).find_or_create(path)
    assert other["id"] != first["id"]
    path.write_bytes(orjson.dumps({**LINE, "custom_id": "b"}) + b"\n")  # new content: a new batch
    assert oneshot(proxy, tmp_path, str(tmp_path / "out.jsonl")).find_or_create(path)["id"] != first["id"]


def test_results_are_written_beside_each_other(proxy, tmp_path):
    out = str(tmp_path / "res" / "results.jsonl")
    assert errors_path(out) == str(tmp_path / "res" / "results.errors.jsonl")
    assert errors_path("s3://b/out") == "s3://b/out.errors.jsonl"
    shot = oneshot(proxy, tmp_path, out)
    shot.deliver(b'{"a":1}\n', out)
    shot.deliver(b'{"e":1}\n', errors_path(out))
    assert (tmp_path / "res" / "results.jsonl").read_bytes() == b'{"a":1}\n'
    shot.deliver(None, errors_path(out))  # a later run without errors leaves no stale error file
    assert not (tmp_path / "res" / "results.errors.jsonl").exists()
