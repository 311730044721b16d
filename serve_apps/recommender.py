"""The recommender endpoint: Ingress (FastAPI) -> QueryEncoder -> Retriever(s) -> Ranker, on Ray Serve.

    HTTP ─► Ingress ──(one call per batch)──► QueryEncoder   user tower / text, image, audio encoders
              │  @serve.batch        ├──────► Retriever[_g]  ScaNN shards (scatter-gather over groups)
              │                      └──────► Ranker         ranker, popular items for cold users
              └─ FastAPI routes, 4xx errors, per-stage timings and metrics

Each HTTP request costs one hop (proxy -> Ingress); the Ingress gathers concurrent requests into a
batch (``@serve.batch``) and sends *one* call per stage for the whole batch, so the per-request cost
of Serve composition is paid once per batch. The stages batch again across Ingress replicas.

Versions: every deployment's ``user_config`` is ``{"index_uri": ...}``. The index manifest names the
model bundle, so query and item vectors always come from the same model. The Ingress stamps every
request with its version's URI; each stage keeps the newest two versions loaded (and loads a version
it has not seen on first use), so changing ``index_uri`` in the YAML and running ``serve deploy``
rolls the new version out while requests keep being answered, each from one version end to end.

Run it::

    serve run serve_apps/recommender.yaml          # or: serve deploy serve_apps/recommender.yaml
    curl -s localhost:8000/v1/recommend -H 'content-type: application/json' -d '{"user_id": "user-00000004", "k": 5}'

Build it in Python::

    app = build_app(RecommenderArgs(index_uri="s3://tessera-demo/index/v1"))
    serve.run(app, name="recommender", route_prefix="/")
"""

# No `from __future__ import annotations`: FastAPI must see the real request models on the routes.

import asyncio
import base64
import binascii
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.serving.errors import RequestError
from tessera.serving.flow import Flow
from tessera.serving.schemas import (
    MAX_K,
    TIMED_STAGES,
    ErrorResponse,
    RecommendRequest,
    RecommendResponse,
    SearchRequest,
    SearchResponse,
    SimilarResponse,
    VersionResponse,
)
from tessera.storage import Storage, StorageConfig

logger = logging.getLogger("ray.serve")


class BatchArgs(BaseModel):
    """``@serve.batch`` settings of the Ingress (the stages take whatever is queued, without waiting).

    Up to 4 batches are in flight per Ingress replica (fixed: Ray's batch queue has no setter for it),
    so the stages of one batch overlap the gathering of the next; each stage hop is paid once per batch.

    The window is adaptive: a request that arrives while no other is being answered by this replica
    starts its batch at once (a lone client pays no wait); under concurrency a batch waits up to
    ``batch_wait_timeout_ms`` for company. Ray reads the window when a batch's first request
    arrives, so the Ingress sets it just before each request joins the queue.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(64, ge=1, le=1024)
    batch_wait_timeout_ms: float = Field(15.0, ge=0, le=1000)


class RecommenderArgs(BaseModel):
    """Typed arguments of :func:`build_app` (the ``args:`` of ``recommender.yaml``).

    Args:
        index_uri: the index version to serve when deploying from Python or ``serve run <import path>``;
            from a config file, leave it out and set ``user_config.index_uri`` of every deployment
            instead (changing ``args`` replaces every replica; changing ``user_config`` does not).
        storage: how to reach object storage (defaults: the environment, as the jobs do).
        max_k: the largest ``k`` a request may ask for; at least 10, the ``k`` of a request that names none
            (below it, such requests were refused: "k=10 is above max_k").
        max_body_bytes: requests with a larger body are refused with 413.
        retriever_groups: Retriever deployments, group ``i`` holding the shards whose id is ``i`` modulo
            ``retriever_groups`` (1: one holds all; a group with no shard of a version answers nothing).
        torch_threads: intra-op threads per replica.
        preload_modalities: load the text / image / audio query encoders at start, not on first search.
        decode_timeout_s: image and audio queries are preprocessed in a child process of each
            QueryEncoder replica, so a decoder crash fails that query with a 422 instead of killing the
            replica (and the requests batched with it, and the replicas the Ingress retries it on);
            one taking longer than this is killed and fails too. None: decode in the replica itself.
        batch: the Ingress's batching.
        rollout_retry_s: a failed rollout is tried again after this long, the wait doubling up to 10
            minutes, while the config still names its version (the index may still be building, or a
            stage short of memory: ``serve deploy`` of an unchanged config does not reach the replicas).
        stage_timeout_s: a stage call (one per batch) not answered within this long is cancelled and its
            requests answered 504 naming the stage (a replica hung, or every replica too busy to take the
            call), where they would wait with no bound. Not retried: a stage that slow is overloaded, and a
            second call adds to its load. None: no bound.
    """

    model_config = ConfigDict(extra="forbid")

    index_uri: str | None = None
    storage: StorageConfig = Field(default_factory=StorageConfig)
    max_k: int = Field(100, ge=10, le=1000)
    max_body_bytes: int = Field(8_000_000, ge=1024)
    retriever_groups: int = Field(1, ge=1, le=64)
    torch_threads: int = Field(1, ge=1)
    preload_modalities: bool = True
    decode_timeout_s: float | None = Field(10.0, gt=0)
    batch: BatchArgs = Field(default_factory=BatchArgs)
    rollout_retry_s: float = Field(30.0, gt=0)
    stage_timeout_s: float | None = Field(60.0, gt=0)


def configured_index(config: dict | None, deployment: str) -> str:
    """The ``index_uri`` a deployment's ``user_config`` names ('' for none).

    Raises:
        ValueError: a key other than ``index_uri`` (a typo would otherwise be ignored, and the replica start
            on no version), or an ``index_uri`` that is not a string; naming the deployment and the keys."""
    config = config or {}
    extra = sorted(str(k) for k in config if k != "index_uri")
    uri = config.get("index_uri")
    if extra or not isinstance(uri, (str, type(None))):
        raise ValueError(f"user_config of {deployment}: takes only index_uri (a string, the index version to "
                         f"serve); got " + (f"unknown keys {extra}" if extra else f"index_uri={uri!r}"))
    return (uri or "").rstrip("/")


def _split(results: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(results[start:start + n])
        start += n
    return out


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _replica_id() -> str:
    """This Serve replica's id (unique within its deployment)."""
    return serve.get_replica_context().replica_tag


