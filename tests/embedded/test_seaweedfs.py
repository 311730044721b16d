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


def test_a_stale_pid_file_naming_another_process_is_not_ours(tmp_path):
    """After a reboot the pid in weed.pid can name any process: stop() must not signal it."""
    import subprocess

    from tessera.embedded.seaweedfs import EmbeddedS3

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        server = EmbeddedS3(tmp_path)
        server.root.mkdir(parents=True)
        server.pid_file.write_text(str(other.pid))
        assert server.pid() is None
        assert server.stop() is False and other.poll() is None  # still running
        assert not server.pid_file.exists()
    finally:
        other.kill()
        other.wait()
