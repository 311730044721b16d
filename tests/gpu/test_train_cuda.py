"""The training stages as a Ray Train worker runs them with ``use_gpu``: on the device it names.

The worker moves the item catalog and every example batch to ``ray.train.torch.get_device()``, keeps
the held-out evaluation set on the host, and writes checkpoints the driver loads on its CPU. Each
variant (fused with ids, a single modality, ids alone) and the ranker stage run here on ``cpu`` and,
where torch sees one, on ``cuda``: a step's loss on the device equals the CPU's for the same weights,
a few steps train, evaluation runs, and the bundle rebuilt on the CPU from the checkpoint gives the
device model's vectors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tessera.train.catalog import ItemCatalog
from tessera.train.config import RankerSection, TowerSection, TrainConfig
from tessera.train.evaluate import evaluate_ranked, evaluate_retrieval
from tessera.train.examples import EvalSet, UserTimelines, item_counts, next_item_examples, user_records
from tessera.train.ranking import RankerModel
from tessera.train.retrieval import TwoTowerModel, variant
from tessera.train.state import RANKED, TrainState, bundle_from_state, load_state, save_state
from tests.gpu.conftest import needs_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
NUM_ITEMS, NUM_USERS, MAX_HISTORY, KS = 48, 40, 6, (5, 10)
TOWERS = TowerSection(d_model=16, out_dim=16, n_heads=2, proj_hidden=32, batch_size=32, fused_ids=True)
RANKER = RankerSection(candidates=12, num_hard=6, num_random=4, batch_size=32)


def _catalog() -> ItemCatalog:
    g = torch.Generator().manual_seed(0)
    present = {"text": torch.ones(NUM_ITEMS, dtype=torch.bool), "image": torch.rand(NUM_ITEMS, generator=g) > 0.2}
    emb = {"text": torch.randn(NUM_ITEMS, 12, generator=g), "image": torch.randn(NUM_ITEMS, 8, generator=g)}
    emb["image"][~present["image"]] = 0.0
    return ItemCatalog(item_ids=np.array([f"item-{i:04d}" for i in range(NUM_ITEMS)]), embeddings=emb,
                       present=present)


def _records() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(NUM_USERS):
        n = int(rng.integers(3, 12))
        rows.append(user_records({"user_id": np.array([f"u{u}"] * n), "item_row": rng.integers(0, NUM_ITEMS, n),
                                  "ts": np.sort(rng.integers(0, 10**10, n)), "weight": rng.uniform(0.5, 2, n)},
                                 holdout=1))
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _batches(records, device: str) -> list[dict[str, torch.Tensor]]:
    ex = next_item_examples(records)
    ex = {**ex, **UserTimelines(records).histories(ex["user_key"], ex["from_end"], MAX_HISTORY)}
    n = len(ex["target"])
    return [{k: torch.from_numpy(v[s:s + 32]).to(device) for k, v in ex.items()} for s in range(0, n - 31, 32)]


def _train(model, params, batches, rng=None) -> list[float]:
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    model.train()
    for batch in batches:
        loss = model(batch) if rng is None else model(batch, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fused", "text", "id_only"])
def test_retrieval_variant_trains_and_evaluates_on_device(device, name):
    catalog, records = _catalog(), _records()
    counts = item_counts(records, NUM_ITEMS)
    eval_set = EvalSet.from_records(records, MAX_HISTORY)  # host tensors, as on rank 0
    torch.manual_seed(0)
    ref = TwoTowerModel.build(variant(name, catalog.modalities, TOWERS.fused_ids), catalog, TOWERS, counts,
                              MAX_HISTORY).eval()
    model = TwoTowerModel.build(variant(name, catalog.modalities, TOWERS.fused_ids), catalog.to(device), TOWERS,
                                counts, MAX_HISTORY)
    model.load_state_dict(ref.state_dict())
    model.to(device).eval()
    cpu_batches, batches = _batches(records, "cpu"), _batches(records, device)
    with torch.no_grad():
        expected, got = float(ref(cpu_batches[0])), float(model(batches[0]))
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    losses = _train(model, model.parameters(), batches * 4)
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    metrics = evaluate_retrieval(model, eval_set, KS)
    assert metrics["num_users"] == eval_set.num_users > 0
    assert all(0.0 <= metrics[f"recall@{k}"] <= 1.0 for k in KS)


@pytest.mark.parametrize("device", DEVICES)
def test_ranker_stage_trains_on_device_and_the_checkpoint_rebuilds_on_the_cpu(device, tmp_path):
    catalog, records = _catalog(), _records()
    counts = item_counts(records, NUM_ITEMS)
    eval_set = EvalSet.from_records(records, MAX_HISTORY)
    batches = _batches(records, device)
    torch.manual_seed(0)
    fused = TwoTowerModel.build(variant("fused", catalog.modalities, TOWERS.fused_ids), catalog.to(device), TOWERS,
                                counts, MAX_HISTORY).to(device)
    _train(fused, fused.parameters(), batches * 3)
    fused_state = copy.deepcopy(fused.state_dict())
    ranked = RankerModel.build(fused, counts, RANKER, MAX_HISTORY).to(device)
    rng = np.random.default_rng(0)
    losses = _train(ranked, ranked.ranker.parameters(), batches * 2, rng)
    assert all(np.isfinite(losses)) and any(loss > 0 for loss in losses)
    metrics = evaluate_ranked(ranked, eval_set, KS)
    assert all(0.0 <= metrics[f"ndcg@{k}"] <= 1.0 for k in KS)

    # the checkpoint as rank 0 writes it, loaded by the driver on its CPU
    path = tmp_path / "state.pt"
    save_state(TrainState(stage=2, models={"fused": fused_state, RANKED: ranked.ranker.state_dict()}), path)
    cfg = TrainConfig.model_validate({"interactions_uri": "s3://b/i", "embeddings_uri": "s3://b/e",
                                      "models_uri": "s3://b/m", "checkpoint_uri": "s3://b/c", "version": "v",
                                      "max_history": MAX_HISTORY, "towers": TOWERS.model_dump(),
                                      "ranker": RANKER.model_dump()})
    bundle = bundle_from_state(cfg, load_state(path), catalog, counts)
    fused.eval()
    rows = torch.arange(NUM_ITEMS)
    hist = eval_set.history
    with torch.no_grad():
        # item tower: every catalog row
        on_device = fused.item_vectors(rows.to(device))  # (I, D)
        feats, masks = catalog.features(rows)
        rebuilt = bundle.item_tower(feats, masks, catalog.id_buckets(bundle.item_tower.config.num_id_buckets))
        torch.testing.assert_close(rebuilt, on_device.cpu(), rtol=1e-4, atol=1e-5)
        # user tower: the held-out users' histories
        users = fused.user_vectors(hist.to(device), on_device).cpu()
        rebuilt_users = bundle.user_tower(rebuilt[hist.item_idx], hist.mask, hist.timestamps_ms, hist.weights)
        torch.testing.assert_close(rebuilt_users, users, rtol=1e-4, atol=1e-5)
        # ranker: the same inputs to the trained ranker on the device and the rebuilt one
        g = torch.Generator().manual_seed(1)
        cands = rebuilt[torch.randint(0, NUM_ITEMS, (len(hist.mask), 5), generator=g)]  # (U, 5, D)
        dense = torch.randn(len(hist.mask), 5, len(bundle.ranker.config.dense_features), generator=g)
        logits = ranked.ranker.eval()(*(t.to(device) for t in (rebuilt[hist.item_idx], hist.mask, cands, dense)))
        rebuilt_logits = bundle.ranker(rebuilt[hist.item_idx], hist.mask, cands, dense)
        torch.testing.assert_close(rebuilt_logits, logits.cpu(), rtol=1e-4, atol=1e-5)
        assert rebuilt_logits.std() > 0  # a trained ranker, not the zero-initialised residual head


@pytest.mark.parametrize("device", DEVICES)
def test_a_stage_resumed_on_the_device_continues_where_its_checkpoint_left_off(device, tmp_path):
    """The worker's resume (stage_model with resume=True) from a checkpoint read on the CPU: the model and
    Adam's moments end up on the device (the optimizer loaded its state before the model moved, so the
    moments stayed on the CPU and the first step of a resume on a GPU failed), and the next step gives
    the same weights as the uninterrupted run's next step."""
    from tessera.train.worker import Stage, stage_model

    catalog, records = _catalog().to(device), _records()
    counts = item_counts(records, NUM_ITEMS)
    cfg = TrainConfig.model_validate({"interactions_uri": "s3://b/i", "embeddings_uri": "s3://b/e",
                                      "models_uri": "s3://b/m", "checkpoint_uri": "s3://b/c", "version": "v",
                                      "max_history": MAX_HISTORY, "towers": TOWERS.model_dump(),
                                      "ranker": RANKER.model_dump(), "variants": ["fused"]})
    stage, batches = Stage("retrieval", "fused", 2), _batches(records, device)
    on_device = lambda m: m.to(device)  # noqa: E731 (what prepare_model does on one worker)

    def step(model, opt, batch):
        torch.manual_seed(7)  # the same dropout in both runs
        model.train()
        loss = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    model, inner, opt = stage_model(stage, cfg, catalog, counts, TrainState(), False, on_device, counts)
    for batch in batches[:3]:
        step(model, opt, batch)
    save_state(TrainState(current={"model": inner.state_dict(), "optim": opt.state_dict()}), tmp_path / "s.pt")
    state = load_state(tmp_path / "s.pt")  # on the CPU, as a restarted worker reads it
    resumed, resumed_inner, resumed_opt = stage_model(stage, cfg, catalog, counts, state, True, on_device, counts)
    moments = [t for s in resumed_opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert moments and {t.device.type for t in moments} == {torch.device(device).type}
    step(resumed, resumed_opt, batches[3])
    step(model, opt, batches[3])
    for name, value in inner.state_dict().items():
        torch.testing.assert_close(resumed_inner.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
