"""A sharded item index: every shard is searched, per-shard top-k are merged into a global top-k.

Shards are built independently (one Ray task each in ``jobs.build_index``; here in-process with
:meth:`ShardedIndex.from_arrays`), saved under ``index/<version>/shard-NNNN/`` and loaded with
:meth:`ShardedIndex.load`, which verifies every file's checksum. Small shards are exact numpy
searches; larger ones are ScaNN searchers (see :mod:`tessera.index.params`).

Thread safety: :meth:`ShardedIndex.search` may be called from many threads at once. It keeps no
per-call state on the index; ScaNN's batched search is read-only and releases the GIL (see
:mod:`tessera.index.shard`). With ``SearchConfig.search_threads > 1`` the shards of one call are
searched in parallel on a shared thread pool.

Example::

    index = ShardedIndex.from_arrays(ids, vectors, IndexConfig(), num_shards=3)
    ids, scores = index.search(queries, k=10, exclude=[{"item-1"}] * len(queries))
    index.save(storage, "s3://bucket/index/v1", model_version="m1", embedding_run="e1")
    same = ShardedIndex.load(storage, "s3://bucket/index/v1")
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from typing import Sequence

import numpy as np
from pydantic import Field

from tessera.config import TesseraConfig
from tessera.index.exact import (
    as_float_matrix,
    prepare_queries,
    top_k_rows,
)
from tessera.index.manifest import (
    FAILED_REPORT,
    INDEX_MANIFEST,
    IndexManifest,
    RecallCheck,
    make_index_manifest,
    read_index_manifest,
    write_index_manifest,
)
from tessera.index.params import IndexConfig
from tessera.index.shard import ShardArtifact, build_shard, search_shard, search_shard_one
from tessera.index.shard_io import (
    SHARD_DIR_NAME,
    SHARD_MANIFEST,
    IndexCorruptError,
    load_shard,
    read_shard_manifest_sha256,
    save_shard,
    shard_name,
)
from tessera.index.sharding import assign_shards, first_duplicate
from tessera.storage import Storage, join_uri

# Merges of up to this many queries run in plain Python (see ShardedIndex._merge_few).
_FEW_QUERIES = 8


class SearchConfig(TesseraConfig):
    """Query-time settings of a :class:`ShardedIndex`.

    Args:
        search_threads: threads searching the shards of one call in parallel (1: one after another).
        load_threads: shards downloaded and loaded at once by :meth:`ShardedIndex.load`.
        num_leaves_to_search: override the tuned leaves searched in tree shards.
        reorder_num_neighbors: override the tuned number of candidates rescored exactly.
    """

    search_threads: int = Field(default=1, ge=1)
    load_threads: int = Field(default=4, ge=1)
    num_leaves_to_search: int | None = Field(default=None, ge=1)
    reorder_num_neighbors: int | None = Field(default=None, ge=1)


class ShardedIndex:
    """Searches several shards of one item catalog as one index.

    Args:
        shards: shards with ids 0..S-1, all of one dimension, with disjoint item ids.
        config: query-time settings.
        manifest: the index manifest it was loaded from, if any.
    """

    def __init__(self, shards: Sequence[ShardArtifact], config: SearchConfig | None = None,
                 manifest: IndexManifest | None = None):
        self.shards = sorted(shards, key=lambda s: s.shard_id)
        if not self.shards:
            raise ValueError("an index needs at least one shard")
        if [s.shard_id for s in self.shards] != list(range(len(self.shards))):
            raise ValueError(f"shard ids must be 0..{len(self.shards) - 1}, got {[s.shard_id for s in self.shards]}")
        if len({s.dim for s in self.shards}) != 1 or len({s.params.normalized for s in self.shards}) != 1:
            described = ", ".join(f"shard {s.shard_id}: {s.dim}-d, {'' if s.params.normalized else 'not '}normalised"
                                  for s in self.shards)
            raise ValueError(f"all shards must share one dimension and one normalisation ({described})")
        if sum(s.count for s in self.shards) != len(set().union(*(s.row_of for s in self.shards))):
            raise ValueError(f"item ids must be unique across shards: {_shared_id(self.shards)}")
        self.config = config or SearchConfig()
        self.manifest = manifest
        self._search_params = [self._with_overrides(s) for s in self.shards]
        self._id_lists = [s.id_list for s in self.shards]
        # a lone query (excluded items or not): one ScaNN call a shard, shards one after another; exact
        # shards and shards searched on threads take the batched path
        self._one_query_path = all(s.searcher is not None for s in self.shards) and (
            self.config.search_threads == 1 or len(self.shards) == 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def num_items(self) -> int:
        return sum(s.count for s in self.shards)

    def _with_overrides(self, shard: ShardArtifact):
        update = {}
        if self.config.num_leaves_to_search and shard.params.mode == "tree_ah":
            update["num_leaves_to_search"] = min(self.config.num_leaves_to_search, shard.params.num_leaves)
        if self.config.reorder_num_neighbors and shard.params.mode != "brute_force":
            update["reorder_num_neighbors"] = max(self.config.reorder_num_neighbors, shard.params.num_neighbors)
        return shard.params.model_copy(update=update)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, ids: Sequence[str], vectors, config: IndexConfig | None = None, num_shards: int = 1,
                    search_config: SearchConfig | None = None) -> ShardedIndex:
        """Build every shard in this process (the Ray job builds them as parallel tasks instead).

        Args:
            ids: N unique item ids.
            vectors: (N, D) item vectors.
            config: build settings (per-shard algorithm by size, tuning).
            num_shards: shards to split into (balanced, by id hash: :func:`assign_shards`).
            search_config: query-time settings.

        Example::

            index = ShardedIndex.from_arrays([f"i{j}" for j in range(n)], vecs, num_shards=2)
        """
        ids = [str(i) for i in ids]
        x = as_float_matrix(vectors, "item vectors")
        if x.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for {x.shape[0]} vectors")
        parts = assign_shards(ids, num_shards)
        if any(len(rows) == 0 for rows in parts):
            raise ValueError(f"{num_shards} shards for {len(ids)} items leaves a shard empty")
        shards = [build_shard([ids[r] for r in rows], x[rows], config, shard_id=i, catalog_size=len(ids))
                  for i, rows in enumerate(parts)]
        return cls(shards, search_config)

    @classmethod
    def load(cls, storage: Storage, uri: str, config: SearchConfig | None = None,
             cache_dir: str | os.PathLike | None = None, *, require_manifest: bool = True) -> ShardedIndex:
        """Load an index version from ``s3://`` or a local folder, verifying every checksum.

        The index manifest ``_MANIFEST.json`` is written last and marks the index complete and
        self-checked; without it the load is refused (a build still running, killed, or failed). With
        ``require_manifest=False`` the ``shard-NNNN/shard.json`` folders found are loaded instead, for
        inspecting shards saved without a manifest; each ``shard.json`` records the index's shard count,
        so a missing shard (the last one included), or a shard left by a build of another shard count, is
        still refused (shards saved before that count was recorded load as found). Shards of two builds of
        the same count are not told apart there: only the manifest, which pins every ``shard.json``, does.
        A folder holding ``_FAILED.json`` (a build that failed its self-check) is refused either way.

        Args:
            storage: where to read.
            uri: the version folder, e.g. ``s3://bucket/index/v3``.
            config: query-time settings.
            cache_dir: keep downloaded files here (see :func:`~tessera.index.shard_io.load_shard`).
            require_manifest: refuse a folder without ``_MANIFEST.json`` (the default).

        Raises:
            IndexCorruptError: naming the shard and file whose checksum, size or content is wrong; or
                ``_MANIFEST.json`` missing beside shard folders; or a shard missing on the opt-in path.
            FileNotFoundError: no index at ``uri``.

        Example::

            index = ShardedIndex.load(storage, "s3://bucket/index/v3")
            partial = ShardedIndex.load(storage, "/tmp/shards", require_manifest=False)
        """
        config = config or SearchConfig()
        manifest = read_index_manifest(storage, uri) if storage.exists(join_uri(uri, INDEX_MANIFEST)) else None
        if manifest is not None:
            wanted = [(s.name, manifest.shard_manifest_sha256[s.name]) for s in manifest.shards]
        else:
            if storage.exists(join_uri(uri, FAILED_REPORT)):
                reason = storage.read_json(join_uri(uri, FAILED_REPORT)).get("error", "see the report")
                raise IndexCorruptError("(index)", FAILED_REPORT, f"the build of {uri} failed: {reason}")
            names = _shard_folders(storage, uri)
            if not names:
                raise FileNotFoundError(f"no index at {uri}: neither {INDEX_MANIFEST} nor shard folders")
            if require_manifest:
                raise IndexCorruptError("(index)", INDEX_MANIFEST, (
                    f"missing under {uri}, which holds {len(names)} shard folder(s): the build is still running, "
                    f"was stopped, or never completed; an index is loadable once its manifest is written "
                    f"(ShardedIndex.load(..., require_manifest=False) loads the shards found, for inspection)"))
            wanted = _complete_shard_set(storage, uri, names)
        with ThreadPoolExecutor(max_workers=config.load_threads) as pool:
            shards = list(pool.map(lambda w: load_shard(storage, join_uri(uri, w[0]), cache_dir, w[1]), wanted))
        if manifest is not None:
            for shard, entry in zip(shards, manifest.shards, strict=True):
                if shard.params != entry.params or shard.shard_id != entry.shard_id:
                    raise IndexCorruptError(entry.name, SHARD_MANIFEST, "does not match the index manifest")
        return cls(shards, config, manifest)

    def save(self, storage: Storage, uri: str, *, index_version: str | None = None, model_version: str | None = None,
             embedding_run: str | None = None, build_config: IndexConfig | None = None,
             recall_check: RecallCheck | None = None) -> IndexManifest:
        """Write every shard, then ``_MANIFEST.json``, under ``uri``; returns the manifest.

        Example::

            index.save(storage, "s3://bucket/index/v1", model_version="m1", embedding_run="e1")
        """
        start = time.perf_counter()
        shard_manifests = [save_shard(storage, uri, shard, len(self.shards)) for shard in self.shards]
        timings = {"build": sum(s.build_seconds for s in self.shards), "save": time.perf_counter() - start}
        manifest = make_index_manifest(index_version or uri.rstrip("/").rsplit("/", 1)[-1], shard_manifests,
                                       build_config=build_config, model_version=model_version,
                                       embedding_run=embedding_run, timings=timings, recall_check=recall_check)
        write_index_manifest(storage, uri, manifest)
        self.manifest = manifest
        return manifest

    # --- search ---------------------------------------------------------------------------
    def search(self, queries, k: int = 10,
               exclude: Sequence[set[str]] | None = None) -> tuple[list[list[str]], np.ndarray]:
        """Global top-``k`` items for each query, by dot product (cosine when the index is normalised).

        Args:
            queries: (Q, D) float32 query vectors (normalised here when the index is).
            k: results per query.
            exclude: per query, item ids never to return (e.g. already seen); the search still returns
                ``k`` items per query when the catalog has ``k`` others.

        Returns:
            ``(ids, scores)``: ``ids[q]`` lists up to ``k`` item ids best first; ``scores`` is (Q, k)
            float32 with ``-inf`` after the last id when fewer than ``k`` items are eligible.

        Example::

            ids, scores = index.search(q, k=5, exclude=[{"item-3"}, set()])
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = prepare_queries(queries, self.dim, self.shards[0].params.normalized)
        if exclude is not None:
            exclude = _exclusions(exclude, q.shape[0])
        if q.shape[0] == 0:
            return [], np.empty((0, k), np.float32)
        if q.shape[0] == 1 and self._one_query_path:
            answer = self._search_one(q[0], k, None if exclude is None else exclude[0])
            if answer is not None:
                return answer

        def one(i: int) -> tuple[np.ndarray, np.ndarray]:
            shard = self.shards[i]
            rows = None if exclude is None else [shard.rows_of(ex) for ex in exclude]
            return search_shard(shard, q, k, rows, self._search_params[i])

        pool = self._executor() if self.config.search_threads > 1 and len(self.shards) > 1 else None
        try:
            results = None if pool is None else list(pool.map(one, range(len(self.shards))))
        except RuntimeError:  # closed by another thread since (an evicted version): this search goes on alone
            if not self._closed:
                raise
            results = None
        if results is None:
            results = [one(i) for i in range(len(self.shards))]
        return self._merge(results, k)

    def _search_one(self, query: np.ndarray, k: int,
                    exclude: set[str] | None = None) -> tuple[list[list[str]], np.ndarray] | None:
        """:meth:`search` of one query, its shards one after another (the single-threaded serving
        path), or None where the batched path must answer (an exact shard, or a shard whose searched
        leaves held fewer than ``k`` eligible items).

        Per shard one ScaNN call (:func:`~tessera.index.shard.search_shard_one`, asking for as many
        more neighbours as that shard holds of ``exclude``), then the S x k candidates merged in plain
        Python as :meth:`_merge_few` merges them (:func:`merge_candidates`).
        """
        found = []
        for shard, params in zip(self.shards, self._search_params, strict=True):
            answer = search_shard_one(shard, query, k, params, shard.rows_of(exclude) if exclude else None)
            if answer is None:
                return None
            found.append(answer)
        ids, best = merge_candidates(found, k, self._id_lists)
        return [ids], np.array([best], dtype=np.float32)

    def _merge(self, results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[list[list[str]], np.ndarray]:
        if len(results) == 1:  # one shard: its order is the answer (row -1 <=> score -inf)
            rows, scores = results[0]
            ids = self._id_lists[0]
            return [[ids[r] for r in row if r >= 0] for row in rows.tolist()], scores
        if len(results[0][0]) <= _FEW_QUERIES:
            return self._merge_few(results, k)
        scores = np.concatenate([s for _, s in results], axis=1)  # (Q, S*k): shard j's k columns at j*k
        if scores.shape[1] <= 4096:
            # Few candidates: one stable sort, the same order as top_k_rows (score desc, then column
            # asc: lower shard, then that shard's order) at a fraction of its per-call overhead.
            cols = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
            best = scores[np.arange(scores.shape[0])[:, None], cols]  # (Q, k)
            cols[~np.isfinite(best)] = -1
        else:
            cols, best = top_k_rows(scores, k)
        # only the k winners' ids are looked up (padding entries, row -1, carry -inf and col -1)
        rows = np.concatenate([r for r, _ in results], axis=1)
        lists = self._id_lists
        ids = [[lists[c // k][r[c]] for c in row if c >= 0]
               for r, row in zip(rows.tolist(), cols.tolist(), strict=True)]
        return ids, best

    def _merge_few(self, results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[list[list[str]], np.ndarray]:
        """:meth:`_merge`'s answer for a handful of queries, in plain Python.

        One query per call is the single-threaded serving path; there, right after the ScaNN calls,
        each of the numpy merge's ~10 calls cost several times what it does in a warm loop, more than
        sorting S x k candidates in Python (measured on 2 x 50k MiniLM shards). Same order: score
        descending, ties to the lower shard, then that shard's own order (a stable sort of
        candidates listed in that order).
        """
        parts = [(rows.tolist(), scores.tolist()) for rows, scores in results]
        ids_out, best = [], []
        for q in range(len(parts[0][0])):
            ids, scores = merge_candidates([(rows[q], scores[q]) for rows, scores in parts], k, self._id_lists)
            ids_out.append(ids)
            best.append(scores)
        return ids_out, np.array(best, dtype=np.float32)

    def _executor(self) -> ThreadPoolExecutor | None:
        """The shard thread pool, started on first use; None once :meth:`close` ran (searches go serial)."""
        with self._pool_lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(self.config.search_threads, len(self.shards)),
                                                thread_name_prefix="tessera-index")
            return self._pool

    def close(self) -> None:
        """Stop the shard thread pool (if one was started). Searches still answer after it, or while it
        runs, one shard after another (a version evicted while a request on it is in flight)."""
        with self._pool_lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_candidates(per_shard: list[tuple[list[int], list[float]]], k: int,
                     lists: list[list]) -> tuple[list, list[float]]:
    """One query's global top-``k`` from each shard's ``(rows, scores)`` lists (best first; row -1 is
    padding): what ``lists[shard][row]`` holds for each winner (the item ids, for a search), and scores
    padded with ``-inf`` to ``k``. Order: score descending, ties to the lower shard, then that shard's
    own order (a stable sort of the candidates listed in that order). The index's search and the index
    job's distributed self-check (:func:`tessera.index.recall.combine_recall`) both merge with it."""
    cand = [(score, j, row) for j, (rows, scores) in enumerate(per_shard)
            for row, score in zip(rows, scores, strict=True) if row >= 0]
    cand.sort(key=itemgetter(0), reverse=True)  # reverse keeps a stable sort's order among ties
    top = cand[:k]
    return [lists[j][row] for _, j, row in top], [score for score, _, _ in top] + [-np.inf] * (k - len(top))


def _shard_folders(storage: Storage, uri: str) -> list[str]:
    """Names of the ``<uri>/shard-NNNN/`` folders holding a ``shard.json`` (not ``modal/...``), sorted."""
    root_name = uri.rstrip("/").rsplit("/", 1)[-1]
    found = [f.rsplit("/", 3)[-3:-1] for f in storage.list_files(uri, suffix=f"/{SHARD_MANIFEST}")]
    return sorted(name for parent, name in found if parent == root_name and SHARD_DIR_NAME.match(name))


def _complete_shard_set(storage: Storage, uri: str, names: list[str]) -> list[tuple[str, str]]:
    """``(name, sha256 of shard.json)`` of the shard folders ``names`` of an index without a manifest,
    once their ``shard.json`` agree on the shard count and every shard of it is present.

    Raises:
        IndexCorruptError: a shard is missing, or the folders mix shards of different builds.
    """
    read = [read_shard_manifest_sha256(storage, join_uri(uri, name)) for name in names]
    counts = {m.num_shards for m, _ in read}
    if counts == {None}:  # saved before shard.json recorded the count: only gaps in 0..S-1 show
        return [(m.name, digest) for m, digest in read]
    if len(counts) > 1:
        described = ", ".join(f"{m.name}: {m.num_shards or 'unrecorded'}" for m, _ in read)
        raise IndexCorruptError("(index)", SHARD_MANIFEST,
                                f"the shard folders under {uri} disagree on the number of shards, they come "
                                f"from different builds ({described})")
    (total,) = counts
    expected = [shard_name(i) for i in range(total)]
    missing = sorted(set(expected) - set(names))
    if missing:
        raise IndexCorruptError(missing[0], SHARD_MANIFEST,
                                f"missing under {uri}: the other shards record an index of {total} shards, "
                                f"{len(missing)} of them absent ({', '.join(missing)}); the build is incomplete")
    return [(m.name, digest) for m, digest in read]


def _shared_id(shards) -> str:
    """Which id two shards share, for an error message."""
    shared = first_duplicate(item_id for shard in shards for item_id in shard.id_list)
    return f"{shared!r} is in shard " + " and shard ".join(str(s.shard_id) for s in shards if shared in s.row_of)


def _exclusions(exclude, num_queries: int) -> list[set[str]]:
    """``exclude`` as one set of id strings per query (the index holds its ids as strings: an int id
    excluded as an int was returned). A lone string or None where a collection of ids belongs is refused:
    a string would be iterated as its characters, excluding nothing."""
    if isinstance(exclude, (str, bytes)) or len(exclude) != num_queries:
        n = "a string" if isinstance(exclude, (str, bytes)) else f"{len(exclude)} entries"
        raise ValueError(f"exclude must hold one collection of item ids per query ({num_queries}), got {n}")
    out = []
    for i, ids in enumerate(exclude):
        if ids is None or isinstance(ids, (str, bytes)):
            raise ValueError(f"exclude[{i}] must be a collection of item ids (a set), got {ids!r:.80}")
        if isinstance(ids, (set, frozenset)) and all(type(x) is str for x in ids):
            out.append(ids)  # serving's sets of id strings, as they are (checking the first alone let an int
            # id in a set of mostly strings through as an int: returned, as the set's order decided)
        else:
            out.append({str(x) for x in ids})
    return out

