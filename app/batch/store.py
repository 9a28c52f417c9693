"""Files and batches on disk: file bodies under BATCH_DIR/files/, everything else in one SQLite file.

Durability: WAL with `synchronous=FULL`, so a committed transaction survives SIGKILL and power
loss; file bodies are written to a temporary name, fsynced and renamed (then the directory is
fsynced) before the row naming them is committed. A file on disk without a row (a crash between the
two) is removed the next time the store opens.

Exactly one result per input line: a line's result (its output or error line, as the bytes that go
into the output file) is a row keyed by (batch, line number), inserted with the batch's counters in
one transaction; a line already recorded is never recorded again. The output and error files are
written from those rows at the end, in input order.

Owners: each file and batch belongs to the API key that made it (its name, `owner`); the output and
error files to their batch's. Reads given an owner see that owner's rows and the public ones (PUBLIC:
rows made before owners were recorded, or while the server had no API key); reads without one see
every row.

The connection is used from one thread only: `AsyncStore` runs every call on its own single-thread
executor, and commits the results that arrive together in one transaction (one fsync for many lines).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from app.keys import ANONYMOUS

T = TypeVar("T")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
"""Batch statuses after which nothing changes."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL,
    status TEXT NOT NULL,
    output_id TEXT NOT NULL,
    error_id TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""


PUBLIC = ("", ANONYMOUS)
"""Owners whose rows every key sees: '' (made by a version that recorded no owner) and ANONYMOUS
(made while the server required no key); hiding them would hide a user's batches after an upgrade."""


