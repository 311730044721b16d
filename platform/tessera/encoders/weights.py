"""Where encoder weights come from: a local folder or an ``s3://`` prefix, cached once per node.

A weights location is a *folder* in the layout the model's own library reads (a Hugging Face
``save_pretrained`` folder, or a torchvision ``config.json`` + state_dict). Local folders are used in
place. An ``s3://`` prefix is listed and downloaded into ``~/.cache/tessera/weights/<key>/`` where the
key covers the URI and the listing (names, sizes, modification times), so a changed upload is a new
key. Downloads go to a temporary folder renamed into place under an exclusive file lock: concurrent
encoder actors on one node download once and never see a half-written folder. A folder is cached only
if every file read back its listed size and the prefix lists the same after the download: files
replaced while they were read (an upload in progress) are downloaded again, from a new listing.

:class:`CheckpointFiles` reads a folder's small configuration files, from disk or straight from the
prefix: the encoders parse their configuration through it, and the embedding job's driver checks that
configuration with the encoders' own code before any work, without downloading the weights.

Example::

    local = resolve_weights("s3://tessera-demo/models/encoders/image-resnet18-seeded", Storage())
    model_dir = local.path
    checksum = weights_checksum(model_dir)   # "sha256:…", the same for the S3 copy and the original
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from tessera.storage import Storage, join_uri, parse_uri

CACHE_DIR_ENV = "TESSERA_WEIGHTS_CACHE"
# Documentation and manifests describe the weights; they are not part of them.
NON_WEIGHT_FILES = ("README.md", ".gitattributes", "_MANIFEST.json")
_CHUNK = 8 << 20


def default_cache_dir() -> Path:
    """``$TESSERA_WEIGHTS_CACHE`` if set, else ``~/.cache/tessera/weights``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "tessera" / "weights")


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights folder on local disk.

    Args:
        path: the local folder.
        source: the URI or path it was resolved from.
        fetched: True when this call downloaded it (False: local folder, or already cached).
    """

    path: Path
    source: str
    fetched: bool


def resolve_weights(uri: str, storage: Storage | None = None, cache_dir: str | os.PathLike | None = None,
                    patterns: tuple[str, ...] | None = None) -> ResolvedWeights:
    """Return a local folder holding the weights at ``uri``, downloading an ``s3://`` prefix once.

    Args:
        uri: a local folder (plain path or ``file://``) or an ``s3://bucket/prefix``.
        storage: how to reach object storage (default: ``Storage()`` from the environment).
        cache_dir: where downloads are kept (default: :func:`default_cache_dir`).
        patterns: download only files whose relative path matches one of these globs (e.g. the
            tokenizer and preprocessing configs for a CPU-only preprocessing task); ignored for
            local folders.

    Raises:
        FileNotFoundError: the folder or prefix does not exist or holds no files.
        WeightsChangedError: the prefix changed during each of ``DOWNLOAD_ATTEMPTS`` downloads.
    """
    loc = parse_uri(uri)
    if loc.scheme == "file":
        path = Path(loc.path)
        if not path.is_dir():
            raise FileNotFoundError(f"weights folder {path} does not exist")
        return ResolvedWeights(path, uri, fetched=False)
    storage = storage or Storage()
    fs, root = storage.filesystem(uri)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    changed = None
    for _ in range(DOWNLOAD_ATTEMPTS):
        listing = storage.retrying_io(f"LIST {uri}", lambda: _list_remote(fs, root, patterns))
        if not listing:
            raise FileNotFoundError(f"no weight files under {uri}" + (f" matching {patterns}" if patterns else ""))
        key = _cache_key(uri, listing, patterns)
        final = cache / key
        if final.is_dir():
            return ResolvedWeights(final, uri, fetched=False)
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if final.is_dir():  # another process on this node finished while we waited
                return ResolvedWeights(final, uri, fetched=False)
            tmp = cache / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                changed = _download_listing(storage, fs, root, listing, tmp, patterns)
                if changed is None:
                    os.rename(tmp, final)
                    return ResolvedWeights(final, uri, fetched=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # only our own temporary folder
    raise WeightsChangedError(f"the weights under {uri} changed while they were downloaded, {DOWNLOAD_ATTEMPTS} times "
                              f"({changed}); nothing was cached: load them again once the upload is complete")


class WeightsChangedError(RuntimeError):
    """An ``s3://`` weights prefix kept changing while it was downloaded (an upload still in progress)."""


DOWNLOAD_ATTEMPTS = 3


def _download_listing(storage: Storage, fs: pafs.FileSystem, root: str, listing: list[tuple[str, int, int]],
                      tmp: Path, patterns: tuple[str, ...] | None) -> str | None:
    """Download every listed file into ``tmp``; None when the copy is the listing's, else what changed: a
    file that read another size than listed, or a listing that differs after the download (a file
    replaced, added or removed meanwhile; sizes and modification times are compared)."""
    for rel, size, _mtime in listing:
        src = f"{root.rstrip('/')}/{rel}"
        try:
            got = storage.retrying_io(f"GET {src}", lambda src=src, rel=rel: _download(fs, src, tmp / rel))
        except FileNotFoundError:
            return f"{rel}: removed after the listing"
        if got != size:
            return f"{rel}: listed {size} bytes, read {got}"
    after = storage.retrying_io(f"LIST {root}", lambda: _list_remote(fs, root, patterns))
    if after != listing:
        diff = sorted({e[0] for e in set(after) ^ set(listing)})
        return "files " + ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "") + " changed in the listing"
    return None


