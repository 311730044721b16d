"""Saving shards to object storage (or a folder) and loading them back with verified checksums.

A saved shard is a folder ``<index>/shard-NNNN/`` holding::

    scann/...        the serialised ScaNN searcher (ScaNN's serialize(), paths relative), or
    vectors.npy      the normalised vectors of a brute-force shard
    ids.parquet      one string column ``item_id``: row i of the searcher is item ids[i]
    shard.json       ShardManifest: params, counts, the number of shards in the index, build
                     seconds, self-check recall, and the sha256 and size of every file above
                     (written last: it marks the shard complete)

Saving into a local folder replaces the shard folder as a whole: the new shard is written into a
hidden sibling folder, which is then swapped in, so files of an earlier attempt (say the ``scann/``
files of an AH shard rebuilt as brute force) never survive next to the new ones. On ``s3://`` the
files are written over in place and stale objects may remain under the prefix; they are never read:
loading downloads only the files ``shard.json`` lists (into a folder named after its checksum) and
checks that folder holds nothing else.

Loading downloads every listed file (s3://) or reads it in place (local folder), hashes it, and
raises :class:`IndexCorruptError` naming the shard and the file on any mismatch. Only listed files
are read; ScaNN's optional pickled ``scann_docids.pkl`` is refused, since ScaNN would unpickle it.

Example::

    manifest = save_shard(storage, "s3://bucket/index/v1", shard)
    same = load_shard(storage, "s3://bucket/index/v1/shard-0000")
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tessera.index.params import IndexConfig, ScannParams
from tessera.index.shard import ShardArtifact, build_shard
from tessera.storage import Storage, join_uri, parse_uri

SHARD_MANIFEST = "shard.json"
IDS_FILE = "ids.parquet"
VECTORS_FILE = "vectors.npy"
SCANN_DIR = "scann"
FORMAT_VERSION = 1
_CHUNK = 4 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
SHARD_DIR_NAME = re.compile(r"^shard-[0-9]{4,}$")
_FORBIDDEN = {"scann_docids.pkl"}


class IndexCorruptError(RuntimeError):
    """A saved shard does not match its manifest (checksum, size, missing file or bad content)."""

    def __init__(self, shard: str, file: str, problem: str):
        super().__init__(f"index shard {shard}, file {file}: {problem}")
        self.shard, self.file, self.problem = shard, file, problem


class FileEntry(BaseModel):
    """Checksum and size of one saved file."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    bytes: int


