"""Where an index build reads from: the model bundle, its embedding run and the interaction log.

Everything is resolved on the driver from small files (manifests and Parquet footers) before any
Ray work starts, so a wrong URI fails in seconds with a message naming it.

Example::

    src = resolve_sources(cfg, storage)
    print(src.model_version, src.embedding_run, len(src.embedding_parts))
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.embed.output import committed_parts
from tessera.fingerprint import bundle_fingerprint
from tessera.index_job.config import IndexJobConfig
from tessera.storage import Storage, join_uri

BUNDLE_MANIFEST = "_MANIFEST.json"
RUN_MANIFEST = "_MANIFEST.json"


class IndexSourceError(ValueError):
    """The bundle, the embedding run or the interaction log is missing or does not fit together."""


@dataclass(frozen=True)
class IndexSources:
    """The resolved inputs of one build.

    Attributes:
        model_uri: the bundle.
        model_version: the bundle's ``version``.
        model_fingerprint: :func:`~tessera.fingerprint.bundle_fingerprint` of the bundle (which training
            of the version this is: ``--overwrite`` retrains one in place).
        version: the index version folder name.
        index_uri: ``<output_uri>/<version>``.
        embedding_run: the embedding run's URI.
        embedding_manifest: that run's manifest.
        embedding_parts: its ``part-*.parquet`` files.
        num_items: rows over the parts (every one comes out of the job exactly once).
        interactions_uri: the interaction log prefix for the self-check (None: no user queries).
    """

    model_uri: str
    model_version: str
    model_fingerprint: str
    version: str
    index_uri: str
    embedding_run: str
    embedding_manifest: dict
    embedding_parts: list[str]
    num_items: int
    interactions_uri: str | None


def corpus_root(items_uri: str) -> str | None:
    """``s3://b/x`` for ``s3://b/x/corpus/items`` (the layout in ARCHITECTURE.md), else None."""
    trimmed = items_uri.rstrip("/")
    suffix = "/corpus/items"
    return trimmed[: -len(suffix)] if trimmed.endswith(suffix) else None


def resolve_sources(cfg: IndexJobConfig, storage: Storage) -> IndexSources:
    """Read the bundle and embedding-run manifests and list the run's parts.

    Raises:
        IndexSourceError: naming the missing or inconsistent input.
    """
    bundle_manifest_uri = join_uri(cfg.model_uri, BUNDLE_MANIFEST)
    if not storage.exists(bundle_manifest_uri):
        raise IndexSourceError(f"no model bundle at model_uri={cfg.model_uri} ({BUNDLE_MANIFEST} missing)")
    bundle = storage.read_json(bundle_manifest_uri)
    model_version = str(bundle.get("version") or "")
    if not model_version:
        raise IndexSourceError(f"model bundle {cfg.model_uri} has no 'version' in its manifest")
    run = cfg.embeddings_uri or bundle.get("embedding_run")
    if not run:
        raise IndexSourceError(f"model bundle {cfg.model_uri} names no embedding_run; set embeddings_uri")
    run = str(run).rstrip("/")
    run_manifest_uri = join_uri(run, RUN_MANIFEST)
    if not storage.exists(run_manifest_uri):
        raise IndexSourceError(f"embedding run {run} (named by {'config' if cfg.embeddings_uri else 'the bundle'}) "
                               f"has no {RUN_MANIFEST}: it is missing or incomplete")
    run_manifest = storage.read_json(run_manifest_uri)
    _check_encoders(bundle, run_manifest, run)
    parts = committed_parts(storage, run, run_manifest)
    if not parts:
        raise IndexSourceError(f"embedding run {run} holds no Parquet parts")
    num_items = storage.parquet_rows(parts)
    expected = run_manifest.get("output", {}).get("rows")
    if expected is not None and expected != num_items:
        raise IndexSourceError(f"embedding run {run}: the manifest says {expected} rows, the parts hold {num_items}")
    interactions = cfg.interactions_uri
    if interactions is None:
        root = corpus_root(str(run_manifest.get("input", {}).get("items_uri", "")))
        interactions = join_uri(root, "corpus", "interactions") if root else None
        if interactions and not storage.list_files(interactions, ".parquet"):
            interactions = None  # derived, not there: the job says there is no user check
    elif (cfg.self_check.user_queries or cfg.self_check.tuning_user_queries) \
            and not storage.list_files(interactions, ".parquet"):
        # found now, not in the self-check after every shard is built
        raise IndexSourceError(f"interactions_uri={interactions} holds no Parquet parts")
    version = cfg.version or model_version
    return IndexSources(model_uri=cfg.model_uri, model_version=model_version,
                        model_fingerprint=bundle_fingerprint(bundle), version=version,
                        index_uri=join_uri(cfg.output_uri, version), embedding_run=run,
                        embedding_manifest=run_manifest, embedding_parts=parts, num_items=num_items,
                        interactions_uri=interactions)


def _check_encoders(bundle: dict, run_manifest: dict, run: str) -> None:
    """Refuse a run made with other encoder weights than those the bundle was trained on, or without a
    modality it was trained on (every item would count as lacking it: those with nothing else left out
    of the index, and that modality's own index dropped, with the job exiting 0)."""
    trained = bundle.get("encoders") or {}
    used = run_manifest.get("encoders") or {}
    missing = sorted(set(trained) - set(used))
    if missing:
        raise IndexSourceError(f"embedding run {run} has no {', '.join(missing)} vectors, which the model was trained "
                               f"on (it has {sorted(used)}): embed the catalog with every modality of the model")
    for modality, enc in trained.items():
        if modality in used and enc.get("weights_checksum") != used[modality].get("weights_checksum"):
            raise IndexSourceError(f"embedding run {run}: {modality} encoder weights differ from those the model "
                                   f"was trained on ({enc.get('weights_checksum')} vs "
                                   f"{used[modality].get('weights_checksum')})")
