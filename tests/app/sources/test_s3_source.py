"""app/sources/s3.py against a real S3 endpoint (moto_server on 127.0.0.1, tests/moto_s3.py) with
its key checks on: copy, resume, verification, and the one sentence for each failure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest

from app.sources import s3
from moto_s3 import MotoS3

FILES = {"config.json": b'{"a": 1}', "sub/weights.bin": bytes(range(256)) * 4096, "empty.txt": b""}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoS3()
    try:
        server.start()
        src = tmp_path_factory.mktemp("model")
        for name, data in FILES.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        server.upload_dir(src, "models", "m1")
        server.client().put_object(Bucket="models", Key="m1-other/x", Body=b"not under m1/")
        key, secret = server.user_key()
        server.enforce_auth()
        server.cfg = s3.S3Config(server.url, key, secret, "us-east-1")
        yield server
    finally:
        server.stop()


def test_copies_every_object_under_the_prefix_and_records_it(moto, tmp_path):
    dest = s3.fetch_s3_dir("s3://models/m1", tmp_path / "m", moto.cfg)
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert not (dest / "x").exists()  # m1-other/ is another folder, not part of m1/
    manifest = orjson.loads((dest / s3.MANIFEST).read_bytes())
    assert manifest["complete"] is True
    assert manifest["files"]["sub/weights.bin"]["etag"] == hashlib.md5(FILES["sub/weights.bin"]).hexdigest()
    assert s3.is_complete(dest)


def test_a_second_fetch_downloads_nothing_and_a_changed_object_again(moto, tmp_path):
    dest = s3.fetch_s3_dir("s3://models/m1", tmp_path / "m", moto.cfg)
    (dest / "config.json").write_bytes(b"truncated")  # a local file of the wrong size is fetched again
    weights = dest / "sub" / "weights.bin"
    before = weights.stat().st_mtime_ns
    s3.fetch_s3_dir("s3://models/m1", dest, moto.cfg)
    assert weights.stat().st_mtime_ns == before  # complete and recorded: not fetched again
    assert (dest / "config.json").read_bytes() == FILES["config.json"]

    cli = moto.cfg.client()
    cli.put_object(Bucket="models", Key="m1/config.json", Body=b'{"a": 2}')
    try:
        s3.fetch_s3_dir("s3://models/m1", dest, moto.cfg)
        assert (dest / "config.json").read_bytes() == b'{"a": 2}'  # new ETag: fetched again
    finally:
        cli.put_object(Bucket="models", Key="m1/config.json", Body=FILES["config.json"])


def test_an_interrupted_file_is_continued_from_where_it_stopped(moto, tmp_path):
    dest = tmp_path / "m"
    part = dest / "sub" / "weights.bin.part"
    part.parent.mkdir(parents=True)
    data = FILES["sub/weights.bin"]
    part.write_bytes(data[:1000])
    s3.fetch_s3_dir("s3://models/m1", dest, moto.cfg)
    assert (dest / "sub" / "weights.bin").read_bytes() == data
    assert not part.exists()


def test_a_corrupt_partial_file_fails_verification_and_is_removed(moto, tmp_path):
    dest = tmp_path / "m"
    part = dest / "sub" / "weights.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # not the object's first bytes: the MD5 (ETag) cannot match
    with pytest.raises(s3.S3Error, match="does not match its ETag"):
        s3.fetch_s3_dir("s3://models/m1", dest, moto.cfg, workers=1)
    assert not part.exists()
    s3.fetch_s3_dir("s3://models/m1", dest, moto.cfg)  # and the next start gets it right
    assert (dest / "sub" / "weights.bin").read_bytes() == FILES["sub/weights.bin"]


@pytest.mark.parametrize(
    ("url", "cfg", "sentence"),
    [
        ("s3://nobucket/m1", None, "the bucket does not exist"),
        ("s3://models/missing", None, "no objects under this prefix"),
        ("s3://models/m1", "bad-key", "refused the credentials (InvalidAccessKeyId)"),
        ("s3://models/m1", "bad-secret", "refused the credentials (SignatureDoesNotMatch)"),
        ("s3://models/m1", "no-endpoint", "cannot be reached (S3_ENDPOINT_URL)"),
        ("s3://a/m1", None, "does not name a valid bucket"),
    ],
)
def test_each_failure_is_one_sentence(moto, tmp_path, url, cfg, sentence):
    config = {
        None: moto.cfg,
        "bad-key": s3.S3Config(moto.url, "AKIAIOSFODNN7WRONG00", "x", "us-east-1"),
        "bad-secret": s3.S3Config(moto.url, moto.cfg.access_key, "wrong-secret", "us-east-1"),
        "no-endpoint": s3.S3Config("http://127.0.0.1:9", "a", "b", "us-east-1"),
    }[cfg]
    with pytest.raises(s3.S3Error) as err:
        s3.fetch_s3_dir(url, tmp_path / "m", config)
    message = str(err.value)
    assert sentence in message
    assert "\n" not in message and "Traceback" not in message


def test_single_files_go_up_and_down(moto, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"a": 1}\n')
    s3.upload_file(src, "s3://models/io/in.jsonl", moto.cfg)
    got = s3.download_file("s3://models/io/in.jsonl", tmp_path / "back.jsonl", moto.cfg)
    assert Path(got).read_bytes() == src.read_bytes()
    with pytest.raises(s3.S3Error, match="no such object"):
        s3.download_file("s3://models/io/missing.jsonl", tmp_path / "x", moto.cfg)


def test_with_the_runai_streamer_the_engine_gets_the_url_after_a_preflight(moto, tmp_path, monkeypatch):
    """LOAD_FORMAT is the engine-flags setting of another change: a stand-in settings object here."""
    from types import SimpleNamespace

    from app import sources

    monkeypatch.setenv("AWS_ENDPOINT_URL", "unset")  # so the value the code sets is undone after
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    settings = SimpleNamespace(
        LOAD_FORMAT="runai_streamer",
        S3_ENDPOINT_URL=moto.url,
        AWS_ACCESS_KEY_ID=moto.cfg.access_key,
        AWS_SECRET_ACCESS_KEY=SimpleNamespace(get_secret_value=lambda: moto.cfg.secret_key),
        AWS_REGION="us-east-1",
        MODEL_CACHE_DIR=tmp_path,
        HF_HOME=None,
    )
    assert sources.resolve("s3://models/m1", settings) == ("s3://models/m1", "s3")
    assert not (tmp_path / "s3").exists()  # nothing copied: the engine streams it
    assert os.environ["AWS_ENDPOINT_URL"] == moto.url  # where vLLM's streamer looks for the endpoint
    with pytest.raises(sources.SourceError, match="no objects under this prefix"):
        sources.resolve("s3://models/missing", settings)
