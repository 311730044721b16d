import os
import pickle
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.storage import Storage, StorageConfig, join_uri, parse_uri


def test_parse_and_join():
    assert parse_uri("s3://b/k/x").bucket == "b" and parse_uri("s3://b/k/x").key == "k/x"
    assert parse_uri("file:///tmp/a").path == "/tmp/a" and parse_uri("file://localhost/tmp/a").path == "/tmp/a"
    for hosted in ("file://data/out", "file://./out"):  # was /out: a folder at the root, silently
        with pytest.raises(ValueError, match="names the host .* plain path"):
            parse_uri(hosted)
    assert parse_uri("rel/path").scheme == "file"
    assert join_uri("s3://b/x/", "/y/", "z") == "s3://b/x/y/z"
    for bad in ("gs://b/k", "s3://", "", "s3:///k", "S3://b/k", "s3a://b/k", "s3:/b/k"):  # the last two: a
        with pytest.raises(ValueError, match="unsupported|no bucket|expected"):   # local path before
            parse_uri(bad)


def test_a_uri_of_another_scheme_is_a_config_error_naming_the_key():
    """The jobs' path check runs first in each job: a URI it cannot parse stops the job with exit 2 naming
    the key, where it raised a bare ValueError (exit 1, a traceback)."""
    from tessera.config import ConfigError
    from tessera.ray_utils import check_paths_for_cluster

    with pytest.raises(ConfigError, match=r"output_uri: unsupported URI scheme in 'S3://b/x'"):
        check_paths_for_cluster({"output_uri": "S3://b/x"}, {"items_uri": "s3://b/items"})
    check_paths_for_cluster({"output_uri": "s3://b/x"}, {"items_uri": "s3://b/items"})  # nothing to refuse


def test_s3_round_trip_listing_and_missing(storage, bucket_uri):
    storage.write_bytes(join_uri(bucket_uri, "a/one.bin"), b"1")
    storage.write_bytes(join_uri(bucket_uri, "a/b/two.bin"), b"22")
    storage.write_json(join_uri(bucket_uri, "m.json"), {"x": 1})
    assert storage.read_bytes(join_uri(bucket_uri, "a/b/two.bin")) == b"22"
    assert storage.read_json(join_uri(bucket_uri, "m.json")) == {"x": 1}
    assert storage.list_files(join_uri(bucket_uri, "a")) == [join_uri(bucket_uri, "a/b/two.bin"),
                                                             join_uri(bucket_uri, "a/one.bin")]
    assert storage.list_files(join_uri(bucket_uri, "nothing-here")) == []
    stats = storage.list_file_stats(join_uri(bucket_uri, "a"), ".bin")  # one listing, the ETag each
    assert [(u, n) for u, n, _ in stats] == [(join_uri(bucket_uri, "a/b/two.bin"), 2),
                                             (join_uri(bucket_uri, "a/one.bin"), 1)]
    storage.write_bytes(join_uri(bucket_uri, "a/one.bin"), b"1")  # the same bytes again: the same tag
    assert storage.list_file_stats(join_uri(bucket_uri, "a"), ".bin") == stats
    storage.write_bytes(join_uri(bucket_uri, "a/one.bin"), b"9")
    assert storage.list_file_stats(join_uri(bucket_uri, "a"), ".bin")[1][2] != stats[1][2]
    assert storage.list_file_stats(join_uri(bucket_uri, "nothing-here")) == []
    assert storage.list_file_stats("s3://no-such-bucket-for-tessera/x") == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(join_uri(bucket_uri, "absent"))
    assert not storage.exists(join_uri(bucket_uri, "absent"))
    with pytest.raises(ValueError, match="over the limit"):
        storage.read_bytes(join_uri(bucket_uri, "a/b/two.bin"), max_bytes=1)
    storage.delete(join_uri(bucket_uri, "a/one.bin"))
    storage.delete(join_uri(bucket_uri, "a/one.bin"))  # gone already: nothing happens
    assert storage.list_files(join_uri(bucket_uri, "a")) == [join_uri(bucket_uri, "a/b/two.bin")]


