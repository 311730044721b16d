"""Session-wide fixtures: one real SeaweedFS (S3 API) and one real Ray per test session.

The object store runs on its own ports (a free block of ports from 24000) in a temporary folder, so tests run
beside a demo stack without touching it. Ray starts locally with 2 CPUs and token auth on; its
workers inherit the S3 settings from this process's environment, as on a real cluster.
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid
from pathlib import Path

import pytest

from tessera.embedded.seaweedfs import EmbeddedS3, S3Ports
from tessera.storage import Storage, StorageConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()
TEST_S3_PORT_BASE = 24000  # the first port block tried; concurrent test sessions take the next free one


def ports_free(ports) -> bool:
    from tessera.embedded.ray_head import port_free

    return all(port_free(port) for port in ports)


def free_head_offsets(from_top: bool = False) -> list[int]:
    """Port offsets at which a Ray head of a test's own finds its ports free (GCS, dashboard, client
    server, agent). The dashboard stays below Ray's worker ports (10002+); the fault tests take offsets
    from the top, the other tests that start heads from the bottom."""
    offsets = range(1600, 999, -100) if from_top else range(1000, 1700, 100)
    return [o for o in offsets if ports_free([6379 + o, 8265 + o, 20000 + o, 52365 + o])]


def free_s3_ports() -> S3Ports:
    """The first block of ten consecutive ports from 24000 (stepping by 20) that are all free, so two
    test sessions on one machine, or a test session beside the demo, do not collide. The blocks stay
    below Linux's ephemeral range (32768+), where an outgoing connection may take a port at any time."""
    for base in range(TEST_S3_PORT_BASE, 32760, 20):
        ports = S3Ports.block(base)
        if ports_free(ports.all()):
            return ports
    raise RuntimeError("no free port range for the test SeaweedFS")


@pytest.fixture(scope="session")
def tessera_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tessera-home")


@pytest.fixture(scope="session")
def s3_server(tessera_home):
    """The session's SeaweedFS process (an :class:`EmbeddedS3`), on the first free port range."""
    s3 = EmbeddedS3(tessera_home, ports=free_s3_ports())
    s3.start()
    yield s3
    s3.stop()


@pytest.fixture(scope="session")
def embedded_s3(s3_server):
    """A real SeaweedFS S3 endpoint for the whole session; its credentials go into os.environ."""
    conn = s3_server.start()  # already running: returns the connection
    saved = {k: os.environ.get(k) for k in conn.env()}
    os.environ.update(conn.env())
    yield conn
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


_SESSION: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_session(embedded_s3):
    """A real local Ray (2 CPUs, 2 logical GPUs, token auth on) for the session, started after the S3 env is set,
    so that its workers inherit the object store settings."""
    import ray

    # 2 logical GPUs (no device behind them) let tests check GPU placement of encoder pools. The dashboard
    # (on a free port, loopback) serves the Jobs and Serve REST APIs the real `serve deploy` CLI talks to.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False)
    _SESSION["dashboard_url"] = "http://" + context.dashboard_url
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dashboard_url(ray_session) -> str:
    """The session Ray's dashboard (``--address`` of ``serve deploy`` / ``ray job submit``)."""
    return _SESSION["dashboard_url"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared test data not found at {SHARED_DATA}: ../shared/data must sit beside the repo")
    return SHARED_DATA


# --- shared artifacts: a small corpus, seeded encoder weights and one embedding run -----------------
TEST_ROOT = "s3://tessera-test/session"


@pytest.fixture(scope="session")
def sample_corpus(ray_session, storage, shared_data):
    """A 160-item corpus with every kind of bad item and real media mixed in (manifest returned)."""
    from tessera.corpus import CorpusConfig, generate_corpus
    from tessera.corpus.catalog import BAD_KINDS

    storage.ensure_bucket(TEST_ROOT)
    cfg = CorpusConfig(root=TEST_ROOT, num_items=160, num_users=80, mean_interactions_per_user=12,
                       items_per_part=60, users_per_part=40, image_size=48, audio_seconds=0.5,
                       bad={k: 0.03 for k in BAD_KINDS}, max_parts_in_flight=2,
                       real_media={"enabled": True, "data_dir": str(shared_data), "share": 0.1})
    return {"config": cfg, "manifest": generate_corpus(cfg)}


@pytest.fixture(scope="session")
def encoder_weights(storage):
    """Seeded placeholder image/audio weights in the test bucket: {modality: uri}."""
    from tessera.encoders import write_seeded_weights

    storage.ensure_bucket(TEST_ROOT)
    return write_seeded_weights(f"{TEST_ROOT}/models/encoders", storage, seed=0)


def embed_config(encoder_weights, run_id: str, **overrides):
    """The embedding config the tests use: small batches, pools sized for the 2-CPU test Ray."""
    from tessera.embed.config import EmbedConfig

    pool = {"num_cpus": 0.25, "batch_size": 16, "torch_threads": 1}
    data = {
        "items_uri": f"{TEST_ROOT}/corpus/items", "output_uri": f"{TEST_ROOT}/embeddings", "run_id": run_id,
        "read_batch_rows": 40, "write_batch_size": 40,
        "text": {"pool": pool},
        "image": {"encoder": {"weights": encoder_weights["image"]}, "pool": pool},
        "audio": {"encoder": {"weights": encoder_weights["audio"], "clip_seconds": 0.5}, "pool": pool},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return EmbedConfig.model_validate(data)


@pytest.fixture(scope="session")
def sample_embeddings(sample_corpus, encoder_weights, storage):
    """One complete embedding run over ``sample_corpus`` (its manifest)."""
    from tessera.embed.pipeline import run_embedding

    return run_embedding(embed_config(encoder_weights, "session"))


@pytest.fixture(scope="session")
def trained_bundle(sample_embeddings, storage):
    """One tiny training run (real Ray Train, 2 workers) over ``sample_embeddings``: ``(config, manifest)``.

    Shared by the training job's test and by serving, so the session trains once.
    """
    from tessera.train.job import run_training
    from tests.train.conftest import tiny_train_config

    cfg = tiny_train_config(sample_embeddings["output"]["uri"], f"{TEST_ROOT}/trained")
    return cfg, run_training(cfg, storage)


@pytest.fixture(scope="session")
def served_index(trained_bundle, ray_session, storage) -> str:
    """The index job over the trained bundle (2 shards + per-modality indexes); its version root URI."""
    from tessera.index_job import run_index_job
    from tessera.storage import join_uri
    from tests.index_job.conftest import job_config

    cfg, _ = trained_bundle
    out = f"{TEST_ROOT}/served/index"
    manifest = run_index_job(job_config(cfg.bundle_uri, out))
    return join_uri(out, manifest.index_version)
