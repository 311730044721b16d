"""One servable version: an index and the model bundle its manifest names, loaded together.

The index manifest (``index/<version>/_MANIFEST.json``) names the bundle it was built from
(``source.model_uri``), the embedding run and the interaction log. Everything a serving component
loads is resolved from that one URI, so query vectors (user tower, modality projections) and item
vectors (the index) always come from the same model.

    index/<v>/_MANIFEST.json ──► model_version, source.model_uri ──► models/<m>/ (towers, ranker,
                             │                                        item_popularity.parquet)
                             ├─► vectors/part-*.parquet (fused item vectors, every item)
                             ├─► source.embedding_run ──► raw encoder embeddings (ranker features)
                             └─► source.interactions_uri ──► the interaction-log snapshot

Example::

    ref = VersionRef.resolve(storage, "s3://tessera-demo/index/v1")
    items = ItemVectors.load(storage, ref)
    items.rows(["item-00000001"])          # catalog rows, -1 when unknown
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import pyarrow.parquet as pq

from tessera.fingerprint import bundle_fingerprint
from tessera.index import IndexManifest, read_index_manifest
from tessera.storage import Storage, join_uri

BUNDLE_MANIFEST = "_MANIFEST.json"  # tessera.models.bundle.MANIFEST (not imported: it pulls torch into the Ingress)


class VersionError(RuntimeError):
    """An index version cannot be served: a missing file, or parts that do not belong together."""


@dataclass(frozen=True)
class VersionRef:
    """The resolved URIs and manifests of one index version.

    Attributes:
        index_uri: the index version root.
        manifest: the index manifest.
        model_uri: the bundle the index was built from.
        bundle_manifest: that bundle's ``_MANIFEST.json``.
        embedding_run: the embedding run the item tower read.
        interactions_uri: the interaction log (the snapshot for user histories).
    """

    index_uri: str
    manifest: IndexManifest
    model_uri: str
    bundle_manifest: dict
    embedding_run: str
    interactions_uri: str | None

    @property
    def index_version(self) -> str:
        return self.manifest.index_version

    @property
    def model_version(self) -> str:
        return str(self.bundle_manifest.get("version", ""))

    @classmethod
    def resolve(cls, storage: Storage, index_uri: str) -> VersionRef:
        """Read the index manifest and the bundle manifest it names; check that they agree."""
        index_uri = index_uri.rstrip("/")
        try:
            manifest = read_index_manifest(storage, index_uri)
        except FileNotFoundError:
            raise VersionError(f"no index at {index_uri} (_MANIFEST.json missing: never built, or still building)"
                               ) from None
        model_uri = manifest.source.get("model_uri")
        if not model_uri:
            raise VersionError(f"the index manifest at {index_uri} names no source.model_uri")
        bundle_manifest_uri = join_uri(model_uri, BUNDLE_MANIFEST)
        if not storage.exists(bundle_manifest_uri):
            raise VersionError(f"index {index_uri} names model {model_uri}, which has no {BUNDLE_MANIFEST}")
        bundle = storage.read_json(bundle_manifest_uri)
        if manifest.model_version is not None and str(bundle.get("version")) != manifest.model_version:
            raise VersionError(f"index {index_uri} was built from model version {manifest.model_version!r} but "
                               f"{model_uri} now holds version {bundle.get('version')!r}")
        built_from = manifest.source.get("model_fingerprint")  # (indexes built before it was recorded: none)
        if built_from and built_from != bundle_fingerprint(bundle):
            raise VersionError(f"index {index_uri} was built from another training of model version "
                               f"{bundle.get('version')!r}: {model_uri} was retrained since (its files differ); "
                               f"build an index from it (jobs.build_index) and serve that")
        run = manifest.source.get("embedding_run") or manifest.embedding_run
        if not run:
            raise VersionError(f"the index manifest at {index_uri} names no embedding run")
        return cls(index_uri=index_uri, manifest=manifest, model_uri=model_uri, bundle_manifest=bundle,
                   embedding_run=run, interactions_uri=manifest.source.get("interactions_uri"))

    def describe(self) -> dict:
        """What ``GET /v1/version`` reports."""
        return {"index_version": self.index_version, "index_uri": self.index_uri,
                "model_version": self.model_version, "model_uri": self.model_uri,
                "embedding_run": self.embedding_run, "num_items": self.manifest.num_items,
                "num_shards": self.manifest.num_shards, "created_at": self.manifest.created_at,
                "recall_check": self.manifest.recall_check.model_dump() if self.manifest.recall_check else None,
                "placeholder_model": bool(self.bundle_manifest.get("placeholder", False))}


@dataclass
class ItemVectors:
    """Every item of the version (sorted ids) with its fused item-tower vector.

    Row ``i`` is the same item in every serving component of the version (the order of the sorted
    ids, which is also the training catalog's order).

    Attributes:
        ids: ``(I,)`` sorted item ids.
        fused: ``(I, E)`` float32 fused vectors, zeros where the item has none.
        has_vector: ``(I,)`` bool, True for items with a fused vector: those a history can hold. Every
            item has one, an item without a usable modality the one training fed the user tower for it;
            an index built before they all had one left those out.
        indexed: ``(I,)`` bool, True for the items of the fused index (``status == ok``): those that can be
            recommended or asked for as an item.
    """

    ids: np.ndarray
    fused: np.ndarray
    has_vector: np.ndarray
    indexed: np.ndarray

    def __post_init__(self):
        if (self.indexed & ~self.has_vector).any():
            raise VersionError("an item of the fused index has no fused vector")

    @property
    def num_items(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.fused.shape[1])

    @classmethod
    def load(cls, storage: Storage, ref: VersionRef) -> ItemVectors:
        """Read ``vectors/part-*.parquet`` named by the index manifest (``item_id``, ``fused``, ``status``)."""
        if not ref.manifest.item_vectors:
            raise VersionError(f"the index manifest at {ref.index_uri} lists no item vectors parts")
        from tessera.index_job.vectors import in_fused_index, served_part

        ids, fused, valid, ok = [], [], [], []
        digests = ref.manifest.item_vectors_sha256  # empty for an index built before they were recorded
        for rel in ref.manifest.item_vectors:
            uri = join_uri(ref.index_uri, rel)
            fs, path = storage.filesystem(uri)
            try:
                with fs.open_input_file(path) as f:
                    table = pq.read_table(f, columns=["item_id", "fused", "status"])
            except FileNotFoundError:
                raise VersionError(f"item vectors part {uri} named by the index manifest is missing") from None
            part_ids, part_fused, part_valid, digest = served_part(table, ref.manifest.dim)  # zeros where null
            if digests and digest != digests.get(rel):
                raise VersionError(f"item vectors part {uri} does not match the checksum in the index manifest "
                                   f"(changed since the build): rebuild the index")
            ids += part_ids
            fused.append(part_fused)
            valid.append(part_valid)
            ok.append(in_fused_index(table.column("status")))

        ids = np.asarray(ids, dtype=object).astype(str)
        fused, valid, ok = np.concatenate(fused), np.concatenate(valid), np.concatenate(ok)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
            raise VersionError(f"the item vectors of {ref.index_uri} hold an item id more than once")
        indexed, expected = valid & ok, ref.manifest.counts.get("indexed")
        if expected is not None and int(indexed.sum()) != int(expected):  # status is outside the parts' digests
            raise VersionError(f"the item vectors of {ref.index_uri} mark {int(indexed.sum())} items as in the "
                               f"fused index, its manifest counts {expected} (changed since the build): rebuild "
                               "the index")
        return cls(ids=ids, fused=np.ascontiguousarray(fused[order]), has_vector=valid[order],
                   indexed=indexed[order])

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Row of each id, ``-1`` for ids not in the catalog.

        Looked up at the catalog's own string width: an id longer than every catalog id cannot match
        and is not converted (numpy would widen the whole catalog array to the longest id, ~4 bytes a
        character per catalog item: a 1 MB id against 10k items asked for 40 GB); an id holding a NUL
        cannot match either (numpy strings drop trailing NULs, so ``"x\\0"`` would find ``"x"``)."""
        item_ids = list(item_ids)
        out = np.full(len(item_ids), -1, np.int64)
        if not item_ids or self.num_items == 0:
            return out
        width = self.ids.dtype.itemsize // 4
        fits = [i for i, x in enumerate(item_ids) if len(x) <= width and "\0" not in x]
        if not fits:
            return out
        ids = np.asarray([item_ids[i] for i in fits], dtype=self.ids.dtype)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, self.num_items - 1)
        out[fits] = np.where(self.ids[pos] == ids, pos, -1)
        return out


