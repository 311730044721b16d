"""Benchmark: the encoders on a CUDA GPU against plain baselines on the same GPU, side by side in one run.

    python bench/gpu_encoders.py [--texts 20000] [--images 4096] [--audio 2048] [--batch-sizes 64 256 1024]

Needs a CUDA device; no Ray and no object store: it measures what one GPU encoder actor does per
call (``Encoder.encode`` on preprocessed inputs, the model's forward under autocast, vectors back on
the host), which is what sizes a GPU pool of the embedding job (``<modality>.pool.batch_size``, how
many CPU decode tasks one GPU needs). Real inputs: texts from ``bench/texts.py``, grocery photos and
FSDD recordings from ``../shared/data`` (cycled when more items are asked for than there are files).

- text: ``TextEncoder`` (all-MiniLM-L6-v2, bf16 autocast, length-sorted micro-batches) at each batch
  size vs sentence-transformers ``SentenceTransformer(...).encode()`` in fp32 on the same GPU, same
  batch size, and the cosine of our vectors to its;
- image / audio: ``ImageEncoder`` / ``AudioEncoder`` (seeded placeholder weights: the architecture's
  cost, not its quality) at each batch size vs a plain fp32 loop over the same model and inputs (the
  encoder's own forward without autocast or channels-last, one stacked call per batch);
- the preprocessing rate per modality with one torch thread (tokenise, which the tokenizers library
  spreads over its own threads / decode+resize / decode+resample): the CPU side a GPU actor waits for.

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.texts import real_texts  # noqa: E402
from tessera.encoders import (  # noqa: E402
    AudioEncoder,
    AudioEncoderConfig,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    load_preprocessor,
    write_seeded_weights,
)
from tessera.encoders.seeded import SEEDED_AUDIO_FOLDER, SEEDED_IMAGE_FOLDER  # noqa: E402
from tessera.encoders.text import packaged_minilm_path  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rate(fn, n: int, repeats: int = 2) -> float:
    """Best items/s of ``repeats`` timed calls of ``fn`` (after one warm-up call)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t0))
    return round(best, 1)


def _prep_rate(prep, raws: list) -> float:
    """Items/s of ``prep.map(raws)`` with one torch thread (after a warm-up item)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prep.map(raws[:1])
        t0 = time.perf_counter()
        prep.map(raws)
        return round(len(raws) / (time.perf_counter() - t0), 1)
    finally:
        torch.set_num_threads(threads)


def bench_text(weights: str, n: int, sizes: list[int]) -> dict:
    from sentence_transformers import SentenceTransformer

    texts = real_texts(SHARED, n)
    out = {"texts": len(texts), "mean_chars": round(float(np.mean([len(t) for t in texts])), 1)}
    # fp32 whatever the checkpoint stores (transformers 5 loads an fp16 file in fp16)
    st = SentenceTransformer(weights, device="cuda").float()
    prep = load_preprocessor(TextEncoderConfig(weights=weights))
    ids = prep.map(texts)
    for b in sizes:
        enc = TextEncoder(TextEncoderConfig(weights=weights, device="cuda", batch_size=b))
        ours = _rate(lambda enc=enc, ids=ids: enc.encode(ids), len(ids))
        base = _rate(lambda b=b: st.encode(texts, batch_size=b, normalize_embeddings=True), len(texts))
        ref = st.encode(texts, batch_size=b, normalize_embeddings=True)
        cos = (enc.encode(ids) * ref).sum(axis=1)
        out[str(b)] = {"ours_items_per_s": ours, "st_fp32_items_per_s": base, "ratio": round(ours / base, 2),
                       "mean_cosine_vs_fp32": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6)}
        del enc
    out["tokenize_items_per_s"] = _prep_rate(prep, texts[:5000])  # the tokenizers library runs its own threads
    return out


def _plain_rate(inputs: list[np.ndarray], b: int, forward) -> float:
    """A plain fp32 loop over the same model: ``forward`` (stack, model, pooling) per batch, normalise, copy to host."""
    def run():
        with torch.inference_mode():
            for s in range(0, len(inputs), b):
                v = torch.nn.functional.normalize(forward(inputs[s:s + b]).float(), dim=-1)
                v.cpu().numpy()
    return _rate(run, len(inputs))


def bench_media(modality: str, weights: Path, raws: list[bytes], sizes: list[int]) -> dict:
    cls, cfg_cls = (ImageEncoder, ImageEncoderConfig) if modality == "image" else (AudioEncoder, AudioEncoderConfig)
    out = {"items": len(raws)}
    prep = load_preprocessor(cfg_cls(weights=str(weights)))
    inputs = prep.map(raws)
    for b in sizes:
        enc = cls(cfg_cls(weights=str(weights), device="cuda", batch_size=b))
        ours = _rate(lambda enc=enc, inputs=inputs: enc.encode(inputs), len(inputs))
        plain_enc = cls(cfg_cls(weights=str(weights), device="cuda", batch_size=b, bf16_autocast=False,
                                **({"channels_last": False} if modality == "image" else {})))
        plain = _plain_rate(inputs, b, plain_enc._forward)
        out[str(b)] = {"ours_items_per_s": ours, "plain_fp32_items_per_s": plain, "ratio": round(ours / plain, 2)}
        del enc, plain_enc
    out["preprocess_items_per_s_1_thread"] = _prep_rate(prep, raws[:512])
    return out


def _cycle(paths: list[Path], n: int) -> list[bytes]:
    data = [p.read_bytes() for p in paths]
    return [data[i % len(data)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--audio", type=int, default=2048)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--text-weights", default=None, help="default: the packaged all-MiniLM-L6-v2")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_encoders.py needs a CUDA device")
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "batch_sizes": args.batch_sizes}
    if args.texts:
        result["text"] = bench_text(args.text_weights or packaged_minilm_path(), args.texts, args.batch_sizes)
        print(json.dumps({"text": result["text"]}), flush=True)
    with tempfile.TemporaryDirectory(prefix="tessera-seeded-") as tmp:
        write_seeded_weights(tmp, seed=0)
        if args.images:
            photos = sorted((SHARED / "grocery" / "dataset").rglob("*.jpg"))
            result["image"] = bench_media("image", Path(tmp) / SEEDED_IMAGE_FOLDER, _cycle(photos, args.images),
                                          args.batch_sizes)
            print(json.dumps({"image": result["image"]}), flush=True)
        if args.audio:
            wavs = sorted((SHARED / "fsdd" / "recordings").glob("*.wav"))
            result["audio"] = bench_media("audio", Path(tmp) / SEEDED_AUDIO_FOLDER, _cycle(wavs, args.audio),
                                          args.batch_sizes)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
