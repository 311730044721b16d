"""Benchmark: the index job's recall self-check, a shard at a time (ours) vs one task holding the whole column.

    .venv/bin/python bench/index_check.py [--items 300000] [--shards 4] [--dim 64] [--queries 200] [--rounds 2]

One fused index of ``--shards`` shards is built once (the job's own split and build tasks, unit random
vectors written as the vector stage writes them, ScaNN settings from ``IndexConfig()``), then its
recall@10 on ``--queries`` sampled item vectors (each with its own item excluded) is measured both ways,
in turns (``--rounds``):

* **baseline** (the index job before 2026-12-06): one Ray task reads every vector of the column from
  the parts, loads every saved shard (checksums verified) and runs
  :func:`tessera.index.measure_recall` over the whole index.
* **ours**: one task per shard, given that shard's pieces from the split (the build task's input: in
  the job the check runs in the build task, on the vectors it already holds), loads its shard back,
  measures its share (:func:`tessera.index_job.self_check.check_saved_shard`); the driver merges the
  shares (:func:`~tessera.index_job.self_check.combine_checks`).

Both must report the same recall on the same query items. Each task returns its peak RSS from its
start (``VmHWM``, reset through ``/proc/self/clear_refs``: the worker's imports included, the same on
both sides; Linux only); ``max_calls=1`` ends each worker after its task. Last line, one JSON
object: ``baseline_s`` / ``ours_s`` (medians, the check's wall time from submit to the figure, a
worker's start included where Ray starts one), ``ratio``, the time inside the
tasks (``baseline_task_s``, ``ours_longest_shard_check_s``: what a build task adds in the job),
``baseline_task_peak_mb`` and ``ours_max_task_peak_mb``, and the recall (the same both ways).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench._stack import bench_stack  # noqa: E402
from bench.index_split import write_parts  # noqa: E402
from tessera.index import IndexConfig, ShardedIndex, load_shard, measure_recall  # noqa: E402
from tessera.index.shard_io import manifest_sha256  # noqa: E402
from tessera.index_job.build import (  # noqa: E402
    assemble_shard,
    build_shards,
    index_rows,
    plan_indexes,
    scan_ids,
    split_vectors,
)
from tessera.index_job.config import SelfCheckConfig, VectorStageConfig  # noqa: E402
from tessera.index_job.self_check import check_saved_shard, combine_checks, gather_rows, item_sample  # noqa: E402
from tessera.index_job.vectors import FUSED, column_matrix  # noqa: E402
from tessera.storage import Storage, StorageConfig, join_uri  # noqa: E402


def _reset_peak() -> None:
    """Start the task's peak RSS from here (a reused worker's earlier peaks do not count)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _peak_mb() -> float:
    """The process's peak RSS since :func:`_reset_peak` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def whole_column_check(storage: Storage, index_uri: str, shas: dict[str, str], parts: list[str],
                       sample: np.ndarray, k: int) -> tuple[float, list[str], float, float]:
    """The baseline task, as the job's check task was: every vector of the fused index read here (the
    rows of ``status == ok``: every row has a fused vector, an item without a usable modality too), every
    shard loaded against its ``shard.json`` checksum, the whole index measured; returns the recall, the
    query items, the task's seconds and its peak RSS."""
    _reset_peak()
    t0 = time.perf_counter()
    ids: list[str] = []
    blocks = []
    for uri in parts:
        table = storage.read_parquet(uri, ["item_id", "status", FUSED])
        table = table.filter(pa.array(index_rows(table, "fused")))
        ids.extend(table.column("item_id").to_pylist())
        blocks.append(column_matrix(table.column(FUSED), table.schema.field(FUSED).type.list_size))
    vectors = np.concatenate(blocks)
    index = ShardedIndex([load_shard(storage, join_uri(index_uri, name), expected_manifest_sha256=sha)
                          for name, sha in shas.items()])
    query_ids = [ids[r] for r in sample]
    check = measure_recall(index, vectors[sample], ids, vectors, k, query_ids=query_ids)
    return check.recall, query_ids, time.perf_counter() - t0, _peak_mb()


def shard_check(num_items: int, shard_uri: str, sha256: str, storage: Storage, k: int, item_queries,
                *pieces) -> tuple[dict, float, float]:
    """Ours, one shard: its pieces assembled (the build task's vectors), its share measured; returns the
    share, the seconds of the check itself (in the job, what the build task adds) and the peak RSS."""
    _reset_peak()
    ids, vectors = assemble_shard(pieces, num_items, shard_uri)
    t0 = time.perf_counter()
    share = check_saved_shard(storage, shard_uri, sha256, ids, vectors, None, item_queries, k)
    return share, time.perf_counter() - t0, _peak_mb()