def test_pyarrow_multipart_parquet_over_s3(storage, bucket_uri):
    # 24 MiB of incompressible data forces a multipart upload (the identity config makes it allowed)
    table = pa.table({"blob": [os.urandom(1 << 20) for _ in range(24)]})
    fs, path = storage.filesystem(join_uri(bucket_uri, "big.parquet"))
    pq.write_table(table, path, filesystem=fs, compression="none")
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.parquet_rows([join_uri(bucket_uri, "big.parquet")] * 2) == 48


def test_parquet_rows_reads_footers_in_threads(storage, bucket_uri):
    uris = []
    for i in range(40):
        uri = join_uri(bucket_uri, f"rows/part-{i:03d}.parquet")
        storage.write_parquet(uri, pa.table({"x": list(range(i))}))
        uris.append(uri)
    expected = sum(range(40))
    assert storage.parquet_rows(uris, threads=1) == expected
    assert storage.parquet_rows(uris, threads=8) == expected
    assert storage.parquet_rows([]) == 0
    with pytest.raises(FileNotFoundError):  # a missing file fails the count, whichever thread reads it
        storage.parquet_rows(uris[:20] + [join_uri(bucket_uri, "rows/absent.parquet")] + uris[20:], threads=8)


def test_local_paths(tmp_path):
    s = Storage()
    s.write_bytes(str(tmp_path / "x" / "y.bin"), b"abc")
    assert s.read_bytes(f"file://{tmp_path}/x/y.bin") == b"abc"
    assert s.list_files(str(tmp_path)) == [str(tmp_path / "x" / "y.bin")]
    # a file is no prefix: nothing under it (as on S3; pyarrow raised NotADirectoryError, and a job given a
    # single local items file exited 1 before its single-file fallback ran)
    assert s.list_files(str(tmp_path / "x" / "y.bin"), ".bin") == []
    [(path, size, tag)] = s.list_file_stats(f"file://{tmp_path}", ".bin")
    assert (path, size) == (str(tmp_path / "x" / "y.bin"), 3) and tag
    s.write_bytes(str(tmp_path / "x" / "y.bin"), b"abd")  # replaced: another tag
    assert s.list_file_stats(str(tmp_path), ".bin")[0][2] != tag
    s.delete(str(tmp_path / "x" / "y.bin"))
    s.delete(str(tmp_path / "x" / "y.bin"))
    assert s.list_files(str(tmp_path)) == []


def test_secrets_never_in_repr_or_pickle(storage, embedded_s3):
    secret = embedded_s3.secret_access_key
    assert secret not in repr(storage) and secret not in repr(embedded_s3)
    assert secret.encode() not in pickle.dumps(storage)
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_bytes is not None and clone.config == storage.config


def test_a_pickled_filesystem_carries_no_keys_from_the_environment(storage, bucket_uri, embedded_s3):
    """Ray Train pickles RunConfig.storage_filesystem into every worker (and pyarrow pickles its options):
    keys from the environment are left to the AWS SDK's own chain there, so the pickle holds none and
    the unpickled filesystem still reads."""
    storage.write_bytes(join_uri(bucket_uri, "p.bin"), b"p")
    fs, path = storage.filesystem(join_uri(bucket_uri, "p.bin"))
    data = pickle.dumps(fs)
    assert embedded_s3.secret_access_key.encode() not in data and embedded_s3.access_key_id.encode() not in data
    with pickle.loads(data).open_input_file(path) as f:
        assert f.read() == b"p"


def test_credentials_file_used_when_env_absent(storage, bucket_uri, embedded_s3, tmp_path, monkeypatch):
    import json

    storage.write_bytes(join_uri(bucket_uri, "c.bin"), b"c")
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"access_key_id": embedded_s3.access_key_id,
                                 "secret_access_key": embedded_s3.secret_access_key}))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s = Storage(StorageConfig(credentials_file=str(creds)))
    assert s.read_bytes(join_uri(bucket_uri, "c.bin")) == b"c"
    wrong = Storage(StorageConfig(credentials_file=str(tmp_path / "absent.json")))
    with pytest.raises(RuntimeError, match="cannot read S3 credentials"):
        wrong.read_bytes(join_uri(bucket_uri, "c.bin"))


