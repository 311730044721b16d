"""What every training worker reads, built once a run and shared through Ray's object store.

Every worker needs every user's training events (an example names only its user and place:
:class:`~tessera.train.examples.UserTimelines` rebuilds its history), the item counts (the ranker's
popularity, the towers' logQ) and the item feature table (:class:`~tessera.train.catalog.ItemCatalog`,
~4.6 MB per 1,000 items); rank 0 also the evaluation sets. Each worker used to read the whole ``users``
dataset and the whole embedding run and build all of it itself: W workers on a node held W copies (the
timelines ~20 bytes an event, plus a Python array object per user and column while building; the catalog
~4.6 GB at 1M items), and each spent the CPU (and the storage reads) to build them.

Now :func:`share_run_data` runs two Ray tasks once a run: one reads the user records and returns
:class:`UserData` (the timelines' flat arrays and the counts), which every worker fetches, :class:`EvalData`
(the evaluation sets), which rank 0 alone fetches, and the ranker's popularity counts, which the driver
writes into the bundle; the other reads the embedding run and returns the catalog's arrays. A numpy array
fetched from the object store is a read-only view of shared memory, not a copy: the workers of a node share
one copy, which a worker on another node pulls once for its node. On a GPU the worker copies the catalog
to its device, as before.

The driver waits for the tasks (1 CPU each) before it starts the trainer: workers holding every CPU would
otherwise leave the tasks none while they wait on them. The results are rebuilt from lineage if a node
holding them is lost; a worker group restarted after that loss waits on the rebuild, which needs a free
CPU (a cluster whose training workers take every CPU has none until the group's old workers are gone).

Example::

    refs = share_run_data(data.users, cfg, data.num_items)     # on the driver, before the trainer starts
    shared = ray.get(refs.users.shared)                        # on each worker
    shared.timelines.histories(user_key, from_end, cfg.max_history)
    catalog = ItemCatalog.from_arrays(ray.get(refs.catalog.arrays))   # tensors over the shared arrays
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import ray

from tessera.storage import Storage
from tessera.train.catalog import ItemCatalog
from tessera.train.config import TrainConfig
from tessera.train.examples import EvalSet, UserTimelines, item_counts, target_counts


@dataclass(frozen=True)
class UserData:
    """Every worker's share of the user records."""

    timelines: UserTimelines  # every user's training events, flat, by user key
    counts: np.ndarray  # (I,) each user's last max_examples_per_user training events: the ranker's popularity
    q_counts: np.ndarray  # (I,) targets of the towers' examples: their logQ
    counts_with_val: np.ndarray  # (I,) as counts, validation events included: the popularity baseline's
    num_users: int


@dataclass(frozen=True)
class EvalData:
    """Rank 0's evaluation sets."""

    test: EvalSet
    validation: EvalSet | None  # None: the config holds out no validation events


@dataclass(frozen=True)
class UserDataRefs:
    """Object refs of one run's :func:`share_user_data` (the driver holds them for the run's length)."""

    shared: ray.ObjectRef  # UserData
    evaluation: ray.ObjectRef  # EvalData
    counts: ray.ObjectRef  # (I,) int64: UserData.counts on its own, for the driver's popularity file


def users_table(shard) -> dict[str, np.ndarray]:
    """Every user record of ``shard`` (a Dataset or DataIterator), ordered by user id (the groupby that made
    them hands them over in no fixed order)."""
    cols: dict[str, list] = {}
    for batch in shard.iter_batches(batch_format="numpy", batch_size=4096):
        for k, v in batch.items():
            cols.setdefault(k, []).extend(list(v))
    table = {k: np.asarray(v, dtype=object) for k, v in cols.items()}
    order = np.argsort(table["user_id"].astype(str), kind="stable") if table else None
    return {k: v[order] for k, v in table.items()}


def derive(records: dict[str, np.ndarray], cfg: TrainConfig, num_items: int,
           with_evaluation: bool = True) -> tuple[UserData, EvalData | None]:
    """:class:`UserData` and :class:`EvalData` (None without ``with_evaluation``) of user records
    (:func:`~tessera.train.examples.user_records`)."""
    cap = cfg.max_examples_per_user
    tail = cfg.ranker.tail if cfg.ranker.enabled else 0
    shared = UserData(timelines=UserTimelines(records),
                      counts=item_counts(records, num_items, max_per_user=cap),
                      q_counts=target_counts(records, num_items, tail, cap),
                      counts_with_val=item_counts(records, num_items, with_validation=True, max_per_user=cap),
                      num_users=len(records["user_id"]))
    if not with_evaluation:
        return shared, None
    evaluation = EvalData(test=EvalSet.from_records(records, cfg.max_history, "test"),
                          validation=(EvalSet.from_records(records, cfg.max_history, "validation")
                                      if cfg.validation else None))
    return shared, evaluation


