"""Session-wide fixtures: one real SeaweedFS (S3 API) and one real Ray per test session.

The object store runs on its own ports (the defaults + 20000) in a temporary folder, so tests run
beside a demo stack without touching it. Ray starts locally with 2 CPUs and token auth on; its
workers inherit the S3 settings from this process's environment, as on a real cluster.
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import pytest

from tessera.embedded.seaweedfs import EmbeddedS3, S3Ports
from tessera.storage import Storage, StorageConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
TEST_PORT_OFFSET = 20000


@pytest.fixture(scope="session")
def tessera_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tessera-home")


@pytest.fixture(scope="session")
def embedded_s3(tessera_home):
    """A real SeaweedFS S3 endpoint for the whole session; its credentials go into os.environ."""
    s3 = EmbeddedS3(tessera_home, ports=S3Ports.offset(TEST_PORT_OFFSET))
    conn = s3.start()
    saved = {k: os.environ.get(k) for k in conn.env()}
    os.environ.update(conn.env())
    yield conn
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3.stop()


@pytest.fixture(scope="session")
def storage(embedded_s3) -> Storage:
    return Storage(StorageConfig())


@pytest.fixture
def bucket_uri(storage) -> str:
    """A fresh, empty prefix in the test bucket: ``s3://tessera-test/<random>``."""
    storage.ensure_bucket("s3://tessera-test")
    return f"s3://tessera-test/{uuid.uuid4().hex[:12]}"


def pytest_configure(config):
    """Turn Ray token auth on before anything imports Ray: its core reads the mode once, at import."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_ADDRESS", None)
    token_dir = Path(config.rootpath) / ".pytest_cache"
    token_dir.mkdir(exist_ok=True)
    token = token_dir / f"ray_auth_token_{os.getpid()}"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


def pytest_unconfigure(config):
    Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "/nonexistent")).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ray_session(embedded_s3):
    """A real local Ray (2 CPUs, token auth on) for the session, started after the S3 env is set,
    so that its workers inherit the object store settings."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared test data not found at {SHARED_DATA}: ../shared/data must sit beside the repo")
    return SHARED_DATA
