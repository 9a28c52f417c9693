"""Files and batches belong to the API key that made them: through the OpenAI SDK against the proxy
app served in this process (real uvicorn, real SDK, real key file), as tests/app/batch/test_batch_api.py
builds it.

The ownership tests leave the engine loading (no line runs). The attribution test runs lines in
front of a stand-in engine (tests/fake_engine.py), because it needs exact token counts per line to
tell a charged tpm bucket from an uncharged one; batches on real vLLM: tests/integration/test_batch_stack.py.
"""

from __future__ import annotations

import io

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from test_batch_store import batch_doc, old_store

from app import metrics
from app.runtime import Phase, Runtime
from fake_engine import FakeEngine
from inproc import InProcessProxy
from stack import wait_for

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
KEYS = """\
- name: alice
  key: sk-alice
  tpm: 20
- name: bob
  key: sk-bob
"""


def jsonl(*objs) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def sdk(proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=30)


def upload(client: OpenAI, *lines) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(*(lines or [LINE])))), purpose="batch").id


def not_found(call) -> dict:
    with pytest.raises(openai.NotFoundError) as err:
        call()
    return err.value.body


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS)
    return path


def loading_proxy(batch_dir, **settings) -> InProcessProxy:
    """The engine never gets ready here: batches stay unfinished, no line runs."""
    return InProcessProxy("http://127.0.0.1:9", runtime=Runtime(), BATCH_DIR=str(batch_dir), **settings)


def test_a_key_cannot_reach_another_keys_files_or_batches(tmp_path, keys_file):
    with loading_proxy(tmp_path / "batch", API_KEY_FILE=str(keys_file)) as p:
        alice, bob = sdk(p, "sk-alice"), sdk(p, "sk-bob")
        bobs_file = upload(bob)  # older than alice's: a cursor on her id would page onto it
        file_id = upload(alice)
        batch = alice.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        # Bob: alice's ids answer exactly what unknown ids answer (nothing to probe).
        assert not_found(lambda: bob.files.retrieve(file_id)) == {
            **not_found(lambda: bob.files.retrieve("file-unknown")),
            "message": f"No such File object: {file_id}",
        }
        not_found(lambda: bob.files.content(file_id))
        not_found(lambda: bob.files.delete(file_id))
        assert not_found(lambda: bob.batches.retrieve(batch.id)) == {
            **not_found(lambda: bob.batches.retrieve("batch_unknown")),
            "message": f"No batch found with id '{batch.id}'.",
        }
        not_found(lambda: bob.batches.cancel(batch.id))
        refused = not_found(
            lambda: bob.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        )
        assert refused["param"] == "input_file_id"
        assert [f.id for f in bob.files.list()] == [bobs_file]
        assert [f.id for f in bob.files.list(after=file_id)] == []
        assert [b.id for b in bob.batches.list()] == []

        # Alice: all of hers is there, untouched by bob's tries.
        assert [f.id for f in alice.files.list()] == [file_id]
        assert alice.files.content(file_id).content == jsonl(LINE)
        assert [b.id for b in alice.batches.list()] == [batch.id]
        assert alice.batches.retrieve(batch.id).status in ("validating", "in_progress")
        not_found(lambda: alice.files.retrieve(bobs_file))
        assert alice.batches.cancel(batch.id).status in ("cancelling", "cancelled")


def test_without_keys_everyone_sees_everything_a_key_made(tmp_path, keys_file):
    batch_dir = tmp_path / "batch"
    with loading_proxy(batch_dir, API_KEY_FILE=str(keys_file)) as p:
        alice = sdk(p, "sk-alice")
        file_id = upload(alice)
        batch_id = alice.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
    with loading_proxy(batch_dir) as p:  # the same BATCH_DIR served without API keys
        anyone = sdk(p, "ignored")
        assert anyone.files.retrieve(file_id).id == file_id
        assert anyone.files.content(file_id).content == jsonl(LINE)
        assert [b.id for b in anyone.batches.list()] == [batch_id]
        mine = upload(anyone)
        assert [f.id for f in anyone.files.list()] == [mine, file_id]
        assert anyone.batches.cancel(batch_id).status in ("cancelling", "cancelled")


def test_an_old_batch_dir_opens_and_its_files_and_batches_stay_visible_to_every_key(tmp_path, keys_file):
    batch_dir = tmp_path / "batch"
    doc = {**batch_doc("batch_old", "file-old"), "status": "completed", "object": "batch"}
    old_store(batch_dir, doc, "file-old", jsonl(LINE))
    with loading_proxy(batch_dir, API_KEY_FILE=str(keys_file)) as p:
        alice, bob = sdk(p, "sk-alice"), sdk(p, "sk-bob")
        for client in (alice, bob):
            assert client.files.retrieve("file-old").filename == "old.jsonl"
            assert client.files.content("file-old").content == jsonl(LINE)
            assert [b.id for b in client.batches.list()] == ["batch_old"]
        new = upload(alice)  # what is made now has an owner
        assert [f.id for f in alice.files.list()] == [new, "file-old"]
        assert [f.id for f in bob.files.list()] == ["file-old"]


