"""Models (and LoRA adapters, and batch files) from S3 or an S3-compatible store (MinIO, ...).

`fetch_s3_dir("s3://bucket/prefix", dest)` copies every object under the prefix into `dest`, in
parallel, resumably:
- a file already there with the size and ETag recorded for it in `dest/.s3-manifest.json` is not
  fetched again (an object changed in the bucket is: its ETag differs);
- a file is written as `name.part` and renamed when complete and verified; an interrupted `.part`
  is continued with a ranged GET on the same ETag (`If-Match`), or started over if the object changed;
- verified: the size always; the MD5 too when the ETag is one (single-part uploads; a multipart
  upload's ETag is not a digest of the content).
Progress goes to the log every few seconds. Every failure is an `S3Error` whose message is the one
sentence the user sees (bucket or object missing, credentials refused, endpoint unreachable).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from app.logs import get_logger

log = get_logger("app.sources.s3")

MANIFEST = ".s3-manifest.json"
WORKERS = 8
CHUNK = 8 << 20
PROGRESS_INTERVAL = 5.0
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_REFUSED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
        "403",
    }
)


class S3Error(Exception):
    """An S3 source that cannot be read; the message is one sentence for the user."""


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> S3Config:
        secret = settings.AWS_SECRET_ACCESS_KEY
        return cls(
            endpoint_url=settings.S3_ENDPOINT_URL,
            access_key=settings.AWS_ACCESS_KEY_ID,
            secret_key=secret.get_secret_value() if secret is not None else None,
            region=settings.AWS_REGION,
        )

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "config": Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=WORKERS * 2,
            ),
        }
        if self.access_key:
            kwargs["aws_access_key_id"] = self.access_key
            kwargs["aws_secret_access_key"] = self.secret_key
        return boto3.client("s3", **{k: v for k, v in kwargs.items() if v is not None})

    @property
    def where(self) -> str:
        return self.endpoint_url or "AWS S3"


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key or prefix) of `s3://bucket/key`."""
    if not url.startswith("s3://"):
        raise S3Error(f"{url!r} is not an s3:// URL.")
    bucket, _, key = url[5:].partition("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,62}", bucket):
        raise S3Error(f"{url!r} does not name a valid bucket (s3://bucket/prefix).")
    return bucket, key


