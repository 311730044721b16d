"""The ranker's training lists (tessera/train/ranking.py) look like the top-K that evaluation re-ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.train.catalog import ItemCatalog
from tessera.train.config import RankerSection, TowerSection
from tessera.train.examples import history_from_batch
from tessera.train.ranking import RankerModel
from tessera.train.retrieval import TwoTowerModel, variant

NUM_ITEMS, K = 60, 10


def _ranker_model(**ranker) -> RankerModel:
    torch.manual_seed(0)
    catalog = ItemCatalog(item_ids=np.array([f"i{i:03d}" for i in range(NUM_ITEMS)]),
                          embeddings={"text": torch.randn(NUM_ITEMS, 8)},
                          present={"text": torch.ones(NUM_ITEMS, dtype=torch.bool)})
    counts = np.ones(NUM_ITEMS, dtype=np.int64)
    towers = TwoTowerModel.build(variant("fused", catalog.modalities), catalog,
                                 TowerSection(d_model=8, out_dim=8, n_heads=2, proj_hidden=8), counts, max_history=4)
    return RankerModel.build(towers, counts, RankerSection(candidates=K, **ranker), max_history=4)


def _scores_and_targets(B: int = 400):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(B, NUM_ITEMS, generator=g)
    order = scores.argsort(dim=1, descending=True)  # (B, NUM_ITEMS) items by rank
    ranks = torch.arange(B) % (2 * K)  # half the targets inside the top-K, half just below it
    return scores, order, order[torch.arange(B), ranks], ranks


def _empty_history_batch(model: RankerModel, B: int, N: int = 4) -> tuple[dict, torch.Tensor]:
    """A batch of ``B`` examples with empty histories (no target yet), and its retrieval scores."""
    batch = {"hist_items": torch.zeros(B, N, dtype=torch.long), "hist_ts": torch.zeros(B, N, dtype=torch.long),
             "hist_w": torch.ones(B, N), "hist_len": torch.zeros(B, dtype=torch.long)}
    with torch.no_grad():
        return batch, model.retrieve(history_from_batch(batch))


def test_lists_only_where_the_target_is_in_the_top_k_and_negatives_from_it():
    model = _ranker_model(num_hard=K - 1, num_random=5)
    scores, order, target, ranks = _scores_and_targets()
    keep, cands, labels = model.training_lists(target, scores, np.random.default_rng(0))
    assert keep.tolist() == (ranks < K).tolist()
    assert cands.shape == labels.shape == (int(keep.sum()), 1 + (K - 1) + 5)
    assert (cands[:, 0] == target[keep]).all() and (labels[:, 0] == 1).all() and (labels[:, 1:] == 0).all()
    for row, top in zip(cands, order[keep, :K], strict=True):
        assert set(row[:K].tolist()) == set(top.tolist())  # positive + the rest of the top-K: the re-ranked set
        assert not set(row[K:].tolist()) & set(row[:K].tolist())  # random negatives are distinct


def test_random_negatives_are_never_items_seen_before():
    # Seen items are -inf in the scores (as serving never offers them): a random negative drawn from them
    # would train on a choice the ranker never faces.
    model = _ranker_model(num_hard=K - 1, num_random=20)
    scores, _, target, _ = _scores_and_targets()
    seen = torch.rand(scores.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    seen[torch.arange(len(target)), target] = False
    seen[:, :K + 20] = False  # room for every list among the unseen items (else the whole catalog is drawn from)
    masked = scores.masked_fill(seen, float("-inf"))
    rows = [np.flatnonzero(row) for row in seen.numpy()]
    keep, cands, _ = model.training_lists(target, masked, np.random.default_rng(0), excluded=rows)
    assert keep.any()
    assert not seen[keep].gather(1, cands).any()


def test_fewer_hard_negatives_are_drawn_across_the_top_k_not_from_its_head():
    # Taking the best-ranked H would make ranks H+1..K hold only positives in training: the ranker
    # learns to push the head of retrieval down (the fused_ranked < fused bug on the demo corpus).
    model = _ranker_model(num_hard=3, num_random=0)
    scores, order, target, _ = _scores_and_targets()
    keep, cands, _ = model.training_lists(target, scores, np.random.default_rng(0))
    rank_of = order.argsort(dim=1)[keep]  # (B', NUM_ITEMS) rank of each item
    neg_ranks = rank_of.gather(1, cands[:, 1:])  # (B', 3)
    assert (neg_ranks < K).all()
    counts = torch.bincount(neg_ranks.flatten(), minlength=K).float()
    assert (counts > 0).all() and counts.max() / counts.min() < 2.0, counts.tolist()


def test_a_batch_without_any_target_in_the_top_k_gives_a_zero_loss_that_reaches_every_parameter():
    model = _ranker_model(num_hard=K - 1, num_random=2)
    batch, scores = _empty_history_batch(model, B=4)
    batch["target"] = scores.argsort(dim=1)[:, 0]  # the lowest-scored item: never in the top-K
    loss = model(batch, np.random.default_rng(0))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is not None for p in model.ranker.parameters())


def test_a_positive_s_popularity_leaves_its_own_event_out(monkeypatch):
    """The counts hold every training event, the positive's own included: in training (``forward``), the
    positive's popularity feature is its count less that event (counted in, every positive had at least
    one interaction, and the ranker learned that items never interacted with are never the answer)."""
    import tessera.train.ranking as ranking

    model = _ranker_model(num_hard=K - 1, num_random=2)
    model.counts = torch.full((NUM_ITEMS,), 3.0)
    seen = []
    real = ranking.ranker_dense_features
    monkeypatch.setattr(ranking, "ranker_dense_features", lambda r, pop, *a: seen.append(pop) or real(r, pop, *a))
    B = 8
    batch, scores = _empty_history_batch(model, B)
    batch["target"] = scores.argsort(dim=1, descending=True)[:, 0]  # the best-scored item: in the top-K
    model(batch, np.random.default_rng(0))
    pop = seen[-1]  # (B, 1 + hard + random), the positive first
    assert pop.shape[0] == B
    torch.testing.assert_close(pop[:, 0], torch.full((B,), float(np.log1p(2.0))))  # 3 events, its own left out
    torch.testing.assert_close(pop[:, 1:], torch.full_like(pop[:, 1:], float(np.log1p(3.0))))
    # re-ranking (evaluation, serving) takes the counts as they are
    seen.clear()
    with torch.no_grad():
        model.rerank(history_from_batch(batch))
    torch.testing.assert_close(seen[-1], torch.full_like(seen[-1], float(np.log1p(3.0))))


def test_training_lists_leave_out_every_item_seen_before_the_target_not_only_the_history(monkeypatch):
    """Evaluation and serving leave out everything a user has seen; training lists left out only the
    history window's items, so an older seen item could be a hard negative it never is after. (Random
    negatives: test_random_negatives_are_never_items_seen_before.)"""
    model = _ranker_model(num_hard=K - 1, num_random=0)
    batch, scores = _empty_history_batch(model, B=2)
    order = scores.argsort(dim=1, descending=True)
    batch["target"] = order[:, 0]
    older = [order[0, 1:4].numpy(), np.empty(0, np.int64)]  # seen before the window (empty here)
    handed = []
    real = model.training_lists
    monkeypatch.setattr(model, "training_lists",
                        lambda t, s, rng, excluded: handed.append((s, excluded)) or real(t, s, rng, excluded))
    model(batch, np.random.default_rng(0), older)
    s, excluded = handed[-1]
    assert torch.isinf(s[0, older[0]]).all() and torch.isfinite(s[1, order[1, 1:4]]).all()
    assert [e.tolist() for e in excluded] == [o.tolist() for o in older]  # random negatives leave them out too
    _, cands, _ = real(batch["target"], s, np.random.default_rng(0))
    assert not set(older[0].tolist()) & set(cands[0].tolist())


def test_re_ranked_items_keep_the_order_of_logits_closer_than_float32_steps_at_1e4():
    """The top-K sat above the rest by adding 1e4 to the logits, where float32 steps are ~0.001: logits
    3.14159 and 3.14200 became one score, and the metrics broke the tie by catalog row."""
    from tessera.train.ranking import place_ranked

    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, float("-inf")],
                           [float("-inf")] * 5])
    top = torch.tensor([[2, 0], [0, 1]])
    logits = torch.tensor([[3.14159, 3.14200], [float("-inf"), float("-inf")]])
    out = place_ranked(scores, top, logits)
    assert out[0].argsort(descending=True).tolist()[:4] == [0, 2, 3, 1]  # re-ranked by logit, then retrieval
    assert out[0, 0] > out[0, 2] and out[0, 2] - out[0, 3] > 0.5 and out[0, 4] == float("-inf")
    assert torch.isneginf(out[1]).all()  # every item excluded: nothing above anything
    assert not torch.isnan(out).any()
    # unchanged: the scores passed in, and a list of no candidates
    assert scores[0, 0] == pytest.approx(0.9) and torch.equal(place_ranked(scores, top[:, :0], logits[:, :0]), scores)


def test_ranker_lists_longer_than_the_catalog_are_a_config_error_naming_the_keys():
    from tessera.config import ConfigError
    from tessera.train.config import TrainConfig
    from tessera.train.job import check_ranker_lists

    cfg = TrainConfig.model_validate({})  # lists of 1 + 49 + 16 = 66 items
    check_ranker_lists(cfg, 66)
    with pytest.raises(ConfigError,
                       match=r"ranker\.num_hard \(49\) and ranker\.num_random \(16\).* 66 distinct .* 60 items"):
        check_ranker_lists(cfg, 60)
    check_ranker_lists(cfg.model_copy(update={"ranker": cfg.ranker.model_copy(update={"enabled": False})}), 60)
    # fewer candidates than hard negatives: the hard ones are capped at candidates - 1 (1 + 9 + 16)
    few = cfg.model_copy(update={"ranker": cfg.ranker.model_copy(update={"candidates": 10})})
    check_ranker_lists(few, 26)
    with pytest.raises(ConfigError, match="26 distinct"):
        check_ranker_lists(few, 25)


def test_evaluation_in_user_chunks_gives_the_whole_matrix_figures_on_the_host():
    """Scores are computed a chunk of users at a time and copied to the host as each is done (the whole
    users x items matrix on a GPU ran out of its memory at scale): the figures are the unchunked ones."""
    from tessera.models.history import pad_histories
    from tessera.train.evaluate import evaluate_ranked, evaluate_retrieval
    from tessera.train.examples import EvalSet

    model = _ranker_model(num_hard=K - 1, num_random=0)
    rng = np.random.default_rng(3)
    seen = [rng.choice(NUM_ITEMS, size=rng.integers(1, 5), replace=False) for _ in range(23)]
    targets = [np.setdiff1d(rng.choice(NUM_ITEMS, size=2, replace=False), s) for s in seen]
    ev = EvalSet(pad_histories(seen, 4), seen, targets)
    whole = evaluate_retrieval(model.retrieval, ev, (10,), max_chunk_elements=10**9)
    for per_chunk in (1, 5 * NUM_ITEMS):  # a user a chunk, and 5
        assert evaluate_retrieval(model.retrieval, ev, (10,), max_chunk_elements=per_chunk) == whole
    with torch.no_grad():
        ranked = model.rerank(ev.history, exclude=ev.train_items, chunk=256)
        assert ranked.device.type == "cpu"
        torch.testing.assert_close(model.rerank(ev.history, exclude=ev.train_items, chunk=4), ranked)
    assert evaluate_ranked(model, ev, (10,))["num_users"] == whole["num_users"]
