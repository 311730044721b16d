"""Embed the items table: one encoder actor pool per modality, embeddings written back to storage.

    ray job submit --working-dir . -- python -m jobs.embed --config configs/embed.yaml
    python -m jobs.embed --config configs/embed.yaml [--run-id R] [--max-error-rate 0.1]
    python -m jobs.embed --config configs/embed.yaml --run-id R2 --retry-failed-from R [--retry-kinds missing,corrupt]

Exit codes: 0 done; 2 bad config or input (null / repeated item ids, pools that do not fit the
cluster, a run id started with other settings, a run to retry that is absent, unfinished or of other
settings); 3 error rate above --max-error-rate (the summary is
printed and the output is kept); 4 the output does not hold every input item exactly once, or a pool's
actors ran different weights of one encoder; 5 another
attempt of the run holds it (started before this one and still running, or took it over from this one).
"""

from __future__ import annotations

import argparse
import json
import sys

from tessera.config import ConfigError, apply_flags, load_config
from tessera.embed.config import EmbedConfig
from tessera.embed.pipeline import EmbeddingInputError, EmbeddingIntegrityError, error_rate, run_embedding
from tessera.lease import LeaseHeldError, LeaseLostError
from tessera.ray_utils import init_ray


def summary_lines(manifest: dict) -> list[str]:
    lines = []
    for m, c in manifest["counts"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(c["errors"].items())) or "none"
        lines.append(f"  {m:5s}: {c['ok']} ok, {c['failed']} failed ({kinds}), {c['missing']} without {m}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="configs/embed.yaml")
    parser.add_argument("--run-id", default=None, help="override run_id from the config")
    parser.add_argument("--max-error-rate", type=float, default=None,
                        help="fail (exit 3) when failed / present modality inputs exceed this (default: config)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take the run over from another attempt that still holds its lease (only when "
                             "you know that attempt is gone: two at once write duplicates)")
    parser.add_argument("--retry-failed-from", default=None, metavar="RUN_ID",
                        help="embed again the failed items of this finished run, into --run-id (a new run that "
                             "copies the rest of it); for objects uploaded or repaired since")
    parser.add_argument("--retry-kinds", default=None, metavar="KIND[,KIND...]",
                        help="with --retry-failed-from: only items failed with these error kinds (default: all)")
    args = parser.parse_args(argv)
    kinds = None if args.retry_kinds is None else [k.strip() for k in args.retry_kinds.split(",") if k.strip()]
    try:
        cfg = apply_flags(load_config(EmbedConfig, args.config), [
            ("--run-id", "run_id", args.run_id or None), ("--max-error-rate", "max_error_rate", args.max_error_rate),
            ("--retry-failed-from", "retry_failed_from", args.retry_failed_from),
            ("--retry-kinds", "retry_kinds", kinds)])
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray()
    try:
        manifest = run_embedding(cfg, break_lease=args.break_lease)
    except EmbeddingInputError as err:
        print(f"error ({args.config}): {err}", file=sys.stderr)
        return 2
    except EmbeddingIntegrityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except (LeaseHeldError, LeaseLostError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 5
    rate = error_rate(manifest)
    state = "already complete, kept" if manifest.get("reused") else "written"
    print(f"embeddings {state} at {manifest['output']['uri']}: {manifest['input']['items']} items, "
          f"error rate {rate:.3f}")
    print("\n".join(summary_lines(manifest)))
    if (retried := manifest.get("retried_from")) is not None:
        print(f"  retried {retried['items_retried']} items of {retried['run']} "
              f"({retried['parts_copied']} of its {retried['parts']} parts copied as they were)")
    print(json.dumps({"counts": manifest["counts"], "timings": manifest["timings"]}, sort_keys=True))
    if rate > cfg.max_error_rate:
        print(f"error: error rate {rate:.3f} is above max_error_rate {cfg.max_error_rate}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
