"""The embedding job: Ray Data streams the items table through one encoder actor pool per modality.

    read items ─► prepare ─► image: fetch ─► decode ─► [ImageEncoder pool]
                          ─► audio: fetch ─► decode ─► [AudioEncoder pool]
                          ─► text: tokenise ─► [TextEncoder pool] ─► write parts ─► tally ─► manifest

The corpus is never materialised: Ray Data streams blocks through the stages with backpressure, and
the driver only sees one small summary row per written part. The manifest's counts are recomputed
from the written parts, and the job fails loudly if any input item is missing or duplicated.

Example::

    manifest = run_embedding(load_config(EmbedConfig, "configs/embed.yaml"))
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tessera.config import ConfigError
from tessera.embed.config import EmbedConfig
from tessera.embed.ids import colliding, file_ids_with_hashes, hash_ids, map_files, new_key
from tessera.embed.output import (
    MAX_PARTS_TO_SETTLE,
    Tally,
    done_items,
    list_parts,
    name_of,
    superseded_copies,
    tally,
)
from tessera.embed.retry import RetrySourceError, check_finished_retry, prepare_retry
from tessera.embed.stages import EncodeActor, clear_guard_marks, decode, fetch, read_items, write_batch
from tessera.encoders.audio import AudioEncoder
from tessera.encoders.errors import MEDIA_ERROR_KINDS
from tessera.encoders.image import ImageEncoder
from tessera.encoders.text import TextEncoder
from tessera.encoders.weights import CheckpointFiles, resolve_weights, weights_checksum
from tessera.lease import LeaseLostError, RunLease
from tessera.memory import allocator_env
from tessera.ray_utils import check_paths_for_cluster, cluster_layout, unplaceable
from tessera.storage import Storage, join_uri, parse_uri

ENCODERS = {"text": TextEncoder, "image": ImageEncoder, "audio": AudioEncoder}


class EmbeddingIntegrityError(RuntimeError):
    """The written run does not hold every input item exactly once."""


class EmbeddingInputError(ValueError):
    """The job cannot start as configured: the items table has null or repeated ids, an encoder's weights
    are missing or configured in a way it cannot use, the pools do not fit the cluster, or the run id
    already holds a run made with other settings. Nothing is written."""


# Encoder settings that change speed or placement, not the vectors (beyond bf16 rounding): a run may
# resume under other values of these. Every other encoder key, the items and the enabled modalities
# make the run's identity (``_RUN.json``).
_NOT_IDENTITY = ("batch_size", "device", "bf16_autocast", "cache_dir", "channels_last", "sort_by_length",
                 "max_batch_tokens", "pad_to_multiple_of", "fast_tokenizer_file")


def weights_identity(weights: str) -> str:
    """Where an encoder's weights are, in a form that names the same weights on every machine: an
    ``s3://`` URI as is; a local folder (say the packaged MiniLM inside a virtualenv, whose path differs
    between environments) by its files' names and sizes, without reading them."""
    if weights.startswith("s3://"):
        return weights
    root = Path(parse_uri(weights).path)
    if root.is_file():
        return f"local:{root.name}:{root.stat().st_size}"
    if not root.is_dir():
        return f"local:{weights}"  # not there: the encoder will say so when it loads
    listing = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    return "local:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def run_identity(cfg: EmbedConfig, files: list[str], n_input: int) -> dict:
    """What a run's output depends on: the items files and row count, and per enabled modality the
    encoder settings that change its vectors or which items fail (weights by :func:`weights_identity`)."""
    encoders = {}
    for m, mcfg in cfg.modalities().items():
        settings = mcfg.encoder.model_dump(mode="json", exclude=set(_NOT_IDENTITY))
        settings["weights"] = weights_identity(settings["weights"])
        encoders[m] = settings
    return {"items_uri": cfg.items_uri, "files": [parse_uri(f).path.rsplit("/", 1)[-1] for f in files],
            "items": n_input, "encoders": encoders}


