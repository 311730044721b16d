"""The embedded object store: loopback only, private credentials, real S3 auth."""

import socket
import stat

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError


def _non_loopback_ip() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


def test_credentials_private_and_required(embedded_s3, s3_server):
    for path in (s3_server.credentials_file, s3_server.identity_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    anon = boto3.session.Session().client(
        "s3", endpoint_url=embedded_s3.endpoint_url, region_name="us-east-1",
        aws_access_key_id="WRONGKEY", aws_secret_access_key="wrong-secret",
        config=Config(retries={"max_attempts": 1}))
    with pytest.raises(ClientError):
        anon.list_buckets()


def test_bound_to_loopback_only(embedded_s3):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to probe")
    port = int(embedded_s3.endpoint_url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection((ip, port), timeout=2).close()


def test_start_is_idempotent(embedded_s3, s3_server):
    pid = s3_server.pid()
    assert pid is not None
    conn = s3_server.start()
    assert s3_server.pid() == pid and conn.access_key_id == embedded_s3.access_key_id
