"""Build parameters follow ScaNN's size rules; every value can be pinned; the split is balanced."""

import math

import numpy as np
import pytest

from tessera.config import ConfigError, parse_config
from tessera.index import (
    IndexConfig,
    assign_shards,
    choose_mode,
    derive_params,
    hash_ids,
    locate_shard,
    num_shards_for,
    shard_bounds,
    shard_key,
    shard_sizes,
)


@pytest.mark.parametrize("n, mode", [(1, "brute_force"), (500, "brute_force"), (19_999, "brute_force"),
                                     (20_000, "ah"), (99_999, "ah"), (100_000, "tree_ah"),
                                     (2_000_000, "tree_ah")])
def test_mode_by_shard_size(n, mode):
    assert derive_params(n, 128).mode == mode


def test_brute_force_has_no_scann_settings():
    p = derive_params(5_000, 64)
    assert (p.num_leaves, p.reorder_num_neighbors, p.dimensions_per_block) == (None, None, None)


def test_ah_follows_scann_guidance():
    p = derive_params(50_000, 64)
    assert p.dimensions_per_block == 2 and p.anisotropic_quantization_threshold == 0.2
    assert p.hash_type == "lut16" and p.reorder_num_neighbors == 100 and p.num_leaves is None
    assert p.training_sample_size == 50_000


@pytest.mark.parametrize("n", [100_000, 400_000, 2_000_000])
def test_tree_leaves_near_sqrt_n(n):
    p = derive_params(n, 64)
    assert p.num_leaves == round(math.sqrt(n))
    assert p.num_leaves_to_search == math.ceil(p.num_leaves / 50)  # tuning starts here
    assert p.training_sample_size == 100_000
    assert p.spherical and p.soar_lambda == 1.5 and p.soar_overretrieve_factor == 2.0
    plain = derive_params(n, 64, IndexConfig(spherical=False, soar_lambda=None))
    assert not plain.spherical and plain.soar_lambda is None and plain.soar_overretrieve_factor is None


def test_every_value_overridable():
    cfg = IndexConfig(num_leaves=50, num_leaves_to_search=7, reorder_num_neighbors=300, dimensions_per_block=4,
                      anisotropic_quantization_threshold=0.1, hash_type="lut256", training_sample_size=5_000,
                      num_neighbors=20)
    p = derive_params(200_000, 64, cfg)
    assert (p.num_leaves, p.num_leaves_to_search, p.reorder_num_neighbors) == (50, 7, 300)
    assert (p.dimensions_per_block, p.anisotropic_quantization_threshold, p.hash_type) == (4, 0.1, "lut256")
    assert (p.training_sample_size, p.num_neighbors) == (5_000, 20)
    assert derive_params(1_000, 64, IndexConfig(mode="tree_ah")).mode == "tree_ah"
    assert derive_params(500_000, 64, IndexConfig(mode="brute_force")).mode == "brute_force"
    assert derive_params(30_000, 64, IndexConfig(brute_force_below=40_000, partition_min_points=50_000)).mode \
        == "brute_force"


def test_small_catalog_is_exact_whatever_the_shard_thresholds():
    cfg = IndexConfig(brute_force_below=1_000)
    assert choose_mode(5_000, cfg, catalog_size=15_000) == "brute_force"
    assert choose_mode(5_000, cfg, catalog_size=25_000) == "ah"


def test_too_few_points_for_ah_fall_back_to_exact():
    assert derive_params(10, 8, IndexConfig(mode="ah")).mode == "brute_force"


def test_config_validation():
    with pytest.raises(ValueError, match="partition_min_points"):
        IndexConfig(brute_force_below=50_000, partition_min_points=10_000)
    with pytest.raises(ConfigError, match="unknown key 'num_leafs'"):
        parse_config(IndexConfig, {"num_leafs": 10})
    with pytest.raises(ValueError):
        derive_params(0, 64)


def test_balanced_deterministic_sharding():
    ids = [f"id-{i}" for i in range(10_007)]
    parts = assign_shards(ids, 4)
    sizes = sorted(len(p) for p in parts)
    assert sizes == [2_501, 2_502, 2_502, 2_502]
    rows = sorted(int(r) for p in parts for r in p)
    assert rows == list(range(len(ids)))
    # Depends on the ids only, not on their order.
    shuffled = list(reversed(ids))
    again = assign_shards(shuffled, 4)
    assert [{shuffled[r] for r in p} for p in again] == [{ids[r] for r in p} for p in parts]


def test_sharding_errors_and_sizes():
    with pytest.raises(ValueError, match="unique"):
        assign_shards(["a", "a"], 2)
    with pytest.raises(ValueError):
        assign_shards(["a"], 0)
    assert [len(p) for p in assign_shards(["a", "b"], 3)].count(0) == 1
    assert num_shards_for(250_000, 100_000) == 3 and num_shards_for(0, 10) == 1


@pytest.mark.parametrize("num_shards", [1, 2, 5, 2_003])
def test_bounds_from_the_hashes_alone_locate_every_item_in_its_shard(num_shards):
    ids = [f"item-{i}" for i in range(2_003)]
    shards = [[ids[r] for r in rows] for rows in assign_shards(ids, num_shards)]
    hashes = hash_ids(ids)[np.random.default_rng(0).permutation(len(ids))]  # any order
    bounds = shard_bounds(hashes, num_shards, tied_ids=lambda h: pytest.fail("no tie among these"))
    assert len(bounds) == num_shards - 1 and bounds == sorted(bounds)
    assert shard_sizes(len(ids), num_shards) == [len(s) for s in shards]
    assert all(locate_shard(shard_key(i), bounds) == s for s, members in enumerate(shards) for i in members)


