"""Index configuration and the ScaNN build parameters derived from a shard's size.

ScaNN's own rules of thumb (``scann/docs/algorithms.md``) decide the algorithm per shard:

* fewer than ~20k points: brute force (here: exact float32 numpy, see :mod:`tessera.index.exact`);
* fewer than ~100k points: asymmetric hashing (AH) with ``dimensions_per_block=2``, then exact
  reordering of the best candidates;
* more: a k-means tree with ``num_leaves`` ~ sqrt(n), AH inside the searched leaves, then reordering.
  The tree is trained with spherical k-means (the vectors are unit length) and every point is also
  filed under a second leaf chosen by SOAR (Sun et al. 2023, "SOAR: Improved Indexing for Approximate
  Nearest Neighbor Search", ScaNN's ``soar_lambda``): on 100k MiniLM text vectors this reached
  recall@10 0.95 searching ~4% of the leaves instead of ~20% (``bench/ann.py``).

``num_leaves_to_search`` and the reordering depth should be "tuned based on recall target"; left
unset (``None``) they are tuned per shard at build time (see :func:`tessera.index.shard.build_shard`).
Every value can be pinned in :class:`IndexConfig`. Similarity is the dot product of L2-normalised
vectors (cosine).

Example::

    cfg = IndexConfig(brute_force_below=5_000)
    params = derive_params(num_points=30_000, dim=64, config=cfg)
    assert params.mode == "ah"
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tessera.config import TesseraConfig

Mode = Literal["brute_force", "ah", "tree_ah"]


class IndexConfig(TesseraConfig):
    """How shards are built. ``None`` means "derive from the shard's size" (or tune, where noted).

    Args:
        mode: ``auto`` applies the size rules below; otherwise every shard uses the named algorithm.
        brute_force_below: shards with fewer points are searched exactly.
        partition_min_points: shards with at least this many points get a k-means tree.
        exact_catalog_below: when the whole catalog is smaller, every shard is exact, whatever its size.
        num_neighbors: the k the shards are tuned for (searches may ask for any k).
        dimensions_per_block: AH dimensions per codebook block (ScaNN recommends 2).
        anisotropic_quantization_threshold: AH noise-shaping threshold for dot-product search (0.2,
            from Guo et al. 2020, "Accelerating Large-Scale Inference with Anisotropic Vector
            Quantization").
        hash_type: ``lut16`` (16 centres per block, fastest) or ``lut256``.
        reorder_num_neighbors: AH candidates rescored exactly; None tunes it from ``10 * num_neighbors``.
        num_leaves: tree leaves; None means ``round(sqrt(n))``.
        num_leaves_to_search: leaves searched per query; None tunes it for ``recall_target``.
        spherical: train the tree with spherical k-means (for normalised vectors).
        soar_lambda: SOAR spilling: each point also goes to a second leaf whose centre's residual
            is far from orthogonal to the first one's (ScaNN's ``soar_lambda``; 1.5 as ScaNN
            suggests); None files every point under one leaf only.
        soar_overretrieve_factor: with SOAR, candidates gathered per query as a multiple of the
            reordering depth (a point may be found twice).
        recall_target: recall@num_neighbors the tuning aims for (leave-one-out on shard vectors).
        tuning_queries: how many shard vectors serve as tuning / self-check queries.
        training_sample_size: points sampled to train the tree and AH codebooks; None: min(n, 100k).
        training_threads: ScaNN training threads (0 lets ScaNN use every core; set 1 in Ray tasks
            that hold one CPU).
        normalize: L2-normalise item vectors (and queries) so dot product is cosine similarity.
        seed: seeds the choice of tuning queries.
    """

    mode: Literal["auto", "brute_force", "ah", "tree_ah"] = "auto"
    brute_force_below: int = Field(default=20_000, ge=0)
    partition_min_points: int = Field(default=100_000, ge=1)
    exact_catalog_below: int = Field(default=20_000, ge=0)
    num_neighbors: int = Field(default=10, ge=1)
    dimensions_per_block: int = Field(default=2, ge=1)
    anisotropic_quantization_threshold: float = 0.2
    hash_type: Literal["lut16", "lut256"] = "lut16"
    reorder_num_neighbors: int | None = Field(default=None, ge=1)
    num_leaves: int | None = Field(default=None, ge=1)
    num_leaves_to_search: int | None = Field(default=None, ge=1)
    spherical: bool = True
    soar_lambda: float | None = Field(default=1.5, gt=0)
    soar_overretrieve_factor: float = Field(default=2.0, ge=1.0)
    recall_target: float = Field(default=0.95, gt=0, le=1)
    tuning_queries: int = Field(default=256, ge=1)
    training_sample_size: int | None = Field(default=None, ge=1)
    training_threads: int = Field(default=0, ge=0)
    normalize: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> IndexConfig:
        if self.partition_min_points < self.brute_force_below:
            raise ValueError(f"partition_min_points ({self.partition_min_points}) must be >= "
                             f"brute_force_below ({self.brute_force_below})")
        return self


class ScannParams(BaseModel):
    """The concrete parameters one shard was built (and is searched) with; saved in its manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode
    num_points: int
    dim: int
    num_neighbors: int
    normalized: bool = True
    dimensions_per_block: int | None = None
    anisotropic_quantization_threshold: float | None = None
    hash_type: str | None = None
    reorder_num_neighbors: int | None = None
    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    spherical: bool | None = None
    soar_lambda: float | None = None
    soar_overretrieve_factor: float | None = None
    training_sample_size: int | None = None