class ShardManifest(BaseModel):
    """What ``shard.json`` records about one shard; enough to load and search it without code defaults."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    shard_id: int
    name: str
    count: int
    dim: int
    params: ScannParams
    files: dict[str, FileEntry]
    build_seconds: float
    self_recall: float | None = None
    num_shards: int | None = Field(
        default=None, ge=1, description="shards in the whole index (None: not recorded, as in shards saved "
                                         "before the field existed)")


def shard_name(shard_id: int) -> str:
    """Folder name of a shard: ``shard-0003``."""
    return f"shard-{shard_id:04d}"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save_shard(storage: Storage, index_uri: str, shard: ShardArtifact,
               num_shards: int | None = None) -> ShardManifest:
    """Write one shard under ``<index_uri>/shard-NNNN/`` and return its manifest.

    In a local folder the shard folder is replaced as a whole (an earlier attempt's files go); on
    ``s3://`` the files are written over in place (see the module docstring).

    Args:
        storage: where to write (``s3://`` URIs or local paths).
        index_uri: the index version's root, e.g. ``s3://bucket/index/v3``.
        shard: a built (or loaded) shard.
        num_shards: shards in the whole index, recorded in ``shard.json`` so that a load without the
            index manifest can tell a missing shard; None records it as unknown.

    Returns:
        The :class:`ShardManifest` written to ``shard.json`` (the index manifest embeds it).

    Example::

        manifests = [save_shard(storage, uri, s, num_shards=len(shards)) for s in shards]
    """
    name = shard_name(shard.shard_id)
    if num_shards is not None and not 0 <= shard.shard_id < num_shards:
        raise ValueError(f"{name} cannot be part of an index of {num_shards} shards")
    shard_uri = join_uri(index_uri, name)
    if parse_uri(shard_uri).scheme == "file":
        return _save_local(Path(parse_uri(shard_uri).path), shard, num_shards)
    with tempfile.TemporaryDirectory(prefix="tessera-shard-") as tmp:
        root = Path(tmp)
        files = _write_shard_files(root, shard, name)
        for rel in files:
            storage.upload_file(root / rel, join_uri(shard_uri, rel))  # whole or not at all
    manifest = _shard_manifest(shard, name, files, num_shards)
    storage.write_bytes(join_uri(shard_uri, SHARD_MANIFEST), manifest_bytes(manifest), "application/json")
    return manifest


def _write_shard_files(root: Path, shard: ShardArtifact, name: str) -> dict[str, FileEntry]:
    """Serialise the shard's searcher (or vectors) and ids into the empty folder ``root``; their entries."""
    if shard.searcher is not None:
        (root / SCANN_DIR).mkdir()
        shard.searcher.serialize(str(root / SCANN_DIR), relative_path=True)
    else:
        np.save(root / VECTORS_FILE, shard.vectors, allow_pickle=False)
    pq.write_table(pa.table({"item_id": pa.array(shard.ids.tolist(), pa.string())}), root / IDS_FILE)
    files: dict[str, FileEntry] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.rsplit("/", 1)[-1] in _FORBIDDEN:
            raise RuntimeError(f"{name}: ScaNN wrote {rel}; shards must not carry pickled files")
        files[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    return files


def _shard_manifest(shard: ShardArtifact, name: str, files: dict[str, FileEntry],
                    num_shards: int | None) -> ShardManifest:
    return ShardManifest(shard_id=shard.shard_id, name=name, count=shard.count, dim=shard.dim,
                         params=shard.params, files=files, build_seconds=shard.build_seconds,
                         self_recall=shard.self_recall, num_shards=num_shards)


def _save_local(target: Path, shard: ShardArtifact, num_shards: int | None) -> ShardManifest:
    """Write the complete shard (``shard.json`` last) into a hidden sibling of ``target``, then swap it in.

    A crash while writing leaves ``target`` as it was (plus a hidden ``.shard-NNNN.partial-*`` folder,
    which no load reads); a crash between the two renames of the swap leaves ``target`` absent, which
    a load reports as a missing shard. Leftovers of earlier crashed saves are removed first.
    """
    name = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{name}.*"):
        if stale.is_dir() and stale.name.startswith((f".{name}.partial-", f".{name}.old-")):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f".{name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # (mkdir, not mkdtemp: the folder gets the umask's permissions, as before)
    try:
        files = _write_shard_files(staging, shard, name)
        manifest = _shard_manifest(shard, name, files, num_shards)
        (staging / SHARD_MANIFEST).write_bytes(manifest_bytes(manifest))
        if target.exists():
            retired = target.parent / f".{name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_and_save_shard(storage: Storage, index_uri: str, shard_id: int, ids, vectors,
                         config: IndexConfig | None = None, catalog_size: int | None = None,
                         tuning_queries=None, num_shards: int | None = None) -> ShardManifest:
    """Build one shard and save it (the index job's build task does the two apart, checking its lease
    between them: :func:`tessera.index_job.build.build_shard_task`).

    Returns only the (small, picklable) manifest: ScaNN searchers cannot cross process boundaries.

    Args:
        storage: where to write.
        index_uri: the index version's root.
        shard_id: which shard this is (from :func:`~tessera.index.sharding.assign_shards` order).
        ids, vectors: the shard's items, (N,) and (N, D).
        config: build settings.
        catalog_size: items over all shards.
        tuning_queries: extra real queries the build tunes on (see :func:`~tessera.index.shard.build_shard`).
        num_shards: shards in the whole index (recorded in ``shard.json``, see :func:`save_shard`).

    Example::

        parts = assign_shards(ids, 4)
        manifests = [build_and_save_shard(storage, uri, i, [ids[r] for r in rows], vecs[rows], num_shards=4)
                     for i, rows in enumerate(parts)]
    """
    shard = build_shard(ids, vectors, config, shard_id, catalog_size, tuning_queries)
    return save_shard(storage, index_uri, shard, num_shards)


def manifest_bytes(manifest: BaseModel) -> bytes:
    """The canonical JSON bytes a manifest is saved as (what its checksum is taken over)."""
    return manifest.model_dump_json(indent=2).encode()


def manifest_sha256(manifest: BaseModel) -> str:
    """Hex sha256 of :func:`manifest_bytes`: the checksum an index manifest records for a shard (or a
    per-modality index) manifest, and :func:`load_shard` verifies."""
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def load_shard(storage: Storage, shard_uri: str, cache_dir: str | os.PathLike | None = None,
               expected_manifest_sha256: str | None = None) -> ShardArtifact:
    """Load one shard, verifying every file against ``shard.json``.

    Args:
        storage: where to read.
        shard_uri: the shard folder (``.../shard-0000``), ``s3://`` or local.
        cache_dir: local folder to download ``s3://`` files into and keep, under
            ``shard-NNNN-<sha256 of shard.json>/`` (files already there with the right checksum are
            not downloaded again); None uses a temporary folder removed after
            loading (ScaNN holds the searcher in memory). Local shards are read in place.
        expected_manifest_sha256: checksum of ``shard.json`` from the index manifest, if known.

    Raises:
        IndexCorruptError: a file is missing, has the wrong size or checksum, or does not parse.

    Example::

        shard = load_shard(storage, "s3://bucket/index/v1/shard-0002", cache_dir="/var/cache/tessera")
    """
    manifest, digest = _read_manifest(storage, shard_uri, expected_manifest_sha256)
    name = manifest.name
    if parse_uri(shard_uri).scheme == "file":
        root = Path(parse_uri(shard_uri).path)
        for rel, entry in manifest.files.items():
            _verify_local(root / rel, entry, name, rel)
        _refuse_unlisted(root, manifest, name)
        return _materialise(root, manifest)
    if cache_dir is not None:
        # Content-addressed: another version's shard of the same name never shares this folder.
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        root = cache / f"{name}-{digest[:16]}"
        _download_all(storage, shard_uri, root, manifest, cache)
        return _materialise(root, manifest)
    with tempfile.TemporaryDirectory(prefix="tessera-index-") as tmp:
        _download_all(storage, shard_uri, Path(tmp) / name, manifest, Path(tmp))
        return _materialise(Path(tmp) / name, manifest)


def read_shard_manifest(storage: Storage, shard_uri: str, expected_sha256: str | None = None) -> ShardManifest:
    """Read and validate ``shard.json`` (and its checksum when the index manifest gives one)."""
    return _read_manifest(storage, shard_uri, expected_sha256)[0]


def read_shard_manifest_sha256(storage: Storage, shard_uri: str) -> tuple[ShardManifest, str]:
    """:func:`read_shard_manifest` and the sha256 of the bytes read: pass it to :func:`load_shard` as
    ``expected_manifest_sha256`` so the shard loaded is the one whose manifest was inspected."""
    return _read_manifest(storage, shard_uri, None)


def _read_manifest(storage: Storage, shard_uri: str, expected_sha256: str | None) -> tuple[ShardManifest, str]:
    name = shard_uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        raw = storage.read_bytes(join_uri(shard_uri, SHARD_MANIFEST))
    except FileNotFoundError:
        raise IndexCorruptError(name, SHARD_MANIFEST, "missing (the shard was never completely written)") from None
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise IndexCorruptError(name, SHARD_MANIFEST, "sha256 does not match the index manifest")
    try:
        manifest = ShardManifest.model_validate_json(raw)
    except ValidationError as err:
        raise IndexCorruptError(name, SHARD_MANIFEST, f"invalid manifest: {err.error_count()} errors") from None
    if manifest.name != name or manifest.name != shard_name(manifest.shard_id):
        raise IndexCorruptError(name, SHARD_MANIFEST, f"describes {manifest.name} (shard {manifest.shard_id})")
    if manifest.num_shards is not None and manifest.shard_id >= manifest.num_shards:
        raise IndexCorruptError(name, SHARD_MANIFEST, f"shard {manifest.shard_id} of an index of "
                                                      f"{manifest.num_shards} shards")
    for rel in manifest.files:
        if not _SAFE_NAME.match(rel) or ".." in rel.split("/") or rel.rsplit("/", 1)[-1] in _FORBIDDEN:
            raise IndexCorruptError(name, rel, "file name not allowed in a shard")
    # the files the loader reads must be listed (so verified): an unlisted one would be read unchecked
    listed, exact = set(manifest.files), manifest.params.mode == "brute_force"
    missing = [rel for rel in (IDS_FILE, VECTORS_FILE if exact else None) if rel and rel not in listed]
    if not exact and not any(rel.startswith(f"{SCANN_DIR}/") for rel in listed):
        missing.append(f"{SCANN_DIR}/*")
    if missing:
        raise IndexCorruptError(name, SHARD_MANIFEST, f"does not list {', '.join(missing)}, which the loader reads")
    return manifest, digest


def _verify_local(path: Path, entry: FileEntry, shard: str, rel: str) -> None:
    if not path.is_file():
        raise IndexCorruptError(shard, rel, f"missing ({path})")
    size = path.stat().st_size
    if size != entry.bytes:
        raise IndexCorruptError(shard, rel, f"size {size} bytes, manifest says {entry.bytes}")
    got = sha256_file(path)
    if got != entry.sha256:
        raise IndexCorruptError(shard, rel, f"sha256 mismatch: manifest {entry.sha256[:16]}..., file {got[:16]}...")


def _refuse_unlisted(root: Path, manifest: ShardManifest, shard: str) -> None:
    """ScaNN's loader reads whatever its folder holds (a pickle included): it must hold only listed files."""
    scann_dir = root / SCANN_DIR
    if scann_dir.is_dir():
        for path in scann_dir.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in manifest.files:
                raise IndexCorruptError(shard, rel, "file not listed in the shard manifest")


def _download_all(storage: Storage, shard_uri: str, root: Path, manifest: ShardManifest, scratch: Path) -> None:
    """Download every listed file into ``root``, hashing on the way; partial files live in ``scratch``."""
    for rel, entry in manifest.files.items():
        target = root / rel
        if target.is_file() and target.stat().st_size == entry.bytes and sha256_file(target) == entry.sha256:
            continue  # already cached and intact
        target.parent.mkdir(parents=True, exist_ok=True)
        fs, path = storage.filesystem(join_uri(shard_uri, rel))
        digest, size = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=scratch, prefix=".partial-", delete=False) as dst:
            partial = Path(dst.name)
        try:
            with fs.open_input_stream(path, compression=None) as src, open(partial, "wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size != entry.bytes:
                raise IndexCorruptError(manifest.name, rel, f"size {size} bytes, manifest says {entry.bytes}")
            if digest.hexdigest() != entry.sha256:
                raise IndexCorruptError(manifest.name, rel, f"sha256 mismatch: manifest {entry.sha256[:16]}..., "
                                                            f"downloaded {digest.hexdigest()[:16]}...")
            os.replace(partial, target)
        except FileNotFoundError:
            raise IndexCorruptError(manifest.name, rel, "missing from storage") from None
        finally:
            partial.unlink(missing_ok=True)  # no-op once moved into place
    _refuse_unlisted(root, manifest, manifest.name)


def _materialise(root: Path, manifest: ShardManifest) -> ShardArtifact:
    """Build the in-memory shard from verified files in ``root``."""
    name = manifest.name
    try:
        table = pq.read_table(root / IDS_FILE)
    except (OSError, pa.ArrowException) as err:
        raise IndexCorruptError(name, IDS_FILE, f"unreadable: {err}") from None
    if table.column_names != ["item_id"] or not pa.types.is_string(table.schema.field(0).type) \
            or table.num_rows != manifest.count or table.column(0).null_count:
        raise IndexCorruptError(name, IDS_FILE, f"expected {manifest.count} non-null string item_id values")
    ids = np.asarray(table.column(0).to_pylist(), dtype=object)
    common = dict(shard_id=manifest.shard_id, ids=ids, params=manifest.params,
                  build_seconds=manifest.build_seconds, self_recall=manifest.self_recall)
    if manifest.params.mode == "brute_force":
        try:
            vectors = np.load(root / VECTORS_FILE, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexCorruptError(name, VECTORS_FILE, f"unreadable: {err}") from None
        if vectors.dtype != np.float32 or vectors.shape != (manifest.count, manifest.dim):
            raise IndexCorruptError(name, VECTORS_FILE, f"shape {vectors.shape} {vectors.dtype}, "
                                                        f"expected ({manifest.count}, {manifest.dim}) float32")
        return ShardArtifact(vectors=vectors, **common)
    from scann.scann_ops.py import scann_ops_pybind

    try:
        searcher = scann_ops_pybind.load_searcher(str(root / SCANN_DIR), assets_backcompat_shim=False)
    except (RuntimeError, ValueError) as err:
        raise IndexCorruptError(name, SCANN_DIR, f"ScaNN could not load the searcher: {err}") from None
    if searcher.size() != manifest.count:
        raise IndexCorruptError(name, SCANN_DIR, f"searcher holds {searcher.size()} points, manifest says "
                                                 f"{manifest.count}")
    return ShardArtifact(searcher=searcher, **common)
