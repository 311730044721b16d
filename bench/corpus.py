"""Benchmark: sample-corpus generation throughput and peak memory.

    .venv/bin/python bench/corpus.py [--sizes 10000 100000] [--baseline-items 2000]

Brings up its own SeaweedFS and a local Ray. For each size it generates a fresh corpus with the
parallel Ray job and records items/s and the peak RSS of the driver plus its Ray workers. Side by
side, the baseline: the same parts built and uploaded serially in one process, no Ray. Prints one
JSON object as the last line: ``items_per_s`` and ``peak_rss_mb`` are those of the largest size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stack import PeakRSS, bench_stack  # noqa: E402
from tessera.corpus import CorpusConfig, generate_corpus  # noqa: E402
from tessera.corpus.generate import write_item_part  # noqa: E402
from tessera.storage import Storage  # noqa: E402

BUCKET = "s3://tessera-bench"


def _cfg(n_items: int, **kw) -> CorpusConfig:
    return CorpusConfig(root=f"{BUCKET}/corpus-{n_items}-{uuid.uuid4().hex[:6]}", num_items=n_items,
                        num_users=max(100, n_items // 10), items_per_part=1000, users_per_part=5000, **kw)


def run(sizes: list[int], baseline_items: int) -> dict:
    with bench_stack():
        Storage().ensure_bucket(BUCKET)
        base_cfg = _cfg(baseline_items)
        t0 = time.perf_counter()
        for part in range(base_cfg.num_item_parts):
            write_item_part(base_cfg, part)
        serial = baseline_items / (time.perf_counter() - t0)
        print(f"[bench] serial baseline: {serial:.1f} items/s", flush=True)
        results = {}
        for n in sizes:
            cfg = _cfg(n)
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                manifest = generate_corpus(cfg)
                wall = time.perf_counter() - t0
            results[str(n)] = {"items_per_s": round(manifest["items_per_s"], 1),
                               "wall_s_incl_users": round(wall, 1), "peak_rss_mb": rss.peak_mb,
                               "interactions": manifest["counts"]["interactions"]}
            print(f"[bench] {n} items: {results[str(n)]}", flush=True)
    largest = results[str(max(sizes))]
    smallest = results[str(min(sizes))]
    return {
        "items_per_s": largest["items_per_s"],
        "peak_rss_mb": largest["peak_rss_mb"],
        "baseline_serial_items_per_s": round(serial, 1),
        "ratio_vs_serial": round(largest["items_per_s"] / serial, 2),
        "peak_rss_ratio_largest_vs_smallest": round(largest["peak_rss_mb"] / smallest["peak_rss_mb"], 2),
        "by_size": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--baseline-items", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(run(args.sizes, args.baseline_items)))


if __name__ == "__main__":
    main()