def _list_remote(fs: pafs.FileSystem, root: str, patterns: tuple[str, ...] | None) -> list[tuple[str, int, int]]:
    root = root.rstrip("/")
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) + 1:]
        if patterns and not any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        mtime = info.mtime_ns if info.mtime_ns is not None else -1
        out.append((rel, info.size, mtime))
    return sorted(out)


def _cache_key(uri: str, listing: list[tuple[str, int, int]], patterns: tuple[str, ...] | None) -> str:
    digest = hashlib.sha256(json.dumps([uri, listing, list(patterns or ())]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.removeprefix("s3://").rstrip("/"))[-80:]
    return f"{slug}-{digest}"


def _download(fs: pafs.FileSystem, src: str, dst: Path) -> int:
    """Copy ``src`` to ``dst``; returns the bytes written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    # compression=None: pyarrow would decompress a .gz / .zst / .bz2 file while reading it (detect)
    with fs.open_input_stream(src, compression=None) as stream, open(dst, "wb") as out:
        shutil.copyfileobj(stream, out, _CHUNK)
        return out.tell()


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The files that make up the weights in ``folder`` (sorted), leaving out docs and manifests."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.name not in NON_WEIGHT_FILES and not p.name.startswith(".tmp"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_checksum(folder: str | os.PathLike) -> str:
    """A stable ``sha256:<hex>`` over every weight file's relative path and content.

    Independent of where the folder lives (a local original and its downloaded S3 copy match) and
    of file modification times; README / manifest files are left out.
    """
    root = Path(folder)
    h = hashlib.sha256()
    for path in weight_files(root):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def upload_folder(folder: str | os.PathLike, dest_uri: str, storage: Storage) -> list[str]:
    """Copy every file of a local folder to ``dest_uri`` (same relative layout); returns the URIs."""
    root = Path(folder)
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        uri = join_uri(dest_uri, path.relative_to(root).as_posix())
        storage.upload_file(path, uri)  # streamed from disk: checkpoints can be gigabytes
        written.append(uri)
    return written


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class CheckpointFiles:
    """The small configuration files of a weights folder, read one at a time, never the weights: from a
    local folder (an encoder, once :func:`resolve_weights` has put the folder on disk), or straight from
    an ``s3://`` prefix (the embedding job's driver, which checks an encoder's configuration before any
    work and downloads nothing).

    Args:
        location: a local folder (plain path or ``file://``) or an ``s3://`` prefix.
        storage: how to reach object storage (default: from the environment); unused for a folder.

    Example::

        files = CheckpointFiles("s3://tessera-demo/models/encoders/image-resnet18-seeded", Storage())
        files.json("preprocessor_config.json")   # {"size": {...}, ...}, or None when there is no such file
        files.where("config.json")               # "s3://tessera-demo/.../config.json", for messages
    """

    def __init__(self, location: str | os.PathLike, storage: Storage | None = None):
        self.location = str(location)
        self._storage = storage

    def where(self, name: str) -> str:
        """The file ``name`` (a path relative to the folder) as messages name it."""
        return join_uri(self.location, name)

    def read(self, name: str) -> bytes | None:
        """The bytes of the file ``name``, or None when there is no such file (or no regular file)."""
        if self._storage is None:  # a local folder is read as a file; credentials only ever resolve for S3
            self._storage = Storage()
        try:
            return self._storage.read_bytes(self.where(name))
        except FileNotFoundError:
            return None

    def json(self, name: str, kind: type = dict):
        """The file ``name`` parsed as JSON; None when there is no such file (or it holds ``null``).

        Raises:
            ValueError: it is not UTF-8 JSON, or its top level is not a ``kind`` (an object; ``list``
                for ``modules.json``). The message names the file.
        """
        data = self.read(name)
        if data is None:
            return None
        try:
            value = json.loads(data.decode("utf-8"))
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError alike
            raise ValueError(f"{self.where(name)} is not valid JSON: {err}") from None
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{self.where(name)} holds a JSON {_JSON_TYPES.get(type(value), type(value).__name__)} "
                             f"at its top level, not an {_JSON_TYPES[kind]}")
        return value


def pretrained_config(files: CheckpointFiles):
    """``config.json`` read as transformers' ``AutoConfig`` reads it, the first thing
    ``AutoModel.from_pretrained`` does with a folder (no weights are read): a ``PretrainedConfig``, or
    None for a folder that brings its own config class (``auto_map``), which is left to the loading.

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
        ValueError: it is not a JSON object, names no ``model_type`` or one this version of
            transformers does not know, or holds values its config class refuses (AutoConfig's own
            refusals); the message names the file.
    """
    name = "config.json"
    config = files.json(name)
    if config is None:
        raise FileNotFoundError(f"{files.location} has no {name}")
    if "AutoConfig" in config.get("auto_map", ()):
        return None
    import transformers  # here, not at import: only the checks and the encoding side need it

    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(f"{files.where(name)} names no model_type: transformers cannot tell which model it holds")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{files.where(name)}: model_type {model_type!r} is not one transformers "
                         f"{transformers.__version__} knows")
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{files.where(name)}: {err}") from err