def _visible(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (to append to a WHERE) and its arguments: rows `owner` may see."""
    return ("", ()) if owner is None else (" AND owner IN (?, ?, ?)", (owner, *PUBLIC))


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


COMPLETION_WINDOW = 24 * 3600


def new_batch_doc(input_file_id: str, endpoint: str, metadata: dict | None) -> dict:
    """A new batch, as OpenAI's `Batch` object."""
    t = now()
    return {
        "id": new_id("batch_"),
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": "24h",
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": t,
        "in_progress_at": None,
        "expires_at": t + COMPLETION_WINDOW,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
        "model": None,
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        },
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Result:
    """One line's outcome: `data` is its line in the output (ok) or error file."""

    line: int
    ok: bool
    data: bytes
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Store:
    """The synchronous store; use it from one thread (see AsyncStore)."""

    root: Path
    db: sqlite3.Connection = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "batch.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self._add_owner_columns()
        self._remove_orphans()

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    def close(self) -> None:
        self.db.close()

    def _add_owner_columns(self) -> None:
        """A database written before owners were recorded gets the column (its rows: owner '').
        Checked again inside the transaction: another proxy process may be opening it too."""

        def missing() -> list[str]:
            return [
                table
                for table in ("files", "batches")
                if "owner" not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            ]

        if not missing():
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for table in missing():
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _remove_orphans(self) -> None:
        known = {row[0] for row in self.db.execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)

    # --- files ----------------------------------------------------------------------------------

    def path_of(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(
        self, tmp: Path, filename: str, purpose: str, owner: str = "", file_id: str | None = None
    ) -> dict:
        """Make a fully written temporary file (under files_dir, fsynced) a stored file of `owner`."""
        file_id = file_id or new_id("file-")
        size = tmp.stat().st_size
        os.replace(tmp, self.path_of(file_id))
        _fsync_dir(self.files_dir)
        created = now()
        self.db.execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, owner) VALUES (?, ?, ?, ?, ?, ?)",
            (file_id, filename, purpose, size, created, owner),
        )
        return self.file_doc((file_id, filename, purpose, size, created))

    def temp_path(self) -> Path:
        return self.files_dir / f".tmp-{secrets.token_hex(8)}"

    @staticmethod
    def file_doc(row: tuple) -> dict:
        file_id, filename, purpose, size, created = row
        return {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": created,
            "expires_at": None,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }

    def get_file(self, file_id: str, owner: str | None = None) -> dict | None:
        """The file; None if there is none, or `owner` (when given) may not see it."""
        mine, args = _visible(owner)
        row = self.db.execute(
            f"SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ?{mine}", (file_id, *args)
        ).fetchone()
        return self.file_doc(row) if row else None

    def list_files(
        self,
        after: str | None,
        limit: int,
        order: str = "desc",
        purpose: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[dict], bool]:
        mine, visible = _visible(owner)
        sql = f"SELECT id, filename, purpose, bytes, created_at FROM files WHERE 1=1{mine}"
        args: list[Any] = [*visible]
        if purpose:
            sql += " AND purpose = ?"
            args.append(purpose)
        if after:  # a cursor the caller may not see is no cursor: ids cannot be probed
            cmp = "<" if order == "desc" else ">"
            sql += f" AND seq {cmp} coalesce((SELECT seq FROM files WHERE id = ?{mine}), -1)"
            args.extend((after, *visible))
        sql += f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
        args.append(limit + 1)
        rows = self.db.execute(sql, args).fetchall()
        return [self.file_doc(r) for r in rows[:limit]], len(rows) > limit

    def file_in_use(self, file_id: str) -> str | None:
        """The id of an unfinished batch reading this file, if any."""
        rows = self.db.execute(
            "SELECT id, doc FROM batches WHERE status NOT IN (?, ?, ?, ?)", tuple(TERMINAL)
        )
        for batch_id, doc in rows:
            if orjson.loads(doc)["input_file_id"] == file_id:
                return batch_id
        return None

    def delete_file(self, file_id: str) -> bool:
        cur = self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        if cur.rowcount:
            self.path_of(file_id).unlink(missing_ok=True)
        return bool(cur.rowcount)

    # --- batches --------------------------------------------------------------------------------

    def add_batch(self, doc: dict, owner: str = "") -> dict:
        self.db.execute(
            "INSERT INTO batches (id, doc, status, output_id, error_id, owner) VALUES (?, ?, ?, ?, ?, ?)",
            (doc["id"], orjson.dumps(doc), doc["status"], new_id("file-"), new_id("file-"), owner),
        )
        return doc

    def get_batch(self, batch_id: str, owner: str | None = None) -> dict | None:
        """The batch; None if there is none, or `owner` (when given) may not see it."""
        mine, args = _visible(owner)
        row = self.db.execute(f"SELECT doc FROM batches WHERE id = ?{mine}", (batch_id, *args)).fetchone()
        return orjson.loads(row[0]) if row else None

    def list_batches(
        self, after: str | None, limit: int, owner: str | None = None
    ) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them."""
        mine, visible = _visible(owner)
        sql, args = f"SELECT doc FROM batches WHERE 1=1{mine}", [*visible]
        if after:
            sql += f" AND seq < coalesce((SELECT seq FROM batches WHERE id = ?{mine}), -1)"
            args.extend((after, *visible))
        rows = self.db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        return [orjson.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[tuple[dict, str]]:
        """Batches to (re)start, oldest first, with their owners."""
        rows = self.db.execute(
            "SELECT doc, owner FROM batches WHERE status NOT IN (?, ?, ?, ?) ORDER BY seq", tuple(TERMINAL)
        ).fetchall()
        return [(orjson.loads(r[0]), r[1]) for r in rows]

    def update_batch(self, batch_id: str, change: Callable[[dict], dict | None]) -> dict | None:
        """Read, change and write one batch in one transaction; `change` returns None to leave it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                self.db.execute("ROLLBACK")
                return None
            doc = orjson.loads(row[0])
            new = change(doc)
            if new is None:
                self.db.execute("ROLLBACK")
                return doc
            self.db.execute(
                "UPDATE batches SET doc = ?, status = ? WHERE id = ?",
                (orjson.dumps(new), new["status"], batch_id),
            )
            self.db.execute("COMMIT")
            return new
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # --- results --------------------------------------------------------------------------------

    def recorded_lines(self, batch_id: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def record(self, batch_id: str, results: list[Result]) -> int:
        """Record results not recorded yet, and count them into the batch, in one transaction.
        Returns how many were new."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ok = failed = tokens_in = tokens_out = 0
            for r in results:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO results (batch_id, line, ok, data) VALUES (?, ?, ?, ?)",
                    (batch_id, r.line, int(r.ok), r.data),
                )
                if cur.rowcount:
                    ok += r.ok
                    failed += not r.ok
                    tokens_in += r.input_tokens
                    tokens_out += r.output_tokens
            if ok or failed:
                row = self.db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
                doc = orjson.loads(row[0])
                counts = doc["request_counts"]
                counts["completed"] += ok
                counts["failed"] += failed
                usage = doc["usage"]
                usage["input_tokens"] += tokens_in
                usage["output_tokens"] += tokens_out
                usage["total_tokens"] += tokens_in + tokens_out
                self.db.execute("UPDATE batches SET doc = ? WHERE id = ?", (orjson.dumps(doc), batch_id))
            self.db.execute("COMMIT")
            return ok + failed
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _results(self, batch_id: str, ok: bool) -> Iterator[bytes]:
        cur = self.db.execute(
            "SELECT data FROM results WHERE batch_id = ? AND ok = ? ORDER BY line", (batch_id, int(ok))
        )
        for (data,) in cur:
            yield data

    def finalize(self, batch_id: str, status: str, extra: Callable[[dict], None] | None = None) -> dict:
        """Write the output and error files (input order) and end the batch with `status`.
        Idempotent: a crash half-way is finished by calling it again."""
        row = self.db.execute(
            "SELECT doc, output_id, error_id, owner FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
        doc, output_id, error_id, owner = orjson.loads(row[0]), row[1], row[2], row[3]
        if doc["status"] in TERMINAL:
            return doc
        written: dict[str, tuple[Path, str]] = {}
        for ok, file_id, suffix in ((True, output_id, "output"), (False, error_id, "error")):
            if self.get_file(file_id) is not None:  # written before a crash
                written[suffix] = (self.path_of(file_id), file_id)
                continue
            tmp = self.temp_path()
            lines = 0
            with open(tmp, "wb") as fh:
                for data in self._results(batch_id, ok):
                    fh.write(data + b"\n")
                    lines += 1
                fh.flush()
                os.fsync(fh.fileno())
            if lines:
                written[suffix] = (tmp, file_id)
            else:
                tmp.unlink()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for suffix, (path, file_id) in written.items():
                if self.get_file(file_id) is None:
                    name = f"{batch_id}_{suffix}.jsonl"
                    self.add_file(path, name, "batch_output", owner, file_id=file_id)
            t = now()
            doc["output_file_id"] = output_id if "output" in written else None
            doc["error_file_id"] = error_id if "error" in written else None
            doc["status"] = status
            doc[f"{status}_at"] = t
            if extra is not None:
                extra(doc)
            self.db.execute(
                "UPDATE batches SET doc = ?, status = ? WHERE id = ?", (orjson.dumps(doc), status, batch_id)
            )
            self.db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return doc


class AsyncStore:
    """The store on its own thread, for the event loop; results arriving together share a commit."""

    def __init__(self, root: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-store")
        self._root = Path(root)
        self._store: Store | None = None
        self._pending: dict[str, list[tuple[Result, asyncio.Future]]] = {}
        self._flushing = False

    async def open(self) -> None:
        self._store = await self._call(Store, self._root)

    @property
    def root(self) -> Path:
        return self._root

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(store, *args)` on the store's thread."""
        assert self._store is not None
        return await self._call(fn, self._store, *args)

    async def record(self, batch_id: str, result: Result) -> None:
        """Returns once the result is committed."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(batch_id, []).append((result, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        await fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                pending, self._pending = self._pending, {}
                for batch_id, items in pending.items():
                    try:
                        await self.run(Store.record, batch_id, [r for r, _ in items])
                    except Exception as exc:
                        for _, fut in items:
                            if not fut.done():
                                fut.set_exception(exc)
                    else:
                        for _, fut in items:
                            if not fut.done():
                                fut.set_result(None)
        finally:
            self._flushing = False

    async def close(self) -> None:
        if self._store is not None:
            await self._call(self._store.close)
            self._store = None
        self._executor.shutdown(wait=False)