def read_popularity(storage: Storage, ref: VersionRef, items: ItemVectors) -> np.ndarray:
    """``(I,)`` float32 training interactions per item row (each user's last ``max_examples_per_user``),
    from the bundle's popularity file.

    A bundle without the file (a placeholder) gives zeros: cold-start answers then fall back to id
    order, and the ranker's popularity feature is 0 for every item.
    """
    from tessera.models.bundle import POPULARITY_FILE

    uri = join_uri(ref.model_uri, POPULARITY_FILE)
    counts = np.zeros(items.num_items, np.float32)
    if not storage.exists(uri):
        return counts
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=["item_id", "train_interactions"])
    rows = items.rows(table.column("item_id").to_pylist())
    values = table.column("train_interactions").to_numpy().astype(np.float32)
    keep = rows >= 0
    counts[rows[keep]] = values[keep]
    return counts


T = TypeVar("T")


class VersionCache(Generic[T]):
    """Loaded versions of one serving component, by index URI; the newest ``keep`` stay loaded (a load
    first drops the least recently used version beyond ``keep - 1``, so a rollout never holds more).

    A rollout loads the new version (``reconfigure``) while requests already routed with the old
    version's URI still find it here; a request naming a version this replica has not loaded yet
    (another component switched first) loads it on the spot. Thread-safe; one load per URI at a time.
    A load that failed is remembered for ``retry_after_s``: requests naming that version fail at once
    with the same error instead of each downloading the version again.

    Args:
        loader: ``index_uri -> component state``.
        keep: versions kept loaded.
        retry_after_s: how long a failed load is answered from memory before it is tried again.
    """

    def __init__(self, loader: Callable[[str], T], keep: int = 2, retry_after_s: float = 30.0):
        self._loader = loader
        self._keep = keep
        self._retry_after_s = retry_after_s
        self._loaded: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._failed: dict[str, tuple[float, float, str]] = {}  # uri -> (monotonic, wall time, "Type: message")
        self.current: str | None = None  # the version this component was configured with
        self.in_use: str | None = None  # the version the latest request named

    def get(self, index_uri: str, retry: bool = False, touch: bool = True) -> T:
        """The state of ``index_uri``, loading it if needed (``retry``: even if it failed just now).
        ``touch``: a request's lookup (the version stays loaded while requests name it); False for a
        background load.

        Raises:
            VersionError: the load failed within the last ``retry_after_s`` (the error is repeated).
            Exception: whatever the loader raised (then remembered).
        """
        index_uri = index_uri.rstrip("/")
        with self._lock:
            if index_uri in self._loaded:
                return self._hit(index_uri, touch)
            gate = self._loading.setdefault(index_uri, threading.Lock())
        with gate:
            with self._lock:
                if index_uri in self._loaded:
                    return self._hit(index_uri, touch)
                failed = self._failed.get(index_uri)
                if failed and not retry and time.monotonic() - failed[0] < self._retry_after_s:
                    self._loading.pop(index_uri, None)
                    raise VersionError(f"loading {index_uri} failed {time.monotonic() - failed[0]:.0f} s ago "
                                       f"(retried after {self._retry_after_s:g} s): {failed[2]}")
                self._evict(self._keep - 1, index_uri)  # room first: a load never holds keep + 1 versions
            try:
                state = self._loader(index_uri)
            except Exception as err:
                with self._lock:
                    self._failed[index_uri] = (time.monotonic(), time.time(), f"{type(err).__name__}: {err}"[:500])
                    self._loading.pop(index_uri, None)
                raise
            with self._lock:
                self._failed.pop(index_uri, None)
                self._loaded[index_uri] = state
                self._loading.pop(index_uri, None)
                self._hit(index_uri, touch)
                self._evict(self._keep, index_uri)
            return state

    def _evict(self, limit: int, loading: str) -> None:
        """Drop the least recently used versions until at most ``limit`` are loaded; never the configured
        version, the one requests name, nor ``loading`` (under ``_lock``)."""
        while len(self._loaded) > limit:
            oldest = next((u for u in self._loaded if u not in (self.current, self.in_use, loading)), None)
            if oldest is None:
                break
            self._loaded.pop(oldest)

    def _hit(self, index_uri: str, touch: bool) -> T:
        self._loaded.move_to_end(index_uri)
        if touch:
            self.in_use = index_uri
        return self._loaded[index_uri]

    def get_loaded(self, index_uri: str) -> T | None:
        """The state of ``index_uri`` when it is loaded, else None (never waits for a load); a request's
        lookup (see ``touch`` of :meth:`get`)."""
        index_uri = index_uri.rstrip("/")
        with self._lock:
            return self._hit(index_uri, True) if index_uri in self._loaded else None

    def set_current(self, index_uri: str) -> T:
        """Load ``index_uri`` (if needed; a version that failed before is tried again) and make it the
        version this component is configured with (never evicted)."""
        state = self.get(index_uri, retry=True, touch=False)
        self.current = index_uri.rstrip("/")
        return state

    def status(self, index_uri: str, failed_since: float = 0.0) -> dict:
        """``{"loaded", "loading", "error", "failed_at"}`` of ``index_uri`` here: ``error`` when its last
        load failed at or after ``failed_since`` (Unix time), no load is under way, and it has not loaded
        since; ``failed_at`` the time of the last failure (None if none)."""
        index_uri = index_uri.rstrip("/")
        with self._lock:
            failed = self._failed.get(index_uri)
            loading = index_uri in self._loading
            return {"loaded": index_uri in self._loaded, "loading": loading,
                    "error": failed[2] if failed and not loading and failed[1] >= failed_since else None,
                    "failed_at": failed[1] if failed else None}

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
