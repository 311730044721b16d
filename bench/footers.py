"""Benchmark: counting the rows of many Parquet files from their footers, one file at a time vs in threads.

    .venv/bin/python bench/footers.py [--files 2000] [--threads 16] [--rounds 2]

The embedding job and the index job count their input's rows before any work (``Storage.parquet_rows``):
one footer read per file, a round trip or two to the store each. Brings up its own SeaweedFS (no Ray),
writes ``--files`` small Parquet files (10-100 rows), then counts them with ``threads=1`` (the baseline:
the loop before threads) and ``threads=--threads``, alternating (``--rounds`` each), and checks both
counts against the rows written. On loopback a round trip costs ~1 ms; on a real S3 endpoint 10-50 ms,
so the gain there is larger than here. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stack import BENCH_S3_PORT_BASE  # noqa: E402


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import os

    import numpy as np
    import pyarrow as pa

    from tessera.embedded.seaweedfs import EmbeddedS3, S3Ports
    from tessera.embedded.state import state_dir
    from tessera.storage import Storage, join_uri

    s3 = EmbeddedS3(state_dir() / "bench", ports=S3Ports.block(BENCH_S3_PORT_BASE))
    conn = s3.start()
    os.environ.update(conn.env())
    try:
        storage = Storage()
        root = "s3://tessera-bench/footers"
        storage.ensure_bucket(root)
        storage.delete_prefix(root)
        sizes = np.random.default_rng(0).integers(10, 101, args.files)
        uris = [join_uri(root, f"part-{i:05d}.parquet") for i in range(args.files)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda a: storage.write_parquet(a[0], pa.table({"item_id": [f"i{j}" for j in range(a[1])]})),
                          zip(uris, sizes.tolist(), strict=True)))
        write_s = time.perf_counter() - t0
        expected = int(sizes.sum())
        passes: dict[str, list[float]] = {"sequential": [], "threaded": []}
        for _ in range(args.rounds):
            for name, threads in (("sequential", 1), ("threaded", args.threads)):
                t0 = time.perf_counter()
                rows = storage.parquet_rows(uris, threads=threads)
                passes[name].append(round(time.perf_counter() - t0, 3))
                if rows != expected:
                    raise SystemExit(f"{name}: counted {rows} rows, wrote {expected}")
        storage.delete_prefix(root)
    finally:
        s3.stop()
    best = {name: min(values) for name, values in passes.items()}
    return {"files": args.files, "rows": expected, "threads": args.threads, "write_s": round(write_s, 2),
            "sequential_s": best["sequential"], "threaded_s": best["threaded"],
            "files_per_s_sequential": round(args.files / best["sequential"], 1),
            "files_per_s_threaded": round(args.files / best["threaded"], 1),
            "speedup": round(best["sequential"] / best["threaded"], 2), "passes_s": passes,
            "store": "embedded SeaweedFS on loopback"}


if __name__ == "__main__":
    print(json.dumps(main()))