def identity_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two identities (``encoders.text.max_length``, ...).

    A modality enabled on one side only is a change; inside one encoder's settings a key only one side
    has is not: an encoder setting added to the code later must not make every earlier run look different."""
    out = [key for key in sorted(set(old) | set(new)) if key != "encoders" and old.get(key) != new.get(key)]
    a, b = old.get("encoders", {}), new.get("encoders", {})
    for m in sorted(set(a) | set(b)):
        if m not in a or m not in b:
            out.append(f"encoders.{m}")
        else:
            out.extend(f"encoders.{m}.{key}" for key in sorted(set(a[m]) & set(b[m])) if a[m][key] != b[m][key])
    return out


def source_columns(cfg: EmbedConfig) -> list[str]:
    """The items-table column each enabled modality reads: ``text`` itself, ``<m>_uri`` for media."""
    return [m if m == "text" else f"{m}_uri" for m in cfg.modalities()]


def check_weights(cfg: EmbedConfig, storage: Storage) -> None:
    """Refuse an enabled modality whose encoder would refuse its weights, naming the key and the file:
    an ``s3://`` prefix that holds no file, or configuration files the encoder cannot use (no
    ``preprocessor_config.json`` for an image or audio model, a ``config.json`` it cannot read, a
    sentence-transformers ``Dense`` module or pooling the text encoder does not do; see each encoder's
    ``check_checkpoint``). These otherwise surface as a traceback from inside a Ray task, after the run
    has started. Only those small files are read (from the prefix itself), never the weights. A local
    folder is checked only when it exists here (the driver's node may have none); it must exist on every
    node of the job, since the decode tasks, which run anywhere, read its tokenizer and preprocessing
    configs too: on a cluster, prefer an ``s3://`` prefix."""
    for m, mcfg in cfg.modalities().items():
        uri = mcfg.encoder.weights
        if parse_uri(uri).scheme == "s3":
            if not storage.retrying_io(f"LIST {uri}", lambda u=uri: storage.list_files(u)):
                raise EmbeddingInputError(f"{m}.encoder.weights: no weight files under {uri}")
        elif not Path(parse_uri(uri).path).is_dir():
            continue
        try:
            ENCODERS[m].check_checkpoint(mcfg.encoder, CheckpointFiles(uri, storage))
        except (FileNotFoundError, ValueError) as err:  # the encoders' own messages name the file
            raise EmbeddingInputError(f"{m}.encoder.weights: {err}") from err
        except (AttributeError, KeyError, TypeError) as err:  # a value of a type the encoder's code does not expect
            raise EmbeddingInputError(f"{m}.encoder.weights: a configuration file under {uri} holds a value the "
                                      f"{m} encoder cannot use ({type(err).__name__}: {err})") from err


def check_item_ids(storage: Storage, files: list[str], num_cpus: float = 0.25, use_ray: bool | None = None,
                   columns: Sequence[str] = ()) -> None:
    """Refuse an items table with a null ``item_id`` or one id on two rows, before any work: the output
    holds every input item exactly once, keyed by its id. Also refused up front: a file whose
    ``item_id`` is not a string, or that lacks one of ``columns`` (the enabled modalities' sources:
    ``text``, ``<m>_uri``) or holds one that is not strings or bytes; the read would drop a missing
    column without a word, and fail its cast of an int64 one, naming neither file nor column.

    Each file is scanned (by Ray tasks when there are many files): nulls and repeats within the file,
    exactly; across files, the driver compares 8-byte hashes of the ids and reads again, as strings,
    only the ids whose hashes meet (:mod:`tessera.embed.ids`). ``use_ray``: see
    :func:`~tessera.embed.ids.map_files`."""
    key = new_key()
    scans = map_files(_scan_items_file, files, storage, key, list(columns), num_cpus=num_cpus, use_ray=use_ray)
    for uri, (nulls, repeated, _) in zip(files, scans, strict=True):
        if isinstance(nulls, str):
            raise EmbeddingInputError(f"{uri}: {nulls}")
        if nulls:
            raise EmbeddingInputError(f"{uri}: {nulls} rows have a null item_id")
        if repeated:
            raise EmbeddingInputError(f"{uri}: item_id repeated within the file: {', '.join(repeated[:5])}"
                                      + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""))
    _, shared = colliding([hashes for _, _, hashes in scans])
    if len(shared):  # an id in two files, or two ids sharing a hash: compare those ids as strings
        seen: dict[str, str] = {}
        found = map_files(file_ids_with_hashes, files, storage, key, shared, num_cpus=num_cpus, use_ray=use_ray)
        for uri, ids in zip(files, found, strict=True):
            for item in ids:
                first = seen.setdefault(item, uri)
                if first != uri:
                    raise EmbeddingInputError(f"item_id {item!r} is in both {first} and {uri}")


