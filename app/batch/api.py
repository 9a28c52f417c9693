"""The OpenAI Files and Batches routes, as a small FastAPI app of their own.

    POST /v1/files (multipart: file, purpose=batch)    GET /v1/files    GET /v1/files/{id}
    GET /v1/files/{id}/content    DELETE /v1/files/{id}
    POST /v1/batches    GET /v1/batches    GET /v1/batches/{id}    POST /v1/batches/{id}/cancel

Shapes are OpenAI's (the SDK's `FileObject`, `Batch`, `FileDeleted`, cursor pages); errors are
OpenAI-shaped (`app/errors.py`). The dispatcher in app/main.py sends these paths here after the
API-key check, with the caller's key name in the request record.

Files and batches belong to the key that made them (a batch's output and error files to the batch's
key): a key lists and reaches only its own, and the public ones (app/batch/store.py PUBLIC); another
key's id answers the 404 of an unknown id. Without API keys every caller sees everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse

from app.batch.store import TERMINAL, Store, new_batch_doc, now
from app.batch.validate import ENDPOINTS
from app.errors import error_body
from app.keys import ANONYMOUS
from app.middleware import RECORD_KEY
from app.runtime import Phase

PATHS = ("/v1/files", "/v1/batches")
_UPLOAD_CHUNK = 1 << 20


def owns(path: str) -> bool:
    """Paths the Batch API answers (the dispatcher's hook)."""
    return path in PATHS or path.startswith(("/v1/files/", "/v1/batches/"))


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _page(data: list[dict], has_more: bool) -> Response:
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ApiError(400, f"Invalid 'limit': expected an integer between 1 and {most}.", param="limit")
    return value


class _TooLarge(Exception):
    pass


def _bounded(receive: Any, limit: int) -> Any:
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _TooLarge
        return message

    return wrapped


def caller(request: Request) -> str:
    """The name of the key the request was made with (set by the dispatcher)."""
    return request.scope[RECORD_KEY].key or ANONYMOUS


def seen_by(request: Request) -> str | None:
    """The owner whose rows the caller may see; None (every row) when the server has no keys."""
    name = caller(request)
    return None if name == ANONYMOUS else name


def build(service: Any) -> FastAPI:
    """The sub-app; `service` is the BatchService (store, runner, limits, runtime)."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        body = error_body(exc.status, exc.message, code=exc.code, param=exc.param)
        return Response(body, status_code=exc.status, media_type="application/json")

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = (
            f"Invalid URL ({request.method} {request.url.path})"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        body = error_body(exc.status_code, message, code=None)
        return Response(body, status_code=exc.status_code, media_type="application/json")

    async def store() -> Any:
        return await service.open()

    def writable() -> None:
        if service.runtime.phase in (Phase.DRAINING, Phase.STOPPED):
            raise ApiError(503, "The server is shutting down; retry shortly.", code="engine_unavailable")

    async def get_file(request: Request, file_id: str) -> dict:
        doc = await (await store()).run(Store.get_file, file_id, seen_by(request))
        if doc is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return doc

    async def get_batch(request: Request, batch_id: str) -> dict:
        doc = await (await store()).run(Store.get_batch, batch_id, seen_by(request))
        if doc is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return doc

    # --- files ----------------------------------------------------------------------------------

    @api.post("/v1/files")
    async def create_file(request: Request) -> Response:
        writable()
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "Uploads must be multipart/form-data with `file` and `purpose`.")
        limit = service.max_file_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 65536:
            raise ApiError(413, f"File larger than BATCH_MAX_FILE_MB ({limit} bytes).", param="file")
        bounded = Request(request.scope, _bounded(request.receive, limit + 65536))
        try:
            form = await bounded.form(max_files=1, max_fields=8)
        except _TooLarge:
            raise ApiError(
                413, f"File larger than BATCH_MAX_FILE_MB ({limit} bytes).", param="file"
            ) from None
        except HTTPException as exc:
            raise ApiError(400, f"Invalid multipart body: {exc.detail}") from None
        try:
            purpose = form.get("purpose")
            upload = form.get("file")
            if purpose is None:
                raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
            if purpose != "batch":
                raise ApiError(
                    400,
                    f"Invalid value for 'purpose': {purpose!r}. This server stores files for the "
                    "Batch API only: 'batch'.",
                    param="purpose",
                )
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "Missing required parameter: 'file'.", param="file")
            st = await store()
            tmp = None
            try:
                tmp = await st.run(Store.temp_path)
                size = await asyncio.to_thread(_copy, upload, tmp, limit)
                if size is None:
                    raise ApiError(413, f"File larger than BATCH_MAX_FILE_MB ({limit} bytes).", param="file")
                name = upload.filename or "upload.jsonl"
                doc = await st.run(Store.add_file, tmp, name, purpose, caller(request))
                tmp = None
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            return _json(doc)
        finally:
            await form.close()

    @api.get("/v1/files")
    async def list_files(request: Request) -> Response:
        q = request.query_params
        order = q.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise ApiError(400, "Invalid 'order': expected 'asc' or 'desc'.", param="order")
        data, more = await (await store()).run(
            Store.list_files,
            q.get("after"),
            _limit(request, 10000, 10000),
            order,
            q.get("purpose"),
            seen_by(request),
        )
        return _page(data, more)

    @api.get("/v1/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str) -> Response:
        return _json(await get_file(request, file_id))

    @api.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        await get_file(request, file_id)
        path: Path = (await store()).root / "files" / file_id
        return FileResponse(path, media_type="application/octet-stream")

    @api.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Response:
        writable()
        st = await store()
        await get_file(request, file_id)
        user = await st.run(Store.file_in_use, file_id)
        if user is not None:
            raise ApiError(
                409, f"File {file_id} is the input of batch {user}, which is not finished.", param="file_id"
            )
        await st.run(Store.delete_file, file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})

    # --- batches --------------------------------------------------------------------------------

    @api.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        writable()
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "We could not parse the JSON body of your request.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if body.get(name) is None:
                raise ApiError(400, f"Missing required parameter: '{name}'.", param=name)
            if not isinstance(body[name], str):
                raise ApiError(400, f"Invalid type for '{name}': expected a string.", param=name)
        if body["endpoint"] not in ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid value for 'endpoint': {body['endpoint']!r}. Supported values are: "
                + ", ".join(f"'{e}'" for e in ENDPOINTS)
                + ".",
                param="endpoint",
            )
        if body["completion_window"] != "24h":
            raise ApiError(
                400,
                f"Invalid value for 'completion_window': {body['completion_window']!r}. Supported "
                "values are: '24h'.",
                param="completion_window",
            )
        metadata = body.get("metadata")
        if metadata is not None and not _valid_metadata(metadata):
            raise ApiError(
                400,
                "Invalid 'metadata': at most 16 pairs of strings, keys up to 64 and values up to 512 "
                "characters.",
                param="metadata",
            )
        st = await store()
        file = await st.run(Store.get_file, body["input_file_id"], seen_by(request))  # the caller's
        if file is None:
            raise ApiError(404, f"No such File object: {body['input_file_id']}", param="input_file_id")
        if file["purpose"] != "batch":
            raise ApiError(
                400,
                f"File {file['id']} has purpose {file['purpose']!r}: a batch's input must be uploaded "
                "with purpose 'batch'.",
                param="input_file_id",
            )
        doc = new_batch_doc(file["id"], body["endpoint"], metadata)
        await st.run(Store.add_batch, doc, caller(request))
        service.runner.wake()
        return _json(doc)

    @api.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        data, more = await (await store()).run(
            Store.list_batches, request.query_params.get("after"), _limit(request, 20, 100), seen_by(request)
        )
        return _page(data, more)

    @api.get("/v1/batches/{batch_id}")
    async def retrieve_batch(request: Request, batch_id: str) -> Response:
        return _json(await get_batch(request, batch_id))

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        writable()
        await get_batch(request, batch_id)

        def cancel(doc: dict) -> dict | None:
            if doc["status"] in ("validating", "in_progress"):
                doc.update(status="cancelling", cancelling_at=now())
                return doc
            return None

        doc = await (await store()).run(Store.update_batch, batch_id, cancel)
        assert doc is not None
        if doc["status"] in TERMINAL - {"cancelled"} or doc["status"] == "finalizing":
            raise ApiError(409, f"Cannot cancel a batch with status '{doc['status']}'.", param="batch_id")
        service.runner.wake()
        return _json(doc)

    return api


def _valid_metadata(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) <= 16
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    )


def _copy(upload: UploadFile, dest: Path, limit: int) -> int | None:
    """Copy an upload to `dest` and fsync it; None if it is over `limit` bytes."""
    src = upload.file
    src.seek(0)
    size = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size
