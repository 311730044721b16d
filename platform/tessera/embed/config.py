"""Config of the batch embedding job (``configs/embed.yaml``).

Sizing on a real cluster: give each GPU modality pool ``num_gpus: 1`` and ``max_actors`` up to the GPUs
you want it to hold (autoscaling between ``min_actors`` and ``max_actors``), raise the encoder's
``batch_size`` (items per forward pass; ``pool.batch_size``, items per actor call, at least as large)
until the GPU is busy, and give the CPU stages enough ``concurrency`` to keep the pools fed. Measured on
one H200 (``bench/gpu_encoders.py``, one process, inputs already preprocessed, bf16 autocast):
MiniLM 14k / 37k / 51k texts/s at 64 / 256 / 1024 a pass; the placeholder ResNet-18 at 128 px 25k /
45k / 34k images/s; the placeholder Wav2Vec2 7k / 11k / 12k clips/s (up to 1 s). On that machine's CPU
one thread decodes and resizes ~1.4k of the grocery photos (3-105 KB JPEGs) a second and ~2.2k
recordings, so one GPU image pool wants ~30 decode CPUs and an audio pool ~5: decode, not the GPU,
bounds media; tokenising runs ~56k texts/s in one process (the tokenizers library's own threads).
On CPU-only nodes, a text pool of several one-thread actors beat one actor with as many threads here
(``bench/embed.py``, 2 cores, 20k texts, separate runs: two 1-thread actors 228 texts/s, one 2-thread
actor 209, each run's bare loop 312 / 290; the 2-thread actor spent 155 CPU-s on what its bare loop did
in 130, the two 1-thread actors 137 for 123); for audio the single actor was faster (0.80 vs 0.66 of the
plain loop), for images neither clearly (0.66 vs 0.72, noisy). On the 2-core embedded stack the defaults
keep all three pools and the CPU stages inside 2 CPUs (fractional requests), so the job cannot stall
waiting for resources.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tessera.config import TesseraConfig
from tessera.embed.limits import DECODE_BATCH_TIMEOUT_S, DECODE_ITEM_TIMEOUT_S
from tessera.encoders.audio import AudioEncoderConfig
from tessera.encoders.errors import MEDIA_ERROR_KINDS, MediaErrorKind
from tessera.encoders.image import ImageEncoderConfig
from tessera.encoders.text import TextEncoderConfig
from tessera.storage import StorageConfig


class PoolConfig(TesseraConfig):
    """One encoder actor pool: autoscales between ``min_actors`` and ``max_actors``.

    ``num_gpus`` > 0 puts each actor on a GPU (CUDA when torch sees one; at most 1, an encoder uses one
    device: a share such as 0.5 puts two actors on one GPU); with 0 the actors run on the
    CPU even on a GPU node (an ``auto`` encoder device follows the pool; Ray 2.60 leaves
    ``CUDA_VISIBLE_DEVICES`` unset for a worker without GPUs, so torch would see them all); ``torch_threads`` caps the
    intra-op threads of a CPU actor (None: Ray's default, one thread per requested CPU).
    ``allocator``: ``jemalloc`` starts the actors' worker processes on the jemalloc that Ray installs
    (``tessera.memory``), purged after every call: their peak memory is lower and grows less over a
    long corpus than on glibc, whose arenas fragment; ``system`` keeps the C library's allocator.
    """

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(64, ge=1)
    torch_threads: int | None = Field(None, ge=1)
    max_tasks_in_flight_per_actor: int = Field(2, ge=1)
    allocator: Literal["jemalloc", "system"] = "jemalloc"

    @model_validator(mode="after")
    def _bounds(self) -> "PoolConfig":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below min_actors ({self.min_actors})")
        return self


class StageConfig(TesseraConfig):
    """A stateless CPU stage (fetch or decode): ``num_cpus`` per task, at most ``concurrency`` tasks."""

    num_cpus: float = Field(0.1, gt=0)
    batch_size: int = Field(64, ge=1)
    concurrency: int | None = Field(None, ge=1)


class FetchConfig(StageConfig):
    """Fetching media bytes is I/O-bound: few CPUs, a thread pool per task, bounded tasks."""

    num_cpus: float = Field(0.1, gt=0)
    threads: int = Field(16, ge=1, le=256)
    concurrency: int | None = Field(4, ge=1)
    # a task yields its batch in blocks of about this many fetched bytes: it holds one block plus the
    # ``threads`` objects in flight (at most ``encoder.max_bytes`` each), not the whole batch
    max_block_mb: int = Field(256, ge=1)


# Media items per fetch task, decode task and encoder call (the encoder still runs micro-batches of its
# own batch_size, 32). bench/embed.py, 8k photos, one 2-thread actor on 2 cores: 32 everywhere gave
# 0.74 of the plain loop, 256 0.77-0.85, 512 0.88 (one run each, noisy): per-task and per-call
# overheads, and a heap trim per call, paid 8x less often. A block of 256 is 12.5 MB of 128 px pixels.
MEDIA_BATCH = 256


# Their own classes, so a config that sets only some keys of a block (``fetch: {concurrency: 2}``)
# keeps the media batch size rather than the generic stage default.
class MediaFetchConfig(FetchConfig):
    batch_size: int = Field(MEDIA_BATCH, ge=1)


class MediaStageConfig(StageConfig):
    """Decoding media. A file that makes a decoder crash or loop is caught by its batch's retry, which
    decodes item by item in a child process (``tessera.embed.stages.map_guarded``):

    Args:
        batch_timeout_s: a batch still decoding after this long ends its worker (a decoder in an
            endless loop), so that Ray retries it the isolated way.
        item_timeout_s: on that retry, an item still decoding after this long fails as ``corrupt``.
    """

    batch_size: int = Field(MEDIA_BATCH, ge=1)
    batch_timeout_s: float = Field(DECODE_BATCH_TIMEOUT_S, gt=0)
    item_timeout_s: float = Field(DECODE_ITEM_TIMEOUT_S, gt=0)


class MediaPoolConfig(PoolConfig):
    batch_size: int = Field(MEDIA_BATCH, ge=1)


class _Modality(TesseraConfig):
    """What every modality block checks: a pool asked to run on CUDA holds a GPU."""

    @model_validator(mode="after")
    def _device_needs_a_gpu(self) -> "_Modality":
        if self.enabled and self.encoder.device == "cuda" and not self.pool.num_gpus:  # type: ignore[attr-defined]
            raise ValueError("encoder.device is 'cuda' but pool.num_gpus is 0: the actors would hold no "
                             "GPU; set pool.num_gpus (e.g. 1) or encoder.device: auto / cpu")
        return self


class TextModality(_Modality):
    enabled: bool = True
    encoder: TextEncoderConfig = TextEncoderConfig()
    preprocess: StageConfig = StageConfig()
    pool: PoolConfig = PoolConfig()


class ImageModality(_Modality):
    enabled: bool = True
    encoder: ImageEncoderConfig = ImageEncoderConfig()
    fetch: MediaFetchConfig = MediaFetchConfig()
    preprocess: MediaStageConfig = MediaStageConfig()
    pool: MediaPoolConfig = MediaPoolConfig()


class AudioModality(_Modality):
    enabled: bool = True
    encoder: AudioEncoderConfig = AudioEncoderConfig()
    fetch: MediaFetchConfig = MediaFetchConfig()
    preprocess: MediaStageConfig = MediaStageConfig()
    pool: MediaPoolConfig = MediaPoolConfig()


class EmbedConfig(TesseraConfig):
    """The embedding job.

    Args:
        items_uri: the items table (a prefix of ``part-*.parquet`` files).
        output_uri: the embeddings root; the run writes to ``<output_uri>/<run_id>/``.
        run_id: names the run; rerunning the same run id resumes it (completed rows are skipped).
        max_error_rate: the job exits non-zero when failed modality inputs / present ones exceed it.
        read_batch_rows: rows per block coming out of the reader.
        io_concurrency: at most this many read tasks and this many write tasks at once (None: as many
            as Ray Data schedules). Each new worker process pays its imports; on a 2-core box a
            single reader and writer keep up with the encoders.
        lease_ttl_s: an attempt holds the run through ``<run>/_LEASE.json``, renewed every quarter of
            this; a second attempt started meanwhile is refused (:mod:`tessera.lease`), and takes over
            a lease not renewed for this long (its holder was killed), or at once when the holder was a
            process on the same machine that has exited. Keep it above ``storage.retry_window_s``: an
            attempt that cannot renew for a ttl stops (the store down that long), where the storage
            retries would have ridden the outage out.
        retry_failed_from: the run id (under ``output_uri``) of a finished run whose failed items this
            run embeds again (:mod:`tessera.embed.retry`): the new run starts with a copy of every item
            of that run that failed no ``retry_kinds`` error, and embeds only the rest. For objects
            uploaded or repaired since, without embedding the whole catalog again; the earlier run is
            left as it is. Both runs must have the same identity (items, modalities, encoder settings).
        retry_kinds: the error kinds (``missing``, ``corrupt``, ...) whose items are embedded again;
            default every kind.
    """

    items_uri: str = "s3://tessera-demo/corpus/items"
    output_uri: str = "s3://tessera-demo/embeddings"
    run_id: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    max_error_rate: float = Field(0.25, ge=0, le=1)
    write_batch_size: int = Field(256, ge=1)
    read_num_cpus: float = Field(0.1, gt=0, description="CPUs per read / write task")
    read_batch_rows: int = Field(256, ge=1, description="rows per block coming out of the reader")
    io_concurrency: int | None = Field(None, ge=1)
    lease_ttl_s: float = Field(150.0, ge=5)
    retry_failed_from: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    retry_kinds: list[MediaErrorKind] = Field(default_factory=lambda: list(MEDIA_ERROR_KINDS), min_length=1)
    text: TextModality = TextModality()
    image: ImageModality = ImageModality()
    audio: AudioModality = AudioModality()
    storage: StorageConfig = StorageConfig()

    @field_validator("retry_kinds")
    @classmethod
    def _kinds_once_each(cls, kinds: list[str]) -> list[str]:
        return sorted(set(kinds))

    def modalities(self) -> dict[str, TextModality | ImageModality | AudioModality]:
        """The enabled modalities, in pipeline order."""
        all_ = {"image": self.image, "audio": self.audio, "text": self.text}
        return {name: m for name, m in all_.items() if m.enabled}