def _text_like(kind) -> bool:
    """A column the read stage can cast to binary: strings, bytes, those dictionary-encoded, or all null."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                         pa.types.is_large_binary, pa.types.is_null))


def _scan_items_file(uri: str, storage: Storage, key: str, columns: Sequence[str] = ()
                     ) -> tuple[int | str, list[str], np.ndarray]:
    """An items file's null ``item_id`` count, its ids on more than one row, and its id hashes; or, in
    place of the count, what is wrong with its columns."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with storage.retrying_io(f"read {uri}", lambda: pq.ParquetFile(path, filesystem=fs)) as file:  # the footer, once
        schema = file.schema_arrow
        absent = [c for c in ["item_id", *columns] if c not in schema.names]
        if absent:
            return f"no {', '.join(absent)} column (it has {', '.join(schema.names)})", [], np.empty(0, np.uint64)
        kind = schema.field("item_id").type
        if pa.types.is_dictionary(kind):  # e.g. a pandas categorical: its values are what count
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return f"item_id must be a string column, not {kind}", [], np.empty(0, np.uint64)
        for name in columns:  # found here, not as a failed cast in a read task once the run started
            if not _text_like(schema.field(name).type):
                return (f"{name} must be a string (or binary) column, not {schema.field(name).type}", [],
                        np.empty(0, np.uint64))
        col = storage.retrying_io(f"read {uri}", lambda: file.read(columns=["item_id"])).column("item_id")
    try:
        col.validate(full=True)  # Parquet strings are not checked for UTF-8 when read
    except pa.ArrowInvalid as err:
        return f"item_id holds a value that is not valid UTF-8 ({err})", [], np.empty(0, np.uint64)
    if col.null_count:
        return col.null_count, [], np.empty(0, np.uint64)
    counts = pc.value_counts(col)
    repeated = [str(v) for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                                       strict=True) if n > 1]
    return 0, repeated, hash_ids(col, key)


MIXED_FILE = "_MIXED.json"  # beside the parts of a run whose actors ran different weights: it is never completed


class EncoderMismatchError(EmbeddingIntegrityError):
    """The actors of one modality's pool ran different encoder weights, or the run's parts record weights
    other than its encoders': the parts are written, the manifest is not, and ``_MIXED.json`` keeps every
    later attempt from completing the run over them."""


def describe_encoder(modality: str, encoder_cfg, storage: Storage) -> dict:
    """Name, dim, weights checksum of an encoder, by loading it (a Ray task holding no GPU: on the CPU)."""
    enc = ENCODERS[modality](encoder_cfg.model_copy(update={"device": "cpu"}), storage)
    return {"name": enc.name, "dim": enc.dim, "weights_checksum": enc.weights_checksum,
            "weights": encoder_cfg.weights, "device": "not used in this attempt"}


def encoder_identities(cfg: EmbedConfig, storage: Storage, reported: list[dict]) -> dict[str, dict]:
    """Per modality: the encoder the actors reported (with every device they ran on); a modality no
    actor ran in this attempt (a resumed run with nothing left for it) is described by loading it."""
    import ray

    out: dict[str, dict] = {}
    per_actor = ("device", "allocator")  # may differ between a pool's actors: listed, every value once
    for ident in reported:
        m = ident["name"].split(":", 1)[0]
        entry = out.setdefault(m, {k: v for k, v in ident.items() if k not in per_actor}
                               | {"devices": [], "allocators": []})
        if ident.get("weights_checksum") != entry.get("weights_checksum"):  # one run, one set of weights
            raise EncoderMismatchError(
                f"{m}: the pool's actors loaded different weights ({entry.get('weights_checksum')} and "
                f"{ident.get('weights_checksum')} from {ident.get('weights')}): a node with another local "
                f"folder, or weights replaced while the run read them; its vectors mix both")
        entry["devices"] = sorted(set(entry["devices"]) | {ident["device"]})
        entry["allocators"] = sorted(set(entry["allocators"]) | {ident.get("allocator", "system")})
    missing = [m for m in cfg.modalities() if m not in out]
    if missing:
        describe = ray.remote(num_cpus=0.1)(describe_encoder)
        found = ray.get([describe.remote(m, cfg.modalities()[m].encoder, storage) for m in missing])
        for m, ident in zip(missing, found, strict=True):
            out[m] = {k: v for k, v in ident.items() if k != "device"} | {"devices": [], "allocators": []}
    return {m: out[m] for m in cfg.modalities()}


def configured_checksum(encoder_cfg, storage: Storage) -> str:
    """The checksum of the weights ``encoder_cfg`` names, as an encoder loading them computes it (``s3://``
    weights are downloaded into this node's cache, where this node's actors then find them)."""
    return weights_checksum(resolve_weights(encoder_cfg.weights, storage, encoder_cfg.cache_dir).path)


def _weights_replaced(modality: str, weights, now: str, then: str, part: str, verb: str) -> str:
    """The refusal of a run whose parts were encoded with weights ``then`` while ``weights`` holds ``now``."""
    return (f"{modality}.encoder.weights: {weights} holds weights {now}, but this run's parts were encoded with "
            f"{then} (for one, {part}): the weights changed since the run started. Put the original weights "
            f"back to {verb} it, or embed into another run_id")


