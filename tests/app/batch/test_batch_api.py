"""The Files and Batches routes through the OpenAI SDK, against the proxy app served in this process
(real uvicorn, real SDK). The engine is left loading (runtime STARTING), so no line runs here: what
lines do on real vLLM is tests/integration/test_batch_api.py."""

from __future__ import annotations

import io

import openai
import orjson
import pytest
from openai import OpenAI

from app.runtime import Runtime
from inproc import InProcessProxy
from stack import wait_for

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    batch_dir = tmp_path_factory.mktemp("batch")
    with InProcessProxy(
        "http://127.0.0.1:9",
        runtime=Runtime(),  # starting: the engine never gets ready here
        API_KEY="k1,k2",
        BATCH_DIR=str(batch_dir),
        BATCH_MAX_FILE_MB=0.01,
    ) as p:
        p.batch_dir = batch_dir
        yield p


@pytest.fixture
def client(proxy) -> OpenAI:
    return OpenAI(base_url=proxy.url + "/v1", api_key="k2", max_retries=0, timeout=30)


def jsonl(*objs) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def test_files_round_trip(client, proxy):
    data = jsonl(LINE, {**LINE, "custom_id": "b"})
    created = [
        client.files.create(file=(f"in{i}.jsonl", io.BytesIO(data)), purpose="batch") for i in range(3)
    ]
    first = created[0]
    assert first.object == "file" and first.purpose == "batch" and first.bytes == len(data)
    assert first.filename == "in0.jsonl" and first.status == "processed"
    assert (proxy.batch_dir / "files" / first.id).read_bytes() == data
    assert client.files.retrieve(first.id) == first
    assert client.files.content(first.id).content == data
    listed = [f.id for f in client.files.list(limit=2, order="asc", purpose="batch")]  # pages of two
    assert [f.id for f in created] == [i for i in listed if i in {f.id for f in created}]
    deleted = client.files.delete(first.id)
    assert deleted.deleted and deleted.id == first.id and deleted.object == "file"
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(first.id)
    assert err.value.body["message"] == f"No such File object: {first.id}"
    assert not (proxy.batch_dir / "files" / first.id).exists()


def test_batches_create_retrieve_list_cancel(client):
    file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(LINE))), purpose="batch")
    batches = [
        client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": str(i)},
        )
        for i in range(3)
    ]
    b = batches[0]
    assert b.object == "batch" and b.status == "validating" and b.metadata == {"run": "0"}
    assert b.expires_at == b.created_at + 24 * 3600 and b.request_counts.total == 0
    # its lines wait for the engine
    wait_for(lambda: client.batches.retrieve(b.id).status == "in_progress", 10, "in progress", 0.05)
    assert client.batches.retrieve(b.id).request_counts.total == 1
    page = client.batches.list(limit=2)
    assert [x.id for x in page.data] == [batches[2].id, batches[1].id] and page.has_more
    assert [x.id for x in client.batches.list(limit=2, after=batches[1].id).data][0] == batches[0].id
    with pytest.raises(openai.ConflictError, match="is the input of batch"):
        client.files.delete(file.id)
    for x in batches:
        assert client.batches.cancel(x.id).status in ("cancelling", "cancelled")
    wait_for(lambda: all(client.batches.retrieve(x.id).status == "cancelled" for x in batches), 10, "", 0.05)
    done = client.batches.retrieve(b.id)
    assert done.cancelled_at and done.output_file_id is None and done.request_counts.completed == 0
    assert client.batches.cancel(b.id).status == "cancelled"  # cancelling again changes nothing
    assert client.files.delete(file.id).deleted  # no unfinished batch reads it any more


@pytest.mark.parametrize(
    ("call", "error", "param"),
    [
        (lambda c, f: c.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune"), openai.BadRequestError, "purpose"),
        (lambda c, f: c.files.create(file=("x.jsonl", io.BytesIO(b"x" * 20000)), purpose="batch"), openai.APIStatusError, "file"),
        (lambda c, f: c.batches.create(input_file_id=f, endpoint="/v1/responses", completion_window="24h"), openai.BadRequestError, "endpoint"),
        (lambda c, f: c.batches.create(input_file_id=f, endpoint="/v1/completions", completion_window="48h"), openai.BadRequestError, "completion_window"),
        (lambda c, f: c.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h"), openai.NotFoundError, "input_file_id"),
        (lambda c, f: c.batches.create(input_file_id=f, endpoint="/v1/completions", completion_window="24h", metadata={"k": "v" * 600}), openai.BadRequestError, "metadata"),
        (lambda c, f: c.batches.retrieve("batch_nope"), openai.NotFoundError, "batch_id"),
        (lambda c, f: c.batches.cancel("batch_nope"), openai.NotFoundError, "batch_id"),
        (lambda c, f: c.batches.list(limit=101), openai.BadRequestError, "limit"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_shaped_errors(client, call, error, param):
    file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(LINE))), purpose="batch")
    with pytest.raises(error) as err:
        call(client, file.id)
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    if param == "file":
        assert err.value.status_code == 413


def test_the_api_keys_guard_the_batch_routes(proxy):
    for key in ("wrong", ""):
        bad = OpenAI(
            base_url=proxy.url + "/v1",
            api_key=key or "x",
            max_retries=0,
            default_headers={} if key else {"authorization": ""},
        )
        with pytest.raises(openai.AuthenticationError) as err:
            bad.batches.list()
        assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0).files.create(
            file=("x.jsonl", io.BytesIO(jsonl(LINE))), purpose="batch"
        )


def test_batch_routes_have_a_request_log_line(client, proxy):
    resp = client.batches.with_raw_response.list()
    record = proxy.logs.request(resp.headers["x-request-id"])
    assert record["path"] == "/v1/batches" and record["status"] == 200
