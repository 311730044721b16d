"""Benchmark: getting each index shard its vectors, the index job's split (ours) vs every shard reading every part.

    .venv/bin/python bench/index_split.py [--items 200000] [--parts N] [--shards 4] [--dim 64] [--rounds 2]

What it measures is the step between the item vectors and the ScaNN builds, which is all that
differs between the two (the builds and their saves are the same code either way):

* **baseline**: one Ray task per shard reads every vectors part and keeps its own rows (``is_in`` on
  the shard's ids), as the index job did before the split: each part is read ``shards x indexes``
  times.
* **ours**: :func:`tessera.index_job.build.split_vectors` (one task per part reads it once and returns
  a piece per shard into Ray's object store), then one task per shard assembles its pieces
  (:func:`~tessera.index_job.build.assemble_shard`, the build task's first step).

Each task returns its shard's row count, checked against the plan. Before that, the two planners,
also in turns: the baseline reads every id onto the driver and splits them with
:func:`~tessera.index.assign_shards`; ours hashes each part's ids in a task and finds the cuts from
the hashes (:func:`~tessera.index_job.build.scan_ids`, :func:`~tessera.index_job.build.plan_indexes`);
both must give the same shard sizes. ``plan_baseline_s`` / ``plan_s`` (medians), then one more run
of each under ``tracemalloc`` for the driver's peak Python allocation (numpy arrays and id strings
included; not timed, tracing slows allocation-heavy code).

The parts are written to the bench's own SeaweedFS (``bench/_stack.py``) as the vector stage writes
them: ``item_id``, ``status``, ``modalities``, a fused column and two modality columns
(``fixed_size_list<float32>[dim]``, unit random vectors: the step moves bytes and does not look at
them; ~30% of the rows lack one modality).
Both run in turns (``--rounds``) on one local Ray with the machine's CPUs. Last line, one JSON object:
``baseline_s`` / ``split_s`` (medians), ``ratio`` (baseline / ours), ``part_reads_baseline`` /
``part_reads_split`` and the bytes of the parts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench._stack import bench_stack  # noqa: E402
from tessera.index import assign_shards  # noqa: E402
from tessera.index_job.build import (  # noqa: E402
    assemble_shard,
    group_parts,
    index_rows,
    plan_indexes,
    read_id_columns,
    scan_ids,
    split_vectors,
    vector_dims,
)
from tessera.index_job.config import BuildResources, VectorStageConfig  # noqa: E402
from tessera.index_job.synthetic import random_vectors_table  # noqa: E402
from tessera.index_job.vectors import column_matrix  # noqa: E402
from tessera.storage import Storage, StorageConfig, join_uri  # noqa: E402

MODALITIES = ["text", "image"]


def write_parts(storage: Storage, root: str, items: int, parts: int, dim: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    uris = []
    for p, rows in enumerate(np.array_split(np.arange(items), parts)):
        uri = join_uri(root, f"part-{p:05d}.parquet")
        storage.write_parquet(uri, random_vectors_table([f"item-{i:08d}" for i in rows], dim, rng, MODALITIES))
        uris.append(uri)
    return uris


def read_own_rows(storage: Storage, parts: list[str], column: str, ids: list[str]) -> int:
    """The baseline task: every part read, the shard's rows kept (the old ``read_rows`` with ids)."""
    value_set = pa.array(ids, pa.string())
    blocks, count = [], 0
    for uri in parts:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["item_id", column])
        table = table.filter(pc.and_(pc.is_valid(table.column(column)), pc.is_in(table.column("item_id"),
                                                                                  value_set=value_set)))
        if table.num_rows:
            blocks.append(column_matrix(table.column(column), table.schema.field(column).type.list_size))
            count += table.num_rows
    np.concatenate(blocks)  # the shard's matrix, as the build got it
    return count


def plan_from_ids(storage: Storage, parts: list[str], num_shards: int) -> dict[str, list[list[str]]]:
    """The baseline planner (the index job's before the hash scan): every id read onto the driver,
    each index's ids split by :func:`~tessera.index.assign_shards`; the shards' id lists by index."""
    table = pa.concat_tables([read_id_columns(storage, uri) for uri in parts])
    ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
    shards = {}
    for name in ["fused", *MODALITIES]:
        members = ids[index_rows(table, name)].tolist()
        shards[name] = [[members[r] for r in rows] for rows in assign_shards(members, min(num_shards, len(members)))]
    return shards


