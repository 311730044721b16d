"""The training job: Ray Data inputs, one Ray Train ``TorchTrainer`` run, the model bundle.

``run_training(cfg)`` builds the datasets (:mod:`tessera.train.datasets`), runs
:func:`tessera.train.worker.train_loop_per_worker` on ``cfg.scaling.num_workers`` DDP workers with
checkpoints on object storage (``<checkpoint_uri>/<version>``, ``FailureConfig(max_failures)``),
then turns the final checkpoint into a :class:`tessera.models.bundle.ModelBundle` at
``<models_uri>/<version>/`` with ``metrics.json`` and a manifest. Running it again with the same
version restores the Ray Train run from its checkpoints instead of starting over, if it was started
with the same settings and embedding run (``_RUN.json`` beside the checkpoints); other settings are
refused (exit 2) unless ``overwrite``, which starts the run again. An existing bundle is replaced only
once the new one is trained. One attempt of a version runs at a time: it holds
``<models_uri>/_LEASE-<version>.json`` (:class:`~tessera.lease.RunLease`), so a retried submit
does not train into the same checkpoints and bundle as the attempt still running. An attempt whose lease
is taken over while Ray Train runs (its driver hung past the ttl, or the lease broken with
``--break-lease``) stops at its next epoch's end: rank 0 checks the lease before each checkpoint, so it
writes at most the checkpoint already under way, and the driver raises :class:`LeaseLostError`.

Example::

    manifest = run_training(load_config(TrainConfig, "configs/train.yaml"))
    manifest["metrics"]["results"]["fused"]["ndcg@10"]
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa
import ray
import ray.train
from ray.train.torch import TorchTrainer

from tessera.config import ConfigError
from tessera.interactions import log_schema_error, ts_unit_warning
from tessera.lease import LeaseLostError, LeaseRef, RunLease
from tessera.models.bundle import MANIFEST, POPULARITY_FILE
from tessera.ray_utils import check_paths_for_cluster
from tessera.storage import Storage, join_uri, parse_uri
from tessera.train.catalog import ItemCatalog
from tessera.train.config import TrainConfig
from tessera.train.datasets import build_datasets
from tessera.train.evaluate import quality_checks
from tessera.train.shared import SharedRefs, share_run_data
from tessera.train.state import RANKED, STATE_FILE, bundle_from_state, load_state
from tessera.train.worker import train_loop_per_worker

METRICS_FILE = "metrics.json"
RUN_FILE = "_RUN.json"  # what a run's checkpoints were trained from, beside them
# Settings that may change between attempts of one run: where and how fast it runs, failure handling.
_RESUMABLE_KEYS = {"version", "overwrite", "scaling", "max_failures", "num_to_keep", "fail_at_epoch",
                   "fail_marker_uri", "storage", "models_uri", "checkpoint_uri", "lease_ttl_s"}

logger = logging.getLogger(__name__)


class BundleExistsError(RuntimeError):
    """The target ``models/<version>/`` already holds a bundle and ``overwrite`` is off."""


class RunConflictError(ValueError):
    """The run's checkpoints come from other settings or another embedding run (``overwrite`` is off)."""


class TrainingFailedError(RuntimeError):
    """Ray Train gave up (more failures than ``max_failures``) or produced no checkpoint."""


def _uri_of(base_uri: str, fs_path: str) -> str:
    """A path in the storage filesystem of ``base_uri`` as a URI (``s3://`` paths carry no scheme)."""
    return f"s3://{fs_path}" if parse_uri(base_uri).scheme == "s3" else fs_path


SPLIT_DATASETS = ("train", "ranker")


def row_ranges(datasets: dict, world_size: int) -> dict:
    """``datasets`` with each of :data:`SPLIT_DATASETS` replaced by one dataset a worker, ``<name>.<rank>``:
    rank r's contiguous range of its rows (``MaterializedDataset.split(equal=True)``, which leaves out the last
    ``world_size - 1`` rows at most, as ``streaming_split(equal=True)`` did), the same range for the same rows
    and world size, whatever blocks hold them.

    Ray Train's default (``streaming_split``) hands blocks to whichever worker is short of rows as they
    come, so which examples a worker trained on, and in what order, changed from run to run. Both datasets
    are materialised in a seeded order (:func:`tessera.train.datasets.seeded_order`); with this and the
    workers' seeded batches (:func:`tessera.train.worker.seeded_batches`) one seed trains one model on
    the CPU (see README: Training). Split here, on the driver before the workers start: the split runs
    tasks where a range ends inside a block, which a split inside the run could wait on for ever once
    the workers hold every CPU. Blocks are not placed by node (no locality hints): a worker reads its
    range from wherever its blocks are."""
    out = {name: ds for name, ds in datasets.items() if name not in SPLIT_DATASETS}
    for name in SPLIT_DATASETS:
        for rank, part in enumerate(datasets[name].split(world_size, equal=True)):
            out[f"{name}.{rank}"] = part
    return out


