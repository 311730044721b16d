"""Benchmark: the index job's sample of users for its self-check, read a file at a time (ours) vs the
whole interaction log in one task.

    .venv/bin/python bench/users_sample.py [--events 5000000] [--users 500000] [--files 20] [--rounds 3]

An interaction log of ``--events`` events over ``--users`` users (a few heavy users, most with a
handful of events; ``--items`` items, a catalog of every third of them, as the job passes the catalog's
item hashes) is written to the bench's S3 store in ``--files`` Parquet files, then the check's users and the
tuning users (``--user-queries`` each, histories cut to ``--max-history`` events) are sampled both ways, in
turns (``--rounds``):

* **baseline**: what the index job did before 2026-12-06, one Ray task reading every file of the log into
  one table, sampled there in memory, with today's sampling code
  (:func:`tessera.index_job.self_check.sample_users`; the job's old code was slower in memory: 0.33-0.35
  s against 0.13-0.16 s on 1M events in one process, measured by a review). Its time is the task's own
  (``max_calls=1`` gives each round a fresh worker, so a peak from an earlier round cannot count; the
  worker's start is left out).
* **ours**: :func:`tessera.index_job.self_check.select_users` as the job runs it: two passes of Ray
  tasks (``build.split_num_cpus`` each, ``--files-per-task`` files each) over the files, the driver
  keeping the first users of the order and their events only.

Both must return the same users and histories. Peaks are ``VmHWM`` from the task's start (reset through
``/proc/self/clear_refs``; Linux only); for ours, the same sampling run in one task a file after another
gives the most any of its tasks can hold (one file, plus the events it keeps). Last line, one JSON
object: ``baseline_s`` (median of the task's own time) / ``ours_s`` (median, call to sample, its tasks'
starts included), ``ratio``, ``baseline_task_peak_mb``, ``ours_one_process_peak_mb``, ``log_parquet_mb``.
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
from bench.index_check import _peak_mb, _reset_peak  # noqa: E402
from tessera.index import hash_ids  # noqa: E402
from tessera.index_job.config import BuildResources, SelfCheckConfig  # noqa: E402
from tessera.index_job.self_check import UserSample, sample_users, select_users  # noqa: E402
from tessera.interactions import read_interactions  # noqa: E402
from tessera.storage import Storage, StorageConfig, join_uri  # noqa: E402


def write_log(storage: Storage, uri: str, events: int, users: int, items: int, files: int, seed: int) -> float:
    """The log's files (users drawn with a long tail: a few users hold many events); returns its MB."""
    rng = np.random.default_rng(seed)
    per_file = -(-events // files)
    total = 0
    for f in range(files):
        n = min(per_file, events - f * per_file)
        user = np.minimum(rng.pareto(1.2, n) * users / 50, users - 1).astype(np.int64)
        table = pa.table({
            "user_id": pa.array(np.char.add("u", user.astype(str)), pa.string()),
            "item_id": pa.array(np.char.add("it-", rng.integers(0, items, n).astype(str)), pa.string()),
            "ts": pa.array(rng.integers(1_600_000_000_000, 1_700_000_000_000, n), pa.int64()),
            "event": pa.array(np.where(rng.random(n) < 0.9, "view", "buy"), pa.string()),
            "weight": pa.array(rng.random(n).astype(np.float32)),
        })
        part = join_uri(uri, f"part-{f:05d}.parquet")
        storage.write_parquet(part, table)
        total += len(storage.read_bytes(part))
    return total / 2**20


def whole_log_task(storage: Storage, uri: str, cfg: SelfCheckConfig, tuning: int, max_history: int,
                   known: np.ndarray) -> tuple[UserSample, float, float]:
    """The baseline: the whole log read into this task, sampled in memory."""
    _reset_peak()
    t0 = time.perf_counter()
    picked = sample_users(read_interactions(storage, uri), cfg, cfg.user_queries + tuning, 0, max_history, known)
    return UserSample(picked[:cfg.user_queries], picked[cfg.user_queries:]), time.perf_counter() - t0, _peak_mb()


def one_process_task(storage: Storage, uri: str, cfg: SelfCheckConfig, tuning: int, max_history: int,
                     known: np.ndarray) -> float:
    """Ours a file after another in this task: its peak bounds what any of ours' tasks holds."""
    _reset_peak()
    select_users(storage, uri, cfg, tuning, max_history, known=known)
    return _peak_mb()


def _key(sample: UserSample) -> list:
    return [(h.user_id, h.items, h.ts.tolist(), h.weights.tolist(), h.seen) for h in sample.check + sample.tuning]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--files-per-task", type=int, default=8)
    parser.add_argument("--user-queries", type=int, default=200)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = SelfCheckConfig(user_queries=args.user_queries, seed=args.seed)
    known = np.unique(hash_ids([f"it-{i}" for i in range(0, args.items, 3)]))
    with bench_stack():
        import ray

        storage = Storage(StorageConfig())
        storage.ensure_bucket("s3://tessera-bench")
        uri = f"s3://tessera-bench/users-sample/{int(time.time())}"
        log_mb = write_log(storage, uri, args.events, args.users, args.items, args.files, args.seed)
        baseline = ray.remote(num_cpus=1, max_calls=1)(whole_log_task)
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        samples = []
        for r in range(args.rounds):
            for name in ("baseline", "ours")[::1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                if name == "baseline":
                    sample, task_s, peak = ray.get(baseline.remote(storage, uri, cfg, args.user_queries,
                                                                   args.max_history, known))
                    run = {"wall_s": time.perf_counter() - t0, "task_s": task_s, "peak_mb": peak}
                else:
                    sample = select_users(storage, uri, cfg, args.user_queries, args.max_history, known=known,
                                          task_options={"num_cpus": BuildResources().split_num_cpus},
                                          files_per_task=args.files_per_task)
                    run = {"wall_s": time.perf_counter() - t0}
                samples.append(_key(sample))
                runs[name].append(run)
                print(f"[bench] round {r} {name}: {json.dumps(run)}", flush=True)
        assert all(s == samples[0] for s in samples), "the two ways sampled different users or histories"
        one = ray.remote(num_cpus=1, max_calls=1)(one_process_task)
        ours_peak = ray.get(one.remote(storage, uri, cfg, args.user_queries, args.max_history, known))

    def median(name: str) -> float:
        return statistics.median(run["task_s" if name == "baseline" else "wall_s"] for run in runs[name])

    print(json.dumps({
        "events": args.events, "users": args.users, "files": args.files, "log_parquet_mb": round(log_mb, 1),
        "sampled_users": len(samples[0]), "history_events": sum(len(s[1]) for s in samples[0]),
        "baseline_s": round(median("baseline"), 2), "ours_s": round(median("ours"), 2),
        "ratio": round(median("baseline") / median("ours"), 2),
        "baseline_task_peak_mb": round(max(run["peak_mb"] for run in runs["baseline"])),
        "ours_one_process_peak_mb": round(ours_peak),
        "rounds": {name: [{k: round(v, 3) for k, v in run.items()} for run in rs] for name, rs in runs.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
