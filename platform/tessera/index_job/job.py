"""The index job end to end: bundle + embedding run in, ``index/<version>/`` out.

    resolve inputs ─► item vectors (Ray Data, tower actor pool) ─► id hashes (tasks of many parts) ─► plan
    shards (driver, from the hashes) ─► split the vectors by shard (a task per run of parts) ─►
    S x (1 + M) shard builds, each checking its shard read back from storage (Ray tasks) ─► the
    shards' checks merged per index (driver) ─► manifests

Manifests are written last: ``modal/<modality>/_MANIFEST.json`` for each per-modality index, then
the version's ``_MANIFEST.json`` (its presence marks the index complete). A build whose self-check
falls below the floor writes ``_FAILED.json`` (the would-be manifest plus the error) instead, which
:meth:`tessera.index.ShardedIndex.load` refuses (as it refuses a version without ``_MANIFEST.json``:
a build still running or stopped). Rerunning a failed build writes over the same shard folders: a
local folder's shard folders are replaced whole; on ``s3://`` objects of the earlier attempt that the
new ``shard.json`` does not list may remain, and are never read (see :mod:`tessera.index.shard_io`).
Each ``shard.json`` records the index's shard count.

Example::

    manifest = run_index_job(load_config(IndexJobConfig, "configs/index.yaml"))
    manifest.recall_check.recall, manifest.counts
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from tessera.config import ConfigError
from tessera.index import (
    FAILED_REPORT,
    INDEX_MANIFEST,
    IndexManifest,
    ModalIndexRef,
    RecallCheck,
    make_index_manifest,
    write_index_manifest,
)
from tessera.index.params import choose_mode, derive_params
from tessera.index.shard_io import manifest_sha256
from tessera.index_job.build import (
    ALL_ROWS,
    BuiltShard,
    IdScan,
    IndexIntegrityError,
    IndexPlan,
    build_shards,
    plan_indexes,
    scan_ids,
    split_vectors,
)
from tessera.index_job.config import IndexJobConfig
from tessera.index_job.self_check import (
    UserSample,
    combine_checks,
    gather_rows,
    item_sample,
    select_users,
    user_queries,
)
from tessera.index_job.sources import IndexSourceError, IndexSources, resolve_sources
from tessera.index_job.vectors import FUSED, VECTORS_DIR, compute_item_vectors
from tessera.lease import RunLease
from tessera.ray_utils import check_paths_for_cluster, cluster_layout, unplaceable
from tessera.storage import Storage, join_uri

LEASE_FILE = "_LEASE.json"


class IndexExistsError(FileExistsError):
    """The index version already has a manifest; indexes are immutable, pick another version.

    ``same_inputs``: its manifest records the bundle (its training) and the embedding run this build would
    read; only such an index is kept by ``--keep-existing``."""

    def __init__(self, message: str, same_inputs: bool = False):
        super().__init__(message)
        self.same_inputs = same_inputs


class IndexRecallError(RuntimeError):
    """A self-check recall is below the configured floor. ``report`` is what ``_FAILED.json`` holds."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def run_index_job(cfg: IndexJobConfig, break_lease: bool = False) -> IndexManifest:
    """Build, check and publish one index version; returns its manifest.

    One build of a version runs at a time: it holds ``<version>/_LEASE.json`` (:class:`RunLease`) from
    before its first write to its manifest, which is written only if none is there; ``break_lease``
    takes over a lease whose holder looks live.

    Raises:
        IndexSourceError: a missing or inconsistent input.
        IndexExistsError: ``<output_uri>/<version>/_MANIFEST.json`` exists.
        IndexIntegrityError: items lost or duplicated on the way.
        IndexRecallError: a self-check below ``self_check.recall_floor`` (``_FAILED.json`` written).
        LeaseHeldError: another build of the version is running.
        LeaseLostError: another build took the version over while this one ran (this one stopped).
        ConfigError: a local ``output_uri`` on a cluster of several nodes (:func:`check_paths_for_cluster`), or
            resources the cluster cannot give (:func:`check_fits`).
    """

    t0 = time.perf_counter()
    storage = Storage(cfg.storage)
    src = resolve_sources(cfg, storage)  # reads manifests only
    # the inputs as resolved: the bundle names the embedding run, the run's items the log, when not configured
    check_paths_for_cluster({"output_uri": cfg.output_uri}, {
        "model_uri": cfg.model_uri,
        "embeddings_uri" if cfg.embeddings_uri else "embeddings_uri (the bundle's embedding_run)": src.embedding_run,
        "interactions_uri" if cfg.interactions_uri else "interactions_uri (beside the run's items)":
            src.interactions_uri})
    check_fits(cfg, *cluster_layout())
    _refuse_existing(storage, src)
    lease = RunLease(storage, join_uri(src.index_uri, LEASE_FILE), cfg.lease_ttl_s, what=f"index {src.index_uri}",
                     break_lease=break_lease)
    lease.acquire()
    with lease:  # renewed while the build goes on, released at its end
        _refuse_existing(storage, src)  # a build that held the lease before this one may have published it
        return _build_leased(cfg, storage, src, lease, t0)


