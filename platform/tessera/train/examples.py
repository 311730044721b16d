"""Per-user time split and next-item training examples (numpy only; Ray Data calls these per batch).

A *user record* is one user's interactions in time order, split by time: the last ``holdout``
events are the test targets (users with fewer than ``holdout + 1`` events keep everything for
training), and the ``validation`` events before them the validation targets (when the user has
more than ``validation`` events left; otherwise none). Every training position ``t >= 1`` then
gives one *example*: the (up to) ``N`` items before it, left-padded to fixed width, predict the
item at ``t``; a user gives at most ``max_examples`` of them, the most recent (a bot's or a power user's
thousands of events would otherwise outweigh everyone else in the loss and in memory). Validation and
test events are never training targets; the test's history holds the validation events (they happened
before it). A target the user had already had before is not evaluated: every metric leaves the user's
history out of the ranking, as serving does, so it could never be found.

Example::

    rec = user_records({"user_id": ..., "item_row": ..., "ts": ..., "weight": ...}, holdout=1, validation=1)
    ex = next_item_examples(rec)                     # target, target_w, from_end, user_key: (E,) each
    hist = UserTimelines(rec).histories(ex["user_key"], ex["from_end"], max_history=20)
    hist["hist_items"].shape    # (E, 20) int64, 0 where padded;  hist["hist_len"]: (E,) real items
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tessera.interactions import event_order
from tessera.models import HistoryBatch, pad_histories

EXAMPLE_COLUMNS = ("target", "target_w", "from_end", "user_key")  # what a materialised example holds
HISTORY_COLUMNS = ("hist_items", "hist_ts", "hist_w", "hist_len")  # added per batch (UserTimelines)
USER_KEY = "tessera-users-01"  # the (16-character) key of the examples' user hashes (user_key)


def user_keys(user_ids: np.ndarray) -> np.ndarray:
    """(n,) int64 keyed hashes of user ids: an example's ``user_key`` (torch has no uint64)."""
    from tessera.interactions import hash_user_ids

    return hash_user_ids([str(u) for u in user_ids], USER_KEY).view(np.int64)


def user_records(events: dict[str, np.ndarray], holdout: int, validation: int = 0) -> dict[str, np.ndarray]:
    """One user's events (any order) -> one record row with its time-split train, validation and test parts.

    Args:
        events: ``user_id``, ``item_row`` (catalog row), ``ts`` (ms) and ``weight`` arrays of one user.
        holdout: events held out at the end; users with ``<= holdout`` events keep all for training.
        validation: events before those held out as validation targets, for a user with a test part and
            more than ``validation`` events before it (the user keeps at least one training event).

    Returns:
        A one-row batch: ``user_id``; ``train_items``/``train_ts``/``train_w``,
        ``val_items``/``val_ts``/``val_w`` and ``test_items`` as object arrays holding one numpy
        array each (chronological).
    """
    # ties on ts broken by item, then weight: the group's arrival order changes between runs (Ray Data's
    # shuffle), and which of two same-time events is held out must not (the self-check and serving agree)
    order = event_order(events["ts"], events["item_row"], events["weight"])
    items = np.asarray(events["item_row"], dtype=np.int64)[order]
    ts = np.asarray(events["ts"], dtype=np.int64)[order]
    w = np.asarray(events["weight"], dtype=np.float32)[order]
    n_test = holdout if len(items) > holdout else 0
    n_val = validation if n_test and len(items) - n_test > validation else 0  # a user never tested keeps all
    end = len(items) - n_test  # train [0, cut), validation [cut, end), test [end, n)
    cut = end - n_val

    def one(x: np.ndarray) -> np.ndarray:
        out = np.empty(1, dtype=object)
        out[0] = x
        return out

    return {"user_id": np.asarray(events["user_id"][:1]), "train_items": one(items[:cut]),
            "train_ts": one(ts[:cut]), "train_w": one(w[:cut]), "val_items": one(items[cut:end]),
            "val_ts": one(ts[cut:end]), "val_w": one(w[cut:end]), "test_items": one(items[end:])}


def first_example(num_events: int, max_examples: int | None) -> int:
    """The first training position of a user with ``num_events`` training events that gives an example: 1
    (the first event has nothing before it), or later when ``max_examples`` keeps only the last ones.
    :func:`next_item_examples` and :func:`target_counts` (logQ) both cut here, so they cannot disagree."""
    return 1 if max_examples is None else max(1, num_events - max_examples)


