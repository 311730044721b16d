"""A Ray Train worker killed (SIGKILL to its process) on a multi-node cluster: the training job
submitted with ``ray job submit`` restarts its worker group, resumes from the last checkpoint on S3
(not from scratch), finishes and writes a complete model bundle.

The head has no CPU (as in ``cluster.yaml``: it runs the job's driver and the Train controller), so
the Ray Data tasks and both DDP workers run on the two worker nodes. The job runs with Ray Train's
state tracking on (``RAY_TRAIN_ENABLE_STATE_TRACKING=1``), so the head's Train API lists each
attempt's workers with their rank, node and pid. Once the Train controller has registered a
checkpoint (its ``checkpoint_manager_snapshot.json`` on S3 names one: a checkpoint merely uploaded
may not be registered yet, and a restart then starts from scratch), the test kills rank 0, the
worker that writes checkpoints, and afterwards checks where the run resumed from in the final
checkpoint's state (``resumes``: stage and epoch at restart) against the controller's last
registered checkpoint.
"""

from __future__ import annotations

import io
import os
import signal
import time
import urllib.error
import uuid

import psutil
import pytest
import torch
import yaml

from tessera.models.bundle import MANIFEST, ModelBundle
from tessera.storage import join_uri
from tessera.train.state import STATE_FILE, TrainState

from .conftest import FAULT_ROOT, write_embed_config

RAY_HEAD = {"num_cpus": 0, "num_gpus": 0}
TOWER_EPOCHS = 6  # + 1 ranker epoch; one checkpoint each, so the kill lands mid-run
SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
RUN_ID = "train-kill"


def write_corpus(root: str):
    """120 items and 60 users' interactions, no broken items, written in this process (no Ray)."""
    from tessera.corpus import CorpusConfig
    from tessera.corpus.catalog import BAD_KINDS, catalog_latents
    from tessera.corpus.generate import write_item_part, write_user_part

    cfg = CorpusConfig(root=root, num_items=120, num_users=60, mean_interactions_per_user=10,
                       items_per_part=60, users_per_part=60, image_size=32, audio_seconds=0.25,
                       bad={k: 0.0 for k in BAD_KINDS})
    for part in range(cfg.num_item_parts):
        write_item_part(cfg, part)
    latents = catalog_latents(cfg)
    for part in range(cfg.num_user_parts):
        write_user_part(cfg, part, latents)
    return cfg


def train_config(root: str):
    from tests.train.conftest import tiny_train_config

    return tiny_train_config(join_uri(root, "embeddings", RUN_ID), root, version="kill",
                             interactions_uri=join_uri(root, "corpus", "interactions"), variants=["fused"],
                             towers={"epochs": TOWER_EPOCHS}, ranker={"epochs": 1})


def position(state: TrainState) -> int:
    """Epochs finished at a checkpoint, over the plan (fused towers, then the ranker)."""
    return state.epoch + (TOWER_EPOCHS if state.stage >= 1 else 0) + (1 if state.stage >= 2 else 0)


def checkpoints(storage, run_uri: str) -> dict[str, TrainState]:
    """The run's checkpoints on S3: ``state.pt`` URI -> the state it holds (one Ray Train deleted
    meanwhile, past ``num_to_keep``, is left out)."""
    out = {}
    for uri in storage.list_files(run_uri, STATE_FILE):
        try:
            blob = io.BytesIO(storage.read_bytes(uri))
        except FileNotFoundError:
            continue
        out[uri] = TrainState(**torch.load(blob, map_location="cpu", weights_only=False))
    return out


def registered_epoch(storage, run_uri: str) -> int | None:
    """``global_epoch`` reported with the Train controller's latest registered checkpoint, or None."""
    try:
        latest = storage.read_json(join_uri(run_uri, SNAPSHOT)).get("latest_checkpoint_result")
    except FileNotFoundError:
        return None
    return int(latest["metrics"]["global_epoch"]) if latest else None


def attempts(cluster) -> list[dict]:
    """Attempts of the job's Train run (Train API), oldest first; empty until the run is registered."""
    try:
        runs = cluster.api("/api/train/v2/runs/v1")["train_runs"]
    except urllib.error.HTTPError:  # 500 until the job creates the Train state actor
        return []
    return sorted(runs[0]["attempts"], key=lambda a: a["start_time_ns"]) if runs else []