def make_trainer(cfg: TrainConfig, storage: Storage, datasets: dict, shared: SharedRefs,
                 lease: LeaseRef | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of ``cfg``: scaling, S3 checkpoint storage, failure policy, dataset split;
    ``shared``: the run's user data and catalog (:func:`~tessera.train.shared.share_run_data`); ``lease``:
    the run's, checked by rank 0 before each checkpoint."""
    fs, path = storage.filesystem(cfg.checkpoint_uri)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "lease": lease, "shared": shared},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.version, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep)),
        datasets=row_ranges(datasets, cfg.scaling.num_workers),
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # each worker reads its own (row_ranges)
    )


def write_popularity(storage: Storage, uri: str, catalog: ItemCatalog, counts: np.ndarray) -> None:
    """``item_id``, ``train_interactions`` (each user's last ``max_examples_per_user`` training events): the
    ranker's ``log_popularity`` input, for serving."""
    table = pa.table({"item_id": catalog.item_ids.tolist(), "train_interactions": counts.astype(np.int64)})
    storage.write_parquet(uri, table)


def lease_uri(cfg: TrainConfig) -> str:
    """The lease of a training run: beside its bundle folder (``overwrite`` empties that folder), keyed on
    the bundle, which two attempts with another ``checkpoint_uri`` would still both write."""
    return join_uri(cfg.models_uri, f"_LEASE-{cfg.version}.json")


def _refuse_existing(cfg: TrainConfig, storage: Storage) -> bool:
    """Whether the bundle exists (to be replaced: ``overwrite``).

    Raises:
        BundleExistsError: it exists and ``overwrite`` is off."""
    exists = storage.exists(join_uri(cfg.bundle_uri, MANIFEST))
    if exists and not cfg.overwrite:
        raise BundleExistsError(f"{cfg.bundle_uri} already holds a model bundle (set overwrite or a new version)")
    return exists


def run_training(cfg: TrainConfig, storage: Storage | None = None, break_lease: bool = False) -> dict:
    """Train every variant, evaluate, save the bundle; returns the bundle manifest.

    Raises:
        ConfigError: a local ``checkpoint_uri`` or ``models_uri`` on a cluster of several nodes
            (:func:`check_paths_for_cluster`).
        BundleExistsError: the version exists and ``overwrite`` is off.
        LeaseHeldError: another attempt of the version is running (``break_lease`` takes it over).
        LeaseLostError: another attempt took the version over while this one trained; nothing written.
    """
    # models_uri holds the run's lease, which rank 0 reads on whichever node it runs
    check_paths_for_cluster({"checkpoint_uri": cfg.checkpoint_uri, "models_uri": cfg.models_uri},
                            {"embeddings_uri": cfg.embeddings_uri, "interactions_uri": cfg.interactions_uri})
    storage = storage or Storage(cfg.storage)
    t0 = time.perf_counter()
    _refuse_existing(cfg, storage)  # before the lease: a rerun of a finished version needs no wait
    lease = RunLease(storage, lease_uri(cfg), cfg.lease_ttl_s, what=f"training run {cfg.version}",
                     break_lease=break_lease)
    lease.acquire()
    with lease:  # renewed while training goes on, released at its end
        return _train_leased(cfg, storage, lease, t0)