def test_a_cut_among_items_sharing_a_hash_is_settled_by_their_ids():
    """No BLAKE2b collision is at hand, so the keys are made up: the cut is where (hash, id) order puts it."""
    keys = [(5, "b"), (5, "a"), (3, "z"), (9, "c"), (5, "c"), (1, "q")]
    ordered = sorted(keys)  # (1,q) (3,z) (5,a) | (5,b) (5,c) (9,c) for 2 shards: 3 + 3
    hashes = np.array([h for h, _ in keys], np.uint64)
    asked = []

    def tied(h):
        asked.append(h)
        return [i for k, i in keys if k == h]

    bounds = shard_bounds(hashes, 2, tied_ids=tied)
    assert bounds == [(5, "b")] and asked == [5]
    assert [locate_shard(k, bounds) for k in ordered] == [0, 0, 0, 1, 1, 1]
    three = shard_bounds(hashes, 3, tied_ids=tied)  # 2 + 2 + 2: cuts at (5,a) and (5,c)
    assert [locate_shard(k, three) for k in ordered] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="sharing the hash 5"):
        shard_bounds(hashes, 2)  # no ids to settle it
    with pytest.raises(ValueError, match="sharing the hash 5"):
        shard_bounds(hashes, 2, tied_ids=lambda h: ["a", "a", "b"])  # duplicate ids cannot be ordered
    with pytest.raises(ValueError, match="between 1 and the 6 items"):
        shard_bounds(hashes, 7)


def test_pinned_settings_the_training_sample_cannot_train_are_refused_naming_the_key():
    """ScaNN fails these in the build task ("Number of points (60) is less than the number of clusters (80)",
    "clusters per block (16) > training data size"), after the whole vector stage; the job derives every
    shard's parameters first (``_check_build_params``), so the key is named before any build."""
    with pytest.raises(ValueError, match=r"index\.num_leaves: 80 leaves .* trained on 60 points .*sample_size=60"):
        derive_params(4000, 8, IndexConfig(mode="tree_ah", num_leaves=80, training_sample_size=60))
    with pytest.raises(ValueError, match=r"^index\.training_sample_size: 100 leaves .* trained on 60 points"):
        derive_params(10_000, 8, IndexConfig(mode="tree_ah", training_sample_size=60))  # sqrt(10k) leaves, unpinned
    assert derive_params(4000, 8, IndexConfig(mode="tree_ah", num_leaves=60, training_sample_size=60)).num_leaves == 60


@pytest.mark.parametrize(("hash_type", "points", "sample", "least"), [("lut16", 5000, 16, 53),
                                                                       ("lut256", 5000, 256, 350)])
def test_an_ah_training_sample_that_scann_may_draw_short_is_refused(hash_type, points, sample, least):
    """ScaNN keeps each point with probability sample / points: the codebooks train on a binomial count
    around the sample. A pinned sample of exactly the centres (16, or 256 for lut256) drew 15 of 5,000 points
    and 247 and failed the build; the sample must sit well above them (or take the whole shard). Each
    setting is built in ScaNN: refused ones fail there, accepted ones build."""
    from scann.scann_ops.py import scann_ops_pybind

    rng = np.random.default_rng(0)
    x = rng.standard_normal((points, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def build(p):
        return (scann_ops_pybind.builder(x, 10, "dot_product")
                .score_ah(2, training_sample_size=p.training_sample_size, hash_type=p.hash_type).reorder(50).build())

    with pytest.raises(ValueError, match=rf"index\.training_sample_size={sample}: .* set at least {least}, or no less "
                                         rf"than the shard's size"):
        derive_params(points, 8, IndexConfig(mode="ah", hash_type=hash_type, training_sample_size=sample))
    with pytest.raises(RuntimeError, match="is greater than asymmetric hashing training data size"):
        build(derive_params(points, 8, IndexConfig(mode="ah", hash_type=hash_type)).model_copy(
            update={"training_sample_size": sample}))
    build(derive_params(points, 8, IndexConfig(mode="ah", hash_type=hash_type, training_sample_size=least)))
    for n in (300, 200):  # the whole shard trains, none drawn short; lut256 on fewer points than centres too
        x = x[:n]
        whole = derive_params(n, 8, IndexConfig(mode="ah", hash_type=hash_type, training_sample_size=n))
        assert whole.training_sample_size == n
        build(whole)


def test_a_tree_trained_on_exactly_its_leaves_builds_in_scann():
    """Unlike the AH codebooks, ScaNN's partitioner trains on a sample of exactly the leaves (checked at
    several shard sizes): the leaves check stays "no more leaves than the sample"."""
    from scann.scann_ops.py import scann_ops_pybind

    rng = np.random.default_rng(1)
    for n in (4000, 20_000):
        x = rng.standard_normal((n, 8)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        p = derive_params(n, 8, IndexConfig(mode="tree_ah", num_leaves=60, training_sample_size=60))
        assert (p.num_leaves, p.training_sample_size) == (60, 60)
        (scann_ops_pybind.builder(x, 10, "dot_product")
         .tree(num_leaves=p.num_leaves, num_leaves_to_search=6, training_sample_size=p.training_sample_size)
         .score_ah(2, training_sample_size=p.training_sample_size).reorder(50).build())  # as the job builds it
    assert derive_params(30, 8, IndexConfig(mode="tree_ah", num_leaves=40)).num_leaves == 30  # capped at n
