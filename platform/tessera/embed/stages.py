"""The Ray Data stages of the embedding job, as plain batch functions and one actor class.

Batches are pyarrow tables with explicit column types (binary payloads, string URIs and errors):
Ray Data's numpy conversion turns a binary column whose values share a length into fixed-width
scalars, and a column mixing arrays and nulls into tensors in some blocks and objects in others.
Each stage works on plain Python lists and hands back a typed table. Per modality ``m`` the pipeline
adds and removes columns as an item moves along:

    fetch (tasks, I/O threads)   <m>_uri   -> <m>_bytes, <m>_error
    decode (CPU tasks)           <m>_bytes -> <m>_input, <m>_error      (text: text -> text_input)
    encode (actor pool)          <m>_input -> <m> (fixed_size_list<float32>[dim], the output column), metrics

A bad item never raises: its ``MediaError`` is recorded as ``"<kind>: <detail>"`` in ``<m>_error``
and it travels on with a null vector. Only failures that are not about the item raise (storage still
unreachable after :class:`Storage`'s retries, ``StorageConfig.retry_window_s`` for a media read), and
fail the job: Ray Data does not retry a task whose function raised.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tessera.embed.ids import hash_ids, is_member
from tessera.embed.limits import DECODE_BATCH_TIMEOUT_S, DECODE_ITEM_TIMEOUT_S
from tessera.embed.output import MODALITIES, ids_digest, vector_column, write_part
from tessera.encoders.errors import MediaError, fetch_media
from tessera.memory import active_allocator, release_free_heap
from tessera.storage import Storage

if TYPE_CHECKING:
    from tessera.encoders.base import EncoderConfig, Preprocessor

logger = logging.getLogger(__name__)

_BINARY_SUFFIXES = ("_bytes", "_input", "_uri")  # a URI column may hold invalid UTF-8: its item fails, not the block


def column_type(name: str) -> pa.DataType:
    """The Arrow type of every column the stages produce (vector columns are built by the actors)."""
    if name.endswith(_BINARY_SUFFIXES) or name == "text":
        return pa.binary()
    return pa.string()


def to_lists(table: pa.Table) -> dict[str, list]:
    """Plain Python lists of a batch's columns, leaving out the (already typed) vector columns."""
    return {name: table.column(name).to_pylist() for name in table.column_names
            if not pa.types.is_fixed_size_list(table.schema.field(name).type)}


def to_table(cols: dict[str, list], carry: pa.Table) -> pa.Table:
    """A typed table of ``cols`` plus the vector columns of ``carry`` (earlier pools' outputs)."""
    table = pa.table({name: pa.array(values, column_type(name)) for name, values in cols.items()})
    for name in carry.column_names:
        if pa.types.is_fixed_size_list(carry.schema.field(name).type):
            table = table.append_column(name, carry.column(name))
    return table