def check_fits(cfg: IndexJobConfig, cluster_cpus: float, cluster_gpus: float, nodes: list[dict] | None) -> None:
    """Refuse settings Ray would wait on forever: a vectors actor or a build task no node can hold, vector
    actors holding every CPU (the read tasks that feed them then never run) or more GPUs than the cluster
    has (Ray Data starts the whole pool before any data flows).

    Raises:
        ConfigError: naming the keys to change.
    """
    stage = cfg.vectors
    if nodes and (problem := unplaceable([("vectors", stage.num_cpus, stage.num_gpus),
                                          ("build", cfg.build.num_cpus, 0.0)], nodes)):
        raise ConfigError(problem)
    if stage.actors * stage.num_cpus + stage.read_num_cpus > cluster_cpus + 1e-9:
        raise ConfigError(f"vectors.actors x vectors.num_cpus ({stage.actors} x {stage.num_cpus:g}) and a read task "
                          f"(vectors.read_num_cpus {stage.read_num_cpus:g}) need more than the cluster's "
                          f"{cluster_cpus:g} CPUs: lower them, or add nodes")
    if stage.actors * stage.num_gpus > cluster_gpus + 1e-9:
        raise ConfigError(f"vectors.actors x vectors.num_gpus ({stage.actors} x {stage.num_gpus:g}) is more than the "
                          f"cluster's {cluster_gpus:g} GPUs: lower them, or add GPU nodes")


def _refuse_existing(storage: Storage, src: IndexSources) -> None:
    """Raises:
        IndexExistsError: the version exists, built from these inputs (``same_inputs``) or not."""
    uri = join_uri(src.index_uri, INDEX_MANIFEST)
    if storage.exists(uri):
        differ = _differing_sources(storage.read_json(uri).get("source") or {}, src)
        said = (f"built from other inputs ({'; '.join(differ)})" if differ else "built from these inputs")
        raise IndexExistsError(f"index {src.index_uri} already exists (it has {INDEX_MANIFEST}), {said}; indexes "
                               f"are immutable: set version (or --version) to build another", same_inputs=not differ)


def _differing_sources(recorded: dict, src: IndexSources) -> list[str]:
    """What an existing index's manifest ``source`` records otherwise than ``src`` (``key: recorded vs now``)."""
    now = {"model_uri": src.model_uri, "model_fingerprint": src.model_fingerprint, "embedding_run": src.embedding_run}
    return [f"{k}: {recorded[k]} vs {v}" for k, v in now.items()  # a key an older manifest lacks: not compared
            if k in recorded and str(recorded[k]).rstrip("/") != str(v).rstrip("/")]