def check_resumed_weights(cfg: EmbedConfig, storage: Storage, recorded: dict[str, dict[str, str]]) -> None:
    """Refuse to resume a run whose written parts were encoded with other weights than the configured ones
    (``recorded``: what the parts record, see :func:`~tessera.embed.output.merge_weights`), before any
    work: same-named weights replaced between attempts (a retrained checkpoint uploaded to the same
    prefix, a local folder of the same file sizes) pass the run identity, and the resumed vectors would
    otherwise come from another model than the written ones. The configured weights are checksummed
    by a Ray task (a local folder must be on every node anyway; see :func:`check_weights`).

    Raises:
        EmbeddingInputError: naming the modality's key, the weights and both checksums; nothing is written.
    """
    import ray

    todo = [m for m in cfg.modalities() if recorded.get(m)]
    if not todo:
        return
    task = ray.remote(num_cpus=0.1)(configured_checksum)
    refs = [task.remote(cfg.modalities()[m].encoder, storage) for m in todo]
    now = []
    for m, ref in zip(todo, refs, strict=True):
        try:
            now.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:  # e.g. a local folder missing on the task's node
            raise EmbeddingInputError(f"{m}.encoder.weights: could not read {cfg.modalities()[m].encoder.weights} "
                                      f"to compare it with the run's parts: {err.cause!r}") from err
    for m, checksum in zip(todo, now, strict=True):
        if other := sorted(set(recorded[m]) - {checksum}):
            raise EmbeddingInputError(_weights_replaced(m, cfg.modalities()[m].encoder.weights, checksum,
                                                        other[0], recorded[m][other[0]], "resume"))


def check_parts_weights(recorded: dict[str, dict[str, str]], encoders: dict[str, dict]) -> None:
    """The run's parts (``recorded``, from the final tally) were all encoded with the weights of
    ``encoders`` (:func:`encoder_identities`); parts written before parts recorded weights are not checked.

    Raises:
        EncoderMismatchError: parts of two checksums (weights replaced while the run read them).
        EmbeddingInputError: every part of one checksum, the encoder another: an attempt that wrote
            nothing described weights replaced after its resume check; the parts are not mixed."""
    for m, found in recorded.items():
        expected = (encoders.get(m) or {}).get("weights_checksum")
        if expected is None or set(found) <= {expected}:
            continue
        if len(found) == 1:  # this attempt wrote none of m's parts: its own would record `expected`
            (checksum, part), = found.items()
            raise EmbeddingInputError(_weights_replaced(m, encoders[m].get("weights"), expected, checksum, part,
                                                        "finish"))
        if other := sorted(set(found) - {expected}):
            raise EncoderMismatchError(
                f"{m}: the run's parts were encoded with different weights ({expected} and {other[0]}, for "
                f"one in {found[other[0]]}; from {encoders[m].get('weights')}): weights replaced while the "
                f"run read them; its vectors mix both")