def refused_store(monkeypatch) -> Storage:
    """A Storage pointed at a loopback port nothing listens on (connections refused), 1.5 s retry window."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "TESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    return Storage(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, retry_window_s=1.5))


def test_unreachable_store_retried_for_the_window_then_raised(monkeypatch, caplog):
    import time

    from botocore.exceptions import EndpointConnectionError

    s = refused_store(monkeypatch)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="tessera.storage"), pytest.raises(EndpointConnectionError):
        s.read_bytes("s3://b/k")
    assert 1.5 <= time.monotonic() - t0 < 10
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= 2 and "GET s3://b/k failed (EndpointConnectionError)" in retries[0].getMessage()


def test_part_writes_and_pyarrow_io_retry_for_the_window(monkeypatch, caplog, tmp_path):
    """A part write (one PutObject) or a file upload against a store that refuses connections is
    retried for ``retry_window_s`` like a read, then raises; pyarrow I/O's missing local file is not
    retried."""
    from botocore.exceptions import EndpointConnectionError

    from tessera.embed.output import write_part

    s = refused_store(monkeypatch)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="tessera.storage"), pytest.raises(EndpointConnectionError):
        write_part(s, "s3://b/run", pa.table({"item_id": ["a", "b"]}))
    assert 1.5 <= time.monotonic() - t0 < 30
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= 2 and retries[0].startswith("storage: PUT s3://b/run/part-"), retries
    caplog.clear()
    local = tmp_path / "shard.bin"
    local.write_bytes(b"x" * 100)
    with caplog.at_level("WARNING", logger="tessera.storage"), pytest.raises(EndpointConnectionError):
        s.upload_file(local, "s3://b/index/shard.bin")
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= 2 and retries[0].startswith("storage: upload s3://b/index/shard.bin"), retries
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        s.retrying_io("GET x", missing)
    assert calls == [1]


_STOPPED_WRITER = """
import signal, sys
import numpy as np, pyarrow as pa
from tessera.storage import Storage
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # as a Ray worker does: SIGTERM unwinds Python
storage = Storage()
storage.client(), storage.s3_filesystem()
table = pa.table({"x": np.random.default_rng(0).random(3_000_000)})  # ~23 MB encoded
print("ready", flush=True)
storage.write_parquet(sys.argv[1], table)
print("written", flush=True)
"""


def _stopped_at(storage, script: str, args_of, delays, whole) -> list[str]:
    """Run ``script`` (a writer that prints "ready", writes the object named by its last argument, then
    prints "written") once per delay, SIGTERMed that long after "ready"; per run "whole" (the object
    exists and ``whole(uri)`` holds) or "none" (no object, and the writer never said "written")."""
    seen = []
    for i, delay in enumerate(delays):
        args = args_of(i)
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        written = proc.stdout.read().strip() == b"written"
        proc.wait(timeout=60)
        if storage.exists(args[-1]):
            assert whole(args[-1]), (delay, written)
            seen.append("whole")
        else:
            assert not written, delay
            seen.append("none")
    return seen


def test_a_writer_stopped_at_any_moment_leaves_the_whole_object_or_none(storage, bucket_uri):
    """Ray stops a dead job's workers with SIGTERM, which unwinds Python; pyarrow's S3 stream, closed
    while unwinding, committed what it held (a 0-byte embedding part, unreadable by every rerun). Stopped
    at moments spread over an encode-and-upload, a writer must leave the complete object or none."""
    def whole(uri):
        fs, path = storage.filesystem(uri)
        return pq.read_table(path, filesystem=fs).num_rows == 3_000_000

    seen = _stopped_at(storage, _STOPPED_WRITER, lambda i: [join_uri(bucket_uri, f"part-{i}.parquet")],
                       (0.0, 0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 2.0), whole)
    assert "none" in seen, seen  # some stops landed before the write was over


_STOPPED_UPLOADER = """
import signal, sys
from tessera.storage import Storage
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # as a Ray worker does: SIGTERM unwinds Python
storage = Storage()
storage.client()
print("ready", flush=True)
storage.upload_file(sys.argv[1], sys.argv[2])
print("written", flush=True)
"""


def test_upload_file_is_whole_or_none(storage, bucket_uri, tmp_path):
    """Index shard files go up with ``upload_file``: above 64 MiB a multipart upload, which makes the
    object only when it completes; an uploader stopped midway leaves none."""
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(1000))
    storage.upload_file(small, join_uri(bucket_uri, "up/small.bin"), "application/octet-stream")
    assert storage.read_bytes(join_uri(bucket_uri, "up/small.bin")) == small.read_bytes()
    storage.upload_file(small, f"file://{tmp_path}/copy/small.bin")
    assert (tmp_path / "copy" / "small.bin").read_bytes() == small.read_bytes()
    assert [p.name for p in (tmp_path / "copy").iterdir()] == ["small.bin"]  # nothing left aside

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(70 << 20))  # two parts
    seen = _stopped_at(storage, _STOPPED_UPLOADER, lambda i: [str(big), join_uri(bucket_uri, f"up/big-{i}.bin")],
                       (0.0, 0.1, 0.3, 0.6), lambda uri: storage.read_bytes(uri) == big.read_bytes())
    print("stopped uploads:", seen)
    assert "none" in seen, seen
    storage.upload_file(big, join_uri(bucket_uri, "up/big.bin"))
    assert storage.read_bytes(join_uri(bucket_uri, "up/big.bin")) == big.read_bytes()


class _Recorder:
    """A loopback HTTP server that records each request (method, path, headers, body) and answers every
    one with ``status`` (or ``status[method]``, else 404): what Tessera's S3 clients send, seen from the wire."""

    def __init__(self, status: int = 404, headers: dict | None = None):
        import http.server
        import threading

        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.status, self.headers = status, headers or {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                       body))
                status = outer.status
                self.send_response(status.get(self.command, 404) if isinstance(status, dict) else status)
                for k, v in outer.headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    server = _Recorder()
    yield server
    server.close()