class _Versioned:
    """Shared by the stage deployments: a :class:`VersionCache` of one core type, ``user_config`` preload."""

    def _init_cache(self, storage_config: dict, loader) -> None:
        from tessera.serving.version import VersionCache, VersionRef

        self.storage = Storage(StorageConfig.model_validate(storage_config))
        self.cache = VersionCache(lambda uri: loader(self.storage, VersionRef.resolve(self.storage, uri)))
        self._target: str | None = None  # the configured version (a background load of another one does not
        self._pending_loads: dict[str, asyncio.Task] = {}  # become it); uri -> task (the loop keeps weak refs)
        self._request_loads: dict[str, asyncio.Future] = {}  # uri -> the load requests naming it wait for

    async def reconfigure(self, config: dict) -> None:
        """Take the version in ``user_config``. A replica's first version is loaded here (it has nothing
        to serve before). If that fails, the replica starts without one and loads the version requests
        name when they come: Serve starts a replica it adds or replaces on the configured version, which
        after a failed rollout is the one nobody could load, and failing its start would leave the app
        unable to replace a lost replica until rolled back. (On a first deploy the Ingress then fails its
        start, naming this stage's error.) A later one is loaded in the background,
        beside the current one: the replica stays RUNNING and routable meanwhile (Serve routes no request
        to a replica inside ``reconfigure``, so a load here stalled every stage call for its length), and a
        version that fails to load is logged and reported by :meth:`version_status` instead of failing the
        replica (Serve would stop it, and its replacements would fail the same way: a bad rollout took the
        whole app down). The Ingress switches only once every stage replica reports the version loaded.
        A ``user_config`` with other keys than ``index_uri`` is logged and ignored (the Ingress fails its
        first deploy, or reports it as a failed rollout)."""
        try:
            uri = configured_index(config, type(self).__name__)
        except ValueError as err:
            logger.error("%s; ignored (serving %s)", err, self.cache.current)
            return
        if not uri:
            return
        self._target = uri
        if self.cache.current is None:
            start = time.perf_counter()
            try:
                await asyncio.to_thread(self.cache.set_current, uri)
            except Exception:  # kept by the cache for version_status
                logger.exception("%s: loading %s failed; this replica serves the versions requests name",
                                 type(self).__name__, uri)
            else:
                logger.info("%s: serving %s (loaded in %.1f s)", type(self).__name__, uri,
                            time.perf_counter() - start)
            await self._load_serving(uri)
        elif uri != self.cache.current:
            self._load_in_background(uri)

    async def _load_serving(self, configured: str) -> None:
        """Also load the version the app's Ingress serves, if another: a replica Serve adds or replaces during
        a rollout (or after a failed one) is configured with the new version while requests still name the
        old, and loading that on the first request held every request naming it for the whole load. Only
        while an Ingress replica of the app runs: the published version outlives a deleted app, and the
        stages of one deployed again must not hold a version of its past (the Ingress would start on it)."""
        app = serve.get_replica_context().app_name
        serving = await asyncio.to_thread(_published_serving, app)
        if not serving or serving == configured:
            return
        if not (await asyncio.to_thread(_replica_counts, app, ["Ingress"])).get("Ingress"):
            return
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.cache.get, serving, True, False)
        except Exception:  # (the key outlives a deleted app: its version may be gone) requests load what they name
            logger.exception("%s: loading %s, the version the app serves, failed", type(self).__name__, serving)
            return
        logger.info("%s: also loaded %s, the version the app serves, in %.1f s", type(self).__name__, serving,
                    time.perf_counter() - start)

    def _load_in_background(self, uri: str) -> None:
        """Load ``uri`` off the event loop (once at a time per version; a failed one is tried again), making
        it the configured version if it still is the target when the load ends."""
        pending = self._pending_loads
        if uri in pending:
            return

        async def load() -> None:
            start = time.perf_counter()
            try:
                await asyncio.to_thread(self.cache.get, uri, True, False)  # retry a failed one; not a request
            except Exception:  # kept by the cache for version_status; the replica keeps serving the others
                logger.exception("%s: loading %s failed; still serving %s", type(self).__name__, uri,
                                 self.cache.current)
                return
            finally:
                pending.pop(uri, None)
            if self._target == uri:
                self.cache.current = uri
            logger.info("%s: loaded %s in %.1f s", type(self).__name__, uri, time.perf_counter() - start)

        pending[uri] = asyncio.get_running_loop().create_task(load())

    async def version_status(self, uri: str, since: float = 0.0) -> dict:
        """This replica's ``{"loaded", "loading", "error", "replica"}`` for ``uri``. A version it has not
        loaded starts loading unless a load is under way or failed at or after ``since`` (Unix time, the
        rollout's start): a rollout that names a version again retries it, and a version only the Ingress
        was rolled out to gets loaded. ``error`` is a failure at or after ``since``."""
        uri = uri.rstrip("/")
        status = self.cache.status(uri, failed_since=since)
        loading = status["loading"] or uri in self._pending_loads
        if not (status["loaded"] or loading or status["error"]):
            self._load_in_background(uri)
            loading = True
        return {"loaded": status["loaded"], "loading": loading, "error": status["error"], "replica": _replica_id()}

    def loaded_versions(self) -> list[str]:
        return self.cache.loaded()

    async def _core(self, uri: str):
        """The loaded core of ``uri``; a version not loaded yet is loaded off the event loop."""
        core = self.cache.get_loaded(uri)
        return core if core is not None else await asyncio.to_thread(self.cache.get, uri)

    async def _ready(self, uri: str) -> None:
        """Wait until ``uri`` is loaded here, before a request joins a batch. A replica asked for a version
        it lacks (one added during a rollout starts on the new version and is sent the current one's
        requests) loads it while only that version's requests wait: loading inside the batch handler,
        which runs one batch at a time, held every request of the replica for the whole load. One load
        (one worker thread) per version, however many requests wait for it."""
        if self.cache.get_loaded(uri) is not None:
            return
        loads = self._request_loads
        load = loads.get(uri)
        if load is None:
            load = loads[uri] = asyncio.ensure_future(asyncio.to_thread(self.cache.get, uri))
            load.add_done_callback(lambda _: loads.pop(uri, None))
        await asyncio.shield(load)  # a waiter cancelled (its client gone) leaves the load to the others

    async def _per_version(self, uris: list[str], batches: list[list], call, threaded=False) -> list[list]:
        """A merged batch of calls (``uris[i]``, ``batches[i]``): one ``call(core, items)`` per version, with
        the answers split back per call.

        The model runs on the replica's user-code event loop, not in a worker thread: a thread hop per
        batch cost ~1 ms a stage at one client here, and calls arriving meanwhile queue up and form the
        next batch. (Serve answers health checks and control calls on its own loop, in another thread.)
        ``threaded``: in a worker thread after all, for calls that may wait long (media decoding); a
        callable ``threaded(core)`` decides per version (a text encoder still to load)."""
        out: list[list | None] = [None] * len(uris)
        for uri in dict.fromkeys(uris):
            calls = [i for i, u in enumerate(uris) if u == uri]
            core = await self._core(uri)
            items = [x for i in calls for x in batches[i]]
            in_thread = threaded(core) if callable(threaded) else threaded
            answers = await asyncio.to_thread(call, core, items) if in_thread else call(core, items)
            for i, part in zip(calls, _split(answers, [len(batches[i]) for i in calls]), strict=True):
                out[i] = part
        return out  # type: ignore[return-value]


