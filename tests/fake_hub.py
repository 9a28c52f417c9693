"""A local stand-in for the Hugging Face Hub, because the real Hub cannot be reached from here.

It serves the directories `root/<org>/<name>/` as model repos, with just the endpoints that
huggingface_hub 2.x calls for `HfApi.model_info`, `HfApi.list_repo_files` and `snapshot_download`:

    GET       /api/models/{repo_id}[/revision/{rev}]   repo info (the commit sha; file sizes with ?blobs=true)
    GET       /api/models/{repo_id}/tree/{rev}[/{dir}]  file listing (recursive)
    HEAD/GET  /{repo_id}/resolve/{rev}/{filename}        file metadata / contents

Errors are answered the way the Hub answers them, with the `X-Error-Code` header that the
client's `hf_raise_for_status` maps to an exception (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound). Only the revision "main" (or the repo's fake commit sha) exists. Every request is
recorded in `requests` so tests can check what was (not) fetched and which headers were sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

INFO = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/tree/(?P<rev>[^/]+)(?:/(?P<dir>.+))?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names


class FakeHub:
    """`with FakeHub(root) as hub:` serves at `hub.url`; mark repos gated with `gate()`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: list[Request] = []
        self.gated: dict[str, str | None] = {}  # repo id -> the one token that may download it
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes | str]) -> Path:
        for name, data in files.items():
            path = self.root / repo_id / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        return self.root / repo_id

    def gate(self, repo_id: str, allowed_token: str | None = None) -> None:
        self.gated[repo_id] = allowed_token

    def downloaded(self) -> list[str]:
        """Files whose contents were fetched (GET on resolve), as `repo_id/filename`."""
        return [
            f"{m['repo']}/{m['file']}"
            for r in self.requests
            if r.method == "GET"
            if (m := RESOLVE.match(r.path))
        ]

    def commit(self, repo_id: str) -> str:
        """The fake commit sha of the repo's only revision, "main"."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def files(self, repo_id: str) -> list[Path]:
        base = self.root / repo_id
        return sorted(p for p in base.rglob("*") if p.is_file())

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # HEAD is the same, without the body (see _send)
            path = unquote(urlsplit(self.path).path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            hub.requests.append(Request(self.command, path, headers))
            if m := TREE.match(path):
                self._tree(m["repo"], m["rev"], m["dir"])
            elif m := INFO.match(path):
                self._info(m["repo"], m["rev"], "blobs=" in urlsplit(self.path).query.lower())
            elif m := RESOLVE.match(path):
                self._resolve(m["repo"], m["rev"], m["file"])
            else:
                self._send(404, b"", {"X-Error-Message": "fake hub: no such endpoint"})

        def _check(self, repo_id: str, rev: str | None) -> bool:
            """Repo and revision exist; otherwise answer the Hub's error and return False."""
            authed = "Authorization" in self.headers  # header names are case-insensitive here
            if not (hub.root / repo_id).is_dir():
                # The Hub says 401 to anonymous callers (it will not confirm a private repo exists).
                msg = "Invalid username or password." if not authed else "Repository not found"
                self._error(401 if not authed else 404, "RepoNotFound", msg)
                return False
            if rev not in (None, "main", hub.commit(repo_id)):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return False
            return True

        def _info(self, repo_id: str, rev: str | None, blobs: bool = False) -> None:
            if self._check(repo_id, rev):
                siblings = [
                    # Sizes only when asked for (`?blobs=true`, model_info(files_metadata=True)), as on the Hub.
                    {"rfilename": p.relative_to(hub.root / repo_id).as_posix()}
                    | (
                        {"size": p.stat().st_size, "blobId": hashlib.sha1(p.read_bytes()).hexdigest()}
                        if blobs
                        else {}
                    )
                    for p in hub.files(repo_id)
                ]
                self._json(
                    {
                        "id": repo_id,
                        "sha": hub.commit(repo_id),
                        "siblings": siblings,
                        "gated": "auto" if repo_id in hub.gated else False,
                        "private": False,
                    }
                )

        def _tree(self, repo_id: str, rev: str, folder: str | None) -> None:
            if self._check(repo_id, rev):
                base = hub.root / repo_id
                entries = [
                    {
                        "type": "file",
                        "path": p.relative_to(base).as_posix(),
                        "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                    }
                    for p in hub.files(repo_id)
                    if folder is None or p.relative_to(base).as_posix().startswith(folder.rstrip("/") + "/")
                ]
                self._json(entries)

        def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
            if not self._check(repo_id, rev):
                return
            if repo_id in hub.gated:
                auth = self.headers.get("Authorization")
                if auth is None or auth != f"Bearer {hub.gated[repo_id]}":
                    msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                    self._error(401 if auth is None else 403, "GatedRepo", msg)
                    return
            file = hub.root / repo_id / filename
            if not file.is_file():
                self._error(404, "EntryNotFound", f'{filename} does not exist on "{rev}"')
                return
            data = file.read_bytes()
            self._send(
                200,
                data,
                {
                    "Content-Length": str(len(data)),
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "X-Repo-Commit": hub.commit(repo_id),
                },
            )

        def _error(self, status: int, code: str, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self._send(
                status,
                payload,
                {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
            )

        def _json(self, obj: object) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_HEAD = do_GET

    return Handler