def choose_mode(num_points: int, config: IndexConfig, catalog_size: int | None = None) -> Mode:
    """The algorithm for a shard of ``num_points``, by ScaNN's size rules unless ``config.mode`` pins it.

    Args:
        num_points: points in this shard.
        config: thresholds and overrides.
        catalog_size: points in the whole index (all shards); below ``exact_catalog_below`` every
            shard is exact. None means this shard is the whole catalog.
    """
    catalog = num_points if catalog_size is None else catalog_size
    if config.mode != "auto":
        mode: Mode = config.mode
    elif catalog < config.exact_catalog_below or num_points < config.brute_force_below:
        mode = "brute_force"
    elif num_points < config.partition_min_points:
        mode = "ah"
    else:
        mode = "tree_ah"
    if mode == "tree_ah" and num_points < 2:
        mode = "ah"
    if mode != "brute_force" and num_points < 16:  # too few points to train 16-centre AH codebooks
        mode = "brute_force"
    return mode


def min_ah_sample(centres: int, z: float = 5.0) -> int:
    """The least ``training_sample_size`` that trains ``centres``-centre AH codebooks on a shard larger than
    it: ScaNN keeps each point with probability sample / points, a binomial count around the sample with
    a spread of about its square root, and refuses a draw of fewer points than centres ("Number of
    clusters per block (16) is greater than asymmetric hashing training data size (15)" from a sample
    of 16 of 5,000 points). Here the sample sits ``z`` spreads above the centres (odds of a short draw
    below 1 in 3 million): 53 for lut16, 350 for lut256. A sample of the whole shard is taken whole."""
    root = (z + math.sqrt(z * z + 4 * centres)) / 2  # s - z * sqrt(s) = centres
    return math.ceil(root * root)


def derive_params(num_points: int, dim: int, config: IndexConfig | None = None,
                  catalog_size: int | None = None) -> ScannParams:
    """Build parameters for one shard; tunable values not pinned in ``config`` get starting points.

    Args:
        num_points: points in the shard (> 0).
        dim: vector dimension.
        config: overrides; defaults follow ScaNN's guidance.
        catalog_size: total points over all shards (see :func:`choose_mode`).

    Returns:
        A :class:`ScannParams`. ``reorder_num_neighbors`` / ``num_leaves_to_search`` hold the
        starting values that :func:`tessera.index.shard.build_shard` tunes when the config left
        them unset.

    Example::

        derive_params(150_000, 128).num_leaves  # 387 = round(sqrt(150_000))
    """
    if num_points <= 0 or dim <= 0:
        raise ValueError(f"need num_points > 0 and dim > 0, got {num_points} and {dim}")
    config = config or IndexConfig()
    mode = choose_mode(num_points, config, catalog_size)
    if mode == "brute_force":
        return ScannParams(mode=mode, num_points=num_points, dim=dim, num_neighbors=config.num_neighbors,
                           normalized=config.normalize)
    reorder = config.reorder_num_neighbors or 10 * config.num_neighbors
    sample = min(num_points, config.training_sample_size or 100_000)
    centres = 256 if config.hash_type == "lut256" else 16
    if sample < num_points and sample < (least := min_ah_sample(centres)):
        raise ValueError(f"index.training_sample_size={config.training_sample_size}: ScaNN trains the "
                         f"{config.hash_type} codebooks ({centres} centres a block) on a random draw of about that "
                         f"many of a {num_points}-point shard's points (give or take its square root) and fails "
                         f"when fewer than {centres} are drawn: set at least {least}, or no less than the shard's size")
    common = dict(
        num_points=num_points, dim=dim, num_neighbors=config.num_neighbors, normalized=config.normalize,
        dimensions_per_block=min(config.dimensions_per_block, dim),
        anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
        hash_type=config.hash_type, reorder_num_neighbors=max(reorder, config.num_neighbors),
        training_sample_size=sample,
    )
    if mode == "ah":
        return ScannParams(mode=mode, **common)
    leaves = config.num_leaves or max(1, round(math.sqrt(num_points)))
    leaves = min(leaves, num_points)
    if leaves > sample:  # ScaNN: "Number of points (...) is less than the number of clusters (...)"
        key = "index.num_leaves" if config.num_leaves else "index.training_sample_size"
        raise ValueError(f"{key}: {leaves} leaves for a {num_points}-point shard, but the tree is trained on {sample} "
                         f"points (index.training_sample_size={config.training_sample_size}, index.num_leaves="
                         f"{config.num_leaves}): raise training_sample_size or lower num_leaves")
    to_search = config.num_leaves_to_search or max(1, math.ceil(leaves / 50))
    soar = config.soar_lambda is not None and leaves > 1
    return ScannParams(mode=mode, num_leaves=leaves, num_leaves_to_search=min(to_search, leaves),
                       spherical=config.spherical and config.normalize,
                       soar_lambda=config.soar_lambda if soar else None,
                       soar_overretrieve_factor=config.soar_overretrieve_factor if soar else None, **common)