def build_dataset(cfg: EmbedConfig, files: list[str], done: np.ndarray, hash_key: str, run_uri: str,
                  attempt: str | None = None):
    """The streaming pipeline over ``files``, skipping items whose id hash (under ``hash_key``) is in
    ``done`` (sorted ``uint64``, :func:`~tessera.embed.output.done_items`); ``attempt`` names
    the parts it writes."""
    import ray

    storage = Storage(cfg.storage)
    sources = source_columns(cfg)
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=len(files))
    # One items file per read task, its blocks streaming out as they are read. Left to itself, Ray
    # Data fuses this map with the next one and bundles as many inputs per task as that one's
    # batch_size (a text decode of 64 rows took 64 files: one task read the whole corpus into one
    # block, and nothing downstream started before it was done). A ray_remote_args_fn keeps an
    # operator out of fusion (ray.data's operator_fusion rule). Ray 2.60 warns that the argument goes
    # away in 2.64: on that upgrade, turn read_items into a Datasource (one read task per file);
    # tests/embed/test_pipeline.py::test_each_items_file_is_read_by_its_own_task catches a regression.
    read_args = {"num_cpus": cfg.read_num_cpus}
    io_compute = ray.data.TaskPoolStrategy(size=cfg.io_concurrency)
    ds = ds.map_batches(read_items, batch_size=1, num_cpus=cfg.read_num_cpus, compute=io_compute,
                        ray_remote_args_fn=lambda: read_args,
                        fn_kwargs={"storage": storage, "columns": ["item_id", *sources],
                                   "rows_per_batch": cfg.read_batch_rows,
                                   "done_hashes": done if len(done) else None, "hash_key": hash_key})
    for m, mcfg in cfg.modalities().items():
        encoder_cls = ENCODERS[m]
        if m != "text":
            f = mcfg.fetch
            ds = ds.map_batches(fetch, batch_format="pyarrow", batch_size=f.batch_size, num_cpus=f.num_cpus,
                                compute=ray.data.TaskPoolStrategy(size=f.concurrency),
                                fn_kwargs={"modality": m, "storage": storage, "max_bytes": mcfg.encoder.max_bytes,
                                           "threads": f.threads, "max_block_bytes": f.max_block_mb << 20})
        p = mcfg.preprocess
        ds = ds.map_batches(decode, batch_format="pyarrow", batch_size=p.batch_size, num_cpus=p.num_cpus,
                            compute=ray.data.TaskPoolStrategy(size=p.concurrency),
                            fn_kwargs={"modality": m, "encoder_cfg": mcfg.encoder, "storage": storage,
                                       **({} if m == "text" else {"batch_timeout_s": p.batch_timeout_s,
                                                                  "item_timeout_s": p.item_timeout_s})})
        pool = mcfg.pool
        env = allocator_env(pool.allocator)
        ds = ds.map_batches(EncodeActor, batch_format="pyarrow", batch_size=pool.batch_size,
                            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
                            **({"runtime_env": {"env_vars": env}} if env else {}),
                            compute=ray.data.ActorPoolStrategy(
                                min_size=pool.min_actors, max_size=pool.max_actors,
                                max_tasks_in_flight_per_actor=pool.max_tasks_in_flight_per_actor),
                            fn_constructor_kwargs={"modality": m, "encoder_cls": encoder_cls,
                                                   "encoder_cfg": mcfg.encoder, "storage": storage,
                                                   "torch_threads": pool.torch_threads,
                                                   "allocator": pool.allocator})
    return ds.map_batches(write_batch, batch_format="pyarrow", batch_size=cfg.write_batch_size,
                          num_cpus=cfg.read_num_cpus, compute=io_compute,
                          fn_kwargs={"run_uri": run_uri, "storage": storage, "modalities": list(cfg.modalities()),
                                     "attempt": attempt})


def check_fits(cfg: EmbedConfig, cluster_cpus: float, cluster_gpus: float, nodes: list[dict] | None = None) -> None:
    """Refuse a config whose pools, at their minimum size, leave no CPU for the stages that feed them,
    or whose one actor or task asks for more than any node has.

    Ray Data starts every pool's ``min_actors`` before data flows; if they hold all the CPUs the read
    and decode tasks wait forever, and an actor no node can hold (2 GPUs on nodes of 1) waits forever
    however many the cluster has in all. This names the keys to change instead of stalling.

    Args:
        nodes: each node's resources (``ray.nodes()``' ``Resources``); None on an autoscaling cluster,
            whose node types may be larger than its nodes now.
    """
    mods = cfg.modalities()
    stages = [("read_num_cpus", cfg.read_num_cpus), *((f"{m}.preprocess", mc.preprocess.num_cpus)
                                                      for m, mc in mods.items()),
              *((f"{m}.fetch", mc.fetch.num_cpus) for m, mc in mods.items() if hasattr(mc, "fetch"))]
    if nodes:
        asks = [(f"{m}.pool", mc.pool.num_cpus, mc.pool.num_gpus) for m, mc in mods.items()]
        asks += [(key, cpus, 0.0) for key, cpus in stages]
        if problem := unplaceable(asks, nodes):
            raise EmbeddingInputError(problem)
    pools = sum(m.pool.min_actors * m.pool.num_cpus for m in mods.values())
    stage = max(cpus for _, cpus in stages)
    if pools + stage > cluster_cpus + 1e-9:
        raise EmbeddingInputError(
            f"encoder pools need {pools:g} CPUs at their minimum size (<modality>.pool.min_actors x num_cpus) and "
            f"the largest CPU stage {stage:g} more, but the cluster has {cluster_cpus:g}: lower pool.num_cpus / "
            f"min_actors or stage num_cpus, or add nodes")
    gpus = sum(m.pool.min_actors * m.pool.num_gpus for m in mods.values())
    if gpus > cluster_gpus + 1e-9:
        raise EmbeddingInputError(f"encoder pools need {gpus:g} GPUs at their minimum size "
                                  f"(pool.min_actors x num_gpus) but the cluster has {cluster_gpus:g}")


