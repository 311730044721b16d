"""Users with latent tastes, and a timestamped interaction log drawn from them.

A user prefers one or two categories (seen in item text), one or two colours (image only) and one
or two pitches (audio only). Each interaction either follows the taste (category, colour and pitch
drawn from the user's preferences, then an item of that group by popularity) or, with probability
``noise_share``, is an item drawn by popularity alone. Popularity is Pareto-tailed, so a few items
take a large share of interactions (the long tail the retrieval loss corrects for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.corpus.catalog import STREAM_USERS, CatalogLatents, item_id, user_id
from tessera.corpus.config import CorpusConfig

EVENTS = np.array(["view", "click", "purchase"])
EVENT_P = np.array([0.7, 0.2, 0.1])
EVENT_WEIGHT = np.array([1.0, 2.0, 4.0], dtype=np.float32)
T0_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
DAY_MS = 86_400_000


@dataclass(frozen=True)
class UserPart:
    users: dict[str, np.ndarray]         # ground truth columns, one row per user
    interactions: dict[str, np.ndarray]  # user_id, item_id, ts, event, weight


def _preference(rng: np.random.Generator, n_users: int, n_values: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Primary and secondary preferred value per user, and the weight of the primary."""
    primary = rng.integers(0, n_values, n_users)
    secondary = (primary + rng.integers(1, n_values, n_users)) % n_values
    w_primary = rng.uniform(0.55, 0.85, n_users)
    return primary, secondary, w_primary


def _pick(rng, primary, secondary, w_primary, n_values: int, uniform_share: float = 0.1):
    """Primary with ``w_primary``, else secondary, except ``uniform_share`` of draws that take any value."""
    u = rng.random(len(primary))
    out = np.where(u < w_primary, primary, secondary)
    anyv = rng.random(len(primary)) < uniform_share
    out[anyv] = rng.integers(0, n_values, int(anyv.sum()))
    return out


def _sample_in_groups(rng: np.random.Generator, cat: CatalogLatents, groups: np.ndarray) -> np.ndarray:
    """One item per requested group, popularity-weighted; empty groups fall back to the whole catalog."""
    lo, hi = cat.group_start[groups], cat.group_start[groups + 1]
    empty = hi <= lo
    base = np.where(lo > 0, cat.group_cum[np.maximum(lo - 1, 0)], 0.0)
    top = cat.group_cum[np.maximum(hi - 1, 0)]
    target = base + rng.random(len(groups)) * (top - base)
    pos = np.clip(np.searchsorted(cat.group_cum, target, side="right"), lo, np.maximum(hi - 1, lo))
    items = cat.group_order[np.minimum(pos, len(cat.group_order) - 1)]
    if empty.any():
        items[empty] = _sample_popular(rng, cat, int(empty.sum()))
    return items


def _sample_popular(rng: np.random.Generator, cat: CatalogLatents, n: int) -> np.ndarray:
    target = rng.random(n) * cat.pop_cum[-1]
    return np.minimum(np.searchsorted(cat.pop_cum, target, side="right"), len(cat.pop_cum) - 1)


def generate_user_part(cfg: CorpusConfig, part: int, cat: CatalogLatents) -> UserPart:
    """Users ``[part * users_per_part, ...)`` with their preferences and interactions, time-ordered."""
    start = part * cfg.users_per_part
    n = min(cfg.users_per_part, cfg.num_users - start)
    rng = np.random.default_rng([cfg.seed, STREAM_USERS, part])
    n_cat, n_col, n_pit = cat.n_groups_axes
    prefs = {name: _preference(rng, n, size) for name, size in
             (("category", n_cat), ("colour", n_col), ("pitch", n_pit))}
    # long-tailed activity: a lognormal around the configured mean, at least 3 interactions
    sigma = 0.8
    counts = np.maximum(3, np.round(rng.lognormal(np.log(cfg.mean_interactions_per_user) - sigma**2 / 2,
                                                  sigma, n))).astype(np.int64)
    # draw twice what is needed, keep each user's first meeting with an item, then the first `counts`
    owner = np.repeat(np.arange(n), 2 * counts)
    sizes = {"category": n_cat, "colour": n_col, "pitch": n_pit}
    picked = {name: _pick(rng, p[0][owner], p[1][owner], p[2][owner], sizes[name]) for name, p in prefs.items()}
    groups = (picked["category"] * n_col + picked["colour"]) * n_pit + picked["pitch"]
    items = _sample_in_groups(rng, cat, groups)
    noisy = rng.random(len(owner)) < cfg.noise_share
    items[noisy] = _sample_popular(rng, cat, int(noisy.sum()))
    key = owner * (cat.popularity.size + 1) + items
    _, first_seen = np.unique(key, return_index=True)
    keep = np.sort(first_seen)
    owner, items = owner[keep], items[keep]
    run_start = np.concatenate([[0], np.flatnonzero(np.diff(owner)) + 1])
    rank = np.arange(len(owner)) - np.repeat(run_start, np.diff(np.append(run_start, len(owner))))
    keep = rank < counts[owner]
    owner, items = owner[keep], items[keep]
    total = len(owner)
    # time: each user starts somewhere in a 60-day window, then exponential gaps (mean 6 h)
    t_start = T0_MS + (rng.random(n) * 60 * DAY_MS).astype(np.int64)
    gaps = rng.exponential(6 * 3600 * 1000, total).astype(np.int64) + 1000
    cum = np.cumsum(gaps)
    first = np.searchsorted(owner, np.arange(n))
    first = np.minimum(first, max(total - 1, 0))
    ts = t_start[owner] + cum - (cum[first] - gaps[first])[owner]
    ev = rng.choice(len(EVENTS), size=total, p=EVENT_P)
    uids = np.array([user_id(start + u) for u in range(n)], dtype=object)
    users = {"user_id": uids, "num_interactions": np.bincount(owner, minlength=n).astype(np.int64)}
    for name, (p1, p2, w) in prefs.items():
        users[f"pref_{name}"] = p1.astype(np.int16)
        users[f"pref_{name}_2"] = p2.astype(np.int16)
        users[f"pref_{name}_weight"] = w.astype(np.float32)
    inter = {
        "user_id": uids[owner],
        "item_id": np.array([item_id(int(i)) for i in items], dtype=object),
        "ts": ts.astype(np.int64),
        "event": EVENTS[ev],
        "weight": EVENT_WEIGHT[ev],
    }
    return UserPart(users, inter)