def run_baseline(storage, index_uri, parts, sample, k, manifests=None, query_ids=None, **_) -> dict:
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(whole_column_check)
    shas = {m.name: manifest_sha256(m) for m in manifests}
    t0 = time.perf_counter()
    recall, used, task_s, peak = ray.get(task.remote(storage, index_uri, shas, parts, sample, k))
    assert used == query_ids, "the baseline's queries are not the split's sample"
    return {"wall_s": time.perf_counter() - t0, "recall": recall, "queries": len(used), "task_s": task_s,
            "peak_mb": peak}


def run_ours(storage, index_uri, parts, sample, k, plan=None, pieces=None, items=None, manifests=None, **_):
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(shard_check)
    t0 = time.perf_counter()
    refs = [task.remote(size, join_uri(index_uri, m.name), manifest_sha256(m), storage, k, items, *shard_pieces)
            for size, m, shard_pieces in zip(plan.sizes, manifests, pieces, strict=True)]
    results = ray.get(refs)
    check = combine_checks([r[0] for r in results], k, {"item": "{n}", "user": "{n}"})["item"]
    return {"wall_s": time.perf_counter() - t0, "recall": check.recall, "queries": check.num_queries,
            "task_s": max(r[1] for r in results),
            "peak_mb": max(r[2] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=300_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts_count = max(1, args.items // VectorStageConfig().read_batch_rows)
    cfg = SelfCheckConfig(item_queries=args.queries, seed=args.seed)
    with bench_stack():
        import ray

        storage = Storage(StorageConfig())
        storage.ensure_bucket("s3://tessera-bench")
        root = f"s3://tessera-bench/index-check/{int(time.time())}"
        parts = write_parts(storage, root, args.items, parts_count, args.dim, args.seed)
        scan = scan_ids(storage, parts, ["fused"])
        (plan,) = plan_indexes(scan, args.shards, [])
        sample = item_sample(plan.num_items, cfg)
        split = split_vectors(storage, [plan], parts, scan.part_rows, samples={"fused": sample})
        items = ray.remote(gather_rows).remote(*split.samples["fused"])
        index_uri = join_uri(root, "index")
        t0 = time.perf_counter()
        built = build_shards(storage, [plan], split.pieces, index_uri, IndexConfig(), num_cpus=1)["fused"]
        build_s = time.perf_counter() - t0
        manifests = [b.manifest for b in built]
        query_ids = ray.get(items)[0]
        shared = {"plan": plan, "pieces": split.pieces, "items": items, "manifests": manifests, "query_ids": query_ids}
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for r in range(args.rounds):
            for name, fn in (("baseline", run_baseline), ("ours", run_ours))[::1 if r % 2 == 0 else -1]:
                runs[name].append(fn(storage, index_uri, parts, sample, cfg.k, **shared))
                print(f"[bench] round {r} {name}: {json.dumps(runs[name][-1])}", flush=True)
        assert len({(run["recall"], run["queries"]) for name in runs for run in runs[name]}) == 1, runs
        assert runs["ours"][0]["queries"] == len(sample)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    print(json.dumps({
        "items": args.items, "dim": args.dim, "shards": args.shards, "queries": len(sample), "k": cfg.k,
        "shard_modes": sorted({m.params.mode for m in manifests}), "build_s": round(build_s, 1),
        "column_mb": round(plan.num_items * args.dim * 4 / 2**20, 1),
        "baseline_s": round(median("baseline", "wall_s"), 2), "ours_s": round(median("ours", "wall_s"), 2),
        "ratio": round(median("baseline", "wall_s") / median("ours", "wall_s"), 2),
        "baseline_task_s": round(median("baseline", "task_s"), 2),
        "ours_longest_shard_check_s": round(median("ours", "task_s"), 2),
        "baseline_task_peak_mb": round(max(run["peak_mb"] for run in runs["baseline"])),
        "ours_max_task_peak_mb": round(max(run["peak_mb"] for run in runs["ours"])),
        "recall": runs["ours"][0]["recall"],
        "rounds": {name: [{k: round(v, 3) for k, v in run.items()} for run in rs] for name, rs in runs.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
