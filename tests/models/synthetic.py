"""A tiny synthetic two-modality recommendation problem, and a two-tower trainer for it.

200 items: 25 (category, colour) pairs of 8 items each, 5 "warm" and 3 "cold". The category is
visible only in modality "a", the colour only in modality "b" (plus item-specific noise). Each user
likes one pair, interacts with its 5 warm items, and then with one of its cold items, which is held
out. Cold items never appear in training, so only content generalises to them, and a model must see
both modalities to find the pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tessera.models import (
    ItemTower,
    ItemTowerConfig,
    PopularityBaseline,
    UserTower,
    UserTowerConfig,
    cross_modal_infonce,
    group_by_user,
    log_sampling_probability,
    pad_histories,
    ranking_metrics,
    sampled_softmax_loss,
    time_split,
)

N_CAT, N_COL, PER_PAIR, WARM, DIM = 5, 5, 8, 5, 16
DAY_MS = 86_400_000


@dataclass
class Problem:
    emb: dict[str, torch.Tensor]  # modality -> (I, DIM)
    train_items: list[np.ndarray]  # per user, chronological
    train_ts: list[np.ndarray]
    test_items: list[np.ndarray]
    train_flat: np.ndarray  # item rows of all training events

    @property
    def num_items(self) -> int:
        return len(self.emb["a"])


def make_problem(num_users: int = 250, noise: float = 0.1, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    num_items = N_CAT * N_COL * PER_PAIR
    pair = np.arange(num_items) // PER_PAIR
    emb = {}
    for name, attr in (("a", pair // N_COL), ("b", pair % N_COL)):
        x = noise * rng.standard_normal((num_items, DIM))
        x[np.arange(num_items), attr] += 1.0
        emb[name] = torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=torch.float32)
    users, items, ts = [], [], []
    for u in range(num_users):
        p = rng.integers(N_CAT * N_COL)
        first = p * PER_PAIR
        chosen = np.append(rng.permutation(np.arange(first, first + WARM)),
                           rng.integers(first + WARM, first + PER_PAIR))
        users += [u] * 6
        items += list(chosen)
        ts += list(1_000 * DAY_MS + np.cumsum(rng.integers(1, 5 * DAY_MS, size=6)))
    users, items, ts = np.array(users), np.array(items), np.array(ts)
    split = time_split(users, ts, holdout=1)
    tr, te = split.train, split.test
    return Problem(
        emb=emb,
        train_items=group_by_user(users[tr], items[tr], num_users, ts[tr]),
        train_ts=[ts[tr][users[tr] == u] for u in range(num_users)],
        test_items=group_by_user(users[te], items[te], num_users),
        train_flat=items[tr],
    )


def train_and_evaluate(problem: Problem, modalities: list[str], steps: int = 200, batch: int = 128,
                       temperature: float = 0.1, modality_dropout: float = 0.2, align_weight: float = 0.2,
                       seed: int = 0) -> float:
    """Train item + user tower on ``modalities`` only; return Recall@10 on the held-out items."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    item_tower = ItemTower(ItemTowerConfig(modality_dims={m: DIM for m in modalities}, d_model=32, n_heads=2,
                                           proj_hidden=64, dropout=0.0, modality_dropout=modality_dropout, out_dim=32))
    user_tower = UserTower(UserTowerConfig(item_dim=32, d_model=32, n_layers=1, n_heads=2, dropout=0.0,
                                           max_history=8))
    params = list(item_tower.parameters()) + list(user_tower.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    emb = {m: problem.emb[m] for m in modalities}
    log_q = log_sampling_probability(np.bincount(problem.train_flat, minlength=problem.num_items))
    # Next-item examples: every prefix of every training history predicts the item after it.
    examples = [(u, t) for u, seq in enumerate(problem.train_items) for t in range(1, len(seq))]
    for _ in range(steps):
        pick = rng.choice(len(examples), size=batch, replace=False)
        chosen = [examples[i] for i in pick]  # (user, position of the target in the history)
        hist = pad_histories([problem.train_items[u][:t] for u, t in chosen], max_len=8,
                             timestamps=[problem.train_ts[u][:t] for u, t in chosen])
        target = torch.tensor([problem.train_items[u][t] for u, t in chosen])
        vecs = item_tower(emb)  # (I, 32)
        user = user_tower(vecs[hist.item_idx], hist.mask, hist.timestamps_ms, hist.weights)
        loss = sampled_softmax_loss(user, vecs[target], log_q[target], temperature=temperature, item_ids=target)
        if len(modalities) > 1 and align_weight > 0:
            uniq = target.unique()
            loss = loss + align_weight * cross_modal_infonce(
                item_tower.modality_vectors({m: e[uniq] for m, e in emb.items()}), ids=uniq)
        opt.zero_grad()
        loss.backward()
        opt.step()
    item_tower.eval()
    user_tower.eval()
    with torch.no_grad():
        vecs = item_tower(emb)
        hist = pad_histories(problem.train_items, max_len=8, timestamps=problem.train_ts)
        user = user_tower(vecs[hist.item_idx], hist.mask, hist.timestamps_ms, hist.weights)
        scores = user @ vecs.T
    return ranking_metrics(scores, problem.test_items, ks=(10,), exclude=problem.train_items)["recall@10"]


def popularity_recall(problem: Problem) -> float:
    pop = PopularityBaseline.fit(problem.train_flat, problem.num_items)
    scores = pop.scores(len(problem.train_items))
    return ranking_metrics(scores, problem.test_items, ks=(10,), exclude=problem.train_items)["recall@10"]
