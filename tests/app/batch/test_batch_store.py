"""The batch store: each line recorded exactly once, files written in input order, state that
survives SIGKILL, OpenAI's list pagination."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import orjson

from app.batch.store import Result, Store
from stack import ROOT


def batch_doc(batch_id: str, file_id: str = "file-in") -> dict:
    return {
        "id": batch_id,
        "object": "batch",
        "status": "in_progress",
        "input_file_id": file_id,
        "request_counts": {"total": 3, "completed": 0, "failed": 0},
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        "output_file_id": None,
        "error_file_id": None,
    }


def test_a_line_is_recorded_once_however_often_it_is_reported(tmp_path):
    store = Store(tmp_path)
    store.add_batch(batch_doc("b1"))
    assert store.record("b1", [Result(2, True, b'{"n":2}', 5, 7), Result(1, False, b'{"n":1}')]) == 2
    assert store.record("b1", [Result(2, True, b'{"n":"again"}', 5, 7), Result(3, True, b'{"n":3}')]) == 1
    doc = store.get_batch("b1")
    assert doc["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert doc["usage"] == {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
    assert store.recorded_lines("b1") == {1, 2, 3}


def test_finalize_writes_both_files_in_input_order_once(tmp_path):
    store = Store(tmp_path)
    store.add_batch(batch_doc("b1"))
    store.record(
        "b1", [Result(3, True, b'{"n":3}'), Result(1, True, b'{"n":1}'), Result(2, False, b'{"n":2}')]
    )
    doc = store.finalize("b1", "completed")
    assert doc["status"] == "completed" and doc["completed_at"]
    out = store.path_of(doc["output_file_id"]).read_bytes()
    assert out == b'{"n":1}\n{"n":3}\n'
    assert store.path_of(doc["error_file_id"]).read_bytes() == b'{"n":2}\n'
    assert store.get_file(doc["output_file_id"])["purpose"] == "batch_output"
    assert store.recorded_lines("b1") == set()  # the files are the record now
    assert store.finalize("b1", "completed") == doc  # a second call changes nothing


def test_no_error_file_without_errors(tmp_path):
    store = Store(tmp_path)
    store.add_batch(batch_doc("b1"))
    store.record("b1", [Result(1, True, b"{}")])
    doc = store.finalize("b1", "completed")
    assert doc["output_file_id"] and doc["error_file_id"] is None


def test_files_without_a_row_are_removed_when_the_store_opens(tmp_path):
    store = Store(tmp_path)
    tmp = store.temp_path()
    tmp.write_bytes(b"x")
    kept = store.add_file(tmp, "in.jsonl", "batch")
    (store.files_dir / "file-orphan").write_bytes(b"renamed, never committed")
    (store.files_dir / ".tmp-half").write_bytes(b"half written")
    store.close()
    store = Store(tmp_path)
    assert sorted(p.name for p in store.files_dir.iterdir()) == [kept["id"]]


def test_committed_results_survive_sigkill(tmp_path):
    """A process records lines one commit at a time and is SIGKILLed right after its last commit."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from app.batch.store import Result, Store
        store = Store({str(tmp_path)!r})
        store.add_batch({batch_doc("b1")!r})
        for n in range(1, 41):
            store.record("b1", [Result(n, n % 4 != 0, b'{{"n":%d}}' % n)])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    store = Store(tmp_path)
    assert store.recorded_lines("b1") == set(range(1, 41))
    assert store.get_batch("b1")["request_counts"] == {"total": 3, "completed": 30, "failed": 10}


def test_lists_page_as_openai_does(tmp_path):
    store = Store(tmp_path)
    for i in range(5):
        store.add_batch(batch_doc(f"b{i}"))
    page, more = store.list_batches(None, 2)
    assert [d["id"] for d in page] == ["b4", "b3"] and more
    page, more = store.list_batches("b3", 2)
    assert [d["id"] for d in page] == ["b2", "b1"] and more
    page, more = store.list_batches("b1", 2)
    assert [d["id"] for d in page] == ["b0"] and not more
    ids = []
    for i in range(3):
        tmp = store.temp_path()
        tmp.write_bytes(orjson.dumps(i))
        ids.append(store.add_file(tmp, f"{i}.jsonl", "batch")["id"])
    page, more = store.list_files(None, 2, "asc", "batch")
    assert [f["id"] for f in page] == ids[:2] and more
    page, more = store.list_files(ids[1], 10, "asc", "batch")
    assert [f["id"] for f in page] == ids[2:] and not more
    assert store.list_files(None, 10, "desc", "batch_output") == ([], False)