def _recorded_store(recorder, monkeypatch, region="us-east-1", **env) -> Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "TESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Storage(StorageConfig(endpoint_url=recorder.url, region=region, max_attempts=1, retry_window_s=0))


def test_temporary_credentials_send_their_session_token(recorder, monkeypatch):
    """SSO, an assumed role or CI OIDC give a key, a secret and a session token; a request signed
    without the token is refused by S3 (InvalidToken). Both clients (boto3 and pyarrow) must send it."""
    s = _recorded_store(recorder, monkeypatch, AWS_SESSION_TOKEN="the-session-token")
    assert not s.exists("s3://b/k")  # boto3: HEAD, 404
    fs, path = s.filesystem("s3://b/k")
    fs.get_file_info(path)  # pyarrow: HEAD, 404
    assert len(recorder.requests) >= 2
    for method, _, headers, _ in recorder.requests:
        assert headers.get("x-amz-security-token") == "the-session-token", (method, headers)
    assert "the-session-token" not in repr(s._credentials())


def test_puts_to_an_s3_compatible_store_carry_no_default_checksum_trailer(recorder, monkeypatch):
    """botocore >= 1.36 sends every PutObject aws-chunked with a CRC32 trailer, which several
    S3-compatible stores refuse; against a configured endpoint checksums go only where required."""
    recorder.status = 200
    s = _recorded_store(recorder, monkeypatch)
    s.write_bytes("s3://b/k", b"hello")
    (method, _, headers, body), = [r for r in recorder.requests if r[0] == "PUT"]
    assert body == b"hello"
    assert "aws-chunked" not in headers.get("content-encoding", "")
    assert not [h for h in headers if h.startswith("x-amz-checksum") or h == "x-amz-trailer"], headers


