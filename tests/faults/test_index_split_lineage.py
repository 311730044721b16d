"""The node holding the index job's split pieces is killed before the shard builds: Ray makes the lost
pieces again by re-running their split tasks (lineage reconstruction), and every shard is built exact.

The head has no CPU, so the split tasks run on the one worker node; once every piece exists the node
is SIGKILLed and a fresh node added, and the builds start (driver: ``tests/faults/index_split_job.py``).
"""

from __future__ import annotations

import time
import uuid

import pytest

from tessera.storage import join_uri

from .conftest import FAULT_ROOT

RAY_HEAD = {"num_cpus": 0, "num_gpus": 0}


@pytest.mark.slow
def test_split_pieces_lost_with_their_node_are_made_again(ray_cluster, fault_storage):
    first = ray_cluster.add_node(num_cpus=2)
    root = join_uri(FAULT_ROOT, f"index-split-{uuid.uuid4().hex[:8]}")
    job = ray_cluster.submit("python", "-m", "tests.faults.index_split_job", root)
    while not fault_storage.exists(join_uri(root, "split-done.json")):
        assert time.monotonic() - job.submitted_at < 300, job.logs()[-3000:]
        assert job.info()["status"] in ("PENDING", "RUNNING"), job.logs()[-3000:]
        time.sleep(0.5)
    held_by = fault_storage.read_json(join_uri(root, "split-done.json"))["nodes"]
    assert held_by == [ray_cluster.node_id(first)]  # every piece lives on the node about to die, and only there
    first.kill()
    while ray_cluster.node_id(first, alive=False) is None:
        time.sleep(0.5)
    second = ray_cluster.add_node(num_cpus=2)
    fault_storage.write_bytes(join_uri(root, "go"), b"")
    info = job.wait(300)
    assert info["status"] == "SUCCEEDED", job.logs()[-4000:]
    result = fault_storage.read_json(join_uri(root, "result.json"))
    assert result["exact"] == [True, True] and sum(result["counts"]) > 0
    runs = [t for t in ray_cluster.state("tasks") if t["name"] == "split_part"]
    again = [t for t in runs if t["node_id"] == ray_cluster.node_id(second)]
    assert again, f"no split task ran again on the new node: {[(t['node_id'], t['state']) for t in runs]}"
    print(f"\n[index-split] {len(runs)} split task runs, {len(again)} of them again on the new node; "
          f"shards {result['counts']}")
