"""Memory of the text encoder alone, in this process: what an encoder actor's RSS does over a corpus.

    .venv/bin/python bench/encoder_memory.py [--texts 100000] [--pool-batch 8192] [--order corpus|shuffled]
                                             [--no-trim] [--threads 2] [--max-batch-tokens N]
                                             [--pad-to-multiple-of N] [--jemalloc]

Encodes real texts (bench/texts.py) with ``TextEncoder`` the way an ``EncodeActor`` does (one
``encode`` call per pool batch, micro-batches of 32 sorted by length), and after each call records
the peak RSS inside the call (``VmHWM``, reset before it through ``/proc/self/clear_refs``) and the
RSS after it, after ``release_free_heap()`` unless ``--no-trim`` (both sides of the A/B run the
same code otherwise). ``--jemalloc`` restarts the script on the jemalloc the encoder pools get
(``tessera.memory.local_allocator_env``; the trim is then its purge). ``--order shuffled`` encodes a seeded
permutation of the texts, so every batch has the corpus's length mix; in corpus order the later texts
are longer. Linux only.

Prints one line per batch and, last, one JSON object: the first and last batches' figures and
``peak_ratio_last_vs_first_quarter`` (the mean in-call peak over the last quarter of the batches /
over the first quarter) and the same for the RSS after each call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.texts import real_texts  # noqa: E402
from tessera.memory import active_allocator, local_allocator_env, release_free_heap  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _status_mb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key))


def _quarter_ratio(values: list[int]) -> float | None:
    q = len(values) // 4
    return round(float(np.mean(values[-q:]) / np.mean(values[:q])), 3) if q else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=100_000)
    parser.add_argument("--pool-batch", type=int, default=8192)
    parser.add_argument("--order", choices=("corpus", "shuffled"), default="corpus")
    parser.add_argument("--no-trim", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="the encoder's max_batch_tokens (padded tokens per micro-batch); default none")
    parser.add_argument("--pad-to-multiple-of", type=int, default=None,
                        help="the encoder's pad_to_multiple_of; default the encoder's own (8)")
    parser.add_argument("--jemalloc", action="store_true", help="run on the encoder pools' jemalloc")
    args = parser.parse_args()
    if args.jemalloc and active_allocator() != "jemalloc":
        env = local_allocator_env("jemalloc")
        if not env:
            sys.exit("this Ray ships no libjemalloc.so")
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

    import torch

    from tessera.encoders import TextEncoder
    from tessera.encoders.text import TextEncoderConfig

    torch.set_num_threads(args.threads)
    texts = real_texts(SHARED, args.texts)
    if args.order == "shuffled":
        texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    padding = {} if args.pad_to_multiple_of is None else {"pad_to_multiple_of": args.pad_to_multiple_of}
    encoder = TextEncoder(TextEncoderConfig(device="cpu", batch_size=32, max_batch_tokens=args.max_batch_tokens,
                                            **padding))
    encoder.embed(texts[:64])
    release_free_heap()
    start_mb, t0, rows = _status_mb("VmRSS"), time.perf_counter(), []
    for lo in range(0, len(texts), args.pool_batch):
        ids = [x for x in encoder.preprocessor.map(texts[lo:lo + args.pool_batch]) if not isinstance(x, Exception)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        vectors = encoder.encode(ids)
        peak = _status_mb("VmHWM")
        del vectors, ids
        if not args.no_trim:
            release_free_heap()
        row = {"texts_done": min(lo + args.pool_batch, len(texts)), "peak_in_call_mb": peak,
               "rss_after_mb": _status_mb("VmRSS"), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    peaks, after = [r["peak_in_call_mb"] for r in rows], [r["rss_after_mb"] for r in rows]
    print(json.dumps({"texts": len(texts), "allocator": active_allocator(), "order": args.order,
                      "trim": not args.no_trim,
                      "max_batch_tokens": args.max_batch_tokens,
                      "pad_to_multiple_of": encoder.config.pad_to_multiple_of,
                      "pool_batch": args.pool_batch, "rss_after_load_mb": start_mb, "first": rows[0], "last": rows[-1],
                      "max_peak_in_call_mb": max(peaks),
                      "peak_ratio_last_vs_first_quarter": _quarter_ratio(peaks),
                      "rss_after_ratio_last_vs_first_quarter": _quarter_ratio(after),
                      "texts_per_s": round(len(texts) / (time.perf_counter() - t0), 1)}))


if __name__ == "__main__":
    main()
