"""Interaction sampling without Ray: taste signal, long tail, time order, determinism."""

import numpy as np
import pytest

from tessera.corpus.attributes import CATEGORY_NAMES
from tessera.corpus.catalog import catalog_latents, part_latents
from tessera.corpus.config import CorpusConfig
from tessera.corpus.interactions import generate_user_part


@pytest.fixture(scope="module")
def cfg():
    return CorpusConfig(num_items=3000, num_users=300, items_per_part=1000, users_per_part=300, seed=3)


@pytest.fixture(scope="module")
def part(cfg):
    return generate_user_part(cfg, 0, catalog_latents(cfg))


def _item_categories(cfg):
    return np.concatenate([part_latents(cfg, p).attrs.category for p in range(cfg.num_item_parts)])


def test_deterministic(cfg, part):
    again = generate_user_part(cfg, 0, catalog_latents(cfg))
    for k in part.interactions:
        assert np.array_equal(part.interactions[k], again.interactions[k])


def test_users_prefer_their_category(cfg, part):
    cats = _item_categories(cfg)
    prefs = dict(zip(part.users["user_id"], part.users["pref_category"], strict=True))
    item_idx = np.array([int(i.split("-")[1]) for i in part.interactions["item_id"]])
    hit = np.array([cats[i] == prefs[u] for u, i in zip(part.interactions["user_id"], item_idx, strict=True)])
    chance = 1 / len(CATEGORY_NAMES)
    assert hit.mean() > 3 * chance, hit.mean()


def test_long_tail_popularity(part):
    _, counts = np.unique(part.interactions["item_id"], return_counts=True)
    counts = np.sort(counts)[::-1]
    top = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top > 0.25, top  # the top 10% of items take well over 10% of interactions


def test_time_ordered_and_unique_per_user(part):
    u, i, ts = part.interactions["user_id"], part.interactions["item_id"], part.interactions["ts"]
    for user in np.unique(u)[:50]:
        m = u == user
        assert np.all(np.diff(ts[m]) > 0)
        assert len(set(i[m])) == m.sum()
    assert part.users["num_interactions"].min() >= 1
    assert part.users["num_interactions"].sum() == len(u)