def assemble_task(expected: int, *pieces) -> int:
    ids, _ = assemble_shard(pieces, expected, "bench")
    return len(ids)


def run_baseline(storage, plans, parts, split_num_cpus: float, shard_ids, part_rows) -> float:
    import ray

    task = ray.remote(read_own_rows).options(num_cpus=1)
    t0 = time.perf_counter()
    refs = [(task.remote(storage, parts, plan.column, ids), len(ids))
            for plan in plans for ids in shard_ids[plan.name]]
    assert all(ray.get(ref) == n for ref, n in refs)
    return time.perf_counter() - t0


def run_split(storage, plans, parts, split_num_cpus: float, shard_ids, part_rows) -> float:
    import ray

    task = ray.remote(assemble_task).options(num_cpus=1)
    t0 = time.perf_counter()
    pieces = split_vectors(storage, plans, parts, part_rows, num_cpus=split_num_cpus).pieces
    expected = [size for plan in plans for size in plan.sizes]
    refs = [task.remote(n, *shard_pieces) for n, shard_pieces in zip(expected, pieces, strict=True)]
    del pieces
    assert ray.get(refs) == expected
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--parts", type=int, default=None,
                        help="vectors parts (default: items / 1024, the job's vectors.read_batch_rows)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--split-num-cpus", type=float, default=BuildResources().split_num_cpus,
                        help="CPUs per split task (the job's build.split_num_cpus)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.parts = args.parts or max(1, args.items // VectorStageConfig().read_batch_rows)
    with bench_stack():
        storage = Storage(StorageConfig())
        storage.ensure_bucket("s3://tessera-bench")
        root = f"s3://tessera-bench/index-split/{int(time.time())}"
        t0 = time.perf_counter()
        parts = write_parts(storage, root, args.items, args.parts, args.dim, args.seed)
        write_s = time.perf_counter() - t0
        part_bytes = sum(storage.filesystem(u)[0].get_file_info(storage.filesystem(u)[1]).size for u in parts)
        plan: dict[str, list[float]] = {"baseline": [], "ours": []}  # the planners, in turns: seconds ...
        peak_mb = {}  # ... then once more each under tracemalloc (it slows allocation-heavy code): peak MB
        for r in range(args.rounds + 1):
            for name in ("baseline", "ours")[::1 if r % 2 == 0 else -1]:
                traced = r == args.rounds
                if traced:
                    tracemalloc.start()
                t0 = time.perf_counter()
                if name == "baseline":
                    shard_ids = plan_from_ids(storage, parts, args.shards)
                else:
                    scan = scan_ids(storage, parts, ["fused", *MODALITIES], args.split_num_cpus)
                    plans = plan_indexes(scan, args.shards, MODALITIES)
                if traced:
                    peak_mb[name] = tracemalloc.get_traced_memory()[1] / 2**20
                    tracemalloc.stop()
                else:
                    plan[name].append(time.perf_counter() - t0)
        split_tasks = len(group_parts(parts, scan.part_rows, plans,
                                      vector_dims(storage, parts[0], ["fused", *MODALITIES])))
        assert {p.name: p.sizes for p in plans} == {k: [len(s) for s in v] for k, v in shard_ids.items()}
        times: dict[str, list[float]] = {"baseline": [], "split": []}
        for r in range(args.rounds):
            for name, fn in (("baseline", run_baseline), ("split", run_split))[::1 if r % 2 == 0 else -1]:
                times[name].append(fn(storage, plans, parts, args.split_num_cpus, shard_ids, scan.part_rows))
                print(f"[bench] round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    baseline, split = statistics.median(times["baseline"]), statistics.median(times["split"])
    num_shards = sum(p.num_shards for p in plans)
    print(json.dumps({
        "items": args.items, "parts": args.parts, "dim": args.dim, "split_num_cpus": args.split_num_cpus,
        "indexes": len(plans), "shards_per_index": args.shards, "part_bytes": part_bytes,
        "write_parts_s": round(write_s, 2),
        "plan_baseline_s": round(statistics.median(plan["baseline"]), 3),
        "plan_s": round(statistics.median(plan["ours"]), 3),
        "plan_baseline_driver_peak_mb": round(peak_mb["baseline"], 1), "plan_driver_peak_mb": round(peak_mb["ours"], 1),
        "baseline_s": round(baseline, 3), "split_s": round(split, 3), "ratio": round(baseline / split, 2),
        "rounds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "part_reads_baseline": num_shards * args.parts, "part_reads_split": args.parts, "split_tasks": split_tasks,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