def _build_leased(cfg: IndexJobConfig, storage: Storage, src: IndexSources, lease: RunLease,
                  t0: float) -> IndexManifest:
    tower_cfg = _tower_config(storage, cfg)
    if cfg.no_modality == "id_only" and not tower_cfg.num_id_buckets:
        raise IndexSourceError(f"no_modality: id_only needs an item tower with num_id_buckets > 0; the one in "
                               f"{cfg.model_uri} has none (set no_modality: exclude, or train with id buckets)")
    modalities = list(tower_cfg.modality_dims)
    encoders = src.embedding_manifest.get("encoders") or {}
    wrong = {m: (dim, encoders[m].get("dim")) for m, dim in tower_cfg.modality_dims.items()
             if m in encoders and encoders[m].get("dim") not in (None, dim)}
    if wrong:  # the vectors would be cut to the tower's width, or fail to reshape, deep in the vector stage
        raise IndexSourceError(f"embedding run {src.embedding_run}: its vectors do not have the widths the item "
                               f"tower of {cfg.model_uri} reads (modality: (tower, run)) {wrong}")
    print(f"[index] model {src.model_version} ({cfg.model_uri}), embeddings {src.embedding_run}: "
          f"{src.num_items} items in {len(src.embedding_parts)} parts -> {src.index_uri}", flush=True)

    vectors = compute_item_vectors(storage, src.embedding_parts, src.index_uri, cfg.model_uri, modalities,
                                   cfg.vectors, cfg.no_modality)
    planned = modalities if cfg.modal_indexes else []
    scan = scan_ids(storage, vectors.parts, [FUSED, *planned], cfg.build.split_num_cpus)
    _check_integrity(src, vectors.counts, scan)
    plans = plan_indexes(scan, cfg.num_shards, planned)
    _check_build_params(cfg, plans, tower_cfg.out_dim)
    part_rows = scan.part_rows
    # the catalog's item hashes, sorted: the users sampled for the check count their events on them
    known = np.unique(scan.hashes[ALL_ROWS]) if src.interactions_uri is not None else None
    del scan  # the hashes: 8 bytes an item and index
    print(f"[index] vectors in {vectors.seconds:.1f}s: {vectors.counts}; building "
          f"{sum(p.num_shards for p in plans)} shards ({', '.join(f'{p.name}: {p.num_shards}' for p in plans)})",
          flush=True)

    t_build = time.perf_counter()
    fused_plan = next(p for p in plans if p.name == "fused")
    approximate = any(choose_mode(size, cfg.index, fused_plan.num_items) != "brute_force"
                      for size in fused_plan.sizes)
    if src.interactions_uri is None and (cfg.self_check.user_queries or cfg.self_check.tuning_user_queries):
        print("[index] warning: no interaction log found beside the embedding run's items: no user check, and "
              "the fused shards tune on their own vectors only (set interactions_uri)", flush=True)
    run = _build_and_check(cfg, storage, src, plans, vectors.parts, part_rows,
                           cfg.self_check.tuning_user_queries if approximate else 0, lease, known)
    built, users = run.shards, run.users
    build_s = time.perf_counter() - t_build - run.users_s  # the users' sampling is timed on its own
    if run.tuning_vectors is not None:
        print(f"[index] fused shards tuned on their own vectors and {run.tuning_vectors} user vectors (users "
              f"outside the self-check's sample)", flush=True)
    shard_manifests = {name: [b.manifest for b in shards] for name, shards in built.items()}
    _check_shard_set(src.index_uri, plans, shard_manifests)
    for line in exhaustive_shards(shard_manifests):
        print(f"[index] warning: {line}", flush=True)
    check_s = max((b.check_seconds for shards in built.values() for b in shards), default=0.0)

    rel_parts = [p[len(src.index_uri.rstrip("/")) + 1:] for p in vectors.parts]
    part_digests = {rel: vectors.digests[p] for rel, p in zip(rel_parts, vectors.parts, strict=True)}
    source = {"model_uri": cfg.model_uri, "model_fingerprint": src.model_fingerprint,
              "embedding_run": src.embedding_run,
              "embedding_run_id": src.embedding_manifest.get("run_id"), "interactions_uri": src.interactions_uri,
              "encoders": {m: {k: e.get(k) for k in ("name", "dim", "weights_checksum")}
                           for m, e in src.embedding_manifest.get("encoders", {}).items()}}
    manifests: dict[str, IndexManifest] = {}
    checks: dict[str, dict[str, RecallCheck]] = {}
    for plan in plans:
        manifests[plan.name] = make_index_manifest(
            src.version, shard_manifests[plan.name], build_config=cfg.index_config(),
            model_version=src.model_version, embedding_run=src.embedding_run)
        descriptions = {"item": f"{{n}} sampled item vectors ({plan.column}), each item excluded from its own results",
                        "user": f"{{n}} user vectors (user tower over histories, last {cfg.self_check.holdout} "
                                f"event(s) held out) from {src.interactions_uri}, each user's seen items "
                                f"excluded from its results (serving's exclude_seen)"}
        checks[plan.name] = combine_checks([b.checks for b in built[plan.name]], cfg.self_check.k, descriptions)
    if users is not None and cfg.self_check.user_queries and "user" not in checks["fused"]:
        print(f"[index] warning: no user check (self_check.user_queries={cfg.self_check.user_queries}): no user "
              "in the log has more than self_check.holdout events", flush=True)
    unchecked = sorted(name for name, by_source in checks.items() if not by_source)
    if unchecked:  # an index published with no recall measured would pass any floor
        raise IndexRecallError(
            f"index {src.index_uri}: no self-check ran for {', '.join(unchecked)} (self_check.item_queries="
            f"{cfg.self_check.item_queries}, and no user queries); set self_check.item_queries above 0",
            {"error": "no self-check", "unchecked": unchecked})
    _record_recall(src.version, checks)

    floor = cfg.self_check.recall_floor
    for plan in plans:
        manifests[plan.name] = _with_checks(manifests[plan.name], checks[plan.name], floor)
        manifests[plan.name].item_vectors = rel_parts
        manifests[plan.name].item_vectors_sha256 = part_digests
        manifests[plan.name].source = source
    top = manifests["fused"]
    top.counts = {"input_items": src.num_items, **{k: v for k, v in vectors.counts.items() if k != "rows"},
                  **{f"with_{m}": n for m, n in sorted(vectors.per_modality.items())}}
    # build_s includes each build task's check of its shard; self_check_s is the longest of those checks,
    # self_check_users_s the log's read and the users' sampling before the split (not in build_s)
    timings = {"vectors_s": vectors.seconds, "build_s": build_s, "self_check_s": check_s,
               "self_check_users_s": run.users_s,
               "shard_build_s_sum": sum(s.build_seconds for ms in shard_manifests.values() for s in ms)}
    failures = [f"{name} index, {source_name} queries: recall@{c.k} {c.recall:.4f} < floor {floor}"
                for name, cs in checks.items() for source_name, c in cs.items() if c.recall < floor]
    for plan in plans:
        if plan.name != "fused":
            manifests[plan.name].modality = plan.name
            manifests[plan.name].counts = {"items": plan.num_items}
    top.timings = {k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - t0}.items()}
    if failures:
        message = (f"index {src.index_uri} failed its self-check: " + "; ".join(failures)
                   + ". Raise index.recall_target (or unpin index.reorder_num_neighbors / num_leaves_to_search "
                     "so they are tuned), or lower self_check.recall_floor")
        report = {"error": message, "manifest": top.model_dump(mode="json"),
                  "modal_indexes": {n: m.model_dump(mode="json") for n, m in manifests.items() if n != "fused"}}
        lease.confirm()
        storage.write_json(join_uri(src.index_uri, FAILED_REPORT), report)
        raise IndexRecallError(message, report)
    lease.confirm()  # still this build's version: nothing below may land over another build's shards
    for plan in plans:
        if plan.name == "fused":
            continue
        sub = manifests[plan.name]
        write_index_manifest(storage, join_uri(src.index_uri, plan.path), sub)
        top.modal_indexes[plan.name] = ModalIndexRef(path=plan.path, num_items=plan.num_items,
                                                     manifest_sha256=manifest_sha256(sub))
    _clear_failed_report(storage, src.index_uri)
    top.timings["total_s"] = round(time.perf_counter() - t0, 3)
    lease.confirm()
    try:
        write_index_manifest(storage, src.index_uri, top, exclusive=True)
    except FileExistsError as err:
        raise IndexExistsError(f"index {src.index_uri}: {err}") from None
    return top