OLD_SCHEMA = """
CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    status TEXT NOT NULL,
    output_id TEXT NOT NULL,
    error_id TEXT NOT NULL
);
CREATE TABLE results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""
"""The schema of the version that recorded no owners, as it wrote BATCH_DIR/batch.db."""


def old_store(root, batch: dict, file_id: str = "file-old", body: bytes = b"{}\n") -> None:
    """A BATCH_DIR as the version before owners left it: one file and one batch."""
    (root / "files").mkdir(parents=True)
    (root / "files" / file_id).write_bytes(body)
    db = sqlite3.connect(root / "batch.db")
    db.executescript(OLD_SCHEMA)
    db.execute(
        "INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
        (file_id, "old.jsonl", "batch", len(body), 1700000000),
    )
    db.execute(
        "INSERT INTO batches (id, doc, status, output_id, error_id) VALUES (?, ?, ?, ?, ?)",
        (batch["id"], orjson.dumps(batch), batch["status"], "file-out", "file-err"),
    )
    db.commit()
    db.close()


def test_a_database_from_before_owners_gains_the_column_and_its_rows_stay_public(tmp_path):
    old_store(tmp_path, batch_doc("b-old", "file-old"))
    store = Store(tmp_path)
    for table in ("files", "batches"):
        columns = {row[1]: row for row in store.db.execute(f"PRAGMA table_info({table})")}
        assert columns["owner"][2:5] == ("TEXT", 1, "''")  # type, NOT NULL, default
    assert store.db.execute("SELECT owner FROM files").fetchall() == [("",)]
    for owner in (None, "alice", "bob"):  # every key sees what was made before owners
        assert store.get_file("file-old", owner)["filename"] == "old.jsonl"
        assert store.get_batch("b-old", owner)["id"] == "b-old"
        assert [f["id"] for f in store.list_files(None, 10, owner=owner)[0]] == ["file-old"]
        assert [b["id"] for b in store.list_batches(None, 10, owner)[0]] == ["b-old"]
    assert store.unfinished() == [(store.get_batch("b-old"), "")]
    store.close()
    Store(tmp_path).close()  # opened again: nothing left to add


def test_rows_belong_to_their_owner_and_a_batchs_output_files_to_the_batchs(tmp_path):
    store = Store(tmp_path)
    tmp = store.temp_path()
    tmp.write_bytes(b"x")
    mine = store.add_file(tmp, "in.jsonl", "batch", "alice")
    store.add_batch(batch_doc("b1", mine["id"]), "alice")
    store.record("b1", [Result(1, True, b"{}"), Result(2, False, b"{}")])
    done = store.finalize("b1", "completed")
    outputs = [done["output_file_id"], done["error_file_id"]]
    for file_id in [mine["id"], *outputs]:
        assert store.get_file(file_id, "alice") is not None and store.get_file(file_id) is not None
        assert store.get_file(file_id, "bob") is None
    assert store.get_batch("b1", "bob") is None and store.get_batch("b1", "alice")["id"] == "b1"
    assert store.list_files(None, 10, owner="bob") == ([], False)
    assert store.list_batches(None, 10, "bob") == ([], False)
    assert len(store.list_files(None, 10, owner="alice")[0]) == 3
    # A cursor the caller may not see is none: paging after another key's id shows nothing of theirs.
    tmp = store.temp_path()
    tmp.write_bytes(b"y")
    theirs = store.add_file(tmp, "b.jsonl", "batch", "bob")
    assert store.list_files(theirs["id"], 10, owner="alice") == ([], False)
    store.add_batch(batch_doc("b2", theirs["id"]), "bob")
    assert store.list_batches("b2", 10, "alice") == ([], False)
    assert [b["id"] for b in store.list_batches("b2", 10)[0]] == ["b1"]  # no owner: every row