# Arrays travel between stages as .npy bytes (self-describing: dtype and shape, no pickle).
def pack_array(arr: np.ndarray | None) -> bytes | None:
    if arr is None:
        return None
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def unpack_array(data: bytes | None) -> np.ndarray | None:
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def read_items(batch: dict, storage: Storage, columns: list[str], rows_per_batch: int,
               done_hashes: np.ndarray | None = None, hash_key: str | None = None):
    """Read the items files named in ``batch["uri"]``, yielding blocks of at most ``rows_per_batch`` rows.

    Rows an earlier attempt of the run wrote (their id's hash in ``done_hashes``) are dropped; text and
    the media URIs are read as bytes, since they may not be valid UTF-8 (that fails its item later, not
    the block). Reading
    here rather than with ``ray.data.read_parquet`` keeps the read's CPU request small and
    configurable: the reader's own file-listing task asks for a whole CPU, which three encoder pools on
    a 2-CPU node never free.
    """
    for uri in map(str, batch["uri"]):
        # one row group at a time, each read retried like every other store access (a store restart
        # mid-read failed the read task, and Ray Data does not retry a task's own errors: the job failed)
        g, groups = 0, 1  # the file's row group count comes with its first one
        while g < groups:
            group, groups = storage.retrying_io(f"read row group {g} of {uri}",
                                                functools.partial(_read_row_group, storage, uri, g, columns))
            g += 1
            for record_batch in group.to_batches(max_chunksize=rows_per_batch):
                table = pa.Table.from_batches([record_batch])
                if done_hashes is not None:
                    written = is_member(done_hashes, hash_ids(table.column("item_id"), hash_key))
                    table = table.filter(pa.array(~written))
                for idx, name in enumerate(table.column_names):
                    # one type per column whatever each file holds (a pandas categorical, a large_string):
                    # batches join blocks of several files, and Arrow refuses to concatenate differing types
                    if name == "item_id":
                        table = table.set_column(idx, name, table.column(name).cast(pa.string()))
                    elif name == "text" or name.endswith("_uri"):
                        column = table.column(name).cast(pa.binary())
                        if name.endswith("_uri"):  # "" is no object, as null is (catalogs exported from SQL
                            # write "" for none): absent, not a failed item counted against max_error_rate
                            column = pc.if_else(pc.equal(pc.binary_length(column), 0), pa.scalar(None, pa.binary()),
                                                column)
                        table = table.set_column(idx, name, column)
                if table.num_rows:
                    yield table