def next_item_examples(records: dict[str, np.ndarray], max_examples: int | None = None) -> dict[str, np.ndarray]:
    """User records -> one example per training position ``t >= 1`` of each user, the last ``max_examples``
    positions of each (None: every one). An example names its place, not its history: the worker rebuilds
    the history from the user records (:class:`UserTimelines`, shared by the workers:
    :mod:`tessera.train.shared`), so a materialised example is 28 bytes whatever ``max_history`` (with its
    padded history it was ~20 x max_history, three copies over).

    Returns:
        ``target`` ``(E,)`` int64, ``target_w`` ``(E,)`` float32, ``from_end`` ``(E,)`` int64: 0 for the
        user's last training event, 1 for the one before... (the retrieval towers leave out each user's last
        ``ranker.tail`` examples, so part of the ranker's lists, which come from every example, carry
        retrieval scores of unseen data), and ``user_key`` ``(E,)`` int64 (:func:`user_keys`; with
        ``from_end``, :class:`UserTimelines` finds the example's history and every item the user had before
        its target).
    """
    tgt, tw, fe, uk = [], [], [], []
    keys = user_keys(records["user_id"])
    for key, items, w in zip(keys, records["train_items"], records["train_w"], strict=True):
        n = len(items)
        first = first_example(n, max_examples)
        if first >= n:
            continue
        tgt.append(np.asarray(items[first:], dtype=np.int64))
        tw.append(np.asarray(w[first:], dtype=np.float32))
        fe.append(np.arange(n - 1 - first, -1, -1, dtype=np.int64))
        uk.append(np.full(n - first, key, dtype=np.int64))

    def flat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return {"target": flat(tgt, np.int64), "target_w": flat(tw, np.float32), "from_end": flat(fe, np.int64),
            "user_key": flat(uk, np.int64)}


class UserTimelines:
    """Every user's training events, flat, by user key: an example's history (its ``max_history`` events
    before the target, left-padded as :func:`tessera.models.pad_histories` pads) and every item the user had
    before its target, from the example's ``user_key`` and ``from_end``.

    The ranker's training lists leave all of those items out (the history holds only the last
    ``max_history``), as evaluation and serving leave out everything a user has seen: an older seen item was a
    hard negative in training, and can never be a candidate after.

    Args:
        records: user records (:func:`user_records` columns ``user_id``, ``train_items``, ``train_ts``,
            ``train_w``), of every user the examples come from (built once a run and shared by every
            worker: :mod:`tessera.train.shared`).

    Example::

        timelines = UserTimelines(users)
        batch = timelines.with_histories(batch, max_history=20)    # + hist_items, hist_ts, hist_w, hist_len
        seen = timelines.seen_before(batch["user_key"], batch["from_end"])   # one array of rows per example
    """

    def __init__(self, records: dict[str, np.ndarray]):
        keys = user_keys(records["user_id"])
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        same = np.flatnonzero(self.keys[1:] == self.keys[:-1])
        if len(same):  # an example names its user by key alone: it would read another user's events
            a, b = str(records["user_id"][order[same[0]]]), str(records["user_id"][order[same[0] + 1]])
            raise ValueError(f"user ids {a!r} and {b!r} have the same 64-bit key ({len(same)} such pair(s) among "
                             f"{len(keys)} users): the examples cannot tell them apart")
        lengths = np.asarray([len(records["train_items"][i]) for i in order], dtype=np.int64)
        self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths

        def flat(column: str, dtype) -> np.ndarray:
            parts = [np.asarray(records[column][i], dtype=dtype) for i in order]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        self.items, self.ts, self.w = flat("train_items", np.int64), flat("train_ts", np.int64), flat("train_w",
                                                                                                     np.float32)
        self.items.flags.writeable = False  # seen_before hands out views of it

    def _places(self, user_key, from_end) -> tuple[np.ndarray, np.ndarray]:
        """Each example's user's first event in the flat arrays, and its target's position among the user's."""
        key = np.asarray(user_key, dtype=np.int64)
        u = np.searchsorted(self.keys, key)
        found = u < len(self.keys)
        found[found] = self.keys[u[found]] == key[found]
        if not found.all():
            raise KeyError(f"examples of {int((~found).sum())} users not among the user records "
                           f"(user_key {int(key[~found][0])})")
        t = self.lengths[u] - 1 - np.asarray(from_end, dtype=np.int64)
        if ((t < 0) | (t >= self.lengths[u])).any():
            raise ValueError("an example's from_end lies outside its user's training events")
        return self.starts[u], t

    def histories(self, user_key, from_end, max_history: int) -> dict[str, np.ndarray]:
        """``hist_items`` / ``hist_ts`` ``(B, N)`` int64, ``hist_w`` ``(B, N)`` float32 (oldest first, left-padded
        with 0) and ``hist_len`` ``(B,)`` of examples ``(user_key, from_end)`` (arrays or CPU tensors)."""
        start, t = self._places(user_key, from_end)
        pos = t[:, None] - max_history + np.arange(max_history)[None, :]  # (B, N): the N positions before t
        valid = pos >= 0  # the rest is padding; a valid position is one of the user's events, so in range
        at = np.where(valid, start[:, None] + pos, 0) if valid.any() else None
        out = {}
        for name, values, dtype in (("hist_items", self.items, np.int64), ("hist_ts", self.ts, np.int64),
                                    ("hist_w", self.w, np.float32)):
            out[name] = (np.where(valid, values[at], 0).astype(dtype) if at is not None
                         else np.zeros(pos.shape, dtype))
        out["hist_len"] = valid.sum(1).astype(np.int64)
        return out

    def with_histories(self, batch: dict[str, torch.Tensor], max_history: int) -> dict[str, torch.Tensor]:
        """An example batch (tensors on any device) with its histories added (on the same device)."""
        device = batch["user_key"].device
        hist = self.histories(batch["user_key"].cpu().numpy(), batch["from_end"].cpu().numpy(), max_history)
        return {**batch, **{k: torch.from_numpy(v).to(device) for k, v in hist.items()}}

    def seen_before(self, user_key: torch.Tensor, from_end: torch.Tensor) -> list[np.ndarray]:
        """Per example, every item its user had before its target (training events, oldest first)."""
        start, t = self._places(user_key.cpu().numpy(), from_end.cpu().numpy())
        return [self.items[a:a + n] for a, n in zip(start.tolist(), t.tolist(), strict=True)]


