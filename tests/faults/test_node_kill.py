"""A worker node killed (SIGKILL to its raylet's process group) while encoder actors run on it: the
embedding job submitted with ``ray job submit`` still completes, every item exactly once.

The cluster is a head (1 CPU, no GPU: it runs the job's driver and CPU stages) and two worker nodes
with one logical GPU each. Every encoder pool asks for 0.3 GPU, so encoder actors run on the worker
nodes only, and one node alone can hold every pool once the other is gone. The test waits until an
encoder actor on a worker node has encoded a batch, then kills that node. (Also here: a local output path
refused on a cluster of several nodes.)
"""

from __future__ import annotations

import time

import pytest

from tessera.embed.output import list_parts
from tessera.storage import join_uri

from .conftest import check_run, encoder_actors, write_embed_config

RAY_HEAD = {"num_cpus": 1, "num_gpus": 0}
MODALITIES = ("image", "text")


@pytest.mark.slow
def test_worker_node_killed_mid_embedding(ray_cluster, fault_corpus, fault_weights, fault_storage, tmp_path):
    nodes = [ray_cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    config = write_embed_config(tmp_path / "embed.yaml", fault_corpus, fault_weights, "node-kill",
                                modalities=MODALITIES, num_gpus=0.3)
    run_uri = join_uri(fault_corpus["config"].root, "embeddings", "node-kill")
    job = ray_cluster.submit("python", "-m", "jobs.embed", "--config", str(config))

    # wait until an encoder actor on a worker node has encoded a batch: data flows through that node
    node_ids = {ray_cluster.node_id(n): n for n in nodes}
    victim = None
    while victim is None:
        assert time.monotonic() - job.submitted_at < 240, job.logs()[-3000:]
        status = job.info()["status"]
        assert status in ("PENDING", "RUNNING"), f"job {status} before the kill:\n{job.logs()[-3000:]}"
        on_workers = {a["actor_id"]: a for a in encoder_actors(ray_cluster, state="ALIVE") if a["node_id"] in node_ids}
        tasks = ray_cluster.state("tasks") if on_workers else []
        busy = [t for t in tasks if t.get("actor_id") in on_workers and t.get("type") == "ACTOR_TASK"
                and t["state"] == "FINISHED"]
        if busy:
            victim_id = on_workers[busy[0]["actor_id"]]["node_id"]
            victim = node_ids[victim_id]
            victim_actors = {aid: a["class_name"] for aid, a in on_workers.items() if a["node_id"] == victim_id}
            running = sorted(t["name"] for t in tasks if t.get("node_id") == victim_id and t["state"] == "RUNNING")
        else:
            time.sleep(0.5)
    parts_before = len(list_parts(fault_storage, run_uri))
    t_kill = time.monotonic()
    killed = victim.kill()

    # recovery: the node is declared dead, its encoder actors come back on the surviving node
    marks: dict[str, float] = {}

    def milestones(now: float) -> None:
        if "node_dead" not in marks and ray_cluster.node_id(victim, alive=False):
            marks["node_dead"] = now
        if "actors_back" not in marks:
            rows = {a["actor_id"]: a for a in encoder_actors(ray_cluster)}
            back = [rows.get(aid) for aid in victim_actors]
            if all(r and r["state"] == "ALIVE" and r["node_id"] != victim_id for r in back):
                marks["actors_back"] = now
        if "part_after" not in marks and len(list_parts(fault_storage, run_uri)) > parts_before:
            marks["part_after"] = now

    info = job.wait(240, on_poll=milestones, since=t_kill, every_s=0.5)
    marks["job_done"] = time.monotonic() - t_kill

    print(f"\n[node-kill] killed node {victim.name} ({killed} processes, encoder actors "
          f"{sorted(victim_actors.values())}, running tasks {running})"
          f" with {parts_before} parts written; seconds after the kill: "
          + ", ".join(f"{k} {v:.1f}" for k, v in marks.items())
          + f"; job {time.monotonic() - job.submitted_at:.1f}s from submission")
    assert info["status"] == "SUCCEEDED", job.logs()[-4000:]
    manifest = check_run(fault_storage, run_uri, fault_corpus["truth"], MODALITIES)
    assert manifest["output"]["parts"] > parts_before  # the kill came mid-run: parts were still to write
    assert manifest["timings"]["resumed_from"] == 0  # recovered inside the one attempt, not by a rerun
    print(f"[node-kill] {manifest['input']['items']} items in {manifest['output']['parts']} parts, each once; "
          f"counts {manifest['counts']}")


@pytest.mark.slow
def test_a_local_output_path_on_a_cluster_of_several_nodes_is_refused(ray_cluster, fault_corpus, fault_weights,
                                                                     tmp_path):
    """A local ``output_uri`` is each node's own disk: the job used to encode the whole corpus with its parts
    landing on the worker nodes, then exit 4 ("parts were lost") from the head, on every rerun. Now it exits 2
    at once, naming the key."""
    import yaml

    ray_cluster.add_node(num_cpus=1)
    out = tmp_path / "embeddings"
    config = write_embed_config(tmp_path / "embed.yaml", fault_corpus, fault_weights, "local-out", modalities=("text",))
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "output_uri": str(out)}))
    job = ray_cluster.submit("python", "-m", "jobs.embed", "--config", str(config))
    info = job.wait(180)
    logs = job.logs()
    assert info["status"] == "FAILED", logs[-3000:]
    assert f"output_uri={out}: a local path, but this Ray cluster has" in logs and "TESSERA_SHARED_FS=1" in logs, logs
    assert not out.exists()
