"""The whole pipeline through the real clients, as a user runs it: `ray job submit` for every batch job
against a local Ray head started like `make ray-up` (token auth on, its own ports), then `serve deploy`
of the shipped YAML, then HTTP. (The session's in-process Ray has no job agent, so it cannot take jobs.)

Asserts on the artifacts each job leaves in the object store and on the answers, and scans every job's
logs and the manifests for the object store's secret key and the Ray token (none may leak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tessera.embedded.ray_head import EmbeddedRay
from tessera.storage import join_uri
from tests.conftest import free_head_offsets
from tests.serve.conftest import deploy_config, free_port, serve_cli, serve_deploy, wait_running

ROOT = Path(__file__).resolve().parents[2]
E2E = "s3://tessera-test/e2e"


@pytest.fixture(scope="module")
def head(tmp_path_factory, embedded_s3):
    """A Ray head as `make ray-up` starts it (2 CPUs, token auth, loopback), on ports of its own."""
    home = tmp_path_factory.mktemp("e2e-ray")
    offset = free_head_offsets()[0]
    h = EmbeddedRay(home, port_offset=offset, num_cpus=2)
    h.start(extra_env=embedded_s3.env())
    yield h
    h.stop()


@pytest.fixture(scope="module")
def client_env(head) -> dict:
    """What a user's shell has after `source .tessera/env.sh`: this head's token, no session settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({k: v for k, v in head.client_env().items() if k != "RAY_ADDRESS"})
    return env


def submit(job: str, *args: str, head, env: dict, logs: list[str]) -> str:
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--",
           "python", "-m", f"jobs.{job}", *args]
    for _ in range(30):  # the job agent comes up a little after the head; the CLI says so
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env, check=False)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    logs.append(done.stdout + done.stderr)
    assert done.returncode == 0, f"jobs.{job} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    assert "succeeded" in done.stdout + done.stderr
    return done.stdout


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
def test_corpus_to_answers_through_ray_job_submit_and_serve_deploy(head, client_env, storage, shared_data, tmp_path):
    storage.ensure_bucket(E2E)
    logs: list[str] = []
    corpus = write_yaml(tmp_path / "corpus.yaml", {
        "root": E2E, "seed": 11, "num_items": 80, "num_users": 40, "mean_interactions_per_user": 12,
        "items_per_part": 40, "users_per_part": 20, "image_size": 48, "audio_seconds": 0.5,
        "real_media": {"enabled": True, "data_dir": str(shared_data), "share": 0.1}})
    submit("make_corpus", "--config", corpus, head=head, env=client_env, logs=logs)
    submit("make_models", "--out", f"{E2E}/models/encoders", head=head, env=client_env, logs=logs)
    embed = yaml.safe_load((ROOT / "configs" / "embed.yaml").read_text())
    embed.update({"items_uri": f"{E2E}/corpus/items", "output_uri": f"{E2E}/embeddings", "run_id": "e2e"})
    embed["image"]["encoder"]["weights"] = f"{E2E}/models/encoders/image-resnet18-seeded"
    embed["audio"]["encoder"]["weights"] = f"{E2E}/models/encoders/audio-wav2vec2-seeded"
    embed["audio"]["encoder"]["clip_seconds"] = 0.5
    for m in ("text", "image", "audio"):
        embed[m]["pool"]["batch_size"] = 16
    submit("embed", "--config", write_yaml(tmp_path / "embed.yaml", embed), head=head, env=client_env, logs=logs)
    run = storage.read_json(f"{E2E}/embeddings/e2e/_MANIFEST.json")
    assert run["complete"] and run["output"]["rows"] == 80

    train = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
    train.update({"interactions_uri": f"{E2E}/corpus/interactions", "embeddings_uri": f"{E2E}/embeddings/e2e",
                  "models_uri": f"{E2E}/models", "checkpoint_uri": f"{E2E}/checkpoints", "version": "e2e",
                  "max_history": 8, "ks": [10, 20]})
    train["towers"].update({"d_model": 16, "out_dim": 16, "n_heads": 2, "proj_hidden": 32, "epochs": 2,
                            "batch_size": 32})
    train["ranker"].update({"epochs": 1, "candidates": 20, "num_hard": 4, "num_random": 4})
    out = submit("train", "--config", write_yaml(tmp_path / "train.yaml", train), head=head, env=client_env,
                 logs=logs)
    assert '"version": "e2e"' in out
    bundle = storage.read_json(f"{E2E}/models/e2e/_MANIFEST.json")
    assert bundle["embedding_run"] == f"{E2E}/embeddings/e2e" and bundle["ranker_features"]["trained"]
    # the head tracks Train runs (RAY_TRAIN_ENABLE_STATE_TRACKING), so the dashboard's Train page lists it
    token = head.token_file.read_text().strip()
    runs = requests.get(f"{head.dashboard_url}/api/train/v2/runs/v1", headers={"Authorization": f"Bearer {token}"},
                        timeout=30).json()["train_runs"]
    assert runs and all(r["status"] == "FINISHED" for r in runs) and runs[0]["attempts"][0]["workers"]

    index = yaml.safe_load((ROOT / "configs" / "index.yaml").read_text())
    index.update({"model_uri": f"{E2E}/models/e2e", "output_uri": f"{E2E}/index"})
    index["self_check"].update({"user_queries": 30, "item_queries": 30})
    submit("build_index", "--config", write_yaml(tmp_path / "index.yaml", index), head=head, env=client_env,
           logs=logs)
    # a second run keeps what is there (make demo is safe to run twice)
    again = submit("build_index", "--config", str(tmp_path / "index.yaml"), "--keep-existing",
                   head=head, env=client_env, logs=logs)
    assert "kept" in again
    manifest = storage.read_json(f"{E2E}/index/e2e/_MANIFEST.json")
    assert manifest["model_version"] == "e2e" and manifest["recall_check"]["recall"] >= 0.95

    port = free_port()
    try:
        serve_deploy(deploy_config(f"{E2E}/index/e2e", port), head.dashboard_url, tmp_path, env=client_env)
        wait_running(head.dashboard_url, env=client_env)
        url = f"http://127.0.0.1:{port}"
        rec = requests.post(f"{url}/v1/recommend", json={"user_id": "user-00000003", "k": 5}, timeout=60)
        assert rec.status_code == 200, rec.text
        assert rec.json()["model_version"] == "e2e" and len(rec.json()["items"]) == 5
        found = requests.post(f"{url}/v1/search", json={"text": "a small wooden toy", "k": 3}, timeout=60)
        assert found.status_code == 200 and len(found.json()["items"]) == 3
        client = subprocess.run([sys.executable, "-m", "serve_apps.demo_client", "--url", url, "--wait", "30",
                                 "--user", "user-00000003"], capture_output=True, text=True, timeout=120, check=False)
        assert client.returncode == 0, client.stdout + client.stderr
    finally:
        serve_cli("shutdown", "-y", dashboard_url=head.dashboard_url, env=client_env)

    # no secret in any job's logs or in any manifest
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], head.token_file.read_text().strip()]
    texts = logs + [json.dumps(storage.read_json(u)) for u in storage.list_files(E2E, "_MANIFEST.json")]
    texts += [json.dumps(storage.read_json(join_uri(f"{E2E}/models/e2e", "metrics.json")))]
    assert len(texts) > 8
    for secret in secrets:
        assert len(secret) >= 16
        assert not any(secret in t for t in texts)
