"""The query side of one version: user vectors from histories, and text / image / audio query vectors.

* Users: the history is the user's events in the interaction-log snapshot (loaded once per version),
  then the request's ``recent_item_ids``; the most recent ``max_history`` go through the bundle's
  user tower, with the fused item vectors of the same version. The tower measures time gaps to the
  history's latest event, in training as here, so an old snapshot does not push every gap into the
  last bucket (the request's recent items count as just after the snapshot's last event). A user
  with no usable history is *cold*: no vector, the ranker answers with popular items.
* Queries: the modality's encoder (the same weights as the embedding run, checked by checksum) and
  the item tower's projection of that modality into the item space. Given an ``IsolatedDecoder``,
  image and audio bytes are preprocessed in its child process, so a decoder crash or hang fails the
  query (422) instead of the replica and the requests batched with it.

Example::

    q = QueryCore.load(storage, ref)
    out = q.encode_users([UserQuery(user_id="user-00000004", recent_item_ids=[], exclude_seen=True)])
    out[0].vector.shape       # (E,)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from tessera.serving.errors import RequestError
from tessera.serving.version import ItemVectors, VersionError, VersionRef
from tessera.storage import Storage, join_uri

if TYPE_CHECKING:
    from tessera.encoders.isolated import IsolatedDecoder

logger = logging.getLogger(__name__)
MEDIA_MODALITIES = ("image", "audio")  # query bytes from outside, through C decoders


@dataclass(frozen=True)
class UserQuery:
    user_id: str | None
    recent_item_ids: list[str] = field(default_factory=list)
    exclude_seen: bool = True


@dataclass
class UserEncoding:
    """The query side's answer for one user request.

    Attributes:
        vector: ``(E,)`` user vector (None when cold).
        history_rows: the rows the ranker attends over (most recent last), at most ``max_history``.
        exclude_rows: item rows never to return (seen items when ``exclude_seen``).
        exclude_ids: the same items' ids (what the index filters by).
        cold_reason: why the request is cold (None when it is not).
    """

    vector: np.ndarray | None
    history_rows: np.ndarray
    exclude_rows: np.ndarray
    exclude_ids: list[str] = field(default_factory=list)
    cold_reason: str | None = None


@dataclass
class UserSnapshot:
    """One user in the interaction-log snapshot, as the query side reads it.

    Attributes:
        rows, ts, weights: the user's last ``max_history`` events on items with a fused vector (what the
            user tower can read), oldest first.
        last_ts: the time of the user's last event on a catalog item (the snapshot's clock for the user).
        seen: sorted distinct catalog rows of every event of the user (what ``exclude_seen`` excludes).
    """

    rows: np.ndarray
    ts: np.ndarray
    weights: np.ndarray
    last_ts: int
    seen: np.ndarray


@dataclass
class UserHistories:
    """The interaction-log snapshot, per user: the last ``max_history`` events on items with a vector and
    the distinct catalog items seen, in flat arrays (offsets per user). Users are found by a keyed 64-bit
    hash of their id (sorted; the id itself compared on a hit), not a Python dict. Events on items
    outside the version's catalog are dropped (counted in ``dropped``); events without a user id or a
    time are ignored.
    Loaded a log file at a time, with Arrow doing the id lookups: no Python object per event.
    """

    key: str
    names: pa.Array  # user ids, in ``hashes`` order
    hashes: np.ndarray  # (U,) sorted uint64
    history_at: np.ndarray  # (U + 1,) offsets into rows / ts / weights
    rows: np.ndarray
    ts: np.ndarray
    weights: np.ndarray
    last_ts: np.ndarray  # (U,)
    seen_at: np.ndarray  # (U + 1,) offsets into seen
    seen: np.ndarray
    dropped: int = 0

    @classmethod
    def empty(cls) -> UserHistories:
        return cls.build(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32),
                         np.empty(0, np.int64), pa.array([], pa.string()), np.empty(0, bool), 1)

    @classmethod
    def load(cls, storage: Storage, interactions_uri: str | None, items: ItemVectors,
             max_history: int) -> UserHistories:
        """The snapshot of the log under ``interactions_uri`` (None: no snapshot, every user is unknown)
        for ``items``' catalog, keeping each user's last ``max_history`` usable events."""
        if not interactions_uri:
            return cls.empty()
        from tessera.interactions import LogSchemaError, encode_strings, interaction_files, read_log_file

        try:
            files = interaction_files(storage, interactions_uri)
        except FileNotFoundError as err:
            raise VersionError(f"interaction-log snapshot: {err}") from None
        names, codes, rows, ts, weights, dropped, offset = [], [], [], [], [], 0, 0
        for uri in files:
            try:
                table = read_log_file(storage, uri)  # the types training and the self-check read too
            except LogSchemaError as err:
                raise VersionError(f"interaction-log snapshot: {err}") from None
            file_names, file_codes = encode_strings(table.column("user_id"))
            found = _catalog_rows(table.column("item_id"), items)
            timed = table.column("ts").is_valid().to_numpy(zero_copy_only=False)  # an event without a time: ignored
            keep = (found >= 0) & (file_codes >= 0) & timed
            dropped += int(((found < 0) & (file_codes >= 0) & timed).sum())
            names.append(file_names)
            codes.append(file_codes[keep] + offset)
            offset += len(file_names)
            rows.append(found[keep])
            ts.append(table.column("ts").fill_null(0).to_numpy()[keep])  # int64 ms, float32 (read_log_file)
            weights.append(table.column("weight").to_numpy()[keep])
        # one code per distinct user over all files (the files' names as chunks: their text may pass 2 GiB)
        distinct, index = encode_strings(pa.chunked_array(names, pa.string()))
        if not len(distinct):
            return cls.empty()
        histories = cls.build(np.concatenate(rows), np.concatenate(ts), np.concatenate(weights),
                              index[np.concatenate(codes)], distinct, items.has_vector, max_history)
        histories.dropped = dropped
        return histories

    @classmethod
    def build(cls, rows: np.ndarray, ts: np.ndarray, weights: np.ndarray, code: np.ndarray, names: pa.Array,
              has_vector: np.ndarray, max_history: int) -> UserHistories:
        """From the catalog events in log order: ``rows`` (catalog rows), ``ts``, ``weights``, and ``code``,
        each event's user as an entry of ``names`` (distinct ids); ``has_vector``: catalog rows with a fused
        vector (all of them but in an index built before every item had one)."""
        from tessera.embed.ids import new_key
        from tessera.interactions import event_order, hash_user_ids, last_flagged

        present = np.bincount(code, minlength=len(names)) > 0  # users with an event on a catalog item
        if not present.all():
            code = (np.cumsum(present) - 1)[code]
            names = names.filter(pa.array(present))
        key = new_key()
        hashes = hash_user_ids(names, key)
        by_hash = np.argsort(hashes, kind="stable")
        place = np.empty(len(names), np.int64)
        place[by_hash] = np.arange(len(names))
        user = place[code]  # each event's user, numbered in hash order
        order = event_order(ts, rows, weights, user)  # rows sort as the ids do (the catalog is in id order)
        user, rows, ts, weights = user[order], rows[order], ts[order], weights[order]
        counts = np.bincount(user, minlength=len(names))
        ends = np.cumsum(counts)
        last_ts = ts[np.maximum(ends - 1, 0)] if len(ts) else np.zeros(len(names), np.int64)
        keep = last_flagged(has_vector[rows], ends[user], max_history)
        history_at = np.r_[0, np.cumsum(np.bincount(user[keep], minlength=len(names)))]
        by_item = np.lexsort((rows, user))
        first = np.r_[True, (user[by_item][1:] != user[by_item][:-1]) | (rows[by_item][1:] != rows[by_item][:-1])] \
            if len(user) else np.empty(0, bool)
        seen = by_item[first]  # one event per (user, item), by user then item
        seen_at = np.r_[0, np.cumsum(np.bincount(user[seen], minlength=len(names)))]
        return cls(key, names.take(pa.array(by_hash, pa.int64())), hashes[by_hash], history_at.astype(np.int64),
                   rows[keep], ts[keep], weights[keep].astype(np.float32), last_ts.astype(np.int64),
                   seen_at.astype(np.int64), rows[seen].astype(np.int64))

    @property
    def num_users(self) -> int:
        return len(self.hashes)

    def user_ids(self) -> list[str]:
        """Every user of the snapshot (in its hash order)."""
        return self.names.to_pylist()

    def of(self, user_id: str) -> UserSnapshot | None:
        """The user's snapshot, None for a user the snapshot does not know."""
        from tessera.interactions import hash_user_ids

        h = hash_user_ids([user_id], self.key)[0]
        lo, hi = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        for u in range(int(lo), int(hi)):  # one, unless two ids share a hash
            if self.names[u].as_py() == user_id:
                a, b = self.history_at[u], self.history_at[u + 1]
                return UserSnapshot(self.rows[a:b], self.ts[a:b], self.weights[a:b], int(self.last_ts[u]),
                                    self.seen[self.seen_at[u]:self.seen_at[u + 1]])
        return None


