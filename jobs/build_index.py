"""Build the sharded ScaNN index of a model bundle: item vectors, parallel shard builds, recall self-check.

    ray job submit --working-dir . -- python -m jobs.build_index --config configs/index.yaml
    python -m jobs.build_index --config configs/index.yaml [--model-uri U] [--version V] [--shards S]
        [--keep-existing] [--break-lease]

Exit codes: 0 done (or the version exists, built from the same bundle training and embedding run, and
--keep-existing was given); 2 bad config; 3 a self-check recall is below the floor (``_FAILED.json``
written, no manifest); 4 the vectors do not hold every input item exactly once; 5 the index version
already exists (with --keep-existing: built from other inputs, which it names), or another build of it
is running (or took it over); 6 an input (bundle, embedding run) is missing or inconsistent.
"""

from __future__ import annotations

import argparse
import json
import sys

from tessera.config import ConfigError, apply_flags, load_config
from tessera.index_job import (
    IndexExistsError,
    IndexIntegrityError,
    IndexJobConfig,
    IndexRecallError,
    IndexSourceError,
    run_index_job,
)
from tessera.interactions import log_schema_error
from tessera.lease import LeaseHeldError, LeaseLostError
from tessera.ray_utils import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="configs/index.yaml")
    parser.add_argument("--model-uri", default=None, help="override model_uri from the config")
    parser.add_argument("--version", default=None, help="override the index version (default: model version)")
    parser.add_argument("--shards", type=int, default=None, help="override num_shards")
    parser.add_argument("--keep-existing", action="store_true",
                        help="an existing complete index of that version is kept and the job succeeds")
    parser.add_argument("--break-lease", action="store_true",
                        help="take the version over from another build that still holds its lease (only when "
                             "that build is known to be gone)")
    args = parser.parse_args(argv)
    try:
        cfg = apply_flags(load_config(IndexJobConfig, args.config), [
            ("--model-uri", "model_uri", args.model_uri or None), ("--version", "version", args.version or None),
            ("--shards", "num_shards", args.shards)])
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray()
    try:
        manifest = run_index_job(cfg, break_lease=args.break_lease)
    except ConfigError as err:  # a setting that does not fit the data (a pinned ScaNN parameter)
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    except IndexRecallError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except IndexIntegrityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except IndexExistsError as err:
        if args.keep_existing and err.same_inputs:
            print(f"kept: {err}")
            return 0
        if args.keep_existing:  # an index of another model (or training of it) would stay in service
            print(f"error: {err} (--keep-existing keeps only an index of the same inputs)", file=sys.stderr)
            return 5
        print(f"error: {err}", file=sys.stderr)
        return 5
    except (LeaseHeldError, LeaseLostError) as err:  # another build of the same version
        print(f"error: {err}", file=sys.stderr)
        return 5
    except (IndexSourceError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 6
    except Exception as err:  # an interaction-log file whose columns cannot be read (from a Ray task)
        if (bad := log_schema_error(err)) is None:
            raise
        print(f"error: {bad}", file=sys.stderr)
        return 6
    checks = {name: f"recall@{c.k} {c.recall:.4f} ({c.num_queries} queries)"
              for name, c in manifest.recall_checks.items()}
    print(f"index {manifest.index_version} written: {manifest.num_items} items in {manifest.num_shards} shards "
          f"(model {manifest.model_version}), {checks}, modal indexes {sorted(manifest.modal_indexes)}")
    print(json.dumps({"counts": manifest.counts, "timings": manifest.timings,
                      "recall": {n: c.recall for n, c in manifest.recall_checks.items()}}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
