"""Quality: a small synthetic problem in the real formats (ItemCatalog, user records, examples), and
the issue's conditions on the demo-sized sample corpus through the real job (slow).

The problem of ``tests/models/synthetic.py``: the pair a user likes is visible only through both
modalities together ("text" carries the category, "image" the colour) and the held-out items are
cold, so only content generalises. The training code under test is the job's own
:class:`TwoTowerModel` and evaluation, driven by a plain loop (no Ray).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.train.catalog import ItemCatalog
from tessera.train.config import TowerSection
from tessera.train.evaluate import evaluate_popularity, evaluate_retrieval
from tessera.train.examples import EvalSet, UserTimelines, item_counts, next_item_examples
from tessera.train.retrieval import TwoTowerModel, variant
from tests.models.synthetic import make_problem

REPO = Path(__file__).resolve().parents[2]


def _records(problem):
    n = len(problem.train_items)

    def obj(xs):
        out = np.empty(n, dtype=object)
        out[:] = [np.asarray(x) for x in xs]
        return out

    return {"user_id": np.array([f"u{u}" for u in range(n)]), "train_items": obj(problem.train_items),
            "train_ts": obj(problem.train_ts),
            "train_w": obj([np.ones(len(x), np.float32) for x in problem.train_items]),
            "test_items": obj(problem.test_items)}


def _fit(name, catalog, records, cfg, steps=150, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ex = {k: torch.from_numpy(v) for k, v in next_item_examples(records).items()}
    ex = UserTimelines(records).with_histories(ex, max_history=8)
    counts = item_counts(records, catalog.num_items)
    model = TwoTowerModel.build(variant(name, catalog.modalities), catalog, cfg, counts, max_history=8)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(ex["target"]), size=cfg.batch_size, replace=False))
        loss = model({k: v[idx] for k, v in ex.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_fused_beats_each_single_modality_on_cold_items():
    problem = make_problem(seed=0)
    catalog = ItemCatalog(item_ids=np.array([f"i{i:04d}" for i in range(problem.num_items)]),
                          embeddings={"text": problem.emb["a"], "image": problem.emb["b"]},
                          present={"text": torch.ones(problem.num_items, dtype=torch.bool),
                                   "image": torch.ones(problem.num_items, dtype=torch.bool)})
    records = _records(problem)
    ev = EvalSet.from_records(records, max_history=8)
    cfg = TowerSection(d_model=32, out_dim=32, n_heads=2, proj_hidden=32, batch_size=128, lr=3e-3,
                       dropout=0.0, modality_dropout=0.2)
    ndcg = {name: evaluate_retrieval(_fit(name, catalog, records, cfg), ev, (10,))["ndcg@10"]
            for name in ("fused", "text", "image")}
    ndcg["popularity"] = evaluate_popularity(item_counts(records, catalog.num_items), ev, (10,))["ndcg@10"]
    report = " ".join(f"{k}={v:.3f}" for k, v in ndcg.items())
    print(report)
    assert ndcg["fused"] >= max(ndcg["text"], ndcg["image"]) + 0.2, report
    assert min(ndcg["text"], ndcg["image"]) > ndcg["popularity"], report


@pytest.mark.slow
def test_sample_corpus_fused_beats_single_modalities_and_ranker_beats_retrieval(ray_session, storage,
                                                                                  encoder_weights, shared_data):
    """The issue's quality conditions on the demo-sized sample corpus (configs/corpus.yaml: 1000 items,
    400 users), embedded and trained with the shipped configs/train.yaml through the real job.

    Full-catalog NDCG@10 on each user's held-out last interaction (~400 users: noise about +-0.005).
    Measured when written (two runs): fused margins over text / image / audio / id_only
    0.016-0.018 / 0.007-0.009 / 0.021-0.023 / 0.018-0.027, ranker +0.008 and +0.015. The image
    margin is the thin one (an earlier run before this test had fused tied with image). A CI run on
    a machine without native bf16 once had the ranker at -0.0055 (fused strong that run); the
    ranker's nearest-history-item features (max_sim_*) followed: ranker +0.0061 in this test after
    them, and +0.0018..+0.0223 over 8 seeded training runs (session note of 2026-12-02, issue 4 section).
    On 2026-12-06, with time gaps measured to the history's latest event and ranker lists leaving out every
    item seen before the target: fused +0.0198 / +0.0177 / +0.0292 / +0.0247, ranker +0.0090 (one run). With
    the validation split (each user's second-to-last event a validation target, no longer trained on; the test
    evaluated once a stage is trained): +0.0240 / +0.0198 / +0.0316 / +0.0271, popularity +0.0240, ranker
    +0.0074 (one run). With each stage kept at its best validation epoch (keep_epoch: best; the single
    modalities peak early): +0.0251 / +0.0142 / +0.0299 / +0.0280, ranker +0.0086 in one run, but image
    -0.0003 (this test failed) in a fresh-clone CI run; with 20 epochs and best: image +0.0285, ranker -0.0011.
    configs/train.yaml therefore keeps keep_epoch: last and 12 epochs (see README Status). After one order for
    same-time events and one log converter (training data unchanged on this corpus: int64 ms, no nulls), a
    fresh-clone CI run failed it (image -0.0028, popularity +0.0027, ranker +0.0291); the same code right after,
    locally: image +0.0133, popularity +0.0176, ranker +0.0118 (the same seed and training data: runs of the
    job differ, not only seeds). Since one seed trains one model (seeded example order, each worker a fixed
    row range, seeded batches; 2026-12-07) two local runs gave the same figures: fused +0.0214 / +0.0159 /
    +0.0276 / +0.0226, popularity +0.0220, ranker +0.0106. ~5 min.
    """
    from tessera.config import load_config
    from tessera.corpus import CorpusConfig, generate_corpus
    from tessera.embed.pipeline import run_embedding
    from tessera.train.config import TrainConfig
    from tessera.train.job import run_training
    from tests.conftest import embed_config

    root = "s3://tessera-test/quality"
    storage.ensure_bucket(root)
    corpus = load_config(CorpusConfig, REPO / "configs" / "corpus.yaml")
    corpus.root, corpus.real_media.data_dir = root, str(shared_data)
    generate_corpus(corpus)
    pool = {"num_cpus": 0.25, "batch_size": 32, "torch_threads": 1}
    run = run_embedding(embed_config(
        encoder_weights, "quality", items_uri=f"{root}/corpus/items", output_uri=f"{root}/embeddings",
        read_batch_rows=250, write_batch_size=250, text={"pool": pool},
        image={"encoder": {"weights": encoder_weights["image"]}, "pool": pool},
        audio={"encoder": {"weights": encoder_weights["audio"]}, "pool": pool}))
    cfg = load_config(TrainConfig, REPO / "configs" / "train.yaml")
    cfg.interactions_uri, cfg.embeddings_uri = f"{root}/corpus/interactions", run["output"]["uri"]
    cfg.models_uri, cfg.checkpoint_uri = f"{root}/models", f"{root}/checkpoints"
    checks = run_training(cfg, storage)["metrics"]["checks"]
    report = (f"fused margins {({k: round(v, 4) for k, v in checks['fused_margins'].items()})}, "
              f"ranker margin {checks['ranker_margin']:.4f}")
    print(report)
    assert set(checks["fused_margins"]) >= {"text", "image", "audio", "id_only"}, report
    assert checks["fused_beats_all"] and checks["ranker_beats_retrieval"], report