def _read_row_group(storage: Storage, uri: str, index: int, columns: list[str]) -> tuple[pa.Table, int]:
    """Row group ``index`` of ``uri`` (``columns`` only) and the file's row group count, from the file
    opened for this call only (a retry after a store restart opens a new one)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        if parquet.num_row_groups == 0:  # a file of no rows
            return parquet.schema_arrow.empty_table().select(columns), 0
        return parquet.read_row_group(index, columns=columns), parquet.num_row_groups


def fetch(table: pa.Table, modality: str, storage: Storage, max_bytes: int, threads: int,
          max_block_bytes: int = 256 << 20) -> Iterator[pa.Table]:
    """Read the objects behind ``<modality>_uri`` in parallel threads (``threads`` in flight), yielding
    the batch's rows as their objects arrive, in blocks of about ``max_block_bytes`` of fetched bytes: a
    task holds one block and the objects in flight, not the whole batch (256 camera photos of 20 MB were
    5 GB a task, twice over as Python bytes and their Arrow copy), and one slow object (a read retried
    for minutes) holds one thread, not the others. Rows keep their columns; their order is not kept."""
    batch = to_lists(table)
    uris = batch.pop(f"{modality}_uri")

    def one(uri):
        if uri is None:
            return None, None
        try:
            if isinstance(uri, bytes):  # read as bytes (see read_items)
                try:
                    uri = uri.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise MediaError("missing", f"invalid URI: not UTF-8 (byte {err.start})") from None
            return fetch_media(storage, str(uri), max_bytes=max_bytes), None
        except MediaError as err:
            return None, str(err)

    def block(got: list[tuple[int, tuple]]) -> pa.Table:
        got.sort(key=lambda row_result: row_result[0])
        rows = [row for row, _ in got]
        cols = {name: [values[r] for r in rows] for name, values in batch.items()}
        cols[f"{modality}_bytes"] = [result[0] for _, result in got]
        cols[f"{modality}_error"] = [result[1] for _, result in got]
        return to_table(cols, table.take(pa.array(rows, pa.int64())))

    if not uris:
        yield block([])
        return
    got: list[tuple[int, tuple]] = []
    size, queued = 0, iter(range(len(uris)))
    with ThreadPoolExecutor(max(1, min(threads, len(uris)))) as pool:
        in_flight = {pool.submit(one, uris[r]): r for r in itertools.islice(queued, threads)}
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                row = in_flight.pop(future)
                got.append((row, future.result()))
                size += len(got[-1][1][0] or b"")
                if (r := next(queued, None)) is not None:
                    in_flight[pool.submit(one, uris[r])] = r
            if size >= max_block_bytes or not in_flight:
                out, got, size = block(got), [], 0  # the block's bytes, once: not also in ``got``
                yield out


def decode(table: pa.Table, modality: str, encoder_cfg: EncoderConfig, storage: Storage,
           batch_timeout_s: float = DECODE_BATCH_TIMEOUT_S, item_timeout_s: float = DECODE_ITEM_TIMEOUT_S) -> pa.Table:
    """Raw bytes (or text) -> model inputs with the modality's preprocessor; errors recorded per item
    (media through :func:`map_guarded`, with its timeouts)."""
    batch = to_lists(table)
    source = "text" if modality == "text" else f"{modality}_bytes"
    raws = list(batch[source])
    errors = list(batch.get(f"{modality}_error", [None] * len(raws)))
    todo = [i for i, raw in enumerate(raws) if raw is not None and errors[i] is None]
    inputs: list = [None] * len(raws)
    if todo:
        from tessera.encoders.registry import shared_preprocessor  # the modality's module only

        _limit_tokenizer_threads()
        pre = shared_preprocessor(encoder_cfg, storage)
        todo_raws = [raws[i] for i in todo]
        if modality == "text":  # the tokenizer raises on bad text, it does not crash
            results = pre.map(todo_raws)
        else:
            results = map_guarded(pre, todo_raws, f"{modality}/{ids_digest([batch['item_id'][i] for i in todo])}",
                                  batch_timeout_s, item_timeout_s)
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, MediaError):
                errors[i] = str(result)
            else:
                inputs[i] = pack_array(result)
    batch[f"{modality}_input"] = inputs
    batch[f"{modality}_error"] = errors
    del batch[source]
    return to_table(batch, table)


_GUARD_NAMESPACE = "tessera_embed"
_GUARD_PREFIX = "decoding/"


def map_guarded(pre: Preprocessor, raws: list, batch_key: str, batch_timeout_s: float = DECODE_BATCH_TIMEOUT_S,
                item_timeout_s: float = DECODE_ITEM_TIMEOUT_S) -> list:
    """``pre.map(raws)``, unless an attempt of this batch died while preprocessing it: then one item at a
    time in a child process (:class:`~tessera.encoders.isolated.IsolatedDecoder`).

    A decoder that crashes on a malformed file (a segfault in a C library) kills the worker, and Ray
    Data retries the task without end (``max_retries=-1``): the job would crash workers forever on one
    bad item. So each batch leaves a mark in the cluster's KV store while it is preprocessed (two GCS
    calls a batch, keyed by the Ray job and the batch's item ids); a task that finds its batch's mark is
    a retry after such a death, and isolates the items, so the one that kills the decoder fails alone,
    as ``corrupt``. A decoder caught in an endless loop would hold its task forever instead: a batch
    still preprocessing after ``batch_timeout_s`` ends its own worker, and on the retry an item past
    ``item_timeout_s`` fails as ``corrupt``. A worker lost to a node failure mid-batch makes its retry
    take the isolated path too: slower, same result. The driver clears what its job left
    (:func:`clear_guard_marks`).

    Raises:
        DecoderUnavailable: on a retry, no child process could be started (the job fails, saying so).
    """
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return pre.map(raws)
    key = f"{_GUARD_PREFIX}{ray.get_runtime_context().get_job_id()}/{batch_key}"
    retried = internal_kv._internal_kv_put(key, b"1", overwrite=False, namespace=_GUARD_NAMESPACE)  # True: there
    try:  # a crash skips the finally: the mark stays for the retry
        if not retried:
            return _map_with_deadline(pre, raws, batch_key, batch_timeout_s)
        from tessera.encoders.isolated import IsolatedDecoder

        logger.warning("batch %s: an earlier attempt died while preprocessing it; preprocessing its %d items one "
                       "at a time in a child process", batch_key, len(raws))
        decoder = IsolatedDecoder(timeout_s=item_timeout_s)
        try:
            return decoder.map(pre, raws)
        finally:  # retries are rare: no child (torch imported) kept for the worker's life
            decoder.close()
    finally:
        internal_kv._internal_kv_del(key, namespace=_GUARD_NAMESPACE)


def _map_with_deadline(pre: Preprocessor, raws: list, batch_key: str, timeout_s: float) -> list:
    """``pre.map(raws)``; past ``timeout_s`` the process ends itself (the batch's mark stays: its retry
    isolates the items). A C decoder in an endless loop cannot be interrupted any other way."""
    def expire() -> None:
        logger.error("batch %s: still preprocessing after %g s (a decoder in an endless loop?); ending this worker "
                     "so that the batch is retried one item at a time", batch_key, timeout_s)
        os._exit(70)  # no logging.shutdown(): it could wait on a lock the stuck thread holds

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        return pre.map(raws)
    finally:
        timer.cancel()


def clear_guard_marks() -> int:
    """Delete the marks this Ray job's decode tasks left (batches whose every attempt died: the job
    failed or was stopped); the number deleted. Called by the driver as the job ends."""
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return 0
    prefix = f"{_GUARD_PREFIX}{ray.get_runtime_context().get_job_id()}/"
    return internal_kv._internal_kv_del(prefix, del_by_prefix=True, namespace=_GUARD_NAMESPACE)


def _limit_tokenizer_threads() -> None:
    """The tokenizers library's thread pool (Rust's rayon) takes every core of the node unless
    ``RAYON_NUM_THREADS`` says otherwise: a decode task holding a quarter of a CPU would run 64 threads on
    a 64-core GPU node, beside the encoder actors. The pool is sized from the CPUs Ray gave the task (the
    first time this worker process tokenizes); an explicit setting wins."""
    import math

    import ray

    if "RAYON_NUM_THREADS" in os.environ or not ray.is_initialized():
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    os.environ["RAYON_NUM_THREADS"] = str(max(1, math.ceil(cpus)))


def write_batch(table: pa.Table, run_uri: str, storage: Storage, modalities: list[str],
                attempt: str | None = None) -> pa.Table:
    """Write one part (the final stage; ``attempt``: this attempt's id, in the part's name); returns a
    one-row summary for the driver."""
    n = table.num_rows
    cols: dict[str, pa.Array] = {"item_id": table.column("item_id")}
    encoders: list[str] = []
    weights: dict[str, list[str]] = {}  # per modality, the checksums of the weights this part's rows saw
    for m in MODALITIES:
        if m in modalities:
            cols[m] = table.column(m)
            cols[f"{m}_error"] = table.column(f"{m}_error").cast(pa.string())
            seen = set(table.column(f"{m}_encoder").to_pylist())
            encoders.extend(seen)
            weights[m] = sorted({json.loads(ident)["weights_checksum"] for ident in seen})
        else:  # a disabled modality keeps its columns, all null
            cols[m] = pa.nulls(n, pa.list_(pa.float32()))
            cols[f"{m}_error"] = pa.nulls(n, pa.string())
    uri = write_part(storage, run_uri, pa.table(cols), attempt, weights)
    return pa.table({"part": [uri], "rows": [n], "encoders": [json.dumps(sorted(encoders))]})


def actor_encoder_config(encoder_cfg: EncoderConfig, gpu_ids: list) -> EncoderConfig:
    """The encoder config an actor runs: ``auto`` means CUDA only when the actor holds a GPU slot.

    Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` unset in a worker that asked for no GPU, so on a GPU node
    torch would see every GPU and a CPU pool's actors would pile onto GPU 0 without holding it."""
    if encoder_cfg.device == "auto" and not gpu_ids:
        return encoder_cfg.model_copy(update={"device": "cpu"})
    return encoder_cfg


class EncodeActor:
    """Ray Data actor UDF: loads one modality's encoder once, encodes the rows that have input.

    Records Ray metrics (shown in the dashboard and its Prometheus endpoint):
    ``tessera_embed_items_total{modality,status}``, ``tessera_embed_failures_total{modality,kind}`` and
    ``tessera_embed_batch_seconds{modality}``.
    """

    def __init__(self, modality: str, encoder_cls: type, encoder_cfg: EncoderConfig, storage: Storage,
                 torch_threads: int | None = None, allocator: str = "system"):
        import ray
        import torch
        from ray.util import metrics

        self.allocator = active_allocator()
        if self.allocator != allocator:
            # e.g. this node's Ray is not where the driver's is, so the preload was not found (the dynamic
            # loader says so in this worker's log): the job goes on, the manifest lists the allocator
            logger.warning("the %s encoder actor asked for the %s allocator and runs on %s",
                           modality, allocator, self.allocator)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.modality = modality
        self.gpu_ids = list(ray.get_gpu_ids())
        self.encoder = encoder_cls(actor_encoder_config(encoder_cfg, self.gpu_ids), storage)
        self.items = metrics.Counter("tessera_embed_items_total", "Items through an encoder pool, by status",
                                     tag_keys=("modality", "status"))
        self.failures = metrics.Counter("tessera_embed_failures_total", "Failed items by error kind",
                                        tag_keys=("modality", "kind"))
        self.latency = metrics.Histogram("tessera_embed_batch_seconds", "Encode time per batch",
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
                                         tag_keys=("modality",))

    def __call__(self, table: pa.Table) -> pa.Table:
        m = self.modality
        batch = to_lists(table)
        inputs = batch.pop(f"{m}_input")
        errors = batch[f"{m}_error"]
        todo = [i for i, x in enumerate(inputs) if x is not None]
        vectors: list = [None] * len(inputs)
        if todo:
            t0 = time.perf_counter()
            encoded = self.encoder.encode([unpack_array(inputs[i]) for i in todo])  # (n, D)
            self.latency.observe(time.perf_counter() - t0, tags={"modality": m})
            release_free_heap()  # freed activations would otherwise stay resident between batches
            finite = np.isfinite(encoded).all(axis=1)
            for row, i in enumerate(todo):
                if finite[row]:
                    vectors[i] = encoded[row]
                else:  # NaN / inf (an fp16 overflow, a bad input the model cannot take): never stored as ok
                    errors[i] = "corrupt: the encoder's output is not finite (NaN or inf)"
            todo = [i for row, i in enumerate(todo) if finite[row]]
        batch[f"{m}_encoder"] = [self.identity] * len(inputs)
        n_failed = 0
        for err in errors:
            if err is not None:
                n_failed += 1
                self.failures.inc(1, tags={"modality": m, "kind": str(err).split(":", 1)[0]})
        for status, n in (("ok", len(todo)), ("failed", n_failed), ("missing", len(inputs) - len(todo) - n_failed)):
            if n:
                self.items.inc(n, tags={"modality": m, "status": status})
        return to_table(batch, table).append_column(m, vector_column(vectors, self.encoder.dim))

    @functools.cached_property
    def identity(self) -> str:
        """JSON naming this actor's encoder and device, carried to the manifest by the writer."""
        gpus = ",".join(str(g) for g in self.gpu_ids)
        device = f"{self.encoder.device}" + (f"|gpu_ids={gpus}" if gpus else "")
        return json.dumps({"name": self.encoder.name, "dim": self.encoder.dim, "device": device,
                           "allocator": self.allocator,
                           "weights_checksum": self.encoder.weights_checksum,
                           "weights": self.encoder.config.weights}, sort_keys=True)