def _train_leased(cfg: TrainConfig, storage: Storage, lease: RunLease, t0: float) -> dict:
    replace_bundle = _refuse_existing(cfg, storage)  # an attempt that held the lease before may have written it
    embed_manifest = storage.read_json(join_uri(cfg.embeddings_uri, "_MANIFEST.json"))
    check_variants(cfg, list(embed_manifest["encoders"]))
    _claim_run(cfg, storage, embed_manifest)
    try:
        data = build_datasets(cfg, storage)
    except Exception as err:  # a log file of unreadable columns: the job's input, named (exit 2), not a traceback
        if (bad := log_schema_error(err)) is None:
            raise
        raise ConfigError(f"interactions_uri: {bad}") from None
    if data.num_users == 0:  # the task sharing the user records would fail in every worker instead
        raise ConfigError(f"interactions_uri: {cfg.interactions_uri} holds no event of an item in the embedding "
                          f"run {cfg.embeddings_uri} ({data.interactions} events, {data.unknown_items} of items "
                          "it lacks): nothing to train on")
    check_ranker_lists(cfg, data.num_items)
    t_data = time.perf_counter()
    ts_warning = ts_unit_warning(*data.ts_range)
    if ts_warning is not None:
        print(f"[train] warning: {ts_warning}", flush=True)  # as the index job warns; also in the manifest
    shared = share_run_data(data.users, cfg, data.num_items)  # built once, read by every worker
    trainer = make_trainer(cfg, storage, {"train": data.train, "ranker": data.ranker}, shared, lease.ref)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:  # Train V2 raises (workers failed past max_failures)
        _raise_if_taken_over(lease, storage)
        raise TrainingFailedError(f"training run {cfg.version} failed: {str(err).strip()[:2000]}") from err
    t_train = time.perf_counter()
    if result.error is not None or result.checkpoint is None:
        _raise_if_taken_over(lease, storage)
        raise TrainingFailedError(f"training run {cfg.version} failed: {result.error!r}")
    with result.checkpoint.as_directory() as d:
        state = load_state(os.path.join(d, STATE_FILE))
    shared.catalog.check_unchanged()  # before the bundle is built from it
    catalog = ItemCatalog.from_arrays(ray.get(shared.catalog.arrays))
    counts = np.array(ray.get(shared.users.counts))  # the ranker's popularity the workers trained with (writable)
    bundle = bundle_from_state(cfg, state, catalog, counts)
    metrics = {"results": state.results, "checks": quality_checks(state.results), "history": state.history,
               "kept_epochs": state.kept_epochs}
    lease.confirm()  # still this attempt's version: nothing below may land over another attempt's bundle
    if replace_bundle:  # kept until now: a failed retraining leaves the bundle serving and indexing use
        storage.delete(join_uri(cfg.bundle_uri, MANIFEST))  # first: a reader then finds no bundle, not half of one
        storage.delete_prefix(cfg.bundle_uri)
    storage.write_json(join_uri(cfg.bundle_uri, METRICS_FILE), metrics)
    write_popularity(storage, join_uri(cfg.bundle_uri, POPULARITY_FILE), catalog, counts)
    bundle.manifest = {
        "version": cfg.version,
        "embedding_run": cfg.embeddings_uri,
        "encoders": embed_manifest["encoders"],
        "modalities": catalog.modalities,
        "metrics": {"results": state.results, "checks": metrics["checks"], "kept_epochs": state.kept_epochs,
                    "file": METRICS_FILE},
        "item_ids": {"num_id_buckets": bundle.item_tower.config.num_id_buckets, "hash": "blake2b-8"},
        "ranker_features": {"names": bundle.ranker.config.dense_features, "similarity_inputs": "encoder embeddings",
                            "candidates": cfg.ranker.candidates, "trained": RANKED in state.models,
                            "log_popularity": f"log1p(train_interactions) from {POPULARITY_FILE}",
                            "score": ("retrieval_score / temperature + ranker_logit" if cfg.ranker.residual
                                      else "ranker_logit"),
                            "temperature": cfg.towers.temperature},
        "training": {"config": cfg.model_dump(mode="json"),
                     "checkpoint": _uri_of(cfg.checkpoint_uri, result.checkpoint.path),
                     "data": {"interactions": data.interactions, "unknown_items": data.unknown_items,
                              "ts_range_ms": list(data.ts_range), "ts_warning": ts_warning,
                              "users": data.num_users, "examples": data.examples, "items": data.num_items,
                              "retrieval_examples": data.train.count(), "ranker_examples": data.ranker.count()}},
        "timings": {"data_s": round(t_data - t0, 2), "train_s": round(t_train - t_data, 2),
                    "total_s": round(time.perf_counter() - t0, 2)},
    }
    return bundle.save(storage, cfg.bundle_uri)


