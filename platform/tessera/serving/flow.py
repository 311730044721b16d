"""The request flow, written once: encode -> retrieve -> rank, for a whole batch of requests.

The same code drives the Ray Serve ingress (the stages are deployment handles, one call per stage
per *batch*, not per request) and the in-process pipeline (the stages are the cores, called
directly): :class:`Stages` is the seam.

Every request of a batch gets its own answer: a response dict, or a :class:`RequestError`.

Example::

    stages = LocalStages(storage)
    flow = Flow(stages, index_uri="s3://tessera-demo/index/v1")
    [answer] = await flow.recommend([RecommendRequest(user_id="user-00000004", k=5)])
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import numpy as np

from tessera.serving.errors import RequestError
from tessera.serving.query import UserEncoding, UserQuery
from tessera.serving.rank import RankInput, RankOutput
from tessera.serving.schemas import RecommendRequest, SearchRequest


class Stages(Protocol):
    """The three stages, each taking the index URI of the version to use."""

    async def encode_users(self, index_uri: str, queries: list[UserQuery]) -> list[UserEncoding | RequestError]: ...

    async def encode_queries(self, index_uri: str, queries: list[tuple[str, Any]]) -> list[Any]: ...

    async def item_vectors(self, index_uri: str, item_ids: list[str]) -> list[Any]: ...

    async def search(self, index_uri: str, index: str, vectors: np.ndarray, k: int,
                     exclude: list[set[str]] | None) -> tuple[list[list[str]], np.ndarray]: ...

    async def rank(self, index_uri: str, inputs: list[RankInput]) -> list[RankOutput]: ...


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _items(ids: list[str], scores: np.ndarray, retrieval: np.ndarray | None) -> list[dict]:
    """Response items; ``ids`` may be shorter than the score rows (an index with fewer eligible items
    than asked for pads its scores with -inf): only as many items as ids."""
    scores = scores[:len(ids)]
    retrieval = None if retrieval is None else retrieval[:len(ids)]
    return [{"item_id": i, "score": float(s), "retrieval_score": None if retrieval is None else float(r)}
            for i, s, r in zip(ids, scores, retrieval if retrieval is not None else [None] * len(ids), strict=True)]


class Flow:
    """Batched request handling over some :class:`Stages`.

    Args:
        stages: where the work runs.
        index_uri: the version (index root) every request of this flow uses.
        model_version, index_version: reported in every response.
        candidates: retrieval candidates handed to the ranker (at least ``k``).
    """

    def __init__(self, stages: Stages, index_uri: str, model_version: str, index_version: str,
                 candidates: int = 50):
        self.stages, self.index_uri = stages, index_uri
        self.versions = {"model_version": model_version, "index_version": index_version}
        self.candidates = candidates

    async def recommend(self, requests: list[RecommendRequest]) -> list[dict | RequestError]:
        t0 = time.perf_counter()
        encoded = await self.stages.encode_users(
            self.index_uri, [UserQuery(r.user_id, list(r.recent_item_ids), r.exclude_seen) for r in requests])
        t1 = time.perf_counter()
        warm = [i for i, e in enumerate(encoded) if isinstance(e, UserEncoding) and e.cold_reason is None]
        found: dict[int, tuple[list[str], np.ndarray]] = {}
        if warm:
            k = max(max(requests[i].k for i in warm), self.candidates)
            vectors = np.stack([encoded[i].vector for i in warm])
            exclude = [set(encoded[i].exclude_ids) for i in warm]
            ids, scores = await self.stages.search(self.index_uri, "fused", vectors, k,
                                                   exclude if any(exclude) else None)
            # one search for the batch, at its largest k; each request ranks only its own share, so the
            # ranker never sees more candidates because a batch mate asked for more. (On ScaNN shards the
            # candidates themselves can still differ a little: a larger k deepens the exact reordering of
            # the whole batched call, which can only add true neighbours.)
            for j, i in enumerate(warm):
                n = min(len(ids[j]), max(requests[i].k, self.candidates))
                found[i] = (ids[j][:n], scores[j, :n])
        t2 = time.perf_counter()
        inputs, slots = [], []
        for i, e in enumerate(encoded):
            if isinstance(e, RequestError):
                continue
            cand_ids, cand_scores = found.get(i, ([], np.empty(0, np.float32)))
            inputs.append(RankInput(e.history_rows, cand_ids, cand_scores, requests[i].k, e.exclude_rows,
                                    cold=e.cold_reason is not None))
            slots.append(i)
        ranked = await self.stages.rank(self.index_uri, inputs) if inputs else []
        t3 = time.perf_counter()
        timings = {"encode_ms": _ms(t1 - t0), "retrieve_ms": _ms(t2 - t1), "rank_ms": _ms(t3 - t2),
                   "total_ms": _ms(t3 - t0)}
        out: list[dict | RequestError] = list(encoded)  # errors stay in place
        for i, r in zip(slots, ranked, strict=True):
            e = encoded[i]
            out[i] = {"items": _items(r.ids, r.scores, r.retrieval_scores), "cold_start": e.cold_reason is not None,
                      "cold_start_reason": e.cold_reason, "ranked": r.ranked, **self.versions, "timings": timings}
        return out

    async def search(self, requests: list[SearchRequest], payloads: list[Any]) -> list[dict | RequestError]:
        """``payloads[i]``: the text, or the decoded bytes of the image / audio, of ``requests[i]``."""
        t0 = time.perf_counter()
        vectors = await self.stages.encode_queries(
            self.index_uri, [(r.modality, p) for r, p in zip(requests, payloads, strict=True)])
        t1 = time.perf_counter()
        out: list[dict | RequestError] = list(vectors)
        by_index: dict[str, list[int]] = {}
        for i, v in enumerate(vectors):
            if not isinstance(v, RequestError):
                by_index.setdefault(requests[i].index, []).append(i)
        results = await asyncio.gather(*(
            self.stages.search(self.index_uri, index, np.stack([vectors[i] for i in rows]),
                               max(requests[i].k for i in rows), None)
            for index, rows in by_index.items()))
        t2 = time.perf_counter()
        timings = {"encode_ms": _ms(t1 - t0), "retrieve_ms": _ms(t2 - t1), "rank_ms": 0.0, "total_ms": _ms(t2 - t0)}
        for (index, rows), result in zip(by_index.items(), results, strict=True):
            if isinstance(result, RequestError):
                for i in rows:
                    out[i] = result
                continue
            ids, scores = result
            for j, i in enumerate(rows):
                k = requests[i].k
                out[i] = {"items": _items(ids[j][:k], scores[j, :k], scores[j, :k]), "modality": requests[i].modality,
                          "index": index, **self.versions, "timings": timings}
        return out

    async def similar(self, item_ids: list[str], ks: list[int]) -> list[dict | RequestError]:
        t0 = time.perf_counter()
        vectors = await self.stages.item_vectors(self.index_uri, item_ids)
        t1 = time.perf_counter()
        out: list[dict | RequestError] = list(vectors)
        ok = [i for i, v in enumerate(vectors) if not isinstance(v, RequestError)]
        if ok:
            ids, scores = await self.stages.search(self.index_uri, "fused", np.stack([vectors[i] for i in ok]),
                                                   max(ks[i] for i in ok), [{item_ids[i]} for i in ok])
        t2 = time.perf_counter()
        timings = {"encode_ms": _ms(t1 - t0), "retrieve_ms": _ms(t2 - t1), "rank_ms": 0.0, "total_ms": _ms(t2 - t0)}
        for j, i in enumerate(ok):
            k = ks[i]
            out[i] = {"item_id": item_ids[i], "items": _items(ids[j][:k], scores[j, :k], scores[j, :k]),
                      **self.versions, "timings": timings}
        return out