@serve.deployment(name="QueryEncoder", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class QueryEncoder(_Versioned):
    """User tower over snapshot + recent history; text / image / audio query encoders and projections."""

    def __init__(self, storage_config: dict, torch_threads: int = 1, preload_modalities: bool = True,
                 decode_timeout_s: float | None = 10.0):
        from tessera.encoders.isolated import IsolatedDecoder
        from tessera.serving.query import QueryCore

        _set_threads(torch_threads)
        # one child process per replica decodes image / audio queries for every version it holds
        self._decoder = IsolatedDecoder(decode_timeout_s) if decode_timeout_s else None
        self._init_cache(storage_config, lambda s, ref: QueryCore.load(s, ref, preload_modalities, self._decoder))

    def __del__(self):
        if getattr(self, "_decoder", None) is not None:
            self._decoder.close()

    async def encode_users(self, uri: str, queries: list) -> list:
        await self._ready(uri)
        return await self._encode_users(uri, queries)

    async def encode_queries(self, uri: str, queries: list) -> list:
        """Search queries: texts in one batch queue, image / audio in another, so that media decoding (up to
        ``decode_timeout_s`` an item, or a child's restart) never holds a text query."""
        from tessera.serving.query import MEDIA_MODALITIES

        await self._ready(uri)
        if any(modality in MEDIA_MODALITIES for modality, _ in queries):
            return await self._encode_media(uri, queries)
        return await self._encode_texts(uri, queries)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0)
    async def _encode_users(self, uris: list[str], queries: list[list]) -> list[list]:
        return await self._per_version(uris, queries, lambda core, flat: core.encode_users(flat))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _encode_texts(self, uris: list[str], queries: list[list]) -> list[list]:
        # the first text query of a version with preload_modalities false loads the encoder: in a thread,
        # so that the load (seconds) does not hold the user batches on this event loop
        return await self._per_version(uris, queries, lambda core, flat: core.encode_queries(flat),
                                       threaded=lambda core: not core.has_encoder("text"))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _encode_media(self, uris: list[str], queries: list[list]) -> list[list]:
        # in a thread, so that decoding does not hold the event loop the user and text batches share
        return await self._per_version(uris, queries, lambda core, flat: core.encode_queries(flat), threaded=True)

    async def item_vectors(self, uri: str, item_ids: list[str]) -> list:
        return (await self._core(uri)).item_vectors(item_ids)