def test_batch_lines_count_under_the_key_that_made_the_batch_but_not_against_its_tpm(tmp_path, keys_file):
    """Alice's tpm is 20 and each line costs 7 tokens (the stand-in engine's usage): her batch of 3
    lines would leave her bucket below zero, and her next live request refused, if batch lines were
    charged to it."""
    before = metrics.KEY_REQUESTS.labels("alice", 200).value
    with (
        FakeEngine() as fake,
        InProcessProxy(fake.url, API_KEY_FILE=str(keys_file), BATCH_DIR=str(tmp_path / "b")) as p,
    ):
        live = {"authorization": "Bearer sk-alice"}
        url = p.url + "/v1/chat/completions"
        assert httpx.post(url, json={"model": "m"}, headers=live).status_code == 200  # 7 of 20 tokens
        alice = sdk(p, "sk-alice")
        lines = [{**LINE, "custom_id": f"c{i}"} for i in range(3)]
        batch = alice.batches.create(
            input_file_id=upload(alice, *lines), endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = wait_for(
            lambda: (b := alice.batches.retrieve(batch.id)).status == "completed" and b,
            30,
            "batch completed",
            0.05,
        )
        assert batch.request_counts.completed == 3
        outputs = [orjson.loads(x) for x in alice.files.content(batch.output_file_id).content.splitlines()]
        for out in outputs:
            record = p.logs.request(out["response"]["request_id"])
            assert (record["key"], record["batch_id"], record["prompt_tokens"]) == ("alice", batch.id, 3)
        assert httpx.post(url, json={"model": "m"}, headers=live).status_code == 200  # tpm not charged
        rows = httpx.get(p.url + "/v1/usage?window=1h", headers=live).json()["data"]
        assert [(r["key"], r["requests"], r["total_tokens"]) for r in rows] == [("alice", 5, 35)]
        bob = httpx.get(p.url + "/v1/usage?window=1h", headers={"authorization": "Bearer sk-bob"})
        assert [(r["key"], r["requests"]) for r in bob.json()["data"]] == [("bob", 0)]
    assert metrics.KEY_REQUESTS.labels("alice", 200).value - before == 5


def run_batch(client: OpenAI, lines: list[dict]):
    batch = client.batches.create(
        input_file_id=upload(client, *lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    return wait_for(
        lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b,
        30,
        "batch completed",
        0.05,
    )


def errors_of(client: OpenAI, batch) -> list[dict]:
    return [orjson.loads(x) for x in client.files.content(batch.error_file_id).content.splitlines()]


def test_batch_lines_keep_to_the_models_their_key_may_use(tmp_path):
    """A key limited to some models cannot run another through a batch (its lines ran as nobody's
    before): those lines fail with the 403 its live requests get, the allowed ones are served."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("- name: carol\n  key: sk-carol\n  models: [m]\n")
    with (
        FakeEngine() as fake,
        InProcessProxy(fake.url, API_KEY_FILE=str(keys), BATCH_DIR=str(tmp_path / "b")) as p,
    ):
        carol = sdk(p, "sk-carol")
        other = {**LINE, "custom_id": "other", "body": {"model": "other-model"}}
        batch = run_batch(carol, [{**LINE, "custom_id": "mine"}, other])
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
        [failed] = errors_of(carol, batch)
        assert failed["custom_id"] == "other" and failed["response"]["status_code"] == 403
        assert "may not use" in failed["response"]["body"]["error"]["message"]


def test_a_revoked_keys_batch_lines_are_refused(tmp_path, keys_file):
    """Removing a key from the file (and reloading) stops what it started: its batch's lines get
    401, as its live requests do. The batch is made while the engine is still loading, so no line
    runs before the key is gone."""
    runtime = Runtime()
    with (
        FakeEngine() as fake,
        InProcessProxy(
            fake.url, runtime=runtime, API_KEY_FILE=str(keys_file), BATCH_DIR=str(tmp_path / "b")
        ) as p,
    ):
        bob = sdk(p, "sk-bob")
        file_id = upload(bob, *[{**LINE, "custom_id": f"c{i}"} for i in range(2)])
        batch = bob.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        keys_file.write_text(KEYS.split("- name: bob")[0])  # alice only
        for reload in runtime.reloaders:  # what SIGHUP does
            reload()
        runtime.set_phase(Phase.READY)

        def batch_lines() -> list[dict]:
            return [
                r for r in p.logs.records() if r.get("event") == "request" and r.get("batch_id") == batch.id
            ]

        lines = wait_for(
            lambda: len(found := batch_lines()) >= 2 and found, 30, "two lines of the batch", 0.05
        )
        assert {(r["key"], r["status"], r["error"]) for r in lines} == {("bob", 401, "batch key revoked")}
        assert not [s for s in fake.seen if s.path == "/v1/chat/completions"]  # none reached the engine
