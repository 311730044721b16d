"""Benchmark: Ray Train throughput against a plain torch loop, worker scaling, and model quality.

    .venv/bin/python bench/train.py [--items 1000] [--users 400] [--epochs 12] [--speed-epochs 2]

Brings up its own SeaweedFS and a local Ray (2 CPUs), generates the demo-sized sample corpus (same
seed and sizes as configs/corpus.yaml), embeds it, then side by side:

* quality: one full training run (fused, ranker, text / image / audio / id-only baselines,
  popularity) on 2 workers; Recall@10 and NDCG@10 per variant, full catalog;
* speed: the fused retrieval stage alone for ``--speed-epochs`` on 1 and on 2 DDP workers (1 torch
  thread each), and the same model on the same examples in a plain single-process loop with as
  many threads as the 2 workers together and the same global batch (2 x per-worker batch).

Samples/s count training examples through forward + backward + step, per epoch wall time of the
training loop (evaluation excluded). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stack import bench_stack, repo_root  # noqa: E402
from tessera.storage import Storage  # noqa: E402

BUCKET = "s3://tessera-bench"


def make_embeddings(root: str, items: int, users: int) -> str:
    """Corpus + seeded encoder weights + one embedding run under ``root``; returns the run URI."""
    from tessera.corpus import CorpusConfig, generate_corpus
    from tessera.embed.config import EmbedConfig
    from tessera.embed.pipeline import run_embedding
    from tessera.encoders import write_seeded_weights

    generate_corpus(CorpusConfig(root=root, seed=7, num_items=items, num_users=users, mean_interactions_per_user=20,
                                 items_per_part=250, users_per_part=200,
                                 real_media={"enabled": True, "data_dir": str(repo_root().parent / "shared" / "data"),
                                             "share": 0.05}))
    weights = write_seeded_weights(f"{root}/models/encoders", Storage(), seed=0)
    pool = {"num_cpus": 0.25, "batch_size": 64, "torch_threads": 1}
    manifest = run_embedding(EmbedConfig.model_validate({
        "items_uri": f"{root}/corpus/items", "output_uri": f"{root}/embeddings", "run_id": "bench",
        "text": {"pool": pool}, "image": {"encoder": {"weights": weights["image"]}, "pool": pool},
        "audio": {"encoder": {"weights": weights["audio"]}, "pool": pool}}))
    return manifest["output"]["uri"]


def train_config(root: str, run_uri: str, **overrides):
    from tessera.config import load_config
    from tessera.train.config import TrainConfig

    cfg = load_config(TrainConfig, repo_root() / "configs" / "train.yaml")
    data = cfg.model_dump()
    data.update({"interactions_uri": f"{root}/corpus/interactions", "embeddings_uri": run_uri,
                 "models_uri": f"{root}/models", "checkpoint_uri": f"{root}/checkpoints",
                 "version": "b" + uuid.uuid4().hex[:8]})
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(data)


def ray_samples_per_s(storage: Storage, cfg, stage: str = "fused") -> float:
    """Global samples/s of a stage: examples of all workers over the summed loop time of its epochs."""
    from tessera.storage import join_uri
    from tessera.train.job import run_training

    run_training(cfg, storage)
    hist = [h for h in storage.read_json(join_uri(cfg.bundle_uri, "metrics.json"))["history"] if h["stage"] == stage]
    return sum(h["samples_global"] for h in hist) / sum(h["train_s"] for h in hist)


def plain_loop_samples_per_s(cfg, storage: Storage, epochs: int) -> float:
    """The fused two-tower model on the same examples, one process, ``num_workers`` threads, no Ray Train."""
    import numpy as np
    import torch

    from tessera.train.catalog import ItemCatalog
    from tessera.train.datasets import build_datasets
    from tessera.train.examples import EXAMPLE_COLUMNS, UserTimelines, target_counts
    from tessera.train.retrieval import TwoTowerModel, variant

    data = build_datasets(cfg, storage)
    ex = data.train.to_pandas()
    cols = {c: torch.from_numpy(np.stack(ex[c].to_numpy())) for c in EXAMPLE_COLUMNS}
    users = data.users.to_pandas()
    timelines = UserTimelines({c: users[c].to_numpy() for c in ("user_id", "train_items", "train_ts", "train_w")})
    catalog = ItemCatalog.load(storage, cfg.embeddings_uri)
    # logQ over the towers' targets, as the workers count them (the speed runs train no ranker: no tail)
    counts = target_counts({"train_items": users["train_items"].to_numpy()}, catalog.num_items,
                           cfg.ranker.tail if cfg.ranker.enabled else 0, cfg.max_examples_per_user)
    torch.set_num_threads(cfg.scaling.num_workers * cfg.scaling.torch_threads)
    torch.manual_seed(cfg.seed)
    model = TwoTowerModel.build(variant("fused", catalog.modalities), catalog, cfg.towers, counts, cfg.max_history)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.towers.lr, weight_decay=cfg.towers.weight_decay)
    batch = cfg.towers.batch_size * cfg.scaling.num_workers
    n = len(cols["target"])
    rng = np.random.default_rng(cfg.seed)
    samples, seconds = 0, 0.0
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(n))
        t0 = time.perf_counter()
        for s in range(0, n - batch + 1, batch):
            idx = perm[s:s + batch]
            loss = model(timelines.with_histories({c: v[idx] for c, v in cols.items()}, cfg.max_history))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples += batch
        seconds += time.perf_counter() - t0
    return samples / seconds


def run(items: int, users: int, epochs: int, speed_epochs: int, quality: bool = True) -> dict:
    # Ray is imported only inside bench_stack: its core reads RAY_AUTH_MODE once, at import.
    with bench_stack(num_cpus=2):
        storage = Storage()
        storage.ensure_bucket(BUCKET)
        root = f"{BUCKET}/train-{uuid.uuid4().hex[:6]}"
        t0 = time.perf_counter()
        run_uri = make_embeddings(root, items, users)
        print(f"[bench] corpus + embeddings in {time.perf_counter() - t0:.0f} s", flush=True)

        speed = {"variants": ["fused"], "ranker": {"enabled": False}, "towers": {"epochs": speed_epochs}}
        per_workers = {}
        for workers, cpus in ((1, 1.0), (2, 0.5)):
            cfg = train_config(root, run_uri, scaling={"num_workers": workers, "cpus_per_worker": cpus}, **speed)
            per_workers[workers] = ray_samples_per_s(storage, cfg)
            print(f"[bench] Ray Train, {workers} worker(s): {per_workers[workers]:.0f} samples/s", flush=True)
        plain = plain_loop_samples_per_s(train_config(root, run_uri, **speed), storage, speed_epochs)
        print(f"[bench] plain loop, 2 threads: {plain:.0f} samples/s", flush=True)
        speed_out = {"ray_train_samples_per_s": round(per_workers[2], 1), "plain_loop_samples_per_s": round(plain, 1),
                     "overhead_ratio": round(plain / per_workers[2], 3),
                     "samples_per_s_1_worker": round(per_workers[1], 1),
                     "samples_per_s_2_workers": round(per_workers[2], 1)}
        if not quality:
            return {**speed_out, "items": items, "speed_epochs": speed_epochs}

        from tessera.train.job import run_training

        t0 = time.perf_counter()
        manifest = run_training(train_config(root, run_uri, towers={"epochs": epochs}), storage)
        print(f"[bench] full training run in {time.perf_counter() - t0:.0f} s", flush=True)
    results = manifest["metrics"]["results"]
    checks = manifest["metrics"]["checks"]
    return {
        **speed_out,
        "recall_at_10": {v: round(r["recall@10"], 4) for v, r in results.items()},
        "ndcg_at_10": {v: round(r["ndcg@10"], 4) for v, r in results.items()},
        "fused_ndcg10_margins": {v: round(m, 4) for v, m in checks["fused_margins"].items()},
        "ranker_ndcg10_margin": None if checks["ranker_margin"] is None else round(checks["ranker_margin"], 4),
        "eval_users": results["fused"]["num_users"],
        "items": items, "epochs": epochs,
        "train_s": manifest["timings"]["train_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=None, help="tower epochs of the quality run (default: config)")
    parser.add_argument("--speed-epochs", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true", help="throughput only (no full training run)")
    args = parser.parse_args()
    from tessera.config import load_config
    from tessera.train.config import TrainConfig

    epochs = args.epochs or load_config(TrainConfig, repo_root() / "configs" / "train.yaml").towers.epochs
    print(json.dumps(run(args.items, args.users, epochs, args.speed_epochs, quality=not args.skip_quality)))


if __name__ == "__main__":
    main()