def explain(exc: BaseException, url: str, cfg: S3Config) -> str:
    """One sentence for each way an S3 call fails."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, S3Error):
        return str(exc)
    if isinstance(exc, NoCredentialsError):
        return f"{url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)."
    if isinstance(exc, EndpointConnectionError):
        return f"{url}: the S3 endpoint {cfg.where} cannot be reached (S3_ENDPOINT_URL)."
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return f"{url}: the bucket does not exist at {cfg.where}."
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{url}: no such object at {cfg.where}."
        if code in _REFUSED:
            return (
                f"{url}: {cfg.where} refused the credentials ({code}): check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and the bucket's policy."
            )
        return f"{url}: S3 error {code or exc.__class__.__name__}: {exc}".splitlines()[0]
    return f"{url}: {exc.__class__.__name__}: {exc}".splitlines()[0]


def _etag(raw: str) -> str:
    return raw.strip('"')


def list_objects(cli: Any, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
    """(key, size, etag) of every object under `prefix` (taken as a folder), folder markers left out."""
    folder = prefix.rstrip("/") + "/" if prefix else ""
    out = []
    for page in cli.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for obj in page.get("Contents", ()):
            if not obj["Key"].endswith("/"):
                out.append((obj["Key"], int(obj["Size"]), _etag(obj["ETag"])))
    return out


class _Progress:
    def __init__(self, url: str, files: int, total: int) -> None:
        self.url, self.files, self.total = url, files, total
        self.done_files = self.done = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def add(self, n: int, file_done: bool = False) -> None:
        with self._lock:
            self.done += n
            self.done_files += file_done
            now = time.monotonic()
            if now - self._last >= PROGRESS_INTERVAL or self.done_files == self.files:
                self._last = now
                log.info(
                    "download progress",
                    what=self.url,
                    done=self.done,
                    total=self.total,
                    unit="B",
                    files=f"{self.done_files}/{self.files}",
                )


def _fetch_one(
    cli: Any, bucket: str, key: str, size: int, etag: str, target: Path, progress: _Progress
) -> None:
    """Download one object to `target` (through `target.part`), resuming and verifying."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5() if _MD5_ETAG.match(etag) else None
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        have = 0
    if have and md5 is not None:
        with open(part, "rb") as fh:
            while chunk := fh.read(CHUNK):
                md5.update(chunk)
    from botocore.exceptions import ClientError

    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "IfMatch": f'"{etag}"'}
    if have and have < size:
        kwargs["Range"] = f"bytes={have}-"
    try:
        resp = cli.get_object(**kwargs) if have < size or size == 0 else None
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) != "PreconditionFailed":
            raise
        raise S3Error(f"s3://{bucket}/{key} changed while it was being downloaded; start again.") from exc
    progress.add(have)
    with open(part, "ab" if have else "wb") as out:
        if resp is not None:
            body = resp["Body"]
            while chunk := body.read(CHUNK):
                out.write(chunk)
                if md5 is not None:
                    md5.update(chunk)
                progress.add(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    got = part.stat().st_size
    if got != size:
        part.unlink(missing_ok=True)
        raise S3Error(f"s3://{bucket}/{key}: got {got} bytes, expected {size}; the partial file was removed.")
    if md5 is not None and md5.hexdigest() != etag:
        part.unlink(missing_ok=True)
        raise S3Error(f"s3://{bucket}/{key}: the content does not match its ETag (MD5); it was removed.")
    os.replace(part, target)
    progress.add(0, file_done=True)


def _read_manifest(dest: Path) -> dict[str, Any]:
    try:
        return orjson.loads((dest / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def _write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    os.replace(tmp, dest / MANIFEST)


def fetch_s3_dir(url: str, dest: str | Path, cfg: S3Config | None = None, workers: int = WORKERS) -> Path:
    """Copy every object under `url` (a folder: `s3://bucket/prefix`) into `dest`; see the module's
    docstring. Returns `dest`. Raises S3Error. Callable for LoRA adapters too."""
    cfg = cfg or S3Config()
    dest = Path(dest)
    bucket, prefix = parse_url(url)
    try:
        cli = cfg.client()
        objects = list_objects(cli, bucket, prefix)
    except Exception as exc:
        raise S3Error(explain(exc, url, cfg)) from exc
    if not objects:
        raise S3Error(f"{url}: no objects under this prefix at {cfg.where}.")
    folder = prefix.rstrip("/") + "/" if prefix else ""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(dest)
    files = manifest.setdefault("files", {})
    manifest["complete"] = False
    todo = []
    for key, size, etag in objects:
        rel = key[len(folder) :]
        target = dest / rel
        if ".." in Path(rel).parts or rel.startswith("/"):
            raise S3Error(f"{url}: object key {key!r} would leave the cache folder.")
        known = files.get(rel)
        if known == {"size": size, "etag": etag} and target.is_file() and target.stat().st_size == size:
            continue
        files.pop(rel, None)
        todo.append((key, size, etag, rel, target))
    skipped = len(objects) - len(todo)
    total = sum(size for _, size, _, _, _ in todo)
    log.info(
        "downloading model from S3",
        url=url,
        files=len(todo),
        bytes=total,
        already_here=skipped,
        dest=str(dest),
    )
    progress = _Progress(url, len(todo), total)
    lock = threading.Lock()

    def one(item: tuple) -> None:
        key, size, etag, rel, target = item
        _fetch_one(cli, bucket, key, size, etag, target, progress)
        with lock:
            files[rel] = {"size": size, "etag": etag}
            _write_manifest(dest, manifest)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="s3") as pool:
            for fut in [pool.submit(one, item) for item in todo]:
                fut.result()
    except Exception as exc:
        raise S3Error(explain(exc, url, cfg)) from exc
    manifest["complete"] = True
    _write_manifest(dest, manifest)
    return dest


def is_complete(dest: Path) -> bool:
    """A folder a previous fetch finished (used when the store cannot be reached)."""
    return bool(_read_manifest(dest).get("complete"))


def check_readable(url: str, cfg: S3Config) -> None:
    """Preflight without downloading: the prefix lists at least one object. Raises S3Error."""
    bucket, prefix = parse_url(url)
    try:
        objects = list_objects(cfg.client(), bucket, prefix)
    except Exception as exc:
        raise S3Error(explain(exc, url, cfg)) from exc
    if not objects:
        raise S3Error(f"{url}: no objects under this prefix at {cfg.where}.")


def download_file(url: str, dest: Path, cfg: S3Config) -> Path:
    """One object to a local file (batch input files). Raises S3Error."""
    bucket, key = parse_url(url)
    if not key or key.endswith("/"):
        raise S3Error(f"{url} does not name an object.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        cfg.client().download_file(bucket, key, str(dest))
    except Exception as exc:
        raise S3Error(explain(exc, url, cfg)) from exc
    return dest


def upload_file(path: Path, url: str, cfg: S3Config) -> None:
    """A local file to one object (batch output files). Raises S3Error."""
    bucket, key = parse_url(url)
    if not key or key.endswith("/"):
        raise S3Error(f"{url} does not name an object.")
    try:
        cfg.client().upload_file(str(path), bucket, key)
    except Exception as exc:
        raise S3Error(explain(exc, url, cfg)) from exc