@dataclass
class _BuildRun:
    """What :func:`_build_and_check` returns."""

    shards: dict[str, list[BuiltShard]]  # by index name, in shard order
    users: UserSample | None  # None without a log (or with no user query asked for)
    tuning_vectors: int | None  # user vectors the fused shards tuned on (None: no tuning users asked for)
    users_s: float  # sampling the users: the passes over the log


def _build_and_check(cfg: IndexJobConfig, storage: Storage, src: IndexSources, plans: list[IndexPlan],
                     parts: list[str], part_rows: dict[str, list[int]], tuning_count: int,
                     lease: RunLease, known: np.ndarray | None = None) -> _BuildRun:
    """Split, build and self-check every shard: the users are sampled from the log first (the check's users
    and ``tuning_count`` more, their events on ``known`` items, the catalog's, histories kept to the last
    events the user tower reads), the split tasks pick out the sampled item rows and those history items
    (in the fused index or not: training reads an item without a usable modality too), a task turns
    them into user vectors, and each build task tunes on the tuning users' and checks its saved shard on
    the check's queries; each saves its shard only while ``lease`` still holds this build's token."""
    import ray

    check = cfg.self_check
    task_options = check.task_options(cfg.build.num_cpus)
    users, t0 = None, time.perf_counter()
    if src.interactions_uri is not None and (check.user_queries or tuning_count):
        # tasks reading a log file at a time: sized like the split tasks reading a vectors part
        users = select_users(storage, src.interactions_uri, check, tuning_count, _history_limit(storage, cfg),
                             task_options={"num_cpus": cfg.build.split_num_cpus}, known=known)
    users_s = time.perf_counter() - t0
    split = split_vectors(storage, plans, parts, part_rows, cfg.build.split_num_cpus,
                          samples={plan.name: item_sample(plan.num_items, check) for plan in plans},
                          wanted=users.wanted() if users is not None else None)
    gather = ray.remote(gather_rows).options(num_cpus=cfg.build.split_num_cpus)
    items = {name: gather.remote(*refs) for name, refs in split.samples.items()}
    checked = tuning = None
    if users is not None:
        checked, tuning = ray.remote(user_queries).options(num_returns=2, **task_options).remote(
            storage, cfg.model_uri, users, check, cfg.build.training_threads, *split.wanted)
    built = build_shards(storage, plans, split.take_pieces(), src.index_uri, cfg.index_config(),
                         cfg.build.num_cpus, cfg.build.memory_gb,
                         tuning_queries={"fused": tuning if tuning_count else None}, check_k=check.k,
                         check_queries={plan.name: (checked if plan.name == "fused" else None, items[plan.name])
                                        for plan in plans}, lease=lease.ref)
    tuning_vectors = len(ray.get(tuning)) if tuning is not None and tuning_count else None
    return _BuildRun(built, users, tuning_vectors, users_s)


