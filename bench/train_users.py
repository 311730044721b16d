"""Benchmark: the user data every training worker holds, one shared copy a node (ours) vs one a worker.

    .venv/bin/python bench/train_users.py [--events 4000000] [--users 100000] [--workers 2] [--rounds 2]

A users dataset of ``--users`` user records (``--events`` events, a long tail: a few users hold many; the
time split of the job, :func:`tessera.train.examples.user_records`) is materialised in a local Ray
(started here, 2 CPUs), then ``--workers`` actors (0.5 CPU each, as the tests' training workers; 1 CPU
in all past 2) get
what the training loop needs from it, both ways, in turns (``--rounds``, fresh actors each time):

* **baseline**: what each worker did before 2026-12-07: read the whole users dataset
  (:func:`tessera.train.shared.users_table`) and derive the timelines, counts and (rank 0) evaluation sets
  itself (:func:`tessera.train.shared.derive`), keeping the records for the run.
* **ours**: :func:`tessera.train.shared.share_user_data` as the job runs it: one task derives them, every
  worker ``ray.get``-s them from the object store (rank 0 the evaluation sets too) and reads every page of
  the timelines once (a training run reads them all within an epoch).

Both must give the same histories. Memory is what the node holds for the workers' user data: for the baseline
the USS (pages no other process maps, from ``/proc/self/smaps_rollup``) each worker adds, summed; for ours the
same sum plus the three objects in the object store, counted once (their pages are shared by the processes
mapping them, so no USS shows them). Time is from the first worker asking to the last one holding its data
(ours: the deriving task's included; its peak, one process's, as one baseline worker's, is not counted: it is
gone when training starts; the heap its idle worker process keeps is counted in ``*_all_workers_mb``: the USS
every Ray worker process of the machine added, the store included). Last line, one JSON object:
``baseline_node_mb`` / ``ours_node_mb`` (median over rounds), ``node_mb_ratio``, ``ours_store_mb``,
``baseline_all_workers_mb`` / ``ours_all_workers_mb``, ``timelines_mb`` (the timelines' arrays alone), ``baseline_s``
/ ``ours_s``, ``s_ratio``, ``same_histories``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from tessera.train.examples import next_item_examples, user_records  # noqa: E402
from tessera.train.shared import derive, share_user_data, users_table  # noqa: E402

NUM_ITEMS = 50_000
MAX_HISTORY = 20


def _users_batch(batch: dict[str, np.ndarray], counts: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The records of the users in ``batch["id"]``, ``counts[u]`` events each."""
    rows = []
    for u in batch["id"].tolist():
        rng = np.random.default_rng([seed, u])
        n = int(counts[u])
        rows.append(user_records({"user_id": np.array([f"user-{u:08d}"] * n),
                                  "item_row": rng.integers(1, NUM_ITEMS, n), "ts": np.sort(rng.integers(0, 10**12, n)),
                                  "weight": np.ones(n, np.float32)}, holdout=1, validation=1))
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def make_users(events: int, users: int, seed: int = 0) -> ray.data.Dataset:
    """A materialised users dataset; per-user event counts with a long tail summing to about ``events``."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, users) + 1.0
    counts = np.maximum(1, np.round(weights / weights.sum() * events)).astype(np.int64)
    return ray.data.range(users).map_batches(_users_batch, fn_kwargs={"counts": counts, "seed": seed},
                                             batch_size=2000, batch_format="numpy").materialize()


def _uss_mb() -> float:
    """This process's USS (private pages), in MB, from ``/proc/self/smaps_rollup``."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


@ray.remote(num_cpus=0.5)
class Worker:
    """Stands for a training worker: holds what the loop holds, reports its memory."""

    def __init__(self, rank: int):
        import gc

        gc.collect()
        self.rank, self.held, self.timelines = rank, None, None
        self.before = _uss_mb()

    def ready(self) -> int:
        return os.getpid()

    def own_copy(self, users, cfg_json: dict) -> float:
        from tessera.train.config import TrainConfig

        cfg = TrainConfig.model_validate(cfg_json)
        records = users_table(users)  # the old loop kept ``users`` (the records) for the whole run
        shared, evaluation = derive(records, cfg, NUM_ITEMS, with_evaluation=self.rank == 0)  # as the loop did
        self.held, self.timelines = (records, shared, evaluation), shared.timelines
        return time.time()

    def shared_copy(self, refs) -> float:
        shared = ray.get(refs[0].shared)
        evaluation = ray.get(refs[0].evaluation) if self.rank == 0 else None
        t = shared.timelines
        int(t.items.sum()) + int(t.ts.sum()) + float(t.w.sum())  # every page read once, as an epoch does
        self.held, self.timelines = (shared, evaluation), t
        return time.time()

    def memory(self) -> float:
        return _uss_mb() - self.before

    def histories(self, user_key: np.ndarray, from_end: np.ndarray) -> dict[str, np.ndarray]:
        return self.timelines.histories(user_key, from_end, MAX_HISTORY)


