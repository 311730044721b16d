"""One way to address data: ``s3://bucket/key`` URIs and local paths (plain or ``file://``).

:class:`Storage` hands out pyarrow filesystems (for Ray Data and Parquet) and boto3 clients (for
single objects). Both retry transient errors through the libraries' own retry settings
(``AwsStandardS3RetryStrategy`` for pyarrow, botocore's ``standard`` retry mode for boto3). botocore's
attempts span a few seconds only (its standard mode backs off from 50 ms) and stop altogether once the
client's retry quota, shared by every thread of the process, is spent, which a pool of fetch threads
failing together does within a second; so single-object reads are also retried by :class:`Storage`
itself, for ``retry_window_s``, to ride out a store restart.

Credentials are resolved where the code runs, never stored in the config or pickled with it:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (with ``AWS_SESSION_TOKEN`` for temporary credentials:
SSO, an assumed role, CI OIDC) from the environment first, then the JSON file named
by ``credentials_file`` (or ``TESSERA_S3_CREDENTIALS_FILE``), then the AWS default chain (instance
roles on a real cluster). The endpoint comes from config, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``; the region from config, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. (A pyarrow
filesystem handed out here pickles with the keys of a credentials file, not with environment ones:
prefer the environment, or instance roles, where filesystems cross processes, as Ray Train's does.)

Example::

    store = Storage(StorageConfig())
    store.write_bytes("s3://tessera-demo/hello.txt", b"hi")
    fs, path = store.filesystem("s3://tessera-demo/corpus/items/")
    table = pyarrow.parquet.read_table(path, filesystem=fs)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import Field

from tessera.config import TesseraConfig

CREDENTIALS_FILE_ENV = "TESSERA_S3_CREDENTIALS_FILE"
_THROTTLING_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                               "TooManyRequestsException"})
logger = logging.getLogger(__name__)


class StorageConfig(TesseraConfig):
    """Where object storage is and how hard to retry.

    Args:
        endpoint_url: S3 endpoint (``http://127.0.0.1:8333`` for the embedded store); None means the
            environment's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself.
        region: S3 region; None means ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``.
        credentials_file: JSON file with ``access_key_id``, ``secret_access_key`` and optionally
            ``session_token`` (used only when the standard AWS environment variables are not set).
        max_attempts: total attempts per request, retries included, for transient errors.
        retry_window_s: how long a single-object read (:meth:`Storage.read_bytes`) keeps being retried,
            after the client's own attempts, while the store is unreachable, cuts a response short, answers
            5xx or throttles. pyarrow's 8 attempts span about 20-60 s (random backoff up to 20 s each).
    """

    endpoint_url: str | None = None
    region: str | None = None
    credentials_file: str | None = None
    max_attempts: int = Field(default=8, ge=1, le=50)
    retry_window_s: float = Field(default=120.0, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=120.0, gt=0)


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``"s3"`` or ``"file"``; ``path`` is ``bucket/key`` or a local path."""

    scheme: str
    path: str

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) == 2 else ""

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path


