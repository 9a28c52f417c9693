"""A real S3 endpoint for tests: `moto_server` (moto[server]) on 127.0.0.1, one per test session or
module, stopped with its process group.

moto accepts any keys by default. `enforce_auth()` makes it check them from then on (moto's
`/moto-api/reset-auth`): only the IAM user's key made by `user_key()` is accepted, any other key is
refused with `InvalidAccessKeyId`, as AWS and MinIO refuse unknown keys.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from stack import free_port

ADMIN = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin", "region_name": "us-east-1"}


class MotoS3:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> MotoS3:
        server = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                httpx.get(self.url + "/moto-api/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError("moto_server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def client(self, service: str = "s3", **keys: str):
        import boto3

        return boto3.client(service, endpoint_url=self.url, **{**ADMIN, **keys})

    def user_key(self, name: str = "reader") -> tuple[str, str]:
        """An IAM user allowed every S3 action; its (access key, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = iam.create_policy(
            PolicyName=f"{name}-s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        iam.attach_user_policy(UserName=name, PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def upload_dir(self, src: Path, bucket: str, prefix: str) -> None:
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        for path in sorted(src.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(src)}")

    def enforce_auth(self) -> None:
        httpx.post(self.url + "/moto-api/reset-auth", content=b"0", timeout=5).raise_for_status()