@ray.remote(num_returns=3, max_retries=3)
def _derive_task(users, cfg_json: dict, num_items: int) -> tuple[UserData, EvalData, np.ndarray]:
    records = users_table(users)
    if not records:
        raise ValueError("no user records: the interaction log holds no event of an item in the embedding run")
    shared, evaluation = derive(records, TrainConfig.model_validate(cfg_json), num_items)
    return shared, evaluation, shared.counts


def share_user_data(users, cfg: TrainConfig, num_items: int, wait: bool = True) -> UserDataRefs:
    """Run the task that reads ``users`` (the materialised user records) once and derives what the workers
    need; returns its refs. ``wait``: return once the task is done (its results stay where it ran).

    Raises:
        ValueError: no user records (with ``wait``; otherwise on the first ``ray.get``).
    """
    shared, evaluation, counts = _derive_task.remote(users, cfg.model_dump(mode="json"), num_items)
    if wait:
        ray.wait([shared], fetch_local=False)
        ray.get(counts)  # small; raises the task's error here, on the driver
    return UserDataRefs(shared=shared, evaluation=evaluation, counts=counts)


def catalog_fingerprint(arrays: dict) -> str:
    """blake2b of a catalog's arrays (:meth:`ItemCatalog.arrays`): ids, embeddings and present masks."""
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(arrays["item_ids"].tolist()).encode())
    for part in ("embeddings", "present"):
        for m in sorted(arrays[part]):
            h.update(m.encode())
            h.update(np.ascontiguousarray(arrays[part][m]).data)
    return h.hexdigest()


@ray.remote(num_returns=2, max_retries=3)
def _catalog_task(cfg_json: dict) -> tuple[dict, dict]:
    cfg = TrainConfig.model_validate(cfg_json)
    arrays = ItemCatalog.load(Storage(cfg.storage), cfg.embeddings_uri).arrays()
    return arrays, {"num_items": len(arrays["item_ids"]), "fingerprint": catalog_fingerprint(arrays)}


@dataclass(frozen=True)
class CatalogRefs:
    """The shared item catalog: the ref of its arrays and what the driver checks them by."""

    arrays: ray.ObjectRef  # ItemCatalog.arrays() of the embedding run
    num_items: int
    fingerprint: str  # catalog_fingerprint of the arrays as the task built them

    def check_unchanged(self) -> None:
        """Raise if the shared arrays differ from what the task built. Ray maps its object store writable: a
        tensor over it (:meth:`ItemCatalog.from_arrays`) written in place would change every worker's copy
        and the bundle's, silently; nothing writes them, and this would catch a change that did.

        Raises:
            RuntimeError: they changed."""
        if catalog_fingerprint(ray.get(self.arrays)) != self.fingerprint:
            raise RuntimeError("the item catalog shared with the training workers changed while they trained "
                               "(a tensor over the object store was written in place)")


@dataclass(frozen=True)
class SharedRefs:
    """Object refs of one run's :func:`share_run_data` (the driver holds them for the run's length)."""

    users: UserDataRefs
    catalog: CatalogRefs


def _catalog_refs(arrays: ray.ObjectRef, info: ray.ObjectRef) -> CatalogRefs:
    """The refs of a :func:`_catalog_task`, once it is done (its error raised here, on the driver)."""
    info = ray.get(info)
    return CatalogRefs(arrays=arrays, num_items=info["num_items"], fingerprint=info["fingerprint"])


def share_catalog(cfg: TrainConfig) -> CatalogRefs:
    """Run the task that reads the embedding run ``cfg.embeddings_uri`` once; returns once it is done (its
    error raised here, on the driver)."""
    return _catalog_refs(*_catalog_task.remote(cfg.model_dump(mode="json")))


def share_run_data(users, cfg: TrainConfig, num_items: int) -> SharedRefs:
    """The user data (:func:`share_user_data`) and the item catalog (:func:`share_catalog`), built by two
    tasks side by side; returns once both are done (the job starts the trainer after, see the module doc).

    Raises:
        ValueError: no user records.
        RuntimeError: the embedding run holds another number of items than ``num_items`` (it changed since
            the datasets mapped the log's item ids to catalog rows).
        The catalog task's error (e.g. ``FileNotFoundError``: the embedding run has no parts).
    """
    started = _catalog_task.remote(cfg.model_dump(mode="json"))  # runs beside the user data's task
    user_data = share_user_data(users, cfg, num_items)
    catalog = _catalog_refs(*started)
    if catalog.num_items != num_items:
        raise RuntimeError(f"the embedding run {cfg.embeddings_uri} holds {catalog.num_items} items, "
                           f"{num_items} when the training data was built: it changed during the job")
    return SharedRefs(users=user_data, catalog=catalog)
