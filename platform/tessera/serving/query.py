"""The query side of one version: user vectors from histories, and text / image / audio query vectors.

* Users: the history is the user's events in the interaction-log snapshot (loaded once per version),
  then the request's ``recent_item_ids``; the most recent ``max_history`` go through the bundle's
  user tower, with the fused item vectors of the same version. The request is placed at the time of
  the latest event (the snapshot's clock), as in training, so an old snapshot does not push every
  time gap into the last bucket. A user with no usable history is *cold*: no vector, the ranker
  answers with popular items.
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
import pyarrow.compute as pc

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
class UserHistories:
    """The interaction-log snapshot as flat arrays grouped by user, oldest event first.

    Events on items outside the version's catalog are dropped (counted in ``dropped``).
    """

    span: dict[str, tuple[int, int]]
    rows: np.ndarray
    ts: np.ndarray
    weight: np.ndarray
    dropped: int = 0

    @classmethod
    def empty(cls) -> UserHistories:
        return cls({}, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    @classmethod
    def load(cls, storage: Storage, interactions_uri: str | None, items: ItemVectors) -> UserHistories:
        if not interactions_uri:
            return cls.empty()
        from tessera.index_job.self_check import read_interactions

        try:
            table = read_interactions(storage, interactions_uri)
        except FileNotFoundError as err:
            raise VersionError(f"interaction-log snapshot: {err}") from None
        rows = items.rows(table.column("item_id").to_pylist())
        keep = rows >= 0
        users = np.asarray(table.column("user_id").to_pylist(), dtype=object).astype(str)[keep]
        ts = table.column("ts").to_numpy()[keep].astype(np.int64)
        weight = pc.cast(table.column("weight"), "float32").to_numpy(zero_copy_only=False)[keep]
        rows = rows[keep]
        order = np.lexsort((np.arange(len(ts)), ts, users))
        users, rows, ts, weight = users[order], rows[order], ts[order], weight[order]
        uniq, first, counts = np.unique(users, return_index=True, return_counts=True)
        span = {str(u): (int(s), int(s + c)) for u, s, c in zip(uniq, first, counts, strict=True)}
        return cls(span, rows, ts, np.asarray(weight, np.float32), dropped=int((~keep).sum()))

    @property
    def num_users(self) -> int:
        return len(self.span)

    def of(self, user_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if user_id not in self.span:
            return None
        s, e = self.span[user_id]
        return self.rows[s:e], self.ts[s:e], self.weight[s:e]


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
        self._encoder_lock = threading.Lock()
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
        histories = UserHistories.load(storage, ref.interactions_uri, items)
        return cls(storage, ref, items, histories, ModelBundle.load(storage, ref.model_uri), preload_modalities,
                   decoder)

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
            rows, ts, w = snap if snap is not None else (np.empty(0, np.int64),) * 2 + (np.empty(0, np.float32),)
            last = int(ts[-1]) if len(ts) else 0
            rows = np.concatenate([rows, recent])
            ts = np.concatenate([ts, last + 1 + np.arange(len(recent), dtype=np.int64)])
            w = np.concatenate([w, np.ones(len(recent), np.float32)])
            exclude = np.unique(rows) if q.exclude_seen else np.empty(0, np.int64)
            exclude_ids = self.items.ids[exclude].tolist()
            usable = self.items.indexed[rows]  # items without a fused vector cannot feed the tower
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
            query_ts = torch.as_tensor([int(t[-1]) for t in hist_ts])
            with torch.inference_mode():
                vecs = self.user_tower(item_vecs, batch.mask, batch.timestamps_ms, query_ts, batch.weights).numpy()
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
    def encoder(self, modality: str):
        """The modality's encoder as the embedding run used it (loaded once; checksum verified)."""
        with self._encoder_lock:
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
        encoder_cfg = section.encoder.model_copy(update={"device": "cpu" if section.pool.num_gpus == 0 else "auto"})
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
            with torch.inference_mode():
                vecs = self.item_tower.project(modality, torch.from_numpy(emb)).numpy()
            for (i, _), v in zip(entries, vecs, strict=True):
                out[i] = v.astype(np.float32)
        return out  # type: ignore[return-value]