def parse_uri(uri: str) -> Location:
    """Parse ``s3://bucket/key``, ``file:///abs/path`` or a plain local path."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a storage URI or path, got {uri!r}")
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        if not rest or rest.startswith("/"):
            raise ValueError(f"S3 URI {uri!r} has no bucket")
        return Location("s3", rest)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):  # file://data/out is host "data", path /out
            raise ValueError(f"file URI {uri!r} names the host {parsed.netloc!r}: write a local folder as "
                             f"file:///absolute/path or as a plain path (relative paths are plain: "
                             f"{parsed.netloc}{parsed.path})")
        return Location("file", os.path.abspath(parsed.path))
    if "://" in uri or re.match(r"(?i)(s3[an]?|file):", uri):  # S3://, s3a://, and s3:/b/k (a slash short)
        raise ValueError(f"unsupported URI scheme in {uri!r}: use s3://bucket/key or a local path")
    return Location("file", os.path.abspath(uri))


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI with single slashes: ``join_uri("s3://b/x/", "y")`` -> ``s3://b/x/y``."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


@dataclass(frozen=True)
class _Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    from_env: bool = False  # the standard AWS variables: every process's AWS SDK reads them itself

    def __repr__(self) -> str:  # never print secrets
        return "_Credentials(<redacted>)"


class Storage:
    """Filesystems and clients for the URIs Tessera reads and writes.

    Cheap to construct and safe to pickle across the Ray boundary: it carries only the config;
    credentials and clients are created lazily in the process that uses them.
    """

    def __init__(self, config: StorageConfig | None = None):
        self.config = config or StorageConfig()

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def __repr__(self) -> str:
        return f"Storage(endpoint={self.endpoint_url!r}, region={self.region!r})"

    # --- resolution -------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str | None:
        return (self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)

    @property
    def region(self) -> str:
        return (self.config.region or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")

    def _credentials(self) -> _Credentials | None:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            return _Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN") or None, from_env=True)
        path = self.config.credentials_file or os.environ.get(CREDENTIALS_FILE_ENV)
        if path:
            try:
                data = json.loads(Path(path).read_text())
                return _Credentials(data["access_key_id"], data["secret_access_key"], data.get("session_token"))
            except KeyError as err:
                raise RuntimeError(f"S3 credentials file {path} has no {err.args[0]!r}") from None
            except (OSError, ValueError, TypeError) as err:
                raise RuntimeError(f"cannot read S3 credentials from {path}: {type(err).__name__}") from None
        return None

    # --- handles ----------------------------------------------------------------------------
    def _handle_key(self) -> tuple:
        creds = self._credentials()
        c = self.config
        return (self.endpoint_url, self.region, creds, c.max_attempts, c.connect_timeout_s, c.request_timeout_s)

    def s3_filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem for this store, shared by every thread of the process."""
        key = self._handle_key()
        with _HANDLES_LOCK:
            fs = _FILESYSTEMS.get(key)
            if fs is None:
                fs = _FILESYSTEMS[key] = _make_filesystem(*key)
        return fs

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """Return ``(pyarrow filesystem, path within it)`` for a URI or local path."""
        loc = parse_uri(uri)
        if loc.scheme == "s3":
            return self.s3_filesystem(), loc.path
        return pafs.LocalFileSystem(), loc.path

    def client(self):
        """A boto3 S3 client (path-style addressing, standard retries), shared by every thread of the
        process: boto3 clients are thread-safe and cost ~0.1 s of CPU each to create."""
        key = self._handle_key()
        with _HANDLES_LOCK:
            client = _CLIENTS.get(key)
            if client is None:
                client = _CLIENTS[key] = _make_client(*key)
        return client

    # --- single objects ---------------------------------------------------------------------
    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """Read a whole object.

        Raises:
            FileNotFoundError: the object (or its bucket) is absent, or ``uri`` names no object (no key).
            PermissionError: the store refuses to hand it over (403: access denied, an archived object's
                ``InvalidObjectState``); on S3 a missing key also reads as 403 when the caller may not
                list the bucket.
            ValueError: it is larger than ``max_bytes``.
        """
        loc = parse_uri(uri)
        if loc.scheme == "s3" and not loc.key:
            raise FileNotFoundError(f"{uri} names a bucket, not an object")
        if loc.scheme == "file":
            p = Path(loc.path)
            info = p.stat()
            if not stat.S_ISREG(info.st_mode):  # a device, FIFO or folder: its size says nothing (/dev/zero)
                raise FileNotFoundError(f"{uri} is not a regular file")
            if max_bytes is not None and info.st_size > max_bytes:
                raise ValueError(f"{uri} is {info.st_size} bytes, over the limit of {max_bytes}")
            with open(p, "rb") as f:  # at most one byte over the limit: a file growing meanwhile is caught
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                raise ValueError(f"{uri} is over the limit of {max_bytes} bytes")
            return data
        from botocore.exceptions import ClientError

        def get() -> bytes:
            try:
                resp = self.client().get_object(Bucket=loc.bucket, Key=loc.key)
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise FileNotFoundError(uri) from None
                if code in ("AccessDenied", "403", "InvalidObjectState", "AllAccessDisabled"):
                    raise PermissionError(f"{uri}: {code}") from None
                raise
            size = resp.get("ContentLength")
            if max_bytes is not None and size is not None and size > max_bytes:
                resp["Body"].close()
                raise ValueError(f"{uri} is {size} bytes, over the limit of {max_bytes}")
            return resp["Body"].read()  # not covered by botocore's retries: a body cut short raises here

        return self._retrying(f"GET {uri}", get)

    def _retrying(self, what: str, call):
        """``call()``, retried while it raises a transient boto3 error (see :func:`_transient`) until
        ``retry_window_s`` has passed since its first failure: jittered backoff from 0.5 s doubling up to
        8 s; each retry is logged as a warning. Other errors are raised at once."""
        from botocore.exceptions import BotoCoreError, ClientError

        return self._retry_loop(what, call, (BotoCoreError, ClientError), _transient)

    def retrying_io(self, what: str, call):
        """``call()`` doing pyarrow S3 I/O (writes, listings, downloads), retried like :meth:`read_bytes`
        while it raises an ``OSError`` that may pass (the store unreachable or answering 5xx; not a
        missing object or a refused request) for ``retry_window_s``: a store restart while a part is
        written or a new worker fetches its model's config no longer fails the job."""
        return self._retry_loop(what, call, (OSError,), _transient_io)

    def _retry_loop(self, what: str, call, errors: tuple[type[BaseException], ...], transient):
        first_failure, attempt = None, 0
        while True:
            try:
                return call()
            except errors as err:
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                left = self.config.retry_window_s - (now - first_failure)
                if not transient(err) or left <= 0:
                    raise
                attempt += 1
                delay = min(left, random.uniform(0.5, 1.0) * min(8.0, 0.5 * 2 ** (attempt - 1)))
                logger.warning("storage: %s failed (%s), retry %d in %.1fs (retrying for %.0fs more)",
                               what, type(err).__name__, attempt, delay, left)
                time.sleep(delay)

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None, *, atomic: bool = True) -> None:
        """Write a whole object (a local file: written aside, then renamed into place).

        On S3, ``atomic`` (the default) sends it as one PutObject through boto3, retried like
        :meth:`read_bytes`: a writer killed or interrupted mid-request leaves no object, never a short or
        empty one. pyarrow's output stream commits whatever it holds when it is closed, and Python closes
        it while unwinding an interrupt: an embedding worker stopped by Ray's SIGTERM (its job's driver
        killed) left a 0-byte part this way, which no later attempt could read. ``atomic=False`` writes
        through pyarrow's stream instead (its C++ client releases the GIL: ~1.7x the puts/s of boto3 from
        a thread pool), for bulk writes whose rerun rewrites them anyway.
        """
        loc = parse_uri(uri)
        if loc.scheme == "file":
            _replace_local(Path(loc.path), lambda tmp: tmp.write_bytes(data))
            return
        if not atomic:
            metadata = {"Content-Type": content_type} if content_type else {}
            with self.s3_filesystem().open_output_stream(loc.path, metadata=metadata) as out:
                out.write(data)
            return
        extra = {"ContentType": content_type} if content_type else {}
        self._retrying(f"PUT {uri}", lambda: self.client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data,
                                                                      **extra))

    def upload_file(self, local: str | os.PathLike, uri: str, content_type: str | None = None) -> None:
        """Copy a local file to ``uri``, whole or not at all, without holding it in memory.

        On S3 through boto3's managed transfer: one PutObject, or above 64 MiB a multipart upload, whose
        object exists only once the upload completes (a writer stopped midway leaves none; boto3 aborts
        the upload when it raises), retried like :meth:`read_bytes`. A local target is written aside and
        renamed into place."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            import shutil

            _replace_local(Path(loc.path), lambda tmp: shutil.copyfile(local, tmp))
            return
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
        extra = {"ContentType": content_type} if content_type else None

        def upload() -> None:
            try:
                self.client().upload_file(str(local), loc.bucket, loc.key, ExtraArgs=extra, Config=config)
            except S3UploadFailedError as err:  # boto3 wraps the S3 error: unwrapped, a 5xx is retried
                raise (err.__context__ or err) from None

        self._retrying(f"upload {uri}", upload)

    def read_parquet(self, uri: str, columns: list[str] | None = None):
        """A Parquet object (or local file) as a pyarrow table of ``columns`` (None: all), the read
        retried like :meth:`retrying_io`'s."""
        import pyarrow.parquet as pq

        fs, path = self.filesystem(uri)
        return self.retrying_io(f"read {uri}", lambda: pq.read_table(path, filesystem=fs, columns=columns))

    def write_parquet(self, uri: str, table, compression: str = "zstd") -> None:
        """Write a pyarrow table as one Parquet object, whole or not at all: encoded in memory, then
        :meth:`write_bytes` (one PutObject; a local file renamed into place)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression=compression)
        self.write_bytes(uri, buf.getvalue().to_pybytes())

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def delete(self, uri: str) -> None:
        """Delete one object (or local file); nothing happens if it is not there."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            Path(loc.path).unlink(missing_ok=True)
            return
        self._retrying(f"DELETE {uri}", lambda: self.client().delete_object(Bucket=loc.bucket, Key=loc.key))

    # --- compare-and-swap on one small object (leases) -------------------------------------
    def create_exclusive(self, uri: str, data: bytes) -> str | None:
        """Write ``data`` to ``uri`` only if no object is there: its version tag (see
        :meth:`read_versioned`), or None if an object is there.

        On S3 a conditional PutObject (``If-None-Match: *``, honoured by AWS S3, SeaweedFS, MinIO): of
        two writers racing, exactly one succeeds. A local file is written aside and hard-linked into
        place (``link`` fails if the name exists), so it too appears whole or not at all; on a filesystem
        without hard links it is created with ``O_EXCL`` and then written."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            path = Path(loc.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _aside(path)
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)
                return _local_tag(path)
            except FileExistsError:
                return None
            except OSError:  # no hard links here (FAT, some FUSE mounts)
                return _create_excl(path, data)
            finally:
                tmp.unlink()
        return self._put_if(uri, data, IfNoneMatch="*")

    def read_versioned(self, uri: str) -> tuple[bytes, str, float]:
        """``(content, version tag, age in seconds)`` of a small object; the tag is what
        :meth:`replace_if` compares. The age is measured on the store's own clock (S3: the response's
        ``Date`` less the object's ``Last-Modified``), so writers on hosts whose clocks differ agree on it.

        Raises:
            FileNotFoundError: no object at ``uri``.
        """
        loc = parse_uri(uri)
        if loc.scheme == "file":  # the tag and the content of one open file, one version
            with open(loc.path, "rb") as f:
                info = os.fstat(f.fileno())
                data = f.read()
            return data, _stat_tag(info), max(0.0, time.time() - info.st_mtime)
        from email.utils import parsedate_to_datetime

        from botocore.exceptions import ClientError

        def get() -> tuple[bytes, str, float]:
            try:
                resp = self.client().get_object(Bucket=loc.bucket, Key=loc.key)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise FileNotFoundError(uri) from None
                raise
            data = resp["Body"].read()
            date = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
            now = parsedate_to_datetime(date).timestamp() if date else time.time()
            return data, resp["ETag"], max(0.0, now - resp["LastModified"].timestamp())

        return self._retrying(f"GET {uri}", get)

    def replace_if(self, uri: str, data: bytes, tag: str) -> str | None:
        """Overwrite ``uri`` with ``data`` only if it still holds the version ``tag`` (from
        :meth:`read_versioned`): the new version's tag, or None if it changed or is gone. On S3 a conditional PutObject
        (``If-Match``), atomic in the store. A local file is compared, then replaced: two writers on one
        folder could both pass the comparison (local leases guard against a second attempt, not a race
        to the microsecond)."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            path = Path(loc.path)
            try:
                if _local_tag(path) != tag:
                    return None
            except FileNotFoundError:
                return None
            _replace_local(path, lambda tmp: tmp.write_bytes(data))
            return _local_tag(path)
        return self._put_if(uri, data, IfMatch=tag)

    def _put_if(self, uri: str, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        loc = parse_uri(uri)

        def put() -> str | None:
            try:
                return self.client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data,
                                                ContentType="application/json", **condition)["ETag"]
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    raise FileNotFoundError(f"{uri}: no bucket {loc.bucket!r}") from None
                if _condition_failed(err):
                    return None
                raise

        return self._retrying(f"PUT {uri} ({', '.join(condition)})", put)

    def delete_if(self, uri: str, tag: str) -> bool:
        """Delete ``uri`` only if it still holds the version ``tag``; False if it changed or is gone.
        On S3 a conditional DeleteObject (``If-Match``; a store that ignores the header deletes
        unconditionally). A local file is compared, then deleted."""
        loc = parse_uri(uri)
        if loc.scheme == "file":
            try:
                if _local_tag(Path(loc.path)) != tag:
                    return False
                Path(loc.path).unlink()
                return True
            except FileNotFoundError:
                return False
        from botocore.exceptions import ClientError

        def delete() -> bool:
            try:
                self.client().delete_object(Bucket=loc.bucket, Key=loc.key, IfMatch=tag)
                return True
            except ClientError as err:
                if _condition_failed(err):
                    return False
                raise

        return self._retrying(f"DELETE {uri} (IfMatch)", delete)

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, obj) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode(), "application/json")

    def list_files(self, prefix_uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
        """All object URIs under a prefix (in subfolders too unless ``recursive`` is False), sorted; empty
        when the prefix does not exist, or is a local file."""
        return sorted(self._iter_files(prefix_uri, suffix, recursive))

    def list_file_stats(self, prefix_uri: str, suffix: str = "") -> list[tuple[str, int, str]]:
        """``(uri, size, version tag)`` of every object under a prefix (subfolders too), sorted by URI, from the
        listing itself (no request per object). The tag is the object's ETag on S3 (its MD5 for a plain upload:
        the same bytes written again keep it; a store's Last-Modified has whole seconds only), inode, mtime
        and size of a local file."""
        loc = parse_uri(prefix_uri)
        if loc.scheme == "file":
            return sorted((uri, info.size, _stat_tag(os.stat(uri)))
                          for uri, info in self._iter_infos(prefix_uri, suffix, True))
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""

        def listing() -> list[tuple[str, int, str]]:
            from botocore.exceptions import ClientError

            out = []
            pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
            try:
                pages = list(pages)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") == "NoSuchBucket":  # as list_files: nothing there
                    return []
                raise
            for page in pages:
                out += [(f"s3://{loc.bucket}/{o['Key']}", int(o["Size"]), str(o.get("ETag", "")))
                        for o in page.get("Contents", []) if o["Key"].endswith(suffix) and not o["Key"].endswith("/")]
            return sorted(out)

        return self._retrying(f"LIST {prefix_uri}", listing)

    def _iter_files(self, prefix_uri: str, suffix: str, recursive: bool = True) -> Iterator[str]:
        return (uri for uri, _ in self._iter_infos(prefix_uri, suffix, recursive))

    def _iter_infos(self, prefix_uri: str, suffix: str, recursive: bool) -> Iterator[tuple[str, pafs.FileInfo]]:
        loc = parse_uri(prefix_uri)
        fs, path = self.filesystem(prefix_uri)
        selector = pafs.FileSelector(path.rstrip("/"), recursive=recursive, allow_not_found=True)
        try:
            infos = fs.get_file_info(selector)
        except NotADirectoryError:  # a local file (an object key is listed as an empty prefix)
            return
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(suffix):
                yield (f"s3://{info.path}" if loc.scheme == "s3" else info.path), info

    def parquet_rows(self, uris: list[str], threads: int = 16) -> int:
        """Total rows over Parquet files, read from their footers only, ``threads`` files at a time.

        Each footer costs a round trip or two to the store and almost no CPU, so the reads overlap in
        threads (pyarrow releases the GIL while it waits): 10^4 files read one after another would keep
        a job's driver waiting for minutes. Each read is retried like :meth:`retrying_io`'s."""
        import pyarrow.parquet as pq

        def rows(uri: str) -> int:
            fs, path = self.filesystem(uri)

            def read() -> int:
                with fs.open_input_file(path) as f:
                    return pq.ParquetFile(f).metadata.num_rows

            return self.retrying_io(f"read the footer of {uri}", read)

        if threads <= 1 or len(uris) <= 1:
            return sum(rows(uri) for uri in uris)
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(min(threads, len(uris)), thread_name_prefix="parquet-footers")
        try:
            return sum(pool.map(rows, uris))
        finally:  # on an error, the reads not started yet are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)

    def delete_prefix(self, prefix_uri: str) -> None:
        """Delete everything under a prefix (used by tests and explicit ``--overwrite`` only)."""
        fs, path = self.filesystem(prefix_uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir_contents(path.rstrip("/"), missing_dir_ok=True)

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an ``s3://`` URI if it does not exist (no-op for local paths)."""
        loc = parse_uri(uri)
        if loc.scheme != "s3":
            Path(loc.path).mkdir(parents=True, exist_ok=True)
            return
        from botocore.exceptions import ClientError

        client = self.client()
        try:
            client.head_bucket(Bucket=loc.bucket)
            return
        except ClientError as err:  # 403 (not ours), 301 (another region): creating would only confuse
            if _status(err) != 404:
                raise
        kwargs = {} if self.region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": self.region}}
        try:
            client.create_bucket(Bucket=loc.bucket, **kwargs)
        except ClientError as err:  # created meanwhile by another process (BucketAlreadyOwnedByYou, or Exists)?
            try:
                client.head_bucket(Bucket=loc.bucket)  # there and ours now: fine
            except ClientError:
                raise err from None  # the create's own error says what is wrong


def _replace_local(path: Path, fill) -> None:
    """Write a local file whole or not at all: ``fill(tmp)`` writes a file beside ``path``, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(path)
    fill(tmp)
    os.replace(tmp, path)


def _aside(path: Path) -> Path:
    """A temporary name beside ``path``, this process and thread's own."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _status(err) -> int:
    """The HTTP status of a boto3 ``ClientError`` (0 when it carries none)."""
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0


def _condition_failed(err) -> bool:
    """Whether a conditional request's ``ClientError`` says the condition did not hold: 412, 409 (another
    conditional write to the key was in flight, AWS, and won) or 404 (If-Match on an object gone)."""
    return _status(err) in (404, 409, 412)


def _local_tag(path: Path) -> str:
    """A local file's version tag: inode, mtime and size change with every replacement."""
    return _stat_tag(path.stat())


def _stat_tag(info: os.stat_result) -> str:
    return f"{info.st_ino}:{info.st_mtime_ns}:{info.st_size}"


def _create_excl(path: Path, data: bytes) -> str | None:
    """Create ``path`` holding ``data`` unless it exists (``O_EXCL``); its tag, or None."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return _local_tag(path)


def _transient(err: Exception) -> bool:
    """Whether a boto3 error may pass on its own: the store unreachable or cutting a response short
    (connection, timeout, streaming errors), a 5xx answer, or throttling."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(err, ClientError):  # 501: the store lacks the feature (e.g. conditional writes)
        status = _status(err)
        return (status >= 500 and status != 501) or err.response.get("Error", {}).get("Code") in _THROTTLING_CODES
    return isinstance(err, (ConnectionError, HTTPClientError, IncompleteReadError))


# pyarrow's S3 errors that are not worth retrying: they say what is wrong with the request itself.
_PERMANENT_IO = ("ACCESS_DENIED", "NO_SUCH_BUCKET", "NO_SUCH_KEY", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH",
                 "Access Denied", "InvalidAccessKeyId", "NoSuchBucket", "ExpiredToken", "InvalidToken",
                 "AuthorizationHeaderMalformed", "PermanentRedirect", "InvalidRequest")
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")


def _transient_io(err: BaseException) -> bool:
    """Whether a pyarrow I/O error may pass on its own (connection refused or reset, timeouts, 5xx, 429);
    not a 3xx / 4xx answer (a wrong region, expired credentials, a malformed request) or 501."""
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    text = str(err)
    if (m := _HTTP_STATUS.search(text)) and (300 <= int(m.group(1)) < 500 or m.group(1) == "501"):
        return m.group(1) in ("408", "409", "429")  # 409: OperationAborted, a conflicting operation: again
    return not any(code in text for code in _PERMANENT_IO)


_HANDLES_LOCK = threading.Lock()
_FILESYSTEMS: dict[tuple, pafs.S3FileSystem] = {}
_CLIENTS: dict[tuple, object] = {}


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's ``S3FileSystem`` whose retry strategy survives pickling. pyarrow pickles an S3 filesystem's
    options but not its ``retry_strategy``: the copy Ray pickles into Ray Train's workers
    (``storage_filesystem``) and Ray Data's read tasks came back with the SDK's default of 3 attempts,
    so a store restart that the configured ``max_attempts`` rides out failed checkpoint uploads and reads
    there.

    Args:
        max_attempts: attempts per request, retries included (``AwsStandardS3RetryStrategy``).
        **options: ``S3FileSystem``'s own keyword arguments.
    """

    def __init__(self, *, max_attempts: int, **options):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self.max_attempts = max_attempts

    def __reduce__(self):
        _, (options,) = super().__reduce__()
        return _rebuild_filesystem, (self.max_attempts, options)


def _rebuild_filesystem(max_attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **options)


def _make_filesystem(endpoint_url, region, creds, max_attempts, connect_timeout, request_timeout):
    kwargs: dict = {
        "region": region,
        "max_attempts": max_attempts,
        "connect_timeout": connect_timeout,
        "request_timeout": request_timeout,
    }
    # A pyarrow filesystem pickles its options, keys included, and Ray pickles the one handed to Ray Train
    # (RunConfig.storage_filesystem) into every worker: keys from the environment are left to the AWS SDK's
    # own chain, which reads the same variables in each process, so the pickle carries none.
    if creds and not creds.from_env:
        kwargs.update(access_key=creds.access_key_id, secret_key=creds.secret_access_key)
        if creds.session_token:
            kwargs["session_token"] = creds.session_token
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return RetryingS3FileSystem(**kwargs)


@functools.lru_cache(maxsize=8)
def _botocore_config(max_attempts: int, connect_timeout: float, read_timeout: float, custom_endpoint: bool = False):
    """botocore settings; against an S3-compatible store (``custom_endpoint``) checksums are sent and
    checked only where the API requires them: botocore >= 1.36 adds CRC32 trailers (aws-chunked uploads)
    to every PutObject by default, which several S3-compatible stores refuse."""
    from botocore.config import Config

    checksums = ({"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
                 if custom_endpoint else {})
    return Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                  s3={"addressing_style": "path"}, connect_timeout=connect_timeout,
                  read_timeout=read_timeout, max_pool_connections=64, **checksums)


def _make_client(endpoint_url, region, creds, max_attempts, connect_timeout, read_timeout):
    import boto3

    kwargs = {"region_name": region,
              "config": _botocore_config(max_attempts, connect_timeout, read_timeout, bool(endpoint_url))}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if creds:
        kwargs.update(aws_access_key_id=creds.access_key_id, aws_secret_access_key=creds.secret_access_key,
                      aws_session_token=creds.session_token)
    session = boto3.session.Session()
    return session.client("s3", **kwargs)
