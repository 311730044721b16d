"""Embedding the failed items of a finished run again, into a new run (``retry_failed_from``).

A run records a failed item with its error (``missing``, ``corrupt``, ...) and keeps it: rerunning the
same run id finds the item written and skips it. Once the objects are uploaded or repaired, a retry run
embeds only those items::

    python -m jobs.embed --config configs/embed.yaml --run-id demo-2 --retry-failed-from demo [--retry-kinds missing]

The new run begins with a copy of the finished run's parts, less the rows of items that failed one of
``retry_kinds`` in some modality (:func:`prepare_retry`): a part without such a row is copied byte for
byte under its own name; a part with some is written again without them (its other rows and its weights
metadata as they were, named by its remaining ids); a part of nothing but such rows is left out. The
pipeline then embeds what the copy lacks, exactly those items, every modality of each (the modalities
that had not failed are encoded again with the same weights). Everything else about the new run is an
ordinary run: its tally, manifest (``retried_from`` records the source and what was copied) and checks.

The finished run is read, never written: an index or a bundle built on it keeps what it was built on.
Both runs must have the same identity (``_RUN.json``: the items, the enabled modalities and every encoder
setting that changes the vectors or which items fail), since the copied rows and the new ones must be
vectors of one kind; a retry under other settings is refused naming the keys (embed a new run instead).

A retry killed halfway resumes like any run. Its settings (``_RUN.json``) and ``_SEEDED.json`` (the
source, a digest of the source's part names, the kinds) are written before the copy starts, and what was
copied once it is done: a resumed attempt copies from the same run with the same kinds and settings
(without the flags it goes on as begun; with others, or once the source was embedded again, it is
refused), a finished copy is not made again, and the items embedded before the kill are skipped. A
finished run named as a retry it is not (no retry, or of another run or kinds) is refused rather than
returned as it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tessera.embed.ids import map_files
from tessera.embed.output import MANIFEST, committed_parts, ids_digest, list_parts, name_of, part_name
from tessera.lease import RunLease
from tessera.storage import Storage, join_uri

SEEDED = "_SEEDED.json"  # in the new run: the source and kinds of its copy (before it), what it copied (after)
_SEED_ATTEMPT = "retry"  # in the names of the parts written again without their retried rows


class RetrySourceError(ValueError):
    """The run to retry cannot be retried: it is absent, unfinished, or of another identity."""


def source_run(storage: Storage, uri: str, identity: dict) -> dict:
    """The manifest of the finished run at ``uri``, checked against the identity of the run about to
    copy it.

    Raises:
        RetrySourceError: no finished run there, or one started with other settings (the keys named).
    """
    from tessera.embed.pipeline import identity_changes

    manifest_uri, identity_uri = join_uri(uri, MANIFEST), join_uri(uri, "_RUN.json")
    if not storage.exists(manifest_uri):
        raise RetrySourceError(f"retry_failed_from: {uri} has no manifest (no such run, or it did not finish: "
                               f"rerun it under its own run_id first)")
    manifest = storage.read_json(manifest_uri)
    if not manifest.get("complete"):
        raise RetrySourceError(f"retry_failed_from: {uri} is not complete (rerun it under its own run_id first)")
    if not storage.exists(identity_uri):
        raise RetrySourceError(f"retry_failed_from: {uri} has no _RUN.json (written before runs recorded their "
                               "settings): its vectors cannot be checked to be of this run's kind")
    if (manifest.get("output") or {}).get("files") is None:
        raise RetrySourceError(f"retry_failed_from: {uri}'s manifest does not list its parts (written by an older "
                               "Tessera): the parts to copy are not known; embed a new run instead")
    changed = identity_changes(storage.read_json(identity_uri), identity)
    if changed:
        raise RetrySourceError(f"retry_failed_from: {uri} was embedded with other settings ({', '.join(changed)} "
                               f"differ; see {identity_uri}): its rows cannot join this run's; embed the whole "
                               "catalog into a new run instead")
    return manifest


def retried_rows(table: pa.Table, modalities: list[str], kinds: list[str]) -> np.ndarray:
    """Boolean mask of the rows of a part whose error, in some modality, is of one of ``kinds``
    (an error reads ``"<kind>: <detail>"``)."""
    retry = np.zeros(table.num_rows, dtype=bool)
    wanted = pa.array(sorted(kinds), pa.string())
    for m in modalities:
        errors = pc.cast(table.column(f"{m}_error"), pa.string())
        kind = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)  # null where no error
        retry |= pc.fill_null(pc.is_in(kind, value_set=wanted), False).to_numpy(zero_copy_only=False)
    return retry


def _seed_part(uri: str, storage: Storage, run_uri: str, modalities: list[str], kinds: list[str]) -> dict:
    """Copy one part of the source run into ``run_uri``, less its retried rows; what it did."""
    table = storage.read_parquet(uri, [f"{m}_error" for m in modalities])
    retry = retried_rows(table, modalities, kinds)
    retried = int(retry.sum())
    by_kind: Counter = Counter()  # the retried errors, by modality and kind
    for m in modalities:
        for err in table.column(f"{m}_error").filter(pa.array(retry)).to_pylist():
            if err is not None and (kind := err.split(":", 1)[0]) in kinds:
                by_kind[f"{m}.{kind}"] += 1
    if not retried:
        storage.write_bytes(join_uri(run_uri, name_of(uri)), storage.read_bytes(uri))
        action = "copied"
    elif retried == table.num_rows:
        action = "left_out"
    else:
        kept = storage.read_parquet(uri).filter(pa.array(~retry))  # its schema metadata (the weights) stays
        storage.write_parquet(join_uri(run_uri, part_name(kept.column("item_id").to_pylist(), _SEED_ATTEMPT)), kept)
        action = "rewritten"
    return {"action": action, "rows": table.num_rows, "retried": retried, "by_kind": dict(by_kind)}


def source_weights(manifest: dict, manifest_uri: str) -> dict[str, dict[str, str]]:
    """The weights checksums a finished run's manifest records, per modality, in the form of
    :func:`~tessera.embed.output.merge_weights` (``{modality: {checksum: where found}}``)."""
    return {m: {enc["weights_checksum"]: manifest_uri} for m, enc in manifest.get("encoders", {}).items()
            if enc.get("weights_checksum")}


def prepare_retry(storage: Storage, run_uri: str, retry_from: str | None, kinds: list[str], output_uri: str,
                  identity: dict, modalities: list[str], lease: RunLease,
                  check_weights: Callable[[dict[str, dict[str, str]]], None], num_cpus: float = 0.25) -> dict | None:
    """Before a run lists what is done: copy the run ``retry_from`` (under ``output_uri``) into ``run_uri``,
    less the rows of items that failed one of ``kinds`` (see the module doc). Returns what was copied (also
    kept in ``<run_uri>/_SEEDED.json``), or None for a run that is no retry. Many parts are copied by Ray
    tasks (:func:`~tessera.embed.ids.map_files`).

    ``_SEEDED.json`` records the source and kinds before the first copy (``complete: false``) and what was
    copied after the last: every later attempt of the run copies from the same source with the same kinds
    (resumed without the flags, it goes on as begun), or is refused; a finished copy is not made again.
    ``check_weights`` is given the weights the source run's manifest records, before anything is written
    (it raises if the configured weights are no longer those).

    Raises:
        RetrySourceError: the source run is absent, unfinished or of another identity; the run was begun
            as a retry of another run or of other kinds; or it holds parts that are not the copy's.
    """
    marker = join_uri(run_uri, SEEDED)
    begun = storage.read_json(marker) if storage.exists(marker) else None
    if begun is not None:
        source = join_uri(output_uri, retry_from) if retry_from else None  # None: resumed without the flags
        if source is not None and (begun["run"], begun["kinds"]) != (source, sorted(kinds)):
            raise RetrySourceError(f"retry_failed_from: {run_uri} was begun as a retry of {begun['run']} (kinds "
                                   f"{', '.join(begun['kinds'])}), not of {source} (kinds {', '.join(sorted(kinds))})"
                                   f": resume it as it was begun, or use another run_id")
        if begun.get("complete"):
            return begun
        source_uri, kinds = begun["run"], begun["kinds"]
    elif retry_from:
        source_uri = join_uri(output_uri, retry_from)
    else:
        return None
    manifest = source_run(storage, source_uri, identity)
    check_weights(source_weights(manifest, join_uri(source_uri, MANIFEST)))
    parts = committed_parts(storage, source_uri, manifest)
    if absent := sorted({name_of(uri) for uri in parts} - {name_of(uri) for uri in list_parts(storage, source_uri)}):
        raise RetrySourceError(f"retry_failed_from: {source_uri} lacks {len(absent)} of the parts its manifest lists "
                               f"({absent[0]}, ...): it cannot be copied whole; embed a new run instead")
    source_digest = ids_digest(sorted(name_of(uri) for uri in parts))  # the source as this copy read it
    if begun is not None and begun.get("source_parts") != source_digest:
        raise RetrySourceError(f"retry_failed_from: {begun['run']} has other parts than when the copy into "
                               f"{run_uri} began (it was embedded again since): use another run_id")
    if begun is None:  # a run that holds parts already is no new run: the copy would join them
        if stray := list_parts(storage, run_uri):
            raise RetrySourceError(f"retry_failed_from: {run_uri} already holds parts ({name_of(stray[0])}, "
                                   f"{len(stray)} in all): a retry starts a new run; use another run_id")
        lease.check()
        # the run's settings are pinned before the copy: resumed under others, it is refused by the run's
        # own identity check (the copied rows and those embedded after must be of one kind)
        storage.write_json(join_uri(run_uri, "_RUN.json"), identity)
        storage.write_json(marker, {"run": source_uri, "kinds": sorted(kinds), "source_parts": source_digest,
                                    "complete": False})
    lease.check()
    done = map_files(_seed_part, parts, storage, run_uri, list(modalities), sorted(kinds), num_cpus=num_cpus)
    actions = Counter(d["action"] for d in done)
    by_kind: Counter = Counter()
    for d in done:
        by_kind.update(d["by_kind"])
    seeded = {"run": source_uri, "kinds": sorted(kinds), "source_parts": source_digest, "complete": True,
              "parts": len(parts),
              "parts_copied": actions["copied"], "parts_rewritten": actions["rewritten"],
              "parts_left_out": actions["left_out"],
              "items_copied": sum(d["rows"] - d["retried"] for d in done),
              "items_retried": sum(d["retried"] for d in done), "retried_by_kind": dict(sorted(by_kind.items()))}
    lease.check()
    storage.write_json(marker, seeded)
    return seeded


def check_finished_retry(manifest: dict, run_uri: str, retry_from: str | None, kinds: list[str],
                         output_uri: str) -> None:
    """A finished run asked to be a retry of ``retry_from`` must be that retry, with those kinds: a
    finished run is returned as it is, and would otherwise pass for a retry it never was.

    Raises:
        RetrySourceError: it is no retry, or a retry of another run or of other kinds."""
    if not retry_from:
        return
    done = manifest.get("retried_from") or {}
    wanted = (join_uri(output_uri, retry_from), sorted(kinds))
    if (done.get("run"), done.get("kinds")) != wanted:
        was = f"a retry of {done['run']} (kinds {', '.join(done['kinds'])})" if done else "no retry"
        raise RetrySourceError(f"retry_failed_from: {run_uri} is a finished run, {was}, not a retry of "
                               f"{wanted[0]} (kinds {', '.join(wanted[1])}): use another run_id")