@serve.deployment(name="Retriever", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class Retriever(_Versioned):
    """ScaNN shards of the fused and per-modality indexes (all of them, or one group's share)."""

    def __init__(self, storage_config: dict, group: list[int] | None = None, modal: bool = True,
                 search_threads: int = 1):
        from tessera.index import SearchConfig
        from tessera.serving.retrieve import RetrieverCore

        config = SearchConfig(search_threads=search_threads)
        share = tuple(group) if group else None  # (i, groups): the shards whose id is i modulo groups
        self._init_cache(storage_config, lambda s, ref: RetrieverCore.load(s, ref, config, share, modal))

    async def search(self, uri: str, index: str, vectors: np.ndarray, k: int, exclude: list[set[str]] | None):
        await self._ready(uri)
        return await self._search(uri, index, vectors, k, exclude)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _search(self, uris: list[str], indexes: list[str], vectors: list[np.ndarray], ks: list[int],
                      excludes: list[list[set[str]] | None]) -> list:
        from tessera.serving.local import search_or_error

        out: list = [None] * len(uris)
        for key in dict.fromkeys(zip(uris, indexes, strict=True)):
            calls = [i for i, u in enumerate(zip(uris, indexes, strict=True)) if u == key]
            core = await self._core(key[0])
            k = max(ks[i] for i in calls)
            exclude = [ex for i in calls for ex in (excludes[i] or [set()] * len(vectors[i]))]
            found = search_or_error(core, key[1], np.concatenate([vectors[i] for i in calls]), k,
                                    exclude if any(exclude) else None)
            if isinstance(found, RequestError):
                for i in calls:
                    out[i] = found
                continue
            ids, scores = found
            start = 0
            for i in calls:
                n = len(vectors[i])
                out[i] = ([row[:ks[i]] for row in ids[start:start + n]], scores[start:start + n, :ks[i]])
                start += n
        return out


@serve.deployment(name="Ranker", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class Ranker(_Versioned):
    """Re-scores candidates with the bundle's ranker; popular items for cold requests."""

    def __init__(self, storage_config: dict, torch_threads: int = 1):
        from tessera.serving.rank import RankerCore

        _set_threads(torch_threads)
        self._init_cache(storage_config, RankerCore.load)

    async def rank(self, uri: str, inputs: list) -> list:
        await self._ready(uri)
        return await self._rank(uri, inputs)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.0)
    async def _rank(self, uris: list[str], inputs: list[list]) -> list[list]:
        return await self._per_version(uris, inputs, lambda core, flat: core.rank(flat))


HEALTH_TIMEOUT_S = 5.0  # how long GET /healthz?deep=true waits for each stage
ROLLOUT_TIMEOUT_S = 1800.0  # how long the Ingress waits for the stages to load a new version
ROLLOUT_RETRY_MAX_S = 600.0  # the longest wait between tries of a failed rollout
RETRIES = 2  # a stage call whose replica died is sent again (every stage call is a read: safe to repeat)


class StageTimeoutError(Exception):
    """A stage call not answered within ``stage_timeout_s`` (its requests get a 504)."""

    def __init__(self, stage: str, timeout_s: float):
        super().__init__(f"{stage} did not answer within {timeout_s:g} s (stage_timeout_s)")
        self.stage = stage


async def _call(method, *args, timeout_s: float | None = None):
    """``await method.remote(*args)``, retried when the replica serving it died or became unreachable;
    cancelled, raising :class:`StageTimeoutError`, when not answered within ``timeout_s`` (None: no bound)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    for attempt in range(RETRIES + 1):
        response = method.remote(*args)
        try:
            if timeout_s is None:
                return await response
            waiting = asyncio.ensure_future(response)
            try:
                await asyncio.wait([waiting], timeout=timeout_s)
            finally:
                if not waiting.done():  # timed out, or this request itself cancelled: the call goes too
                    response.cancel()
                    waiting.cancel()
                    waiting.add_done_callback(_retrieve)
            if not waiting.done():
                raise StageTimeoutError(method.deployment_name, timeout_s)
            return waiting.result()
        except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
            if attempt == RETRIES:
                raise
            logger.warning("stage call failed (%s: %s); retrying on another replica", type(err).__name__, err)
            await asyncio.sleep(0.05 * (attempt + 1))


def _retrieve(task: asyncio.Future) -> None:
    """Take a dropped call's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class HandleStages:
    """:class:`tessera.serving.flow.Stages` over deployment handles (scatter-gather over retriever groups);
    a request call not answered within ``timeout_s`` raises :class:`StageTimeoutError` (None: no bound)."""

    def __init__(self, query_encoder: DeploymentHandle, retrievers: list[DeploymentHandle], ranker: DeploymentHandle,
                 timeout_s: float | None = None):
        self.query_encoder, self.retrievers, self.ranker = query_encoder, retrievers, ranker
        self.timeout_s = timeout_s

    @property
    def handles(self) -> list[DeploymentHandle]:
        """Every stage deployment's handle."""
        return [self.query_encoder, *self.retrievers, self.ranker]

    async def encode_users(self, index_uri, queries):
        return await _call(self.query_encoder.encode_users, index_uri, queries, timeout_s=self.timeout_s)

    async def encode_queries(self, index_uri, queries):
        return await _call(self.query_encoder.encode_queries, index_uri, queries, timeout_s=self.timeout_s)

    async def item_vectors(self, index_uri, item_ids):
        return await _call(self.query_encoder.item_vectors, index_uri, item_ids, timeout_s=self.timeout_s)

    async def search(self, index_uri, index, vectors, k, exclude):
        # the fused index is spread over the groups; the (small) per-modality indexes live in group 0
        groups = self.retrievers if index == "fused" else self.retrievers[:1]
        parts = await asyncio.gather(*(_call(r.search, index_uri, index, vectors, k, exclude, timeout_s=self.timeout_s)
                                       for r in groups))
        for part in parts:
            if isinstance(part, RequestError):
                return part
        if len(parts) == 1:
            return parts[0]
        return merge_top_k(parts, k)

    async def rank(self, index_uri, inputs):
        return await _call(self.ranker.rank, index_uri, inputs, timeout_s=self.timeout_s)

    async def wait_loaded(self, index_uri: str, timeout_s: float, poll_s: float = 0.5) -> None:
        """Return once every running replica of every stage deployment reports ``index_uri`` loaded.

        Each poll goes through the deployment's handle, so it reaches one replica, chosen by Serve's
        router: a deployment is done once as many distinct replicas said "loaded" as it has replicas
        running or updating (``serve.status()``). Replicas that have not loaded it start loading it, and
        one whose load failed before this rollout began tries again.

        Raises:
            VersionError: a stage replica failed to load it in this rollout (naming the stage and its error).
            TimeoutError: not every stage had it within ``timeout_s``.
        """
        from tessera.serving.version import VersionError

        since, app_name = time.time(), serve.get_replica_context().app_name
        waiting = {h.deployment_name: h for h in self.handles}
        loaded: dict[str, set[str]] = {name: set() for name in waiting}
        deadline = time.monotonic() + timeout_s
        while waiting:
            replicas = await asyncio.to_thread(_replica_counts, app_name, list(waiting))
            for name, handle in list(waiting.items()):
                try:
                    status = await asyncio.wait_for(_call(handle.version_status, index_uri, since),
                                                    max(1.0, min(30.0, deadline - time.monotonic())))
                except TimeoutError:  # no replica free to answer (or none running): ask again
                    continue
                if status["error"]:
                    raise VersionError(f"{name} could not load {index_uri}: {status['error']}")
                if status["loaded"]:
                    loaded[name].add(status["replica"])
                    if len(loaded[name]) >= max(1, replicas.get(name, 1)):
                        del waiting[name]
            if waiting:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{', '.join(waiting)} did not load {index_uri} within {timeout_s:g} s")
                await asyncio.sleep(poll_s)

    async def probe(self, index_uri: str, timeout_s: float) -> dict[str, dict]:
        """Ask each stage deployment (one replica each) which versions it holds; per deployment ``ok``
        (answered within ``timeout_s``), ``versions`` and ``has_current`` (``index_uri`` among them: a
        stage without it loads it on its first request), or ``error``."""

        async def one(handle: DeploymentHandle) -> dict:
            try:
                versions = await asyncio.wait_for(handle.loaded_versions.remote(), timeout_s)
            except TimeoutError:  # no replica running, or every replica too busy to answer in time
                return {"ok": False, "error": f"no answer within {timeout_s:g} s"}
            except Exception as err:  # replica lost, the call failed: the stage is not answering
                return {"ok": False, "error": _cause_line(err).rstrip(": ")}  # an empty message: the type alone
            return {"ok": True, "versions": versions, "has_current": index_uri in versions}

        handles = self.handles
        answers = await asyncio.gather(*(one(h) for h in handles))
        return {h.deployment_name: a for h, a in zip(handles, answers, strict=True)}


_KV_NAMESPACE = "tessera_serve"


def _publish_serving(app_name: str, index_uri: str) -> None:
    """Record the version ``app_name``'s Ingress switched to (Ray's internal KV store, cluster-wide)."""
    from ray.experimental.internal_kv import _internal_kv_put

    try:
        _internal_kv_put(f"serving/{app_name}", index_uri, overwrite=True, namespace=_KV_NAMESPACE)
    except Exception:  # a replica added later then has no version to fall back on: it fails as before
        logger.warning("could not record the serving version of %s", app_name, exc_info=True)


def _published_serving(app_name: str) -> str | None:
    """The version ``app_name``'s Ingress last switched to, or None."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        value = _internal_kv_get(f"serving/{app_name}", namespace=_KV_NAMESPACE)
    except Exception:
        logger.warning("could not read the serving version of %s", app_name, exc_info=True)
        return None
    return value.decode() if value else None


def _replica_counts(app_name: str, deployments: list[str]) -> dict[str, int]:
    """Replicas RUNNING or UPDATING per deployment of ``app_name`` (a blocking controller call; an empty
    dict when the controller cannot say)."""
    try:
        app = serve.status().applications[app_name]
    except Exception:  # the controller unreachable for a moment: count one replica each meanwhile
        logger.warning("no replica counts from the Serve controller", exc_info=True)
        return {}
    return {name: sum(n for state, n in app.deployments[name].replica_states.items()
                      if str(getattr(state, "value", state)) in ("RUNNING", "UPDATING"))
            for name in deployments if name in app.deployments}


def _cause_line(err: BaseException) -> str:
    """``Type: first line`` of a failed stage call's cause. A stage's own exception comes wrapped in
    Ray's RayTaskError, whose text is a header naming the replica (pid, IP, actor id) and a remote
    traceback: only the cause's first line (200 characters at most) is said."""
    cause = getattr(err, "cause", None) or err
    first = (str(cause).strip().splitlines() or [""])[0][:200]
    return f"{type(cause).__name__}: {first}"


def merge_top_k(parts: list[tuple[list[list[str]], np.ndarray]], k: int) -> tuple[list[list[str]], np.ndarray]:
    """Merge per-group top-k lists (ids, scores best first) into one global top-k per query."""
    n = len(parts[0][0])
    ids_out, scores_out = [], np.full((n, k), -np.inf, np.float32)
    for q in range(n):
        cand = [(float(s), i) for ids, scores in parts for i, s in zip(ids[q], scores[q], strict=False)
                if np.isfinite(s)]
        cand.sort(key=lambda x: -x[0])
        best = cand[:k]
        ids_out.append([i for _, i in best])
        scores_out[q, :len(best)] = [s for s, _ in best]
    return ids_out, scores_out


class _Metrics:
    def __init__(self):
        from ray.util import metrics

        self.latency = metrics.Histogram(
            "tessera_serve_stage_latency_ms", description="latency of each stage of a request, in ms",
            boundaries=[1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500], tag_keys=("route", "stage"))
        self.requests = metrics.Counter("tessera_serve_requests_total", description="requests by route and status",
                                        tag_keys=("route", "status"))
        self.cold = metrics.Counter("tessera_serve_cold_start_total", description="cold-start answers",
                                    tag_keys=("route",))

    def observe(self, route: str, status: int, timings: dict | None = None) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        if timings:
            for stage in TIMED_STAGES:
                self.latency.observe(timings[f"{stage}_ms"], tags={"route": route, "stage": stage})


api = FastAPI(title="Tessera recommender",
              description="Recommendations and cross-modal search over one model + index version.",
              version="1", responses={422: {"model": ErrorResponse}})


_METRICS: list[_Metrics] = []


def metrics() -> _Metrics:
    """This process's metric objects (one set per replica process)."""
    if not _METRICS:
        _METRICS.append(_Metrics())
    return _METRICS[0]


_ROUTES = {"/v1/recommend": "recommend", "/v1/search": "search", "/v1/version": "version", "/healthz": "healthz"}


def _route_of(path: str) -> str:
    """The metric label of a request path: one of the app's routes (under any route prefix), else
    ``other``: a label per path would let any client create metric series without end."""
    path = path.rstrip("/")
    if "/v1/items/" in path and path.endswith("/similar"):
        return "similar"
    return next((name for suffix, name in _ROUTES.items() if path.endswith(suffix)), "other")


def _printable(value: Any) -> Any:
    """``value`` safe to encode as UTF-8 JSON: a lone surrogate (valid JSON escape, invalid UTF-8) is escaped."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body or parameter that fails validation, counted like every other answer.

    Each error keeps its ``type``, ``loc`` and ``msg`` but not the offending ``input``: echoing it back
    would return a multi-megabyte body for a long list or a base64 payload, and a string holding a lone
    surrogate could not even be encoded (that was a bare 500)."""
    metrics().observe(_route_of(request.url.path), 422)
    detail = [{"type": e.get("type"), "loc": _printable(list(e.get("loc", ()))), "msg": _printable(e.get("msg", ""))}
              | ({"ctx": {k: _printable(str(v)[:200]) for k, v in e["ctx"].items()}} if e.get("ctx") else {})
              for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(detail), "kind": "bad_request"})


_HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own answers (a body that is not JSON or not UTF-8: 400; a path or method the app lacks:
    404, 405), counted like every other answer and given a ``kind`` as ours are (they were neither)."""
    metrics().observe(_route_of(request.url.path), exc.status_code)
    kind = _HTTP_KINDS.get(exc.status_code, "bad_request" if exc.status_code < 500 else "error")
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail, "kind": kind},
                        headers=getattr(exc, "headers", None))


def _too_large(path: str, size: int, limit: int, declared: bool) -> JSONResponse:
    metrics().observe(_route_of(path), 413)
    said = f"{size} bytes" if declared else f"over {limit} bytes (sent without a length)"
    return JSONResponse(status_code=413, content={"detail": f"request body of {said} is over the limit of {limit} "
                                                            f"bytes", "kind": "too_large"})


BODY_LIMIT = [8_000_000]  # this replica's args.max_body_bytes (set by the Ingress; one Ingress per process)


class _BodyLimit:
    """ASGI middleware: 413 for a body over ``max_body_bytes``, by its declared length before anything is
    read; a body sent without a length (chunked) is read here first, up to the limit, then handed on
    (FastAPI reads and parses the whole body before a route runs, and turns an error raised while reading
    into a 400, so neither a check in the route nor a raising ``receive`` can answer 413). Plain ASGI,
    not ``@app.middleware``: Starlette's BaseHTTPMiddleware costs a task group and a stream per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BODY_LIMIT[0]
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if length is not None:  # declared: refuse up front, or pass through untouched
            if length.isdigit() and int(length) > limit:
                return await _too_large(scope["path"], int(length), limit, declared=True)(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _too_large(scope["path"], size, limit, declared=False)(scope, receive, send)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)


