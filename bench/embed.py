"""Benchmark: the embedding job against plain single-process loops, side by side in one run.

    .venv/bin/python bench/embed.py [--texts 3000] [--images 400] [--audio 400] [--threads 2]
                                    [--scale 10000 30000]

Brings up its own SeaweedFS and a local Ray (2 CPUs). Measures, on real data from ../shared/data and
real text on this machine (bench/texts.py):

- text: the whole job (items table in S3 -> Parquet embeddings in S3, wall clock, model loads
  included) vs sentence-transformers ``SentenceTransformer(...).encode()`` in fp32 and vs our bare
  encoder loop (``TextEncoder.embed``), same thread count; cosine of our vectors to the fp32 ones;
- image / audio: the job vs a plain single-process loop over the same objects in S3 (fetch, decode,
  encode with the same model and batch size);
- peak RSS of the driver and its Ray workers, and with ``--scale`` the same text job at larger sizes
  to show whether memory stays flat.

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench._stack import PeakRSS, bench_stack, repo_root  # noqa: E402
from bench.texts import real_texts  # noqa: E402
from tessera.embed.config import EmbedConfig  # noqa: E402
from tessera.embed.output import list_parts  # noqa: E402
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
from tessera.storage import Storage, join_uri  # noqa: E402

ROOT = "s3://tessera-bench"
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


def _job(storage, items_uri, modality, weights, threads, batch, pool_batch=None) -> tuple[float, dict, float]:
    off = {"enabled": False}
    # the pool's batch can be larger than the encoder's micro-batch: text sorts a whole pool batch by
    # length before cutting micro-batches, so a larger pool batch pads less
    pool = {"num_cpus": 1.0, "batch_size": pool_batch or batch, "torch_threads": threads}
    cfg = {"items_uri": items_uri, "output_uri": f"{ROOT}/embeddings", "run_id": uuid.uuid4().hex[:10],
           "text": off, "image": off, "audio": off, "read_batch_rows": 256, "write_batch_size": 256}
    cfg[modality] = {"pool": pool, "encoder": {"batch_size": batch, **({"weights": weights} if weights else {})}}
    if modality != "text":
        cfg[modality]["fetch"] = {"concurrency": 2, "threads": 16}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        manifest = run_embedding(EmbedConfig.model_validate(cfg))
        wall = time.perf_counter() - t0
    return manifest["input"]["items"] / wall, manifest, rss.peak_mb


def _vectors(storage, manifest, modality) -> dict[str, np.ndarray]:
    out = {}
    for uri in list_parts(storage, manifest["output"]["uri"]):
        fs, path = storage.filesystem(uri)
        t = pq.read_table(path, filesystem=fs, columns=["item_id", modality])
        for iid, v in zip(t.column("item_id").to_pylist(), t.column(modality).to_pylist(), strict=True):
            if v is not None:
                out[iid] = np.asarray(v, np.float32)
    return out


def bench_text(storage, n, threads) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    texts = real_texts(SHARED, n)
    ids = [f"t{i:07d}" for i in range(len(texts))]
    items = f"{ROOT}/text-{uuid.uuid4().hex[:6]}/items"
    _write_items(storage, items, {"item_id": ids, "text": texts})
    torch.set_num_threads(threads)
    cfg = TextEncoderConfig(batch_size=64)
    st = SentenceTransformer(cfg.weights, device="cpu")
    st.encode(texts[:64])
    t0 = time.perf_counter()
    ref = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    st_rate = len(texts) / (time.perf_counter() - t0)
    enc = TextEncoder(cfg)
    enc.embed(texts[:64])
    t0 = time.perf_counter()
    enc.embed(texts)
    bare_rate = len(texts) / (time.perf_counter() - t0)
    del enc, st
    job_rate, manifest, rss = _job(storage, items, "text", None, threads, 64, pool_batch=512)
    ours = _vectors(storage, manifest, "text")
    cos = [float(ours[i] @ ref[k]) for k, i in enumerate(ids) if i in ours]
    return {"texts": len(texts), "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
            "text_items_per_s": round(job_rate, 1), "st_items_per_s": round(st_rate, 1),
            "bare_encoder_items_per_s": round(bare_rate, 1),
            "ratio_vs_sentence_transformers": round(job_rate / st_rate, 2),
            "mean_cosine_vs_fp32": round(float(np.mean(cos)), 5), "min_cosine_vs_fp32": round(float(np.min(cos)), 5),
            "pipeline_efficiency": round(job_rate / bare_rate, 2), "text_job_peak_rss_mb": rss,
            "text_job_timings": manifest["timings"]}


def _plain_loop(storage, uris, encoder, batch) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(uris), batch):
        chunk = uris[start:start + batch]
        encoder.encode([encoder.preprocessor(fetch_media(storage, u)) for u in chunk])
    return len(uris) / (time.perf_counter() - t0)


def bench_media(storage, modality, files, weights, threads) -> dict:
    import torch

    prefix = f"{ROOT}/{modality}-{uuid.uuid4().hex[:6]}"
    uris = []
    for i, f in enumerate(files):
        uri = join_uri(prefix, "media", f"{i:06d}{f.suffix}")
        storage.write_bytes(uri, f.read_bytes())
        uris.append(uri)
    ids = [f"{modality[0]}{i:07d}" for i in range(len(uris))]
    _write_items(storage, join_uri(prefix, "items"), {"item_id": ids, f"{modality}_uri": uris})
    torch.set_num_threads(threads)
    cfg = (ImageEncoderConfig if modality == "image" else AudioEncoderConfig)(weights=weights, batch_size=32)
    enc = (ImageEncoder if modality == "image" else AudioEncoder)(cfg, storage)
    enc.embed([files[0].read_bytes()])
    plain = _plain_loop(storage, uris, enc, 32)
    del enc
    job_rate, manifest, rss = _job(storage, join_uri(prefix, "items"), modality, weights, threads, 32)
    return {f"{modality}_items": len(uris), f"{modality}_items_per_s": round(job_rate, 1),
            f"{modality}_plain_loop_items_per_s": round(plain, 1),
            f"{modality}_ratio_vs_plain_loop": round(job_rate / plain, 2), f"{modality}_job_peak_rss_mb": rss,
            f"{modality}_failed": manifest["counts"][modality]["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--audio", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=int, nargs="*", default=[], help="extra text-job sizes for the memory check")
    args = parser.parse_args()
    result: dict = {"threads": args.threads}
    with bench_stack(num_cpus=2):
        storage = Storage()
        storage.ensure_bucket(ROOT)
        weights = write_seeded_weights(f"{ROOT}/models/encoders", storage, seed=0)
        result.update(bench_text(storage, args.texts, args.threads))
        print(f"[bench] text: {result}", flush=True)
        photos = sorted((SHARED / "grocery" / "dataset" / "test").rglob("*.jpg"))[: args.images]
        result.update(bench_media(storage, "image", photos, weights["image"], args.threads))
        wavs = sorted((SHARED / "fsdd" / "recordings").glob("*.wav"))[: args.audio]
        result.update(bench_media(storage, "audio", wavs, weights["audio"], args.threads))
        scale = {}
        for n in args.scale:
            texts = real_texts(SHARED, n)
            items = f"{ROOT}/scale-{n}-{uuid.uuid4().hex[:6]}/items"
            _write_items(storage, items, {"item_id": [f"s{i:08d}" for i in range(len(texts))], "text": texts})
            rate, _, rss = _job(storage, items, "text", None, args.threads, 64, pool_batch=512)
            scale[str(len(texts))] = {"items_per_s": round(rate, 1), "peak_rss_mb": rss}
            print(f"[bench] scale {n}: {scale[str(len(texts))]}", flush=True)
        result["scale"] = scale
    result["peak_rss_mb"] = max(v for k, v in result.items() if k.endswith("peak_rss_mb"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
