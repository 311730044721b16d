"""The catalog's latent side: per-item attributes, popularity and bad-item plan, drawn per part.

Every part of ``items_per_part`` items has its own random stream seeded by ``(seed, part)``, so a part
can be regenerated alone (parallel tasks, reruns) and :func:`catalog_latents` can rebuild the whole
catalog's latents (a few bytes per item) without touching any media.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.corpus.attributes import (
    CATEGORY_NAMES,
    COLOUR_NAMES,
    PITCHES_HZ,
    ItemAttributes,
    sample_attributes,
)
from tessera.corpus.config import CorpusConfig

BAD_KINDS = ["corrupt_image", "truncated_audio", "empty_text", "non_utf8_text", "missing_object",
             "oversized_image", "wrong_format"]
MODALITIES = ["text", "image", "audio"]
STREAM_LATENT, STREAM_MEDIA, STREAM_USERS = 1, 2, 3


def item_id(i: int) -> str:
    return f"item-{i:08d}"


def user_id(u: int) -> str:
    return f"user-{u:08d}"


@dataclass(frozen=True)
class PartLatents:
    """Latents of one item part: ``start`` is the global index of its first item."""

    start: int
    attrs: ItemAttributes
    popularity: np.ndarray      # (n,) float64, Pareto-tailed
    bad_kind: np.ndarray        # (n,) int8, -1 = good, else index into BAD_KINDS
    present: np.ndarray         # (n, 3) bool: text / image / audio present
    real: np.ndarray            # (n,) bool: real media from ../shared/data
    generic_text: np.ndarray    # (n,) bool: text without category words


def part_latents(cfg: CorpusConfig, part: int) -> PartLatents:
    start = part * cfg.items_per_part
    n = min(cfg.items_per_part, cfg.num_items - start)
    rng = np.random.default_rng([cfg.seed, STREAM_LATENT, part])
    attrs = sample_attributes(rng, n)
    popularity = (1.0 - rng.random(n)) ** (-1.0 / cfg.popularity_alpha)
    shares = np.array([getattr(cfg.bad, k) for k in BAD_KINDS])
    u = rng.random(n)
    edges = np.cumsum(shares)
    bad = np.searchsorted(edges, u, side="right").astype(np.int8)
    bad[bad >= len(BAD_KINDS)] = -1
    present = np.ones((n, 3), dtype=bool)
    good = bad < 0
    m = rng.random(n)
    one = good & (m < cfg.missing.one_modality)
    two = good & (m >= cfg.missing.one_modality) & (m < cfg.missing.one_modality + cfg.missing.two_modalities)
    for idx in np.flatnonzero(one):
        present[idx, rng.integers(0, 3)] = False
    for idx in np.flatnonzero(two):
        present[idx, rng.choice(3, size=2, replace=False)] = False
    real = np.zeros(n, dtype=bool)
    if cfg.real_media.enabled:
        real = good & (rng.random(n) < cfg.real_media.share)
    generic = rng.random(n) < cfg.generic_text_share
    return PartLatents(start, attrs, popularity, bad, present, real, generic)


@dataclass(frozen=True)
class CatalogLatents:
    """What user sampling needs of the whole catalog, with items grouped by preferred attributes."""

    popularity: np.ndarray       # (N,)
    group_order: np.ndarray      # item indices sorted by group
    group_start: np.ndarray      # (G+1,) offsets into group_order
    group_cum: np.ndarray        # cumulative popularity along group_order
    pop_cum: np.ndarray          # cumulative popularity over all items
    n_groups_axes: tuple[int, int, int]


def catalog_latents(cfg: CorpusConfig) -> CatalogLatents:
    """Rebuild the catalog's latents from the seeds (no media). Real-media items join no group."""
    cats, cols, pits, pops, eligible = [], [], [], [], []
    for part in range(cfg.num_item_parts):
        lat = part_latents(cfg, part)
        cats.append(lat.attrs.category)
        cols.append(lat.attrs.colour)
        pits.append(lat.attrs.pitch)
        pops.append(lat.popularity)
        eligible.append(~lat.real)
    cat, col, pit = (np.concatenate(x).astype(np.int64) for x in (cats, cols, pits))
    pop = np.concatenate(pops)
    ok = np.concatenate(eligible)
    axes = (len(CATEGORY_NAMES), len(COLOUR_NAMES), len(PITCHES_HZ))
    group = (cat * axes[1] + col) * axes[2] + pit
    group[~ok] = axes[0] * axes[1] * axes[2]  # a trailing group nobody prefers
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(axes[0] * axes[1] * axes[2] + 2))
    return CatalogLatents(pop, order, starts, np.cumsum(pop[order]), np.cumsum(pop), axes)