def _replay(messages: list[dict], then=None):
    """An ASGI ``receive`` that returns ``messages`` first, then defers to ``then`` (disconnect waits)."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


api.add_middleware(_BodyLimit)


_INLINE_BASE64_CHARS = 256 << 10


def _base64_payload(text: str) -> bytes | str:
    """The bytes of a base64 field, or what is wrong with it. Tolerates what common encoders emit: line
    breaks (``base64`` wraps at 76 columns), a ``data:<type>;base64,`` URI prefix, and the URL-safe
    alphabet."""
    text = text.strip()
    if text.startswith("data:"):
        head, sep, rest = text.partition(",")
        if not sep or not head.endswith(";base64"):
            return "a data: URI must be data:<type>;base64,<data>"
        text = rest
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4) if len(text) % 4 in (2, 3) else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        return f"{err} (expected standard or URL-safe base64)"


def _publish_max_k(schema: dict, max_k: int) -> dict:
    """``schema`` (an OpenAPI document, changed in place) with every ``k``'s maximum lowered from the
    models' ceiling to the deployment's ``max_k``, so ``/docs`` states the bound requests are held to."""
    for model in schema.get("components", {}).get("schemas", {}).values():
        k = model.get("properties", {}).get("k")
        if k is not None and "maximum" in k:
            k["maximum"] = min(k["maximum"], max_k)
    for route in schema.get("paths", {}).values():
        for operation in route.values():
            for param in operation.get("parameters", []):
                if param.get("name") == "k" and "maximum" in param.get("schema", {}):
                    param["schema"]["maximum"] = min(param["schema"]["maximum"], max_k)
    return schema


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"detail": err.detail, "kind": err.kind})


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """HTTP routes; gathers concurrent requests into batches and sends one call per stage per batch."""

    def __init__(self, query_encoder: DeploymentHandle, retrievers: list[DeploymentHandle], ranker: DeploymentHandle,
                 args: dict):
        # index_uri is not among the init args (build_app leaves it out): it arrives through user_config
        self.args = RecommenderArgs.model_validate(args)
        self.storage = Storage(self.args.storage)
        # through the module: Serve pickles this class by value, so a bare BODY_LIMIT here would be
        # cloudpickle's copy of the list, not the one the middleware (a class imported by reference) reads
        import serve_apps.recommender as this_module

        this_module.BODY_LIMIT[0] = self.args.max_body_bytes
        self.stages = HandleStages(query_encoder, retrievers, ranker, self.args.stage_timeout_s)
        self.metrics = metrics()
        b = self.args.batch
        for batched in (self._recommend_batch, self._search_batch, self._media_search_batch):
            batched.set_max_batch_size(b.max_batch_size)
            batched.set_batch_wait_timeout_s(b.batch_wait_timeout_ms / 1000.0)
        self._inflight = 0  # requests of this replica between arrival and answer
        self.flow: Flow | None = None
        self.ref = None
        self.rollout: dict | None = None  # a version being rolled out, or whose rollout failed
        self._rolling: asyncio.Task | None = None

    def check_health(self) -> None:
        if self.flow is None:
            raise RuntimeError("no index version to serve: set user_config.index_uri of the Ingress (and of the "
                               "other deployments) in the Serve config, or args.index_uri")

    async def reconfigure(self, config: dict) -> None:
        """Take the version in ``user_config`` (Serve calls this after ``__init__`` and on every change).

        The first version is resolved here, and the replica starts once every stage deployment has it
        loaded (a replica without one cannot serve; one the stages cannot load fails the deploy; a replica
        added while a rollout is under way or failing starts on the version the app serves: :meth:`_first_version`).
        A later one is rolled
        out in the background: requests keep being answered from the
        current version until every stage deployment reports the new one loaded, then new requests switch
        to it. If a stage fails to load it (or none answers within ``ROLLOUT_TIMEOUT_S``), the Ingress
        stays on the current version, ``/v1/version`` and ``/healthz`` report the failed rollout, and it
        is tried again (``rollout_retry_s``). A ``user_config`` with other keys than ``index_uri``, or with
        none, fails a first deploy; later, it is reported as a failed rollout and the current version goes
        on (a replica added meanwhile starts on the version the app serves)."""
        try:
            uri = configured_index(config, "Ingress")
            if not uri:  # (an unset template variable): on a running app, not a reason to stop its replicas
                raise ValueError("the Ingress's user_config needs index_uri (the index version to serve)")
        except ValueError as err:
            await self._refuse_config(config, err)
            uri = None
        if uri is None:
            pass  # refused: the current version goes on
        elif self.flow is None:
            ref = await self._first_version(uri)
            self._switch(ref)
            if ref.index_uri != uri:  # started on the app's serving version: keep trying the configured one
                self._start_rollout(uri)
        elif uri == self.flow.index_uri:
            self._cancel_rollout()  # rolled back to the version being served: nothing pending
        elif not (self.rollout and self.rollout["index_uri"] == uri and self.rollout["state"] == "loading"):
            self._cancel_rollout()  # (the same config again, as when Serve reassigns ranks, keeps it going)
            self._start_rollout(uri)
        app = getattr(self, "_asgi_app", None)  # set by serve.ingress after __init__, before this first call
        if isinstance(app, FastAPI) and app.openapi_schema is None:
            app.openapi_schema = _publish_max_k(app.openapi(), self.args.max_k)

    async def _refuse_config(self, config: dict | None, err: ValueError) -> None:
        """A ``user_config`` that is not one: reported as a failed rollout while the current version goes on
        (a replica with none yet starts on the version the app serves, if any; else ``err`` is raised)."""
        if self.flow is None:
            serving = await self._serving_fallback(None)
            if serving is None:
                raise err
            self._switch(await self._ready_version(serving))
        self._cancel_rollout()
        self.rollout = {"index_uri": str((config or {}).get("index_uri") or ""), "state": "failed",
                        "since": time.time(), "error": str(err)}
        logger.error("%s; still serving %s", err, self.flow.index_uri)

    def _start_rollout(self, uri: str) -> None:
        self.rollout = {"index_uri": uri, "state": "loading", "since": time.time(), "error": None}
        self._rolling = asyncio.get_running_loop().create_task(self._roll_out(uri))

    def _cancel_rollout(self) -> None:
        if self._rolling is not None:
            self._rolling.cancel()
            self._rolling = None
        self.rollout = None

    def _switch(self, ref) -> None:
        candidates = int(ref.bundle_manifest.get("ranker_features", {}).get("candidates", 50))
        self.flow = Flow(self.stages, ref.index_uri, ref.model_version, ref.index_version, candidates)
        self.ref = ref  # swapped together: a batch already running keeps the flow it started with
        _publish_serving(serve.get_replica_context().app_name, ref.index_uri)

    async def _ready_version(self, uri: str):
        """The :class:`VersionRef` of ``uri``, once every stage replica has it loaded."""
        from tessera.serving.version import VersionRef

        ref = await asyncio.to_thread(VersionRef.resolve, self.storage, uri)
        await self.stages.wait_loaded(ref.index_uri, ROLLOUT_TIMEOUT_S)
        return ref

    async def _first_version(self, uri: str):
        """The replica's first version: ``uri`` once every stage replica has it loaded. A replica that
        Serve adds or replaces while a rollout of ``uri`` is under way or failing (it starts them on the
        configured version) starts instead, at once, on the version the app's Ingress replicas last switched
        to (published in Ray's KV store by :meth:`_switch`) if a stage still holds it loaded, and rolls
        ``uri`` out in the background (reporting the rollout, as the running replicas do). With no such version (a first
        deploy, or the app deleted and deployed again: its stages are new) the failure fails its start."""
        serving = await self._serving_fallback(uri)
        if serving is not None:  # a rollout of uri under way or failing: start on the served version at once
            try:  # (waiting for uri kept a replaced Ingress replica down for the whole rollout)
                return await self._ready_version(serving)
            except Exception as err:
                logger.error("%s, the version the app serves, cannot be served here (%s); waiting for %s", serving,
                             _cause_line(err), uri)
        try:
            return await self._ready_version(uri)
        except Exception as err:
            fallback = await self._serving_fallback(uri)
            if fallback is None or fallback == serving:  # (that one failed above: not waited for twice)
                raise
            logger.error("%s cannot be served (%s); starting on %s, the version the app was serving",
                         uri, _cause_line(err), fallback)
            return await self._ready_version(fallback)

    async def _serving_fallback(self, other_than: str | None) -> str | None:
        """The version the app's Ingress replicas last switched to (Ray's KV store), if it is not
        ``other_than`` and a stage still holds it loaded (the key outlives the app: a deleted app deployed
        again has new stages, and must not start on a version of its past)."""
        fallback = await asyncio.to_thread(_published_serving, serve.get_replica_context().app_name)
        if fallback is None or fallback == other_than:
            return None
        held = await self.stages.probe(fallback, HEALTH_TIMEOUT_S)
        return fallback if any(answer.get("has_current") for answer in held.values()) else None

    async def _roll_out(self, uri: str) -> None:
        """Roll ``uri`` out; a failed try is reported (``failed``, the error, when the next try starts)
        and tried again after ``rollout_retry_s``, doubling, until it loads or the config changes (which
        cancels this task)."""
        start, wait = time.perf_counter(), self.args.rollout_retry_s
        me = asyncio.current_task()
        while True:
            try:
                ref = await self._ready_version(uri)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                ref, error = None, _cause_line(err)
            if self._rolling is not me:  # replaced (a cancel can be lost in wait_for on Python 3.11)
                return
            if ref is not None:
                break
            self.rollout = {**self.rollout, "state": "failed", "error": error,
                            "attempts": self.rollout.get("attempts", 0) + 1, "retry_at": time.time() + wait}
            logger.error("rollout of %s failed, still serving %s (tried again in %.0f s): %s", uri,
                         self.flow.index_uri, wait, error)
            await asyncio.sleep(wait)
            if self._rolling is not me:
                return
            wait = min(2 * wait, max(ROLLOUT_RETRY_MAX_S, self.args.rollout_retry_s))
            self.rollout = {**self.rollout, "state": "loading", "retry_at": None}
        self._switch(ref)
        self.rollout = None
        logger.info("serving %s (rolled out in %.1f s)", ref.index_uri, time.perf_counter() - start)

    # --- helpers ------------------------------------------------------------------------
    def _check_k(self, k: int) -> RequestError | None:
        if k > self.args.max_k:
            return RequestError(422, "bad_request", f"k={k} is above this endpoint's max_k={self.args.max_k}")
        return None

    def _batched(self, batched, *args):
        """Queue one request on a ``@serve.batch`` method with the adaptive window (see :class:`BatchArgs`)."""
        alone = self._inflight == 0  # called before _answer counts this request in
        batched.set_batch_wait_timeout_s(0.0 if alone else self.args.batch.batch_wait_timeout_ms / 1000.0)
        return batched(*args)

    async def _answer(self, route: str, coro, response_model: type[BaseModel]):
        self._inflight += 1
        try:
            return await self._answer_inner(route, coro, response_model, time.perf_counter())
        finally:
            self._inflight -= 1

    async def _answer_inner(self, route: str, coro, response_model: type[BaseModel], arrived: float):
        try:
            result = await coro
        except StageTimeoutError as err:  # a stage hung or overloaded: 504, the request not left waiting
            logger.error("%s: %s", route, err)
            self.metrics.observe(route, 504)
            return JSONResponse(status_code=504, content={"detail": f"{route} failed: {err}", "kind": "timeout"})
        except Exception as err:  # a stage failed (replica lost, bug): 503, logged, never a silent 500
            logger.exception("%s failed", route)
            self.metrics.observe(route, 503)
            return JSONResponse(status_code=503, content={"detail": f"{route} failed: {_cause_line(err)}",
                                                          "kind": "unavailable"})
        if isinstance(result, RequestError):
            self.metrics.observe(route, result.status)
            return _error(result)
        # the Flow times its batch; the request also waited for the batch to run (window, batches ahead)
        total, ran = round((time.perf_counter() - arrived) * 1000.0, 3), result["timings"]["total_ms"]
        result = {**result, "timings": {**result["timings"], "queue_ms": max(0.0, round(total - ran, 3)),
                                        "total_ms": total}}  # per request: the batch shares one timings dict
        self.metrics.observe(route, 200, result["timings"])
        if result.get("cold_start"):
            self.metrics.cold.inc(tags={"route": route})
        return response_model.model_validate(result)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _recommend_batch(self, requests: list[RecommendRequest]) -> list:
        return await self.flow.recommend(requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _search_batch(self, requests: list[SearchRequest], payloads: list[Any]) -> list:
        return await self.flow.search(requests, payloads)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _media_search_batch(self, requests: list[SearchRequest], payloads: list[Any]) -> list:
        """Image and audio searches, batched apart from text ones: a batch's answers all wait for its
        slowest decode (up to ``decode_timeout_s``), which no text query should."""
        return await self.flow.search(requests, payloads)

    # --- routes -------------------------------------------------------------------------
    @api.post("/v1/recommend", response_model=RecommendResponse,
              responses={413: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                         504: {"model": ErrorResponse}})
    async def recommend(self, body: RecommendRequest):
        """Top-k items for a user (snapshot history + ``recent_item_ids``); popular items when cold."""
        bad = self._check_k(body.k)
        if bad:
            self.metrics.observe("recommend", bad.status)
            return _error(bad)
        return await self._answer("recommend", self._batched(self._recommend_batch, body), RecommendResponse)

    @api.post("/v1/search", response_model=SearchResponse,
              responses={413: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                         504: {"model": ErrorResponse}})
    async def search(self, body: SearchRequest):
        """Cross-modal search: items whose vectors are nearest a text, an image or a sound."""
        bad = self._check_k(body.k)
        payload: Any = body.text
        if bad is None and body.text is None:
            encoded = body.image if body.image is not None else body.audio
            # ~45 ms for 8 MB here: large payloads are decoded off the event loop, which every other request
            # of this replica waits on; small ones cost less than the hop to a thread
            payload = (await asyncio.to_thread(_base64_payload, encoded) if len(encoded) > _INLINE_BASE64_CHARS
                       else _base64_payload(encoded))
            if isinstance(payload, str):
                bad = RequestError(422, "bad_media", f"{body.modality} is not valid base64: {payload}")
        if bad:
            self.metrics.observe("search", bad.status)
            return _error(bad)
        batched = self._search_batch if body.text is not None else self._media_search_batch
        return await self._answer("search", self._batched(batched, body, payload), SearchResponse)

    @api.get("/v1/items/{item_id:path}/similar", response_model=SimilarResponse,  # :path: ids may hold "/"
             responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
                         504: {"model": ErrorResponse}})
    async def similar(self, item_id: str, k: int = Query(10, ge=1, le=MAX_K, description="items to return")):
        """Items nearest this item's fused vector (the item itself left out)."""
        bad = self._check_k(k)
        if bad:
            self.metrics.observe("similar", bad.status)
            return _error(bad)

        async def one():
            [answer] = await self.flow.similar([item_id], [k])
            return answer

        return await self._answer("similar", one(), SimilarResponse)

    @api.get("/healthz", responses={503: {"description": "a stage did not answer (deep=true)"}})
    async def healthz(self, deep: bool = Query(False, description="also ask every stage deployment which "
                                                                     "versions it has loaded (one call each)")):
        """The Ingress is up and has a version to serve; with ``deep=true``, every stage answered too."""
        body = {"status": "ok", "index_version": self.ref.index_version, "model_version": self.ref.model_version}
        if self.rollout is not None:  # informative: the current version still answers
            body["rollout"] = self.rollout
        if not deep:
            metrics().observe("healthz", 200)
            return body
        stages = await self.stages.probe(self.flow.index_uri, HEALTH_TIMEOUT_S)
        if not all(stage["ok"] for stage in stages.values()):
            body["status"] = "unavailable"
        body["stages"] = stages
        status = 200 if body["status"] == "ok" else 503
        metrics().observe("healthz", status)
        return JSONResponse(status_code=status, content=body)

    @api.get("/v1/version", response_model=VersionResponse)
    async def version(self):
        metrics().observe("version", 200)
        return VersionResponse.model_validate({**self.ref.describe(), "rollout": self.rollout})


