"""The object store restarted (stopped, then started again on the same ports and data) while the
embedding job fetches media: transient storage errors are retried and nothing is lost.

The store goes down once every items file is read and an encoder is up; it stays down until a worker
has logged a storage retry (a request met the store down), and DOWN_S seconds more: longer than
botocore's own retries last, so the job lives through it only if the library retries beyond them.
"""

from __future__ import annotations

import re
import time

import pytest

from tessera.embed.output import list_parts
from tessera.storage import join_uri

from .conftest import check_run, encoder_actors, write_embed_config

RAY_HEAD = {"num_cpus": 2, "num_gpus": 0}
MODALITIES = ("image", "audio")  # the two that fetch media from the store
DOWN_S = 10.0
# the stages that talk to the store: reads, media fetches, part writes, and the decode tasks and encoder
# actors, which read their model's files from the store when a new worker starts (retried the same way)
S3_STAGES = ("read_items", "fetch", "write_batch", "decode", "EncodeActor")


def store_tasks(cluster) -> list[dict]:
    """The job's Ray Data tasks that talk to the store (state API rows)."""
    return [t for t in cluster.state("tasks") if any(f"({s})" in t.get("name", "") for s in S3_STAGES)]


def retries_logged(logs: str) -> int:
    """Storage retries the job's workers logged (Ray folds repeated lines into "[repeated Nx ...]")."""
    lines = [ln for ln in logs.splitlines() if "storage: " in ln and "failed" in ln and "retry" in ln]
    return sum(int(m.group(1)) if (m := re.search(r"\[repeated (\d+)x", ln)) else 1 for ln in lines)


@pytest.mark.slow
def test_object_store_restarted_mid_embedding(ray_cluster, fault_s3, fault_corpus, fault_weights, fault_storage,
                                              tmp_path):
    config = write_embed_config(tmp_path / "embed.yaml", fault_corpus, fault_weights, "s3-restart",
                                modalities=MODALITIES)
    run_uri = join_uri(fault_corpus["config"].root, "embeddings", "s3-restart")
    job = ray_cluster.submit("python", "-m", "jobs.embed", "--config", str(config))

    # every items file read and an encoder up: from here on the job fetches media and writes parts
    n_files = fault_corpus["config"].num_item_parts
    while True:
        assert time.monotonic() - job.submitted_at < 240, job.logs()[-3000:]
        status = job.info()["status"]
        assert status in ("PENDING", "RUNNING"), f"job {status} before the restart:\n{job.logs()[-3000:]}"
        reads = [t for t in store_tasks(ray_cluster) if "(read_items)" in t["name"] and t["state"] == "FINISHED"]
        if len(reads) >= n_files and encoder_actors(ray_cluster, state="ALIVE"):
            break
        time.sleep(0.5)
    parts_before = len(list_parts(fault_storage, run_uri))
    t_down = time.time()
    stop_s = fault_s3.stop()
    # down until the job has met the store down (a worker logged a storage retry), then DOWN_S more: a task
    # merely running while the store is down may not touch it (fresh-clone CI: every fetch had finished, the
    # encoder actor was still loading from its node cache, and no request failed)
    retries_while_down = 0
    while not retries_while_down and time.time() - t_down < 180 and job.info()["status"] == "RUNNING":
        time.sleep(0.5)
        retries_while_down = retries_logged(job.logs())
    hit = [t for t in store_tasks(ray_cluster) if t.get("start_time_ms")
           and (t.get("end_time_ms") or 1e15) / 1e3 > t_down + 1.0]
    time.sleep(DOWN_S)
    start_s = fault_s3.start()
    t_up = time.time()
    info = job.wait(timeout_s=240)
    logs = job.logs()
    retries = retries_logged(logs)
    print(f"\n[s3-restart] store down {t_up - t_down:.1f}s (stop {stop_s:.1f}s, start {start_s:.1f}s) with "
          f"{parts_before} parts written; tasks running meanwhile: {sorted(t['name'] for t in hit)}; "
          f"{retries} storage retries logged; job {info['status']} {time.time() - t_up:.1f}s after the store "
          f"came back, {time.monotonic() - job.submitted_at:.1f}s after submission")
    assert retries_while_down, f"no storage request failed while the store was down; job {info['status']}:\n" \
        f"{logs[-6000:]}"
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    assert retries > 0
    manifest = check_run(fault_storage, run_uri, fault_corpus["truth"], MODALITIES)
    assert manifest["timings"]["resumed_from"] == 0  # retried in place, not by a rerun
    assert manifest["output"]["parts"] > parts_before  # the restart came mid-run
    print(f"[s3-restart] {manifest['input']['items']} items in {manifest['output']['parts']} parts, each once; "
          f"counts {manifest['counts']}")
