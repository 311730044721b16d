"""Benchmark: the embedding job against plain single-process loops, side by side in one run.

    .venv/bin/python bench/embed.py [--texts 20000] [--images 8000] [--audio 3000] [--threads 2]
                                    [--scale 10000 90000] [--text-actors 2] [--media-actors 1]
                                    [--text-pool-batch 2048] [--text-rounds 2]

Brings up its own SeaweedFS and a local Ray (2 CPUs). Measures, on real data from ../shared/data and
real text on this machine (bench/texts.py):

- text: the whole job (items table in S3 -> Parquet embeddings in S3, wall clock, actor start and
  model load included) vs sentence-transformers ``SentenceTransformer(...).encode()`` in fp32 (one
  process, ``--threads`` threads) and vs our bare encoder loop in the job's own layout: as many Ray
  actors as the job's ``--text-actors`` (1 thread each by default), started on the pools'
  ``--allocator``, each running ``TextEncoder.embed`` over its share of the texts in one call (sorted
  by length over all of it), the rate all texts over the slowest actor's time; same micro-batch.
  Cosine of our vectors to the fp32 ones. The baselines run before the first text job and after the
  last (``--text-rounds`` jobs, 2 by default: st, bare, job, job, bare, st), and ``pipeline_efficiency``
  is the mean job rate over the mean bare rate, ``ratio_vs_sentence_transformers`` over the mean
  sentence-transformers rate, so drift in the machine's speed falls on both sides (one pass of each
  gave 0.83 and 0.90 in two runs of the same code; the bare loop alone moved 162-208/s).
  sentence-transformers runs on a seeded random sample of ``--st-sample`` texts (its rate does not
  depend on how many: it sorts by length within the call, and the sample has the corpus' lengths);
- image / audio: the job vs a plain single-process loop over the same items in S3 (fetch, decode,
  encode with the same model and batch size, one after another), in a Ray actor started on the pools'
  ``--allocator`` with ``--threads`` torch threads (on the driver's C-library allocator, the pools'
  jemalloc counted as pipeline gain: image 0.85 of the plain loop with ``--allocator system``, 0.92
  without, in one run each). Every photo and recording is uploaded once; with
  more items than files the items cycle over them (each item still fetches and decodes its object);
- peak RSS of the driver and its Ray workers, and with ``--scale`` the same text job at larger sizes
  to show whether memory stays flat (each size a seeded sample of the largest size's texts, so only
  the count differs); each job's fixed cost (the same job on 64 items: plan, actor start, model
  load) and its steady rate (items / (wall - fixed)), for media also as a ratio to the plain loop
  (the headline ratios include the fixed cost). ``--texts 0``,
  ``--images 0`` or ``--audio 0`` leaves a modality out.

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench._stack import PeakRSS, bench_stack, repo_root  # noqa: E402
from bench.texts import real_texts  # noqa: E402
from tessera.embed.config import MEDIA_BATCH, EmbedConfig  # noqa: E402
from tessera.embed.output import committed_parts  # noqa: E402
from tessera.embed.pipeline import run_embedding  # noqa: E402
from tessera.encoders import (  # noqa: E402
    AudioEncoder,
    AudioEncoderConfig,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    fetch_media,
    write_seeded_weights,
)
from tessera.memory import allocator_env  # noqa: E402
from tessera.storage import Storage, join_uri  # noqa: E402

ROOT = f"s3://tessera-bench/embed-{uuid.uuid4().hex[:8]}"  # this run's objects, deleted when it ends
SHARED = (repo_root().parent / "shared" / "data").resolve()


def _write_items(storage: Storage, uri: str, rows: dict[str, list], per_part: int = 1000) -> None:
    n = len(rows["item_id"])
    for p, start in enumerate(range(0, n, per_part)):
        table = pa.table({
            "item_id": pa.array(rows["item_id"][start:start + per_part], pa.string()),
            "text": pa.array(rows.get("text", [None] * n)[start:start + per_part], pa.string()),
            "image_uri": pa.array(rows.get("image_uri", [None] * n)[start:start + per_part], pa.string()),
            "audio_uri": pa.array(rows.get("audio_uri", [None] * n)[start:start + per_part], pa.string()),
        })
        fs, path = storage.filesystem(join_uri(uri, f"part-{p:05d}.parquet"))
        pq.write_table(table, path, filesystem=fs)


TEXT_BATCH = 32  # micro-batch of the encoder, sentence-transformers and the bare loop alike
# the encoder pools', the bare text loop's and the plain media loops' (--allocator); sentence-transformers
# runs in this process, on the C library's
ALLOCATOR = {"allocator": "jemalloc"}
TEXT_POOL_BATCH = 2048  # texts per encoder call, sorted by length before cutting micro-batches (configs/embed.yaml)


def _job(storage, items_uri, modality, weights, threads, batch, pool_batch=None,
         uss: bool = False, actors: int = 1, torch_threads: int | None = None) -> tuple[float, dict, PeakRSS, float]:
    """One embedding job of one modality; (items/s, manifest, its memory and CPU samples, wall seconds).

    ``actors`` encoder actors share the ``threads`` (``threads // actors`` torch threads each, or
    ``torch_threads``) and one logical CPU, which leaves the other for the read, decode and write tasks.
    ``uss``: also sample each process's unique memory (reads every process's smaps each second, which
    costs CPU the job then lacks: on for the memory check, off where throughput is measured)."""
    off = {"enabled": False}
    pool = {"min_actors": actors, "max_actors": actors, "num_cpus": 1.0 / actors,
            "batch_size": pool_batch or batch, "torch_threads": torch_threads or max(1, threads // actors),
            **ALLOCATOR}
    cfg = {"items_uri": items_uri, "output_uri": f"{ROOT}/embeddings", "run_id": uuid.uuid4().hex[:10],
           "text": off, "image": off, "audio": off, "read_batch_rows": 256, "write_batch_size": 256,
           "io_concurrency": 1}
    cfg[modality] = {"pool": pool, "encoder": {"batch_size": batch, **({"weights": weights} if weights else {})}}
    # one decode task at a time, as configs/embed.yaml: each new worker pays the modality's imports
    cfg[modality]["preprocess"] = {"concurrency": 1, **({"batch_size": 256} if modality == "text" else {})}
    if modality != "text":
        cfg[modality]["fetch"] = {"concurrency": 2, "threads": 16}
    with PeakRSS(uss_every=4 if uss else 0) as rss:
        t0 = time.perf_counter()
        manifest = run_embedding(EmbedConfig.model_validate(cfg))
        wall = time.perf_counter() - t0
    return manifest["counts"][modality]["ok"] / wall, manifest, rss, wall  # items encoded: failures do not count


def _vectors(storage, manifest, modality) -> dict[str, np.ndarray]:
    out = {}
    for uri in committed_parts(storage, manifest["output"]["uri"], manifest):
        fs, path = storage.filesystem(uri)
        t = pq.read_table(path, filesystem=fs, columns=["item_id", modality])
        for iid, v in zip(t.column("item_id").to_pylist(), t.column(modality).to_pylist(), strict=True):
            if v is not None:
                out[iid] = np.asarray(v, np.float32)
    return out


class _BaselineProcess:
    """A baseline loop's Ray actor, started by :func:`_in_actor` on the encoder pools' allocator (the
    driver runs on the C library's, whose extra CPU would otherwise count as pipeline gain): ``threads``
    torch threads, the encoder ``make_encoder()`` builds, warmed up on ``warm``. (Ray is imported only once
    :func:`bench_stack` has set the token variables: Ray reads them at import.)"""

    def __init__(self, threads: int, make_encoder, warm: list):
        import torch

        from tessera.memory import active_allocator

        torch.set_num_threads(threads)
        self.enc = make_encoder()
        self.enc.embed(warm)
        self._allocator = active_allocator()

    def allocator(self) -> tuple[str, int]:
        return self._allocator, os.getpid()


class BareTextLoop(_BaselineProcess):
    """The bare encoder loop: ``TextEncoder.embed`` over texts in one call."""

    def __init__(self, cfg, threads: int):
        super().__init__(threads, lambda: TextEncoder(cfg), ["warm up"] * 64)

    def run(self, texts: list[str]) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one ``embed`` call over ``texts``."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.enc.embed(texts)
        return time.perf_counter() - t0, time.process_time() - c0


class PlainMediaLoop(_BaselineProcess):
    """The plain media loop: fetch, decode, encode, a batch at a time."""

    def __init__(self, modality: str, cfg, threads: int, warm: bytes):
        self.storage = Storage()
        encoder = ImageEncoder if modality == "image" else AudioEncoder
        super().__init__(threads, lambda: encoder(cfg, self.storage), [warm])

    def run(self, uris: list[str], batch: int) -> tuple[float, float]:
        """(items/s, CPU seconds of this process) over ``uris``."""
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, len(uris), batch):
            chunk = uris[start:start + batch]
            self.enc.encode([self.enc.preprocessor(fetch_media(self.storage, u)) for u in chunk])
        return len(uris) / (time.perf_counter() - t0), time.process_time() - c0


def _in_actor(cls, *args):
    """An actor of ``cls`` on the pools' allocator (num_cpus 0: it runs alone, between the jobs), and a
    function that kills it and waits for its process to exit (alive during a job, its memory would count
    in the job's peak)."""
    import ray

    actor = ray.remote(num_cpus=0)(cls).options(
        runtime_env={"env_vars": allocator_env(ALLOCATOR["allocator"])}).remote(*args)
    allocator, pid = ray.get(actor.allocator.remote())

    def done() -> None:
        ray.kill(actor)
        try:
            psutil.Process(pid).wait(timeout=30)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass

    return actor, allocator, done


def bench_text(storage, n, threads, st_sample, actors=1, pool_batch=TEXT_POOL_BATCH, rounds=2) -> dict:
    """Text: sentence-transformers and the bare loop, then the text jobs, then both baselines again
    (``rounds`` jobs: st, bare, job, job, bare, st at 2), so a machine whose speed drifts during the
    minutes this takes weighs on both sides alike. ``pipeline_efficiency`` is the mean job rate over
    the mean bare rate; every pass is listed."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = real_texts(SHARED, n)
    ids = [f"t{i:07d}" for i in range(len(texts))]
    items = f"{ROOT}/text-{uuid.uuid4().hex[:6]}/items"
    _write_items(storage, items, {"item_id": ids, "text": texts})
    torch.set_num_threads(threads)
    cfg = TextEncoderConfig(batch_size=TEXT_BATCH)
    sample = sorted(np.random.default_rng(0).choice(len(texts), min(st_sample, len(texts)), replace=False))
    st = SentenceTransformer(cfg.weights, device="cpu")
    st.encode(texts[:64], batch_size=TEXT_BATCH)
    ref = None

    def st_pass() -> float:
        nonlocal ref
        t0 = time.perf_counter()
        ref = st.encode([texts[k] for k in sample], batch_size=TEXT_BATCH, normalize_embeddings=True,
                        convert_to_numpy=True)
        return len(sample) / (time.perf_counter() - t0)

    import ray

    # the job's layout: its actors, its threads each, each over a contiguous share of the texts
    shares = [ray.put(part.tolist()) for part in np.array_split(np.asarray(texts, dtype=object), actors)]
    per_actor = max(1, threads // actors)

    def bare() -> tuple[float, float, str]:
        """One pass, in actors started for it; (texts/s over the slowest actor, CPU s, allocator)."""
        started = [_in_actor(BareTextLoop, cfg, per_actor) for _ in range(actors)]
        try:
            passes = ray.get([a.run.remote(share) for (a, _, _), share in zip(started, shares, strict=True)])
        finally:
            for _, _, done in started:
                done()
        return (len(texts) / max(w for w, _ in passes), sum(c for _, c in passes),
                "+".join(sorted({alloc for _, alloc, _ in started})))

    sts, bares, jobs = [st_pass()], [bare()], []
    for _ in range(rounds):
        jobs.append(_job(storage, items, "text", None, threads, TEXT_BATCH, pool_batch, actors=actors))
    bares.append(bare())
    sts.append(st_pass())
    st = None  # noqa: F841  (frees the model)
    st_rate = float(np.mean(sts))
    job_rate, bare_rate = float(np.mean([j[0] for j in jobs])), float(np.mean([b[0] for b in bares]))
    _, manifest, rss, _ = jobs[0]
    wall = float(np.mean([j[3] for j in jobs]))
    ours = _vectors(storage, manifest, "text")
    # the job's fixed cost (plan, actor start, model load, first and last hops): the same job on 64 texts
    tiny = f"{ROOT}/text-{uuid.uuid4().hex[:6]}/items"
    _write_items(storage, tiny, {"item_id": ids[:64], "text": texts[:64]})
    _, _, _, fixed = _job(storage, tiny, "text", None, threads, TEXT_BATCH, pool_batch, actors=actors)
    cos = [float(ours[ids[k]] @ ref[j]) for j, k in enumerate(sample) if ids[k] in ours]
    return {"texts": len(texts), "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
            "text_failed": manifest["counts"]["text"]["failed"], "cosine_sample_without_vector": len(sample) - len(cos),
            "bare_encoder_allocator": sorted({b[2] for b in bares}), "bare_encoder_actors": actors,
            "bare_encoder_threads_per_actor": per_actor,
            "st_sample": len(sample), "text_items_per_s": round(job_rate, 1),
            "text_job_wall_s": round(wall, 2),
            "st_items_per_s": round(st_rate, 1), "bare_encoder_items_per_s": round(bare_rate, 1),
            "bare_encoder_cpu_s": round(float(np.mean([b[1] for b in bares])), 1),
            "text_passes": {"st_items_per_s": [round(r, 1) for r in sts],
                            "bare_items_per_s": [round(b[0], 1) for b in bares],
                            "job_items_per_s": [round(j[0], 1) for j in jobs]},
            "ratio_vs_sentence_transformers": round(job_rate / st_rate, 2),
            "mean_cosine_vs_fp32": round(float(np.mean(cos)), 5), "min_cosine_vs_fp32": round(float(np.min(cos)), 5),
            "pipeline_efficiency": round(job_rate / bare_rate, 2), "text_job_peak_rss_mb": rss.peak_mb,
            "text_job_fixed_s": round(fixed, 2),
            "text_job_steady_items_per_s": round(len(texts) / (wall - fixed), 1) if wall > fixed else None,
            "text_job_timings": manifest["timings"], "text_job_cpu": rss.cpu_by_process()}


def bench_media(storage, modality, files, n_items, weights, threads, actors=1, actor_threads=None) -> dict:
    import ray

    prefix = f"{ROOT}/{modality}-{uuid.uuid4().hex[:6]}"
    objects = []
    for i, f in enumerate(files[:n_items]):
        uri = join_uri(prefix, "media", f"{i:06d}{f.suffix}")
        storage.write_bytes(uri, f.read_bytes())
        objects.append(uri)
    uris = [objects[i % len(objects)] for i in range(n_items)]
    ids = [f"{modality[0]}{i:07d}" for i in range(len(uris))]
    _write_items(storage, join_uri(prefix, "items"), {"item_id": ids, f"{modality}_uri": uris})
    cfg = (ImageEncoderConfig if modality == "image" else AudioEncoderConfig)(weights=weights, batch_size=32)
    loop, plain_allocator, done = _in_actor(PlainMediaLoop, modality, cfg, threads, files[0].read_bytes())
    try:
        plain, plain_cpu = ray.get(loop.run.remote(uris, 32))
    finally:
        done()
    # micro-batches of 32 as the plain loop; MEDIA_BATCH items per fetch task, decode task and encoder call
    job_rate, manifest, rss, wall = _job(storage, join_uri(prefix, "items"), modality, weights, threads, 32,
                                         MEDIA_BATCH, actors=actors, torch_threads=actor_threads)
    # the job's fixed cost, as for text: the same job on 64 of the items
    tiny = join_uri(prefix, "tiny-items")
    _write_items(storage, tiny, {"item_id": ids[:64], f"{modality}_uri": uris[:64]})
    _, _, _, fixed = _job(storage, tiny, modality, weights, threads, 32, MEDIA_BATCH, actors=actors,
                          torch_threads=actor_threads)
    steady = len(uris) / (wall - fixed) if wall > fixed else None
    return {f"{modality}_items": len(uris), f"{modality}_files": len(objects),
            f"{modality}_items_per_s": round(job_rate, 1),
            f"{modality}_plain_loop_items_per_s": round(plain, 1), f"{modality}_plain_loop_cpu_s": round(plain_cpu, 1),
            f"{modality}_plain_loop_allocator": plain_allocator,
            f"{modality}_ratio_vs_plain_loop": round(job_rate / plain, 2), f"{modality}_job_wall_s": round(wall, 2),
            f"{modality}_job_fixed_s": round(fixed, 2),
            f"{modality}_job_steady_items_per_s": round(steady, 1) if steady else None,
            f"{modality}_steady_ratio_vs_plain_loop": round(steady / plain, 2) if steady else None,
            f"{modality}_job_peak_rss_mb": rss.peak_mb,
            f"{modality}_failed": manifest["counts"][modality]["failed"], f"{modality}_job_cpu": rss.cpu_by_process()}


def memory_ratio(scale: dict) -> dict:
    """Peak RSS (and USS, without shared pages; and RSS without the bench's SeaweedFS server, whose memory
    grows with the data it stores) of the largest text job over the smallest's (the memory check)."""
    sizes = sorted((int(k), v["peak_rss_mb"], v["peak_uss_mb"], v["peak_rss_without_storage_mb"])
                   for k, v in scale.items())
    if len(sizes) < 2:
        return {}
    return {"scale_peak_rss_ratio_largest_vs_smallest": round(sizes[-1][1] / sizes[0][1], 2),
            "scale_peak_uss_ratio_largest_vs_smallest": round(sizes[-1][2] / sizes[0][2], 2),
            "scale_peak_rss_ratio_without_storage": round(sizes[-1][3] / sizes[0][3], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--st-sample", type=int, default=3000, help="texts sentence-transformers encodes")
    parser.add_argument("--images", type=int, default=8000, help="image items (over the 2,781 photos)")
    parser.add_argument("--audio", type=int, default=3000, help="audio items (over the 3,000 recordings)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=int, nargs="*", default=[], help="extra text-job sizes for the memory check")
    # two 1-thread text actors beat one 2-thread actor here (separate runs, 20k texts: 228 texts/s at
    # 2048 a call vs 209 at 8192); for audio two actors were slower (0.66 vs 0.80 of its plain loop)
    parser.add_argument("--allocator", choices=("jemalloc", "system"), default="jemalloc",
                        help="the encoder pools' allocator (pool.allocator), and the bare text loop's and "
                             "plain media loops'; sentence-transformers runs on this process's")
    parser.add_argument("--text-actors", type=int, default=2,
                        help="text encoder actors, sharing --threads (threads // actors torch threads each)")
    parser.add_argument("--media-actors", type=int, default=1, help="image / audio encoder actors, as --text-actors")
    parser.add_argument("--media-threads", type=int, default=None,
                        help="torch threads per image / audio actor (default: --threads // --media-actors)")
    parser.add_argument("--text-pool-batch", type=int, default=TEXT_POOL_BATCH,
                        help="texts per encoder call (sorted by length within it)")
    parser.add_argument("--text-rounds", type=int, default=2,
                        help="text jobs, between a bare-loop pass before and one after (A-B-B-A at 2)")
    args = parser.parse_args()
    ALLOCATOR["allocator"] = args.allocator
    result: dict = {"allocator": args.allocator, "threads": args.threads, "text_actors": args.text_actors,
                    "media_actors": args.media_actors,
                    "media_threads": args.media_threads or max(1, args.threads // args.media_actors),
                    "text_pool_batch": args.text_pool_batch, "media_batch": MEDIA_BATCH}
    with bench_stack(num_cpus=2):
        storage = Storage()
        storage.ensure_bucket(ROOT)
        try:
            run_all(args, storage, result)
        finally:  # the store's memory grows with what it holds: leave nothing for the next run
            storage.delete_prefix(ROOT)
    scale = result["scale"]
    peaks = [v for k, v in result.items() if k.endswith("peak_rss_mb")] + [v["peak_rss_mb"] for v in scale.values()]
    result["peak_rss_mb"] = max(peaks, default=None)  # a --scale-only run has no top-level peaks
    print(json.dumps(result))


def run_all(args, storage: Storage, result: dict) -> None:
    weights = write_seeded_weights(f"{ROOT}/models/encoders", storage, seed=0)
    if args.texts:
        result.update(bench_text(storage, args.texts, args.threads, args.st_sample, args.text_actors,
                                 args.text_pool_batch, args.text_rounds))
        print(f"[bench] text: {result}", flush=True)
    grocery = SHARED / "grocery" / "dataset"
    photos = sorted((grocery / "test").rglob("*.jpg")) + sorted((grocery / "val").rglob("*.jpg"))
    if args.images:
        result.update(bench_media(storage, "image", photos, args.images, weights["image"], args.threads,
                                  args.media_actors, args.media_threads))
        print(f"[bench] image: {result}", flush=True)
    wavs = sorted((SHARED / "fsdd" / "recordings").glob("*.wav"))
    if args.audio:
        result.update(bench_media(storage, "audio", wavs, args.audio, weights["audio"], args.threads,
                                  args.media_actors, args.media_threads))
        print(f"[bench] audio: {result}", flush=True)
    scale = {}
    # every size is a seeded sample of one pool, so the sizes differ in count and not in what the
    # texts are like (the pool's later texts are longer: prefixes would compare different inputs)
    pool = real_texts(SHARED, max(args.scale)) if args.scale else []
    shuffled = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))]
    for n in args.scale:
        texts = shuffled[:n]
        items = f"{ROOT}/scale-{n}-{uuid.uuid4().hex[:6]}/items"
        _write_items(storage, items, {"item_id": [f"s{i:08d}" for i in range(len(texts))], "text": texts})
        rate, _, rss, wall = _job(storage, items, "text", None, args.threads, TEXT_BATCH, args.text_pool_batch,
                                  uss=True, actors=args.text_actors)
        scale[str(len(texts))] = {"items_per_s": round(rate, 1), "peak_rss_mb": rss.peak_mb,
                                  "peak_rss_without_storage_mb": rss.peak_without_storage_mb,
                                  "peak_uss_mb": rss.peak_uss_mb, "largest_at_peak": rss.top_at_peak,
                                  "wall_s": round(wall, 2), **rss.cpu_by_process()}
        print(f"[bench] scale {n}: {scale[str(len(texts))]}", flush=True)
    result["scale"] = scale
    result.update(memory_ratio(scale))


if __name__ == "__main__":
    main()
