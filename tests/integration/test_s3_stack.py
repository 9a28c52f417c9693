"""Models and batch files from S3, on the real stack: a real S3 endpoint (moto_server on 127.0.0.1,
with its key checks on: tests/moto_s3.py) holding the tiny text model and a batch file.

- One-shot mode with MODEL_NAME=s3://..., BATCH_INPUT and BATCH_OUTPUT on S3: the model is copied
  into the cache and served, the lines answered, the outputs written back, exit 1 because a line
  failed (its error file beside the output). A second run, local files, all lines good: exit 0,
  and the model is not downloaded again.
- Preflight: a missing bucket, a missing prefix, refused credentials: one sentence, exit 1."""

from __future__ import annotations

import io
import json
import os
import subprocess

import orjson
import pytest

from moto_s3 import MotoS3
from stack import CPU_ENV, START, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def moto(tiny_models):
    server = MotoS3()
    try:
        server.start()
        server.upload_dir(tiny_models["text"], "models", "tiny-text")
        server.client().create_bucket(Bucket="batch-io")
        server.keys = server.user_key()
        server.enforce_auth()
        yield server
    finally:
        server.stop()


def env_for(moto, tmp_path, **extra) -> dict[str, str]:
    key, secret = moto.keys
    return {
        **os.environ,
        **CPU_ENV,
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
        "METRICS_DB_PATH": str(tmp_path / "metrics.db"),
        "MODEL_NAME": "s3://models/tiny-text",
        "SERVED_MODEL_NAME": "tiny-text",
        "MAX_MODEL_LEN": "1024",
        "MODEL_CACHE_DIR": str(tmp_path / "models"),
        "BATCH_DIR": str(tmp_path / "batch"),
        "S3_ENDPOINT_URL": moto.url,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "PORT": str(free_port()),
        "ENGINE_PORT": str(free_port()),
        **extra,
    }


def run(env: dict[str, str], log_path, timeout: float) -> tuple[int, list[dict]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(START)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    records = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return code, records


def chat(custom_id: str, max_tokens: int = 6) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny-text",
            "messages": [{"role": "user", "content": custom_id}],
            "max_tokens": max_tokens,
        },
    }


def jsonl(lines) -> bytes:
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


@pytest.mark.timeout(900)  # two one-shot runs, each starting the stack
def test_one_shot_serves_an_s3_model_and_reads_and_writes_s3(moto, tmp_path):
    key, secret = moto.keys
    s3 = moto.client(aws_access_key_id=key, aws_secret_access_key=secret)
    s3.upload_fileobj(
        io.BytesIO(jsonl([chat("a"), chat("b"), chat("bad", max_tokens=-1), chat("c")])),
        "batch-io",
        "in.jsonl",
    )
    env = env_for(
        moto, tmp_path, BATCH_INPUT="s3://batch-io/in.jsonl", BATCH_OUTPUT="s3://batch-io/out/results.jsonl"
    )
    code, records = run(env, tmp_path / "oneshot-1.log", timeout=420)
    events = [r.get("event") for r in records]
    assert code == 1, events[-20:]  # one line failed
    ready = next(r for r in records if r.get("event") == "model ready")
    assert ready["source"] == "s3" and ready["path"] == str(
        tmp_path / "models" / "s3" / "models" / "tiny-text"
    )
    assert (tmp_path / "models" / "s3" / "models" / "tiny-text" / "config.json").is_file()
    assert any(r.get("event") == "download progress" for r in records)
    progress = [r for r in records if r.get("event") == "batch progress"]
    assert progress and progress[-1]["total"] == 4 and progress[-1]["percent"] == 100.0

    out = [
        orjson.loads(x)
        for x in s3.get_object(Bucket="batch-io", Key="out/results.jsonl")["Body"].read().splitlines()
    ]
    assert [o["custom_id"] for o in out] == ["a", "b", "c"]
    assert all(o["response"]["body"]["model"] == "tiny-text" for o in out)
    errors = s3.get_object(Bucket="batch-io", Key="out/results.errors.jsonl")["Body"].read().splitlines()
    assert [orjson.loads(x)["custom_id"] for x in errors] == ["bad"]
    assert orjson.loads(errors[0])["response"]["status_code"] == 400

    # Again, local files this time, every line good: exit 0, and the model is already in the cache.
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl([chat("x"), chat("y")]))
    (tmp_path / "results.errors.jsonl").write_text("stale, from an earlier run\n")
    env.update(BATCH_INPUT=str(good), BATCH_OUTPUT=str(tmp_path / "results.jsonl"))
    code, records = run(env, tmp_path / "oneshot-2.log", timeout=420)
    assert code == 0, [r.get("event") for r in records][-20:]
    fetch = next(r for r in records if r.get("event") == "downloading model from S3")
    assert fetch["files"] == 0 and fetch["already_here"] >= 5
    got = [orjson.loads(x)["custom_id"] for x in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert got == ["x", "y"]
    assert not (tmp_path / "results.errors.jsonl").exists()


@pytest.mark.parametrize(
    ("model", "keys", "sentence"),
    [
        ("s3://nobucket/tiny-text", None, "s3://nobucket/tiny-text: the bucket does not exist at"),
        ("s3://models/missing", None, "s3://models/missing: no objects under this prefix at"),
        (
            "s3://models/tiny-text",
            ("AKIAIOSFODNN7WRONG00", "nope"),
            "refused the credentials (InvalidAccessKeyId)",
        ),
    ],
)
def test_preflight_says_what_is_wrong_in_one_sentence_and_exits_1(moto, tmp_path, model, keys, sentence):
    extra = {"MODEL_NAME": model}
    if keys:
        extra.update(AWS_ACCESS_KEY_ID=keys[0], AWS_SECRET_ACCESS_KEY=keys[1])
    code, records = run(env_for(moto, tmp_path, **extra), tmp_path / "preflight.log", timeout=120)
    assert code == 1
    errors = [r for r in records if r.get("level") == "error"]
    assert len(errors) == 1 and sentence in errors[0]["event"], errors
    assert "\n" not in errors[0]["event"] and "Traceback" not in errors[0]["event"]
    assert not any(r.get("event") == "engine started" for r in records)