def run_embedding(cfg: EmbedConfig, break_lease: bool = False) -> dict:
    """Embed every item under ``cfg.items_uri`` into ``<output_uri>/<run_id>/`` and return the manifest.

    Rerunning the same run id resumes: items already in written parts are skipped, and a finished run
    whose manifest matches the input is returned as is. A run id keeps the identity it started with
    (:func:`run_identity`, in ``_RUN.json``): a rerun with other items or other encoder settings is
    refused, naming the keys that differ, rather than mixing two kinds of vectors in one run. One attempt
    writes a run at a time: once it has found the run unfinished it holds ``<run>/_LEASE.json``
    (:class:`~tessera.lease.RunLease`) until its manifest is written; ``break_lease`` takes over a lease
    whose holder looks live. A finished run is returned without a lease (read-only credentials do).

    Raises:
        EmbeddingInputError: no items table at ``items_uri``, null or repeated item ids, an items file
            without a source column, pools that cannot fit, another run's identity, a local ``output_uri``
            on a cluster of several nodes.
        EmbeddingIntegrityError: the parts do not hold every input item exactly once, or one modality's
            actors ran different weights (:class:`EncoderMismatchError`).
        LeaseHeldError: another attempt of the run is running.
        LeaseLostError: another attempt took the run over while this one ran (it had not renewed its
            lease for ``lease_ttl_s``, or was broken); this attempt stopped.
    """
    t0 = time.perf_counter()
    try:
        check_paths_for_cluster({"output_uri": cfg.output_uri}, {"items_uri": cfg.items_uri})
    except ConfigError as err:
        raise EmbeddingInputError(str(err)) from None
    if cfg.retry_failed_from == cfg.run_id:
        raise EmbeddingInputError(f"retry_failed_from is the run itself ({cfg.run_id!r}): a retry writes a new run "
                                  "beside the one it retries; give it another run_id")
    if sorted(cfg.retry_kinds) != sorted(MEDIA_ERROR_KINDS) and not cfg.retry_failed_from:  # a narrowed set
        raise EmbeddingInputError(f"retry_kinds is set ({', '.join(cfg.retry_kinds)}) but retry_failed_from is "
                                  "not: name the finished run whose failed items to embed again")
    storage = Storage(cfg.storage)
    run_uri = join_uri(cfg.output_uri, cfg.run_id)
    files = storage.list_files(cfg.items_uri, ".parquet")
    if not files and cfg.items_uri.endswith(".parquet") and storage.exists(cfg.items_uri):
        files = [cfg.items_uri]  # a single items file
    if not files:
        raise EmbeddingInputError(f"items_uri: no Parquet files under {cfg.items_uri}")
    n_input = storage.parquet_rows(files)
    identity = run_identity(cfg, files, n_input)
    # a finished run is read, not written: no lease (read-only credentials, two callers at once)
    if (finished := run_state(storage, run_uri, identity, n_input)[1]) is not None:
        return _checked_finished(cfg, run_uri, finished)
    lease = RunLease(storage, join_uri(run_uri, "_LEASE.json"), cfg.lease_ttl_s, what=run_uri,
                     break_lease=break_lease)
    try:
        lease.acquire()
    except FileNotFoundError as err:  # no such bucket
        raise EmbeddingInputError(f"output_uri: {err}") from None
    with lease:  # renewed while the run goes on, released at its end
        try:
            return _run_leased(cfg, storage, run_uri, lease, files, n_input, identity, t0)
        finally:
            clear_guard_marks()  # decode batches whose every attempt died (see map_guarded)


def _checked_finished(cfg: EmbedConfig, run_uri: str, finished: dict) -> dict:
    """A finished run, returned as it is; one asked to be a retry must be that retry."""
    try:
        check_finished_retry(finished, run_uri, cfg.retry_failed_from, cfg.retry_kinds, cfg.output_uri)
    except RetrySourceError as err:
        raise EmbeddingInputError(str(err)) from None
    return finished


def run_state(storage: Storage, run_uri: str, identity: dict, n_input: int,
              announce: bool = False) -> tuple[dict | None, dict | None]:
    """``(identity the run started with, its manifest if complete)``; either None when there is none.

    Raises:
        EmbeddingInputError: the run was started with another identity and holds parts or a manifest.
    """
    identity_uri, manifest_uri = join_uri(run_uri, "_RUN.json"), join_uri(run_uri, "_MANIFEST.json")
    started = storage.read_json(identity_uri) if storage.exists(identity_uri) else None
    if started is not None and (changed := identity_changes(started, identity)):
        if list_parts(storage, run_uri) or storage.exists(manifest_uri):
            raise EmbeddingInputError(
                f"{run_uri} was started with other settings ({', '.join(changed)} differ; see {identity_uri}): "
                f"use another run_id, or delete {run_uri}/ to redo this one")
        # an attempt that wrote nothing (say, it failed on a weights path, fixed since): nothing to mix with
        if announce:
            print(f"[embed] {run_uri} holds no parts yet: restarting it with the new settings "
                  f"({', '.join(changed)})", flush=True)
        started = None
    if storage.exists(manifest_uri):
        previous = storage.read_json(manifest_uri)
        # runs written before _RUN.json existed: the input's row count is all there is to compare
        if previous.get("complete") and (started is not None or previous.get("input", {}).get("items") == n_input):
            previous["reused"] = True
            return started, previous
    return started, None