def _replica_device() -> str:
    """``cuda`` when Ray gave this process a GPU (a QueryEncoder with ``num_gpus``), else ``cpu``: whatever
    the embedding run ran on, and never a GPU Ray did not assign (Ray 2.60 leaves the GPUs of a node
    visible to an actor that asked for none)."""
    import ray

    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"


def _catalog_rows(item_ids: pa.ChunkedArray, items: ItemVectors) -> np.ndarray:
    """(n,) each event's catalog row, -1 for an item outside the catalog or no item id; looked up once
    per distinct id (dictionary-encoded in Arrow)."""
    from tessera.interactions import encode_strings

    values, codes = encode_strings(item_ids)
    return np.append(items.rows(values.to_pylist()), -1)[codes]  # the last entry: code -1, no id


class QueryCore:
    """Query encoding for one version (no Ray; the QueryEncoder deployment and the in-process
    pipeline both call it). Thread-safe for concurrent calls."""

    def __init__(self, storage: Storage, ref: VersionRef, items: ItemVectors, histories: UserHistories,
                 bundle, preload_modalities: bool = True, decoder: IsolatedDecoder | None = None):
        self.storage, self.ref, self.items, self.histories = storage, ref, items, histories
        self.decoder = decoder  # image / audio query bytes are preprocessed in its child process
        self.user_tower = bundle.user_tower.eval()
        self.item_tower = bundle.item_tower.eval()
        self.max_history = self.user_tower.config.max_history
        self.modalities = list(self.item_tower.config.modality_dims)
        self._encoders: dict[str, object] = {}
        self._encoder_locks = {m: threading.Lock() for m in self.modalities}  # one load never holds another
        if preload_modalities:
            for m in self.modalities:
                self.encoder(m)

    @classmethod
    def load(cls, storage: Storage, ref: VersionRef, preload_modalities: bool = True,
             decoder: IsolatedDecoder | None = None) -> QueryCore:
        """Load one version's query side; ``decoder``: preprocess image and audio queries in its child
        process (a decoder crash or hang then fails that query alone, see :mod:`tessera.encoders.isolated`)."""
        from tessera.models.bundle import ModelBundle

        items = ItemVectors.load(storage, ref)
        bundle = ModelBundle.load(storage, ref.model_uri)
        histories = UserHistories.load(storage, ref.interactions_uri, items, bundle.user_tower.config.max_history)
        return cls(storage, ref, items, histories, bundle, preload_modalities, decoder)

    # --- users ----------------------------------------------------------------------------
    def encode_users(self, queries: list[UserQuery]) -> list[UserEncoding | RequestError]:
        """One answer per query, in order; the user tower runs once for all the warm ones."""
        import torch

        from tessera.models.history import pad_histories

        out: list[UserEncoding | RequestError | None] = [None] * len(queries)
        warm: list[int] = []
        hist_rows, hist_ts, hist_w = [], [], []
        for i, q in enumerate(queries):
            recent = self.items.rows(q.recent_item_ids)
            if (recent < 0).any():
                unknown = [x for x, r in zip(q.recent_item_ids, recent, strict=True) if r < 0]
                out[i] = RequestError.unknown_items(unknown)
                continue
            snap = self.histories.of(q.user_id) if q.user_id else None
            if snap is None:
                rows, ts, w, last, seen = (np.empty(0, np.int64),) * 2 + (np.empty(0, np.float32), 0,
                                                                         np.empty(0, np.int64))
            else:
                rows, ts, w, last, seen = snap.rows, snap.ts, snap.weights, snap.last_ts, snap.seen
            rows = np.concatenate([rows, recent])
            ts = np.concatenate([ts, last + 1 + np.arange(len(recent), dtype=np.int64)])
            w = np.concatenate([w, np.ones(len(recent), np.float32)])
            exclude = np.unique(np.concatenate([seen, recent])) if q.exclude_seen else np.empty(0, np.int64)
            exclude_ids = self.items.ids[exclude].tolist()
            usable = self.items.has_vector[rows]  # in the index or not, as training reads them
            keep = np.flatnonzero(usable)[-self.max_history:]
            rows, ts, w = rows[keep], ts[keep], w[keep]
            if len(rows) == 0:
                reason = ("no user_id and no recent items" if not q.user_id and not q.recent_item_ids
                          else "unknown user and no recent items" if snap is None and not q.recent_item_ids
                          else "no history item has a vector")
                out[i] = UserEncoding(None, rows, exclude, exclude_ids, cold_reason=reason)
                continue
            out[i] = UserEncoding(None, rows, exclude, exclude_ids)
            warm.append(i)
            hist_rows.append(rows)
            hist_ts.append(ts)
            hist_w.append(w)
        if warm:
            batch = pad_histories(hist_rows, self.max_history, timestamps=hist_ts, weights=hist_w)
            item_vecs = torch.from_numpy(self.items.fused)[batch.item_idx]  # (B, N, E)
            with torch.inference_mode():
                vecs = self.user_tower(item_vecs, batch.mask, batch.timestamps_ms, batch.weights).numpy()
            for j, i in enumerate(warm):
                out[i].vector = vecs[j].astype(np.float32)
        return out  # type: ignore[return-value]

    # --- items ----------------------------------------------------------------------------
    def item_vectors(self, item_ids: list[str]) -> list[np.ndarray | RequestError]:
        """The fused vector of each catalog item (a 404 error for an unknown one or one without a vector)."""
        out: list[np.ndarray | RequestError] = []
        for item_id, row in zip(item_ids, self.items.rows(item_ids), strict=True):
            if row < 0:
                out.append(RequestError(404, "not_found", f"unknown item id: {item_id}"))
            elif not self.items.indexed[row]:
                out.append(RequestError(404, "not_found", f"item {item_id} has no usable modality, so no vector"))
            else:
                out.append(self.items.fused[row])
        return out

    # --- text / image / audio queries ---------------------------------------------------
    def has_encoder(self, modality: str) -> bool:
        """Whether the modality's encoder is loaded (a query of it then does not wait for a load)."""
        return modality in self._encoders

    def encoder(self, modality: str):
        """The modality's encoder as the embedding run used it (loaded once; checksum verified)."""
        if modality not in self._encoder_locks:
            raise VersionError(f"the model of {self.ref.index_uri} has no {modality} modality "
                               f"(it has {', '.join(self.modalities)})")
        with self._encoder_locks[modality]:
            if modality not in self._encoders:
                encoder = self._load_encoder(modality)
                if self._isolated(modality):
                    from tessera.encoders.isolated import DecoderUnavailable

                    try:  # set up in the child now, not on a query
                        self.decoder.start(encoder.preprocessor)
                    except DecoderUnavailable as err:  # the version still loads; its queries try again
                        logger.warning("%s queries: %s", modality, err)
                self._encoders[modality] = encoder
            return self._encoders[modality]

    def _isolated(self, modality: str) -> bool:
        return self.decoder is not None and modality in MEDIA_MODALITIES

    def _load_encoder(self, modality: str):
        from tessera.embed.config import EmbedConfig
        from tessera.encoders.registry import load_encoder

        run = self.storage.read_json(join_uri(self.ref.embedding_run, "_MANIFEST.json"))
        cfg = EmbedConfig.model_validate({**run["config"], "storage": self.storage.config.model_dump()})
        section = cfg.modalities().get(modality)
        if section is None:
            raise VersionError(f"the embedding run {self.ref.embedding_run} did not embed {modality}")
        encoder_cfg = section.encoder.model_copy(update={"device": _replica_device()})
        encoder = load_encoder(encoder_cfg, self.storage)
        expected = run["encoders"].get(modality, {}).get("weights_checksum")
        if expected and encoder.weights_checksum != expected:
            raise VersionError(f"{modality} encoder weights at {encoder_cfg.weights} ({encoder.weights_checksum}) "
                               f"differ from the ones the embedding run used ({expected})")
        return encoder

    def encode_queries(self, queries: list[tuple[str, str | bytes]]) -> list[np.ndarray | RequestError]:
        """``(modality, text or raw bytes)`` -> ``(E,)`` unit vector in the item space, per query."""
        import torch

        from tessera.encoders.errors import MediaError
        from tessera.encoders.isolated import DecoderUnavailable

        out: list[np.ndarray | RequestError | None] = [None] * len(queries)
        by_modality: dict[str, list[tuple[int, np.ndarray]]] = {}
        for i, (modality, raw) in enumerate(queries):
            if modality not in self.modalities:
                out[i] = RequestError(422, "bad_request", f"this model has no {modality} modality "
                                                          f"(it has {', '.join(self.modalities)})")
                continue
            # map, not a direct call: any exception from one query's bytes fails that query alone (422),
            # never the batch it shares with other requests
            prep = self.encoder(modality).preprocessor
            try:
                [pre] = self.decoder.map(prep, [raw]) if self._isolated(modality) else prep.map([raw])
            except DecoderUnavailable as err:  # the replica's fault, not the query's
                out[i] = RequestError(503, "unavailable", f"{modality} queries cannot be decoded now: {err}")
                continue
            if isinstance(pre, MediaError):
                status = 413 if pre.kind == "oversized" else 422
                out[i] = RequestError(status, "bad_media", f"{modality} query rejected: {pre}")
            else:
                by_modality.setdefault(modality, []).append((i, pre))
        for modality, entries in by_modality.items():
            emb = self.encoder(modality).encode([x for _, x in entries])  # (b, Dm)
            # a query whose embedding is not finite (a float WAV of samples near 3e38: its normalisation
            # overflows) fails alone, as the embedding job fails such an item; project refuses a batch
            # holding one, which failed every query sharing the batch with a 503
            kept = []
            for (i, _), row, ok in zip(entries, emb, np.isfinite(emb).all(axis=1), strict=True):
                if ok:
                    kept.append((i, row))
                else:
                    out[i] = RequestError(422, "bad_media", f"{modality} query rejected: corrupt: its embedding "
                                                            "is not finite (sample values out of range?)")
            if not kept:
                continue
            with torch.inference_mode():
                vecs = self.item_tower.project(modality, torch.from_numpy(np.stack([r for _, r in kept]))).numpy()
            for (i, _), v in zip(kept, vecs, strict=True):
                out[i] = v.astype(np.float32)
        return out  # type: ignore[return-value]