def _raise_if_taken_over(lease: RunLease, storage: Storage) -> None:
    """After a failed fit: raise :class:`LeaseLostError` if another attempt holds the version (rank 0
    stops on that, and the failure is best named as such); with the store unreachable, say nothing."""
    try:
        lease.ref.verify(storage)
    except LeaseLostError:
        raise
    except Exception as err:  # the training error is the one to report
        logger.warning("%s: could not read its lease after the failure (%s: %s)", lease.what,
                       type(err).__name__, err)


def check_variants(cfg: TrainConfig, modalities: list[str]) -> None:
    """Every single-modality variant names a modality of the embedding run (checked before any work:
    the workers would otherwise fail on it after training the others).

    Raises:
        ConfigError: naming ``variants``, the missing modalities and the run's."""
    missing = [v for v in cfg.variants if v not in ("fused", "id_only") and v not in modalities]
    if missing:
        raise ConfigError(f"variants: {missing} name modalities the embedding run {cfg.embeddings_uri} does not "
                          f"have (it has {modalities}); remove them from `variants`")


def check_ranker_lists(cfg: TrainConfig, num_items: int) -> None:
    """Refuse, before any training, ranker lists longer than the catalog: each holds the positive,
    ``min(num_hard, min(candidates, I) - 1)`` retrieved items and ``num_random`` others, all distinct.
    (Found by the first ranker step otherwise, in every worker and every restart, after the towers had
    trained: the job exited 4, "training failed", naming no key.)

    Raises:
        ConfigError: naming the keys, the list length and the catalog's."""
    r = cfg.ranker
    if not r.enabled:
        return
    size = 1 + min(r.num_hard, min(r.candidates, num_items) - 1) + r.num_random
    if size > num_items:
        raise ConfigError(f"ranker.num_hard ({r.num_hard}) and ranker.num_random ({r.num_random}) make ranker lists "
                          f"of {size} distinct items (with ranker.candidates {r.candidates}), more than the "
                          f"{num_items} items of the embedding run {cfg.embeddings_uri}: lower them, or set "
                          "ranker.enabled false")


def run_identity(cfg: TrainConfig, embed_manifest: dict, log: dict) -> dict:
    """What a run's checkpoints depend on: the settings (less :data:`_RESUMABLE_KEYS`), the embedding
    run (its encoders with weight checksums, and its counts) and the interaction log as it is now
    (``log``: :func:`~tessera.interactions.log_fingerprint`). The log's URI alone let a resumed attempt
    train checkpointed towers on a log rewritten in place since: events they trained on could become
    the new split's validation or test targets."""
    return {"config": cfg.model_dump(mode="json", exclude=_RESUMABLE_KEYS),
            "embedding_run": {"uri": cfg.embeddings_uri,
                              **{k: embed_manifest.get(k) for k in ("encoders", "counts")}},
            "interactions": {"uri": cfg.interactions_uri, **log}}


def _claim_run(cfg: TrainConfig, storage: Storage, embed_manifest: dict) -> None:
    """Ray Train resumes any run of the same name from its checkpoints: make sure those were trained from
    what this attempt trains from, or start over (``overwrite``), or refuse naming what differs."""
    run_dir = join_uri(cfg.checkpoint_uri, cfg.version)
    from tessera.interactions import log_fingerprint

    identity = run_identity(cfg, embed_manifest, log_fingerprint(storage, cfg.interactions_uri))
    uri = join_uri(run_dir, RUN_FILE)
    if cfg.overwrite:
        storage.delete_prefix(run_dir)
    else:
        checkpoints = [f for f in storage.list_files(run_dir) if "/checkpoint_" in f]  # Ray Train's dir names
        before = storage.read_json(uri) if storage.exists(uri) else None
        if before == identity:
            return
        if checkpoints and before is None:
            raise RunConflictError(f"{run_dir} holds checkpoints without {RUN_FILE} (what they were trained from "
                                   "is unknown); use a new version, or overwrite to start this one again")
        if checkpoints:
            raise RunConflictError(
                f"{run_dir} holds checkpoints of run {cfg.version} trained with other settings or data "
                f"({', '.join(_differing_keys(before, identity))}); resuming would mix the two. Use a new "
                "version, or overwrite to start this one again")
        # no checkpoint yet (a first attempt, or one that failed before its first): nothing to mix with
    storage.write_json(uri, identity)


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(f"{prefix}{key}")
    return keys[:10]
