"""The stages in this process (no Ray Serve): the baseline the benchmark compares Serve with, and
what the library tests drive.

Example::

    stages = LocalStages(storage)
    flow = Flow(stages, uri, ref.model_version, ref.index_version)
    answers = asyncio.run(flow.recommend([RecommendRequest(user_id="user-00000004")]))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tessera.serving.errors import RequestError
from tessera.serving.query import QueryCore, UserEncoding, UserQuery
from tessera.serving.rank import RankerCore, RankInput, RankOutput
from tessera.serving.retrieve import RetrieverCore
from tessera.serving.version import VersionCache, VersionRef
from tessera.storage import Storage


def search_or_error(core: RetrieverCore, index: str, vectors: np.ndarray, k: int,
                    exclude: list[set[str]] | None) -> tuple[list[list[str]], np.ndarray] | RequestError:
    """``core.search``, with an index the version does not have as a 422 (not an exception)."""
    if index not in core.indexes:
        return RequestError(422, "bad_request", f"no {index!r} index in version {core.ref.index_version} "
                                                f"(it has {', '.join(core.indexes)})")
    return core.search(index, vectors, k, exclude)


class LocalStages:
    """:class:`~tessera.serving.flow.Stages` backed by the cores, loaded per version on first use."""

    def __init__(self, storage: Storage, preload_modalities: bool = True):
        self.storage = storage
        self.query = VersionCache(lambda uri: QueryCore.load(storage, VersionRef.resolve(storage, uri),
                                                             preload_modalities))
        self.retriever = VersionCache(lambda uri: RetrieverCore.load(storage, VersionRef.resolve(storage, uri)))
        self.ranker = VersionCache(lambda uri: RankerCore.load(storage, VersionRef.resolve(storage, uri)))

    async def encode_users(self, index_uri: str, queries: list[UserQuery]) -> list[UserEncoding | RequestError]:
        return self.query.get(index_uri).encode_users(queries)

    async def encode_queries(self, index_uri: str, queries: list[tuple[str, Any]]) -> list[Any]:
        return self.query.get(index_uri).encode_queries(queries)

    async def item_vectors(self, index_uri: str, item_ids: list[str]) -> list[Any]:
        return self.query.get(index_uri).item_vectors(item_ids)

    async def search(self, index_uri: str, index: str, vectors: np.ndarray, k: int,
                     exclude: list[set[str]] | None):
        return search_or_error(self.retriever.get(index_uri), index, vectors, k, exclude)

    async def rank(self, index_uri: str, inputs: list[RankInput]) -> list[RankOutput]:
        return self.ranker.get(index_uri).rank(inputs)