def _run_leased(cfg: EmbedConfig, storage: Storage, run_uri: str, lease: RunLease, files: list[str],
                n_input: int, identity: dict, t0: float) -> dict:
    manifest_uri, identity_uri = join_uri(run_uri, "_MANIFEST.json"), join_uri(run_uri, "_RUN.json")
    # again, holding the lease: an attempt that held it before may have finished or started the run
    started, finished = run_state(storage, run_uri, identity, n_input, announce=True)
    if finished is not None:
        return _checked_finished(cfg, run_uri, finished)
    if storage.exists(join_uri(run_uri, MIXED_FILE)):  # a rerun would find every item done: one checksum
        raise EncoderMismatchError(f"{run_uri}: {storage.read_json(join_uri(run_uri, MIXED_FILE))['error']}; its "
                                   f"parts mix both: delete the run's folder, or embed into another run_id")
    # an earlier run's incomplete or outdated manifest, if any: this attempt replaces that version only
    started_manifest = storage.read_versioned(manifest_uri)[1] if storage.exists(manifest_uri) else None
    check_fits(cfg, *cluster_layout())
    check_weights(cfg, storage)
    check_item_ids(storage, files, cfg.read_num_cpus, columns=source_columns(cfg))
    modalities = cfg.modalities()
    try:  # a retry of another run's failed items: that run's other rows are copied in first
        seeded = prepare_retry(storage, run_uri, cfg.retry_failed_from, cfg.retry_kinds, cfg.output_uri, identity,
                               list(modalities), lease, lambda found: check_resumed_weights(cfg, storage, found),
                               cfg.read_num_cpus)
    except RetrySourceError as err:
        raise EmbeddingInputError(str(err)) from None
    if seeded is not None:
        print(f"[embed] retrying {seeded['items_retried']} failed items of {seeded['run']} "
              f"({', '.join(f'{k} {n}' for k, n in seeded['retried_by_kind'].items()) or 'none'}); "
              f"{seeded['items_copied']} copied as they were", flush=True)
    key = new_key()  # drawn per attempt: see tessera.embed.ids on the skip filter of a resumed run
    done, recorded = done_items(storage, run_uri, key, cfg.read_num_cpus)
    check_resumed_weights(cfg, storage, recorded)
    if started is None:
        lease.check()
        storage.write_json(identity_uri, identity)
    print(f"[embed] {n_input} items in {len(files)} files; {len(done)} already done in {run_uri}; "
          f"modalities: {', '.join(modalities)}", flush=True)
    seen: set[str] = set()  # encoder identities reported by the actors, through the writer
    written, written_parts = 0, set()
    if len(done) < n_input:
        lease.check()
        ds = build_dataset(cfg, files, done, key, run_uri, attempt=lease.token[:8])
        for row in ds.iter_rows():
            lease.check()
            written += int(row["rows"])
            written_parts.add(name_of(row["part"]))
            seen.update(json.loads(row["encoders"]))
    t_pipeline = time.perf_counter() - t0
    try:
        encoders = encoder_identities(cfg, storage, [json.loads(e) for e in seen])
    except EncoderMismatchError as err:
        _mark_mixed(storage, run_uri, lease, err)
        raise
    lease.check()
    parts = list_parts(storage, run_uri)
    counts = tally(storage, run_uri, list(modalities), cfg.read_num_cpus, parts=parts)
    superseded = settle_repeats(storage, run_uri, counts, written_parts)
    if superseded:
        gone = set(superseded)
        parts = [uri for uri in parts if uri not in gone]
        counts = tally(storage, run_uri, list(modalities), cfg.read_num_cpus, parts=parts)
    lease.check()  # parts another attempt wrote after taking the run over are not this run's duplicates
    try:
        check_parts_weights(counts.weights, encoders)
    except EncoderMismatchError as err:
        _mark_mixed(storage, run_uri, lease, err)
        raise
    if counts.distinct_ids != n_input or counts.duplicates:
        raise EmbeddingIntegrityError(
            f"{run_uri} holds {counts.distinct_ids} distinct items ({counts.duplicates} duplicate rows) for "
            f"{n_input} input items; the input changed under this run id, parts were lost"
            + (", or two attempts of the run ran at once (each wrote every item in parts of its own "
               "grouping: delete the run's folder and run it again)" if counts.duplicates else "")
            + ("" if not len(done) or counts.distinct_ids > n_input else
               "; or (odds ~ resumed x remaining / 2^64) an item was skipped as written because its id's 64-bit "
               "hash met a written one's: rerun, each attempt hashes with a new key"))
    for c in counts.per_modality.values():
        c["errors"] = c.pop("failed_by_kind")
    elapsed = time.perf_counter() - t0
    manifest = {
        "kind": "tessera.embeddings",
        "run_id": cfg.run_id,
        "identity": identity,
        "complete": True,
        "input": {"items_uri": cfg.items_uri, "items": n_input, "files": len(files)},
        "output": {"uri": run_uri, "parts": counts.parts, "rows": counts.rows,
                   "files": [name_of(p) for p in parts], "superseded_parts": [name_of(p) for p in superseded]},
        "encoders": encoders,
        "counts": counts.per_modality,
        "config": cfg.model_dump(mode="json", exclude={"storage"}),
        **({"retried_from": seeded} if seeded is not None else {}),
        "timings": {"pipeline_s": round(t_pipeline, 2), "total_s": round(elapsed, 2),
                    "items_written_this_attempt": written, "resumed_from": len(done),
                    "items_per_s": round(written / t_pipeline, 2) if written else None},
    }
    lease.confirm()
    _write_manifest(storage, manifest_uri, manifest, started_manifest)
    _delete_superseded(storage, superseded, lease)
    return manifest