def history_from_batch(batch: dict[str, torch.Tensor]) -> HistoryBatch:
    """The :class:`HistoryBatch` of an example batch (mask rebuilt from ``hist_len``)."""
    n = batch["hist_items"].shape[1]
    mask = torch.arange(n, device=batch["hist_len"].device)[None, :] >= (n - batch["hist_len"][:, None])  # (B, N)
    return HistoryBatch(batch["hist_items"].long(), mask, batch["hist_ts"].long(), batch["hist_w"].float())


SPLITS = ("validation", "test")


@dataclass
class EvalSet:
    """One evaluation split: per evaluated user, the history (the model's input, and the items left out of
    the ranking: the user has seen them) and the targets.

    ``validation``: the history is the training events, the targets the validation events; it is
    evaluated after every epoch. ``test``: the history is the training and validation events (everything
    before the held-out ones), the targets the held-out events; evaluated once a stage is trained.
    """

    history: HistoryBatch
    train_items: list[np.ndarray]  # the history's items: left out of the ranking
    test_items: list[np.ndarray]  # the targets
    repeat_targets: int = 0  # targets left out: the user had the item before (out of the ranking, never found)

    @property
    def num_users(self) -> int:
        return len(self.test_items)

    @classmethod
    def from_records(cls, records: dict[str, np.ndarray], max_history: int, split: str = "test") -> EvalSet:
        """Users with at least one target and one history event of ``split``, from user-record columns
        (records without ``val_*`` columns have no validation events). A target already in the user's
        history is left out (counted in ``repeat_targets``): the ranking leaves the history out, as serving
        leaves out what a user has seen, so it would be a miss whatever the model."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        n = len(records["train_items"])
        empty = [np.zeros(0, dtype=np.int64)] * n
        val = {k: records.get(f"val_{k}", empty) for k in ("items", "ts", "w")}
        if split == "validation":
            seen = {k: list(records[f"train_{k}"]) for k in ("items", "ts", "w")}
            targets = list(val["items"])
        else:
            seen = {k: [np.concatenate([np.asarray(a), np.asarray(b, dtype=np.asarray(a).dtype)])
                        for a, b in zip(records[f"train_{k}"], val[k], strict=True)] for k in ("items", "ts", "w")}
            targets = list(records["test_items"])
        # every user's targets against its history at once (np.isin a user took 4.5 s for 100k users)
        (t_flat, t_len), (s_flat, s_len) = _pack(targets), _pack(seen["items"])
        t_user, s_user = np.repeat(np.arange(n), t_len), np.repeat(np.arange(n), s_len)
        base = int(max(t_flat.max(initial=0), s_flat.max(initial=0))) + 1  # catalog rows: >= 0
        repeat = _isin(t_user * base + t_flat, s_user * base + s_flat)
        new = _unpack(t_flat[~repeat], np.bincount(t_user[~repeat], minlength=n))
        keep = [i for i in range(n) if len(new[i]) and len(seen["items"][i])]
        items = [np.asarray(seen["items"][i], dtype=np.int64) for i in keep]
        history = pad_histories(items, max_len=max_history, timestamps=[seen["ts"][i] for i in keep],
                                weights=[seen["w"][i] for i in keep])
        return cls(history=history, train_items=items, test_items=[new[i] for i in keep],
                   repeat_targets=int(repeat.sum()))

    def __reduce__(self):
        """Pickled with each list of arrays as one flat array and its lengths: Ray's object store took 3.3 s to
        store and 1.7 s to read the two sets of 100k users as 200k arrays each (:mod:`tessera.train.shared`)."""
        return _eval_set, (self.history, _pack(self.train_items), _pack(self.test_items), self.repeat_targets)


def _isin(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """``np.isin(values, pool)`` by a sort of the pool and a binary search (np.isin took 3.7 s for 100k values
    in 4M, either kind; this 0.3 s)."""
    if not len(pool):
        return np.zeros(len(values), dtype=bool)
    pool = np.sort(pool)
    return pool[np.minimum(np.searchsorted(pool, values), len(pool) - 1)] == values


def _pack(arrays) -> tuple[np.ndarray, np.ndarray]:
    """``arrays`` (one int array a user) as one int64 array and each one's length (:func:`_unpack` undoes it)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) else np.zeros(0, np.int64)
    return flat, lengths