def test_a_redirect_or_a_refusal_is_not_retried_for_the_window(recorder, monkeypatch):
    """A bucket in another region answers 301, expired credentials 400/403: retrying for the whole
    window (120 s by default) only delays the real error."""
    from tessera.storage import _transient_io

    recorder.status = 301
    s = _recorded_store(recorder, monkeypatch)
    s.config.retry_window_s = 30
    fs, path = s.filesystem("s3://b/k")
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        s.retrying_io("GET s3://b/k", lambda: fs.open_input_file(path).read())
    assert time.monotonic() - t0 < 10, str(err.value)
    assert not _transient_io(err.value), str(err.value)
    assert _transient_io(OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation"))
    assert _transient_io(OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7"))
    assert not _transient_io(OSError("AWS Error UNKNOWN (HTTP status 501) during PutObject operation"))
    assert _transient_io(OSError("AWS Error UNKNOWN (HTTP status 429) during GetObject operation"))
    assert _transient_io(OSError("AWS Error UNKNOWN (HTTP status 409) during PutObject operation"))
    assert not _transient_io(OSError("AWS Error UNKNOWN (HTTP status 403) during GetObject operation"))


def test_a_store_without_a_feature_is_not_retried():
    from botocore.exceptions import ClientError

    from tessera.storage import _transient

    def error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert not _transient(error(501, "NotImplemented"))
    assert _transient(error(503, "SlowDown")) and _transient(error(500, "InternalError"))
    assert not _transient(error(403, "AccessDenied"))


def test_ensure_bucket_creates_only_a_missing_bucket_in_the_configured_region(storage, recorder, monkeypatch):
    import uuid

    name = f"ensure-{uuid.uuid4().hex[:8]}"
    storage.ensure_bucket(f"s3://{name}/x")  # the embedded store: created, then found
    storage.ensure_bucket(f"s3://{name}/y")
    storage.write_bytes(f"s3://{name}/k", b"1")
    assert storage.read_bytes(f"s3://{name}/k") == b"1"
    s = _recorded_store(recorder, monkeypatch, region="eu-west-1")
    recorder.status = {"HEAD": 404, "PUT": 200}
    s.ensure_bucket("s3://missing/x")  # HEAD 404, then a create naming the region
    (_, _, _, body), = [r for r in recorder.requests if r[0] == "PUT"]
    assert b"<LocationConstraint>eu-west-1</LocationConstraint>" in body
    recorder.requests.clear()
    recorder.status = 403  # someone else's bucket: say so, do not try to create it
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="403|Forbidden"):
        s.ensure_bucket("s3://theirs/x")
    assert [r[0] for r in recorder.requests] == ["HEAD"]


def test_a_pickled_filesystem_keeps_its_retries(recorder, monkeypatch):
    """Ray pickles the filesystem handed to Ray Train (storage_filesystem) and Ray Data's reads; pyarrow's
    own pickle drops the retry strategy, so the copy retried 3 times, the SDK's default, whatever
    max_attempts said (a store answering 503 here counts the requests)."""
    recorder.status = 503
    s = _recorded_store(recorder, monkeypatch)
    s.config.max_attempts = 4  # one more than the SDK's default; each retry backs off longer
    fs, path = s.filesystem("s3://b/k")
    copy = pickle.loads(pickle.dumps(fs))
    for each in (fs, copy):
        recorder.requests.clear()
        with pytest.raises(OSError, match="503"):
            each.get_file_info(path)
        assert len(recorder.requests) == 4, [r[:2] for r in recorder.requests]


def test_a_credentials_file_missing_a_field_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    path = tmp_path / "creds.json"
    path.write_text('{"access_key_id": "AKIA"}')
    with pytest.raises(RuntimeError, match=f"{path} has no 'secret_access_key'"):
        Storage(StorageConfig(credentials_file=str(path)))._credentials()
    path.write_text('["not", "an", "object"]')
    with pytest.raises(RuntimeError, match="cannot read S3 credentials .*TypeError"):
        Storage(StorageConfig(credentials_file=str(path)))._credentials()
