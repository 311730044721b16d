"""Driver of ``test_index_split_lineage.py``, run through ``ray job submit``: split vectors parts by shard,
wait for the test to kill the node holding the pieces, then build the shards from them.

    python -m tests.faults.index_split_job <root uri>

Writes ``<root>/vectors/part-*.parquet``, splits them (:func:`tessera.index_job.build.split_vectors`),
writes ``<root>/split-done.json`` (the nodes holding the pieces) once every piece exists, waits for
``<root>/go``, builds every shard (:func:`~tessera.index_job.build.build_shards`) and writes
``<root>/result.json``: per shard, whether it holds exactly its planned ids.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import ray

from tessera.index import IndexConfig, assign_shards, load_shard
from tessera.index_job.build import build_shards, index_rows, plan_indexes, read_id_columns, scan_ids, split_vectors
from tessera.index_job.synthetic import random_vectors_table
from tessera.storage import Storage, StorageConfig, join_uri

ITEMS, PARTS, SHARDS, DIM = 20_000, 4, 2, 64  # pieces of ~0.5-1.3 MB: in the object store, not inlined


def main(root: str) -> int:
    ray.init()
    storage = Storage(StorageConfig())
    rng = np.random.default_rng(0)
    parts = []
    for p, rows in enumerate(np.array_split(np.arange(ITEMS), PARTS)):
        uri = join_uri(root, "vectors", f"part-{p:04d}.parquet")
        storage.write_parquet(uri, random_vectors_table([f"item-{i:06d}" for i in rows], DIM, rng, ("text",)))
        parts.append(uri)
    scan = scan_ids(storage, parts, ["fused"])
    plans = plan_indexes(scan, SHARDS, [])
    tables = [read_id_columns(storage, uri) for uri in parts]
    ids = [i for table in tables for i, kept in zip(table.column("item_id").to_pylist(), index_rows(table, "fused"),
                                                      strict=True) if kept]
    planned = [sorted(ids[r] for r in rows) for rows in assign_shards(ids, SHARDS)]
    pieces = split_vectors(storage, plans, parts, scan.part_rows).pieces
    flat = [ref for by_part in pieces for ref in by_part]
    ready, _ = ray.wait(flat, num_returns=len(flat), timeout=300, fetch_local=False)
    assert len(ready) == len(flat), "the split did not finish"
    locations = ray.experimental.get_object_locations(flat)
    nodes = sorted({n for where in locations.values() for n in where["node_ids"]})
    storage.write_json(join_uri(root, "split-done.json"), {"nodes": nodes})
    while not storage.exists(join_uri(root, "go")):
        time.sleep(0.5)
    index_uri = join_uri(root, "index")
    built = build_shards(storage, plans, pieces, index_uri, IndexConfig(), num_cpus=1)["fused"]
    manifests = [b.manifest for b in built]
    shards = [sorted(load_shard(storage, join_uri(index_uri, m.name)).ids.tolist()) for m in manifests]
    storage.write_json(join_uri(root, "result.json"),
                       {"exact": [got == want for got, want in zip(shards, planned, strict=True)],
                        "counts": [len(s) for s in shards]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
