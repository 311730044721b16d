"""Ray Data side of training: interactions + embedding run -> user records and next-item examples.

    read_parquet(interactions) -> map ids to catalog rows (item ids read from the embedding run)
      -> groupby(user_id).map_groups(time split)     = ``users``   (one row per user)
      -> map_batches(next-item examples: user key, place, target; no history)
      -> all but each user's last ``ranker.tail``      = ``train``   (the retrieval towers)
         every example                                = ``ranker``  (the ranker's lists)
      (both shuffled once across users)

Both are materialised once before training (28 bytes an example: each worker rebuilds an example's
history from the user records, :class:`tessera.train.examples.UserTimelines`, which one task builds a run
and every worker reads from the object store: :mod:`tessera.train.shared`), so restarts
after a worker failure re-read blocks instead of recomputing. Interactions whose item is not in
the embedding run are counted and dropped (the count goes into the manifest); events without a user, an
item or a time are left out (:func:`tessera.interactions.normalize_log`, which also gives every reader
of the log the same column types).

Example::

    data = build_datasets(cfg, storage)
    data.train.count(), data.users.count(), data.unknown_items
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import ray.data
from ray.data.aggregate import Max, Min
from ray.data.expressions import col

from tessera.embed.output import committed_parts
from tessera.storage import Storage
from tessera.train.config import TrainConfig
from tessera.train.examples import next_item_examples, user_records

INTERACTION_COLUMNS = ["user_id", "item_id", "ts", "weight"]


@dataclass
class TrainDatasets:
    """Materialised datasets and their counts."""

    train: ray.data.Dataset
    ranker: ray.data.Dataset
    users: ray.data.Dataset
    num_items: int
    interactions: int
    unknown_items: int
    examples: int
    num_users: int
    ts_range: tuple[int | None, int | None] = (None, None)  # the log's first and last time (int64 ms)


def _catalog_ids(cfg: TrainConfig, storage: Storage) -> np.ndarray:
    parts = committed_parts(storage, cfg.embeddings_uri)
    if not parts:
        raise FileNotFoundError(f"no Parquet parts under {cfg.embeddings_uri}")
    fs, _ = storage.filesystem(parts[0])
    ids = ray.data.read_parquet([storage.filesystem(p)[1] for p in parts], filesystem=fs).select_columns(["item_id"])
    return np.sort(np.asarray([r["item_id"] for r in ids.take_all()], dtype=str))


def _to_rows(batch: dict[str, np.ndarray], item_ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = batch["item_id"].astype(str)
    pos = np.clip(np.searchsorted(item_ids, ids), 0, len(item_ids) - 1)
    batch["item_row"] = np.where(item_ids[pos] == ids, pos, -1).astype(np.int64)
    return batch


def _read_log_files(batch: dict[str, np.ndarray], storage: Storage):
    """Each log file of the batch in the readers' common types (:func:`tessera.interactions.read_log_file`),
    events without a user, an item or a time left out, as serving and the index self-check ignore them."""
    from tessera.interactions import iter_log_file

    for uri in batch["uri"]:
        yield from iter_log_file(storage, str(uri), INTERACTION_COLUMNS, drop_incomplete=True)


def read_interactions(storage: Storage, interactions_uri: str) -> ray.data.Dataset:
    """The interaction log as a Dataset of ``user_id``, ``item_id`` (strings), ``ts`` (int64 ms) and
    ``weight`` (float32), read the way the self-check and serving read it: a file at a time, each converted
    on its own (Ray Data's ``read_parquet`` refused files whose column types differ, int and string ids)."""
    from tessera.interactions import interaction_files

    files = interaction_files(storage, interactions_uri)
    listing = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=len(files))
    # one CPU a task, as the map that follows (so the two fuse: no trip through the object store between)
    return listing.map_batches(_read_log_files, batch_size=1, fn_kwargs={"storage": storage})


_ORDER = "_order"
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (uint64, wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _order_key(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore"):
        z = _mix(np.uint64(seed % (1 << 64)) * _GOLDEN + batch["user_key"].astype(np.int64).view(np.uint64))
        z = _mix(z + batch["from_end"].astype(np.int64).view(np.uint64) * _GOLDEN)
    batch[_ORDER] = (z >> np.uint64(1)).astype(np.int64)
    return batch


def seeded_order(examples: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """``examples`` in an order drawn from ``seed`` and each example's own identity (its user's key and its
    place from the end of the user's history), not from the order its blocks were computed in.

    ``random_shuffle(seed=)`` permutes the rows as they arrive, and the groupby before it hands them over in
    the order its tasks finish: the same data and seed trained another model each run (the same job's NDCG
    moved by +-0.015 between runs). Sorting on a keyed hash gives one order for one seed, whichever way
    the blocks were cut; (user_key, from_end) breaks ties, so the order is total. The rows keep it through the
    step after the sort where ``examples`` runs with ``preserve_order`` (:func:`build_datasets`), and the workers
    take contiguous row ranges of it (:func:`tessera.train.job.row_ranges`)."""
    keyed = examples.map_batches(_order_key, fn_kwargs={"seed": seed}, batch_format="numpy")
    return keyed.sort([_ORDER, "user_key", "from_end"]).drop_columns([_ORDER])


def build_datasets(cfg: TrainConfig, storage: Storage) -> TrainDatasets:
    """Read, map, split and expand; see the module docstring."""
    item_ids = _catalog_ids(cfg, storage)
    inter = read_interactions(storage, cfg.interactions_uri)
    mapped = inter.map_batches(_to_rows, fn_kwargs={"item_ids": item_ids}, batch_format="numpy").materialize()
    total = mapped.count()
    ts_range = tuple(int(t) for t in mapped.aggregate(Min("ts"), Max("ts")).values()) if total else (None, None)
    known = mapped.filter(expr=col("item_row") >= 0)
    n_known = known.count()
    users = known.groupby("user_id", num_partitions=cfg.group_partitions).map_groups(
        user_records, fn_kwargs={"holdout": cfg.holdout, "validation": cfg.validation},
        batch_format="numpy").materialize()
    examples = users.map_batches(next_item_examples, fn_kwargs={"max_examples": cfg.max_examples_per_user},
                                 batch_format="numpy").materialize()
    tail = cfg.ranker.tail if cfg.ranker.enabled else 0
    # From here on (the context of this build's datasets, read_interactions' copy of the driver's) blocks
    # leave each step in order, so the seeded order survives the step after its sort (seeded_order); the
    # steps before, already run, were not held to it
    examples.context.execution_options.preserve_order = True
    # Shuffled once across users: the examples come out grouped by user (one run of a user's examples
    # after another), and the workers' local shuffle buffer (a few batches) left several of the same
    # user's own items among each example's in-batch negatives (2.3 of 63 a row, simulated, vs 0.15).
    train = seeded_order(examples.filter(expr=col("from_end") >= tail), cfg.seed).materialize()
    # The ranker reads every example: the tail alone (~2 lists a user) is too few lists to learn from.
    ranker = (seeded_order(examples, cfg.seed + 1).materialize() if cfg.ranker.enabled
              else examples.filter(expr=col("from_end") < 0).materialize())
    return TrainDatasets(train=train, ranker=ranker, users=users, num_items=len(item_ids), interactions=total,
                         unknown_items=total - n_known, examples=examples.count(), num_users=users.count(),
                         ts_range=ts_range)