def _check_build_params(cfg: IndexJobConfig, plans: list[IndexPlan], dim: int) -> None:
    """Every shard's ScaNN settings derive (a pinned ``index`` value that cannot build a shard fails here,
    naming it, not in the build tasks after the vector stage).

    Raises:
        ConfigError: naming the ``index`` key and the shard."""
    for plan in plans:
        for shard, size in enumerate(plan.sizes):
            try:
                derive_params(size, dim, cfg.index_config(), plan.num_items)
            except ValueError as err:
                raise ConfigError(f"{err} (the {plan.name} index's shard {shard})") from None


def _history_limit(storage: Storage, cfg: IndexJobConfig) -> int:
    """The events of a history the user tower reads: ``self_check.max_history``, else the tower's own."""
    if cfg.self_check.max_history:
        return cfg.self_check.max_history
    return int(storage.read_json(join_uri(cfg.model_uri, "user_tower", "config.json"))["config"]["max_history"])


def exhaustive_shards(shard_manifests: dict[str, list]) -> list[str]:
    """One line per approximate shard whose tuning reached the recall target only by rescoring every one of
    its points (reordering depth = shard size): it searches no faster than exact search would, and
    nothing else says so (its recall is fine)."""
    out = []
    for name, manifests in shard_manifests.items():
        for m in manifests:
            p = m.params
            if p.mode != "brute_force" and p.reorder_num_neighbors is not None and p.reorder_num_neighbors >= m.count:
                out.append(f"{name} index, {m.name} ({m.count} points, {p.mode}): the recall target was reached "
                           f"only by rescoring every point (reorder_num_neighbors={p.reorder_num_neighbors}), so "
                           f"it searches as slowly as exact search; its queries sit far from its points (user "
                           f"vectors flatter than the items?): index.mode: brute_force says so plainly, or "
                           f"fewer shards give each more points")
    return out