@pytest.mark.slow
def test_training_worker_killed_resumes_from_checkpoint(ray_cluster, fault_storage, tmp_path):
    nodes = [ray_cluster.add_node(num_cpus=1) for _ in range(2)]
    node_names = {ray_cluster.node_id(n): n.name for n in nodes}
    root = f"{FAULT_ROOT}/{uuid.uuid4().hex[:8]}"
    corpus = write_corpus(root)

    # inputs: a text-only embedding run of the corpus, through the same job as in production
    disabled = {"image": f"{root}/unused", "audio": f"{root}/unused"}
    embed_yaml = write_embed_config(tmp_path / "embed.yaml", {"config": corpus}, disabled, RUN_ID,
                                    modalities=("text",))
    embed = ray_cluster.submit("python", "-m", "jobs.embed", "--config", str(embed_yaml))
    assert embed.wait(timeout_s=240)["status"] == "SUCCEEDED", embed.logs()[-4000:]
    embed_s = time.monotonic() - embed.submitted_at

    cfg = train_config(root)
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage"})))
    run_uri = join_uri(cfg.checkpoint_uri, cfg.version)
    job = ray_cluster.submit("python", "-m", "jobs.train", "--config", str(train_yaml),
                             env_vars={"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"})

    # a checkpoint registered by the controller and the worker group up: kill rank 0 there
    victim = None
    while victim is None:
        assert time.monotonic() - job.submitted_at < 300, job.logs()[-3000:]
        status = job.info()["status"]
        assert status in ("PENDING", "RUNNING"), f"job {status} before the kill:\n{job.logs()[-3000:]}"
        tried = attempts(ray_cluster)
        workers = tried[-1]["workers"] if tried else []
        if workers and registered_epoch(fault_storage, run_uri):
            victim = next(w for w in workers if w["world_rank"] == 0)
        else:
            time.sleep(0.5)
    assert {w["node_id"] for w in workers} <= set(node_names), "a Train worker ran on the head"
    proc = psutil.Process(victim["pid"])
    assert "RayTrainWorker" in " ".join(proc.cmdline()), proc.cmdline()
    t_kill = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    at_kill = set(fault_storage.list_files(run_uri, STATE_FILE))  # rank 0 is dead: none can come after this
    seen: dict = {"registered": None}
    marks: dict[str, float] = {}

    def milestones(now: float) -> None:
        tried = attempts(ray_cluster)
        if seen["registered"] is None and len(tried) > 1:  # the controller moved on: what it restores from is final
            seen["registered"] = registered_epoch(fault_storage, run_uri)
        if "workers_back" not in marks and len(tried) > 1 and tried[-1]["workers"] \
                and all(w.get("status") == "ALIVE" for w in tried[-1]["workers"]):
            marks["workers_back"] = now
        if "checkpoint_after" not in marks and set(fault_storage.list_files(run_uri, STATE_FILE)) - at_kill:
            marks["checkpoint_after"] = now  # the resumed run finished an epoch and checkpointed it

    info = job.wait(300, on_poll=milestones, since=t_kill, every_s=0.5)
    marks["job_done"] = time.monotonic() - t_kill
    registered = seen["registered"]

    total_s = time.monotonic() - job.submitted_at
    tried = attempts(ray_cluster)
    print(f"\n[train-kill] killed rank 0 (pid {victim['pid']}, node {node_names[victim['node_id']]}; workers on "
          f"{sorted(node_names[w['node_id']] for w in workers)}) with the checkpoint of epoch {registered} of "
          f"{TOWER_EPOCHS + 1} registered; seconds after the kill: "
          + ", ".join(f"{k} {v:.1f}" for k, v in marks.items())
          + f"; train job {total_s:.1f}s from submission (embed job before it {embed_s:.1f}s); "
          f"attempts {[a['status'] for a in tried]}")
    for a in tried[:-1]:  # why each failed attempt ended (the controller's words)
        lasted = ((a.get("end_time_ns") or a["start_time_ns"]) - a["start_time_ns"]) / 1e9
        print(f"[train-kill] attempt {a['status']} after {lasted:.1f}s: {(a.get('status_detail') or '')[:600]}")
    assert info["status"] == "SUCCEEDED", job.logs()[-4000:]
    # the killed attempt errors, a later one finishes. With both DDP workers on one node (0.5 CPU each
    # fit one 1-CPU node) Ray Train 2.60 recorded a second ERRORED attempt before the finishing one in
    # both runs on 2026-12-01 (open question in the issue notes); the restore itself is checked below,
    # from the final checkpoint's history.
    statuses = [a["status"] for a in tried]
    assert len(tried) >= 2 and statuses[-1] == "FINISHED" and set(statuses[:-1]) == {"ERRORED"}, tried

    manifest = fault_storage.read_json(join_uri(cfg.bundle_uri, MANIFEST))
    final = next(iter(checkpoints(fault_storage, manifest["training"]["checkpoint"]).values()))
    assert len(final.resumes) == 1, final.resumes
    resumed = final.resumes[0]
    resumed_at = position(TrainState(stage=resumed["stage"], epoch=resumed["epoch"]))
    print(f"[train-kill] resumed at stage {resumed['stage']} epoch {resumed['epoch']} "
          f"(epoch {resumed_at} of {TOWER_EPOCHS + 1} done), world size {resumed['world_size']}")
    # from the last checkpoint the controller had registered at the kill, not from scratch
    assert registered is not None and resumed_at == registered >= 1, (resumed, registered)
    assert registered < TOWER_EPOCHS + 1  # the kill came mid-run
    # each epoch once in the history, in order: the resumed attempt did not redo finished epochs
    assert [h["global_epoch"] for h in final.history] == list(range(1, TOWER_EPOCHS + 2))
    assert set(final.results) == {"popularity", "fused", "fused_ranked"}
    bundle = ModelBundle.load(fault_storage, cfg.bundle_uri)  # every file present and matching its checksum
    assert bundle.version == cfg.version and manifest["modalities"] == ["text"]
