"""What training derives from the user records, built once a run and shared by every worker.

Every worker needs every user's training events (an example names only its user and place:
:class:`~tessera.train.examples.UserTimelines` rebuilds its history) and the item counts (the ranker's
popularity, the towers' logQ); rank 0 also the evaluation sets. Each worker used to read the whole ``users``
dataset and build all of it itself: W workers on a node held W copies (~20 bytes an event each, plus a
Python array object per user and column while building), and each spent the CPU to build them.

Now one Ray task (:func:`share_user_data`) reads the records once and returns three objects:
:class:`UserData` (the timelines' flat arrays and the counts), which every worker fetches from Ray's object
store, :class:`EvalData` (the evaluation sets), which rank 0 alone fetches, and the ranker's popularity
counts, which the driver writes into the bundle. A numpy array fetched from the object store is a
read-only view of shared memory, not a copy: the workers of a node share one copy, which a worker on
another node pulls once for its node.

The driver waits for the task (1 CPU) before it starts the trainer: workers holding every CPU would
otherwise leave the task none while they wait on it. The results are rebuilt from lineage if a node
holding them is lost; a worker group restarted after that loss waits on the rebuild, which needs a free
CPU (a cluster whose training workers take every CPU has none until the group's old workers are gone).

Example::

    refs = share_user_data(data.users, cfg, data.num_items)     # on the driver, before the trainer starts
    shared = ray.get(refs.shared)                              # on each worker
    shared.timelines.histories(user_key, from_end, cfg.max_history)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

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
    need; returns its refs. ``wait``: return once the task is done (its results stay where it ran): the job
    waits before starting the trainer, whose workers could otherwise take the CPUs the task waits for
    while they wait on it.

    Raises:
        ValueError: no user records (with ``wait``; otherwise on the first ``ray.get``).
    """
    shared, evaluation, counts = _derive_task.remote(users, cfg.model_dump(mode="json"), num_items)
    if wait:
        ray.wait([shared], fetch_local=False)
        ray.get(counts)  # small; raises the task's error here, on the driver
    return UserDataRefs(shared=shared, evaluation=evaluation, counts=counts)
