"""The embedding job's driver killed (SIGKILL to the ``python -m jobs.embed`` process) halfway through a
run submitted with ``ray job submit``, then the same job submitted again: the second attempt skips the
parts the first one wrote, leaves them untouched, embeds only the rest and ends with every item once.

The head (2 CPUs, no GPU) runs the driver, the CPU stages and the three encoder pools. The test waits
for the first part on S3 and kills the driver at once: the job ends FAILED, Ray reaps the job's
workers, and no manifest is written. Then it submits the same command again and checks the kept parts
(same ETag, size, modification time), the second attempt's own account of what it skipped (its log
line and the manifest's timings), the whole output against the corpus's truth rows, and the vectors
against a clean run of the same config under another run id (cosine >= 0.9999 each).
"""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tessera.embed.output import list_parts
from tessera.storage import join_uri, parse_uri

from .conftest import check_run, encoder_actors, write_embed_config

RAY_HEAD = {"num_cpus": 2, "num_gpus": 0}
# The first part reaches S3 once all three pools are up; after that the tiny encoders take 120 items in
# about a second (10 of 12 parts were listed by the first poll on an AVX-512 machine, and the kill came
# too late). 600 items in 12 files keep the job writing for several seconds after its first part.
CORPUS = {"num_items": 600, "items_per_part": 50}
MODALITIES = ("image", "audio", "text")
RUN_ID = "resume"
WRITE_BATCH = 10  # rows per part: 600 items make about 60 parts, so a kill lands between parts