def _unpack(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _eval_set(history: HistoryBatch, train: tuple, test: tuple, repeat_targets: int) -> EvalSet:
    return EvalSet(history=history, train_items=_unpack(*train), test_items=_unpack(*test),
                   repeat_targets=repeat_targets)


def target_counts(records: dict[str, np.ndarray], num_items: int, tail: int,
                  max_examples: int | None = None) -> np.ndarray:
    """``(I,)`` how often each catalog row is a target of the retrieval towers' examples (positions
    ``max(1, len - max_examples) <= t <= len - 1 - tail`` of each user's training events:
    :func:`next_item_examples` with ``from_end >= tail``). In-batch negatives are other examples' targets,
    so this, not every training event, is the distribution logQ corrects for: a user's first event is
    never a target, nor one before its last ``max_examples``, and the last ``tail`` are the ranker's."""
    flat = [np.asarray(x, dtype=np.int64)[first_example(len(x), max_examples):max(1, len(x) - tail)]
            for x in records["train_items"]]
    rows = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    return np.bincount(rows, minlength=num_items)


def item_counts(records: dict[str, np.ndarray], num_items: int, with_validation: bool = False,
                max_per_user: int | None = None) -> np.ndarray:
    """``(I,)`` training interactions per catalog row (the ranker's popularity statistic);
    ``with_validation``: the validation events counted too (everything before the test: the popularity
    baseline's counts when it is tested); ``max_per_user``: each user's last that many of those events
    only (None: all), as its examples are capped (``max_examples_per_user``), so that one bot's
    million events on a few items do not make them the catalog's most popular."""
    parts = ("train_items", "val_items") if with_validation and "val_items" in records else ("train_items",)
    per_user = [np.concatenate([np.asarray(records[part][u], dtype=np.int64) for part in parts])
                for u in range(len(records["train_items"]))]
    flat = [x if max_per_user is None else x[max(0, len(x) - max_per_user):] for x in per_user]
    rows = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    return np.bincount(rows, minlength=num_items)