def _ray_workers_uss_mb() -> float:
    """The USS of every Ray worker process of this machine (actors, task and idle workers), in MB."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (proc.info["cmdline"] or [""])[0].startswith("ray::"):
                total += proc.memory_full_info().uss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def one_round(users: ray.data.Dataset, cfg, workers: int, mode: str, probe: dict) -> dict:
    # 1 CPU at most for them all: the deriving task needs the other (the job runs it before the trainer starts)
    actors = [Worker.options(num_cpus=min(0.5, 1 / workers)).remote(r) for r in range(workers)]
    pids = ray.get([a.ready.remote() for a in actors])
    time.sleep(1.0)
    before = _ray_workers_uss_mb()
    t0 = time.time()
    if mode == "baseline":
        done = ray.get([a.own_copy.remote(users, cfg.model_dump(mode="json")) for a in actors])
        refs = None
    else:
        refs = share_user_data(users, cfg, NUM_ITEMS)
        done = ray.get([a.shared_copy.remote([refs]) for a in actors])
    seconds = max(done) - t0
    uss = ray.get([a.memory.remote() for a in actors])
    workers_mb = _ray_workers_uss_mb() - before
    store = 0.0 if refs is None else sum(_stored_mb(r) for r in (refs.shared, refs.evaluation, refs.counts))
    hist = ray.get(actors[-1].histories.remote(probe["user_key"], probe["from_end"]))
    for a in actors:
        ray.kill(a)
    del refs
    import psutil

    for pid in pids:  # ray.kill returns at once: an actor still exiting would count in the next round's start
        try:
            psutil.Process(pid).wait(timeout=60)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
    return {"s": seconds, "node_mb": sum(uss) + store, "store_mb": store, "all_node_mb": workers_mb + store,
            "per_worker_uss_mb": [round(m, 1) for m in uss], "hist": hist}


def _stored_mb(ref) -> float:
    """About what an object takes in the object store: its pickle (protocol 5, buffers in-band)."""
    return len(pickle.dumps(ray.get(ref), protocol=5)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from tessera.train.config import TrainConfig

    cfg = TrainConfig.model_validate({"interactions_uri": "s3://unused/i", "embeddings_uri": "s3://unused/e",
                                      "models_uri": "s3://unused/m", "checkpoint_uri": "s3://unused/c",
                                      "version": "bench", "max_history": MAX_HISTORY})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t = time.time()
        users = make_users(args.events, args.users)
        print(f"[bench] users dataset: {users.count()} users in {time.time() - t:.1f} s", file=sys.stderr)
        sample = users.limit(200).to_pandas()
        probe = next_item_examples({c: sample[c].to_numpy() for c in sample.columns}, cfg.max_examples_per_user)
        shared = ray.get(share_user_data(users, cfg, NUM_ITEMS).shared)
        tl = shared.timelines
        timelines_mb = sum(a.nbytes for a in (tl.items, tl.ts, tl.w, tl.keys, tl.starts, tl.lengths)) / 2**20
        del shared, tl
        results = {"baseline": [], "ours": []}
        for r in range(args.rounds):
            for mode in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):
                out = one_round(users, cfg, args.workers, mode, probe)
                results[mode].append(out)
                print(f"[bench] round {r} {mode}: {out['s']:.1f} s, USS {out['per_worker_uss_mb']} MB, "
                      f"store {out['store_mb']:.0f} MB, every Ray worker +{out['all_node_mb']:.0f} MB",
                      file=sys.stderr)
        first = results["baseline"][0]["hist"]
        same = all(np.array_equal(first[k], out["hist"][k]) for runs in results.values() for out in runs
                   for k in first)
        med = {mode: {k: statistics.median(o[k] for o in runs) for k in ("s", "node_mb", "store_mb", "all_node_mb")}
               for mode, runs in results.items()}
        print(json.dumps({
            "events": args.events, "users": args.users, "workers": args.workers, "rounds": args.rounds,
            "timelines_mb": round(timelines_mb, 1), "same_histories": same,
            "baseline_node_mb": round(med["baseline"]["node_mb"], 1), "ours_node_mb": round(med["ours"]["node_mb"], 1),
            "node_mb_ratio": round(med["ours"]["node_mb"] / med["baseline"]["node_mb"], 3),
            "ours_store_mb": round(med["ours"]["store_mb"], 1),
            "baseline_all_workers_mb": round(med["baseline"]["all_node_mb"], 1),
            "ours_all_workers_mb": round(med["ours"]["all_node_mb"], 1),
            "baseline_s": round(med["baseline"]["s"], 2), "ours_s": round(med["ours"]["s"], 2),
            "s_ratio": round(med["ours"]["s"] / med["baseline"]["s"], 3),
        }))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