def _mark_mixed(storage: Storage, run_uri: str, lease: RunLease, err: EncoderMismatchError) -> None:
    """``_MIXED.json`` beside the parts: no later attempt completes the run over them."""
    lease.check()
    storage.write_json(join_uri(run_uri, MIXED_FILE), {"error": str(err)})


def _write_manifest(storage: Storage, uri: str, manifest: dict, replacing: str | None) -> None:
    """Write the run's manifest only if it is still what this attempt found when it began (``replacing``:
    that manifest's version tag, None for none): an attempt that stalled past its lease cannot overwrite
    the manifest of the attempt that took the run over and finished it."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    written = storage.replace_if(uri, data, replacing) if replacing else storage.create_exclusive(uri, data)
    if written is None and storage.exists(uri) and storage.read_versioned(uri)[0] == data:
        written = "ours"  # the write landed but its answer was lost, and the retry was refused (timings make it unique)
    if written is None:
        raise LeaseLostError(f"{uri} was written by another attempt while this one ran (it took the run over); "
                             "this attempt stopped")


def _delete_superseded(storage: Storage, parts: list[str], lease: RunLease) -> None:
    """Delete the parts the manifest left out, while this attempt holds the lease (renewed before each).
    The run is complete either way: a part left behind is not in the manifest, so never read."""
    for uri in parts:
        try:
            lease.confirm()
            storage.delete(uri)
        except Exception as err:  # noqa: BLE001 - the manifest is written; a leftover part is harmless
            print(f"[embed] left {uri} in place (not part of the run): {err}", flush=True)
            return


def settle_repeats(storage: Storage, run_uri: str, counts: Tally, written_here: set[str]) -> list[str]:
    """The parts to leave out of the run when its tally found repeated ids: those whose every id is in a
    part kept (:func:`~tessera.embed.output.superseded_copies`), trying first the parts another attempt
    wrote (names not in ``written_here``): parts an attempt this one took over wrote after this one
    listed what was done, or parts left by an attempt that stopped before its manifest."""
    if not counts.duplicates or not counts.repeated_parts:
        return []
    if len(counts.repeated_parts) > MAX_PARTS_TO_SETTLE:
        print(f"[embed] {len(counts.repeated_parts)} parts of {run_uri} hold repeated ids: more than "
              f"{MAX_PARTS_TO_SETTLE}, not settled here", flush=True)
        return []
    suspects = sorted(counts.repeated_parts, key=lambda uri: (name_of(uri) in written_here, name_of(uri)))
    superseded = superseded_copies(storage, suspects)
    if superseded:
        print(f"[embed] {len(superseded)} part(s) of {run_uri} repeat items found in other parts (written by an "
              f"attempt this one took over, or left by one that stopped before its manifest): left out of "
              f"the run, deleted after its manifest", flush=True)
    return superseded


def error_rate(manifest: dict) -> float:
    """Failed modality inputs / present modality inputs, over all modalities."""
    failed = sum(c["failed"] for c in manifest["counts"].values())
    present = sum(c["input"] for c in manifest["counts"].values())
    return failed / present if present else 0.0