def driver_processes(config_path: str) -> list[psutil.Process]:
    """The job's driver: the Python process running ``-m jobs.embed --config <config_path>`` (not the
    ``/bin/sh -c`` the job supervisor may start it through)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "jobs.embed" in cmd and config_path in cmd and "python" in os.path.basename(cmd[0]):
            found.append(proc)
    return found


def part_objects(storage, run_uri: str) -> dict[str, tuple[str, int, float]]:
    """Part files under ``run_uri`` as S3 lists them: key -> (ETag, size, last-modified)."""
    loc = parse_uri(run_uri)
    pages = storage.client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key + "/")
    return {o["Key"]: (o["ETag"], o["Size"], o["LastModified"].timestamp())
            for page in pages for o in page.get("Contents", [])
            if o["Key"].rsplit("/", 1)[-1].startswith("part-") and o["Key"].endswith(".parquet")}


def read_run(storage, run_uri: str) -> dict[str, dict]:
    parts = list_parts(storage, run_uri)
    table = pa.concat_tables([pq.read_table(storage.filesystem(u)[1], filesystem=storage.s3_filesystem())
                              for u in parts])
    return {r["item_id"]: r for r in table.to_pylist()}


def wall_s(info: dict) -> float:
    """A finished job's run time as the Jobs API records it (ms timestamps)."""
    return (info["end_time"] - info["start_time"]) / 1000


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(ray_cluster, fault_corpus, fault_weights, fault_storage, tmp_path):
    t_test = time.monotonic()
    config = write_embed_config(tmp_path / "embed.yaml", fault_corpus, fault_weights, RUN_ID, modalities=MODALITIES)
    data = yaml.safe_load(config.read_text())
    data["write_batch_size"] = WRITE_BATCH
    config.write_text(yaml.safe_dump(data))
    root = fault_corpus["config"].root
    run_uri = join_uri(root, "embeddings", RUN_ID)
    manifest_uri = join_uri(run_uri, "_MANIFEST.json")
    n_items = len(fault_corpus["truth"])
    entrypoint = ("python", "-m", "jobs.embed", "--config", str(config))

    # first attempt: kill its driver as soon as one part is on S3
    first = ray_cluster.submit(*entrypoint)
    while not list_parts(fault_storage, run_uri):
        assert time.monotonic() - first.submitted_at < 300, first.logs()[-3000:]
        status = first.info()["status"]
        assert status in ("PENDING", "RUNNING"), f"job {status} before the kill:\n{first.logs()[-3000:]}"
        time.sleep(0.05)
    t_first_part = time.monotonic() - first.submitted_at
    drivers = driver_processes(str(config))
    assert len(drivers) == 1, [p.info["cmdline"] for p in drivers]
    os.kill(drivers[0].pid, signal.SIGKILL)
    t_kill = time.monotonic() - first.submitted_at
    at_kill = len(list_parts(fault_storage, run_uri))
    drivers[0].wait(timeout=15)  # not our child: psutil sees it gone, without its exit status

    info = first.wait(timeout_s=120)
    t_failed = time.monotonic() - first.submitted_at
    at_failed = len(list_parts(fault_storage, run_uri))
    assert info["status"] == "FAILED", info
    assert not driver_processes(str(config))
    # Ray reaps the dead driver's workers: nothing of the first attempt writes on behind the second one
    deadline = time.monotonic() + 60
    while encoder_actors(ray_cluster, state="ALIVE"):
        assert time.monotonic() < deadline, encoder_actors(ray_cluster, state="ALIVE")
        time.sleep(0.5)
    assert not fault_storage.exists(manifest_uri)
    kept = part_objects(fault_storage, run_uri)
    loc = parse_uri(run_uri)
    uploads = fault_storage.client().list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.key + "/")
    abandoned = len(uploads.get("Uploads", []))  # parts cut off mid-upload: never visible as objects
    kept_rows = read_run(fault_storage, run_uri)  # every part whole: a half-written one fails to read here
    assert kept and 0 < len(kept_rows) < n_items, (
        f"{len(kept)} parts ({len(kept_rows)} of {n_items} items) kept: first part {t_first_part:.1f}s after "
        f"submission, kill at {t_kill:.1f}s with {at_kill} parts listed, FAILED at {t_failed:.1f}s with {at_failed}")

    # second attempt: the same command, the same run id and output
    second = ray_cluster.submit(*entrypoint)
    second_info = second.wait(timeout_s=400)
    t_total = time.monotonic() - first.submitted_at
    logs = second.logs()
    assert second_info["status"] == "SUCCEEDED", logs[-4000:]
    said = re.search(r"\[embed\] (\d+) items in \d+ files; (\d+) already done", logs)
    assert said and (int(said[1]), int(said[2])) == (n_items, len(kept_rows)), logs[-3000:]
    manifest = check_run(fault_storage, run_uri, fault_corpus["truth"], MODALITIES)
    assert manifest["timings"]["resumed_from"] == len(kept_rows)
    assert manifest["timings"]["items_written_this_attempt"] == n_items - len(kept_rows)
    after = part_objects(fault_storage, run_uri)
    assert {k: after[k] for k in kept} == kept, "a part of the killed attempt was rewritten"
    new_parts = set(after) - set(kept)
    assert new_parts and manifest["output"]["parts"] == len(kept) + len(new_parts)
    resumed = read_run(fault_storage, run_uri)
    assert all(resumed[i] == row for i, row in kept_rows.items())

    print(f"\n[embed-resume] first part {t_first_part:.1f}s after submission; driver SIGKILLed at "
          f"{t_kill:.1f}s ({at_kill} parts listed), job FAILED at {t_failed:.1f}s ({at_failed} parts); "
          f"{abandoned} unfinished multipart uploads; kept {len(kept)} parts ({len(kept_rows)} of {n_items} "
          f"items); second attempt wrote {len(new_parts)} parts ({n_items - len(kept_rows)} items) in "
          f"{wall_s(second_info):.1f}s (pipeline {manifest['timings']['pipeline_s']}s); "
          f"{t_total:.1f}s from the first submission to the second attempt's end")

    # a clean run of the same config under another run id: the same errors and nulls, the same vectors
    clean = ray_cluster.submit(*entrypoint, "--run-id", f"{RUN_ID}-clean")
    clean_info = clean.wait(timeout_s=400)
    assert clean_info["status"] == "SUCCEEDED", clean.logs()[-4000:]
    clean_uri = join_uri(root, "embeddings", f"{RUN_ID}-clean")
    clean_manifest = check_run(fault_storage, clean_uri, fault_corpus["truth"], MODALITIES)
    assert manifest["counts"] == clean_manifest["counts"]
    assert {m: (e["name"], e["dim"], e["weights_checksum"]) for m, e in manifest["encoders"].items()} == \
        {m: (e["name"], e["dim"], e["weights_checksum"]) for m, e in clean_manifest["encoders"].items()}
    reference = read_run(fault_storage, clean_uri)
    assert set(reference) == set(resumed)
    cosines = {m: [] for m in MODALITIES}
    for iid, row in resumed.items():
        ref = reference[iid]
        for m in MODALITIES:
            assert row[f"{m}_error"] == ref[f"{m}_error"], (iid, m)
            assert (row[m] is None) == (ref[m] is None), (iid, m)
            if row[m] is not None:
                cosines[m].append(float(np.dot(row[m], ref[m])))
    worst = {m: min(c) for m, c in cosines.items() if c}
    assert set(worst) == set(MODALITIES) and all(c >= 0.9999 for c in worst.values()), worst

    print(f"[embed-resume] clean run {wall_s(clean_info):.1f}s; worst cosine resumed vs clean: "
          f"{', '.join(f'{m} {c:.6f}' for m, c in worst.items())}; test {time.monotonic() - t_test:.1f}s")