def _check_shard_set(index_uri: str, plans: list[IndexPlan], shard_manifests: dict[str, list]) -> None:
    """Each index's shards as planned (ids 0..S-1, the planned sizes) and of one dimension and
    normalisation: what loading them as one index requires."""
    for plan in plans:
        shards = shard_manifests[plan.name]
        if ([s.shard_id for s in shards] != list(range(plan.num_shards)) or [s.count for s in shards] != plan.sizes
                or len({(s.dim, s.params.normalized) for s in shards}) != 1):
            raise IndexIntegrityError(
                f"{index_uri}: the {plan.name} index's shards do not make one index: ids "
                f"{[s.shard_id for s in shards]}, sizes {[s.count for s in shards]} (planned {plan.sizes}), "
                f"dims and normalisation {sorted({(s.dim, s.params.normalized) for s in shards})}")


def _tower_config(storage: Storage, cfg: IndexJobConfig):
    """The item tower's saved config (read without loading weights: the actors load them)."""
    from tessera.models.item_tower import ItemTowerConfig

    saved = storage.read_json(join_uri(cfg.model_uri, "item_tower", "config.json"))
    return ItemTowerConfig.model_validate(saved["config"])


def _check_integrity(src: IndexSources, counts: dict[str, int], scan: IdScan) -> None:
    distinct = scan.distinct_items()
    if counts["rows"] != src.num_items or scan.rows != src.num_items or distinct != src.num_items:
        raise IndexIntegrityError(f"{src.index_uri}/{VECTORS_DIR}: {scan.rows} rows in the parts ({counts['rows']} "
                                  f"written), {distinct} distinct items, for {src.num_items} input items in "
                                  f"{src.embedding_run}")


def _record_recall(version: str, checks: dict[str, dict[str, RecallCheck]]) -> None:
    """Set the Ray gauge ``tessera_index_recall{index,queries,version}`` (Prometheus: ``ray_tessera_index_recall``)
    from the driver, once per build and before the floor is applied, so a failing build shows too. The manifest
    (or ``_FAILED.json``) stays the record; the gauge is for dashboards and alerts."""
    from ray.util import metrics

    gauge = metrics.Gauge("tessera_index_recall", "Recall@k of the index self-check against exact search",
                          tag_keys=("index", "queries", "version"))
    for name, by_source in checks.items():
        for source_name, check in by_source.items():
            gauge.set(float(check.recall), tags={"index": name, "queries": source_name, "version": version})


def _with_checks(manifest: IndexManifest, checks: dict[str, RecallCheck], floor: float) -> IndexManifest:
    worst = min(checks.values(), key=lambda c: c.recall) if checks else None
    return manifest.model_copy(update={"recall_checks": checks, "recall_check": worst, "recall_floor": floor})


def _clear_failed_report(storage: Storage, index_uri: str) -> None:
    """A rerun that passes removes the report of an earlier failed attempt of the same version."""
    uri = join_uri(index_uri, FAILED_REPORT)
    if storage.exists(uri):
        fs, path = storage.filesystem(uri)
        fs.delete_file(path)


__all__ = ["FUSED", "IndexExistsError", "IndexIntegrityError", "IndexRecallError", "run_index_job"]