def build_app(args: RecommenderArgs | dict) -> Application:
    """The four-deployment application (``import_path: serve_apps.recommender:build_app``).

    ``args`` is validated here (this module's postponed annotations hide the model from Serve's own
    typed-builder check), so a wrong key fails the deploy naming the key.
    """
    if not isinstance(args, RecommenderArgs):
        args = RecommenderArgs.model_validate(args)
    storage = args.storage.model_dump(mode="json")
    version = {"user_config": {"index_uri": args.index_uri}} if args.index_uri else {}
    encoder = QueryEncoder.options(**version).bind(storage, args.torch_threads, args.preload_modalities,
                                                   args.decode_timeout_s)
    if args.retriever_groups == 1:
        retrievers = [Retriever.options(**version).bind(storage, None, True)]
    else:
        g = args.retriever_groups
        retrievers = [Retriever.options(name=f"Retriever_{i}", **version).bind(storage, [i, g], i == 0)
                      for i in range(g)]
    ranker = Ranker.options(**version).bind(storage, args.torch_threads)
    # index_uri travels only in user_config: a new version is a reconfigure, not a new replica
    ingress_args = args.model_dump(mode="json", exclude={"index_uri"})
    return Ingress.options(**version).bind(encoder, retrievers, ranker, ingress_args)
