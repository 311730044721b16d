"""Train the fused two-tower retrieval model, its ranker and the baselines; write the model bundle.

    ray job submit --working-dir . -- python -m jobs.train --config configs/train.yaml
    python -m jobs.train --config configs/train.yaml [--version v2] [--overwrite | --keep-existing]
        [--break-lease]

Exit codes: 0 done (the summary's last line is one JSON object with the metrics), or the version
already exists and --keep-existing was given; 2 bad config, or checkpoints of this version trained
with other settings or another embedding run (pass --overwrite or another --version; a rerun with the
same ones resumes from them); 3 the bundle version already exists
(pass --overwrite, --keep-existing or another --version); 4 training failed
(more worker failures than max_failures); 5 another attempt of the version is running (it holds
the version's lease; --break-lease takes it over) or took it over while this one ran.
"""

from __future__ import annotations

import argparse
import json
import sys

from tessera.config import ConfigError, apply_flags, load_config
from tessera.ray_utils import init_ray
from tessera.train.config import TrainConfig


def job_config(args: argparse.Namespace) -> TrainConfig:
    """The config file with the flags applied. ``--keep-existing`` wins over ``overwrite: true`` in the file or
    ``TESSERA__OVERWRITE`` (with those, an existing bundle was not refused, so not kept: it was replaced).

    Raises:
        ConfigError: a bad file or flag, or ``--keep-existing`` with ``--overwrite``."""
    if args.keep_existing and args.overwrite:
        raise ConfigError("--keep-existing and --overwrite contradict each other: give one")
    return apply_flags(load_config(TrainConfig, args.config), [
        ("--version", "version", args.version or None), ("--overwrite", "overwrite", args.overwrite or None),
        ("--keep-existing", "overwrite", False if args.keep_existing else None)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("--version", default=None, help="override the bundle version from the config")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle of that version")
    parser.add_argument("--keep-existing", action="store_true",
                        help="an existing bundle of that version is kept and the job succeeds (re-runs of a demo)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take the version over from another attempt that still holds its lease (only when "
                             "that attempt is known to be gone)")
    args = parser.parse_args(argv)
    try:
        cfg = job_config(args)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tessera.lease import LeaseHeldError, LeaseLostError
    from tessera.train.job import BundleExistsError, RunConflictError, TrainingFailedError, run_training

    init_ray()
    try:
        manifest = run_training(cfg, break_lease=args.break_lease)
    except BundleExistsError as err:
        if args.keep_existing:
            print(f"kept: {err}")
            return 0
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ConfigError as err:  # the config does not fit the data it names
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    except RunConflictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingFailedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    except (LeaseHeldError, LeaseLostError) as err:  # another attempt of the same version
        print(f"error: {err}", file=sys.stderr)
        return 5
    results, checks = manifest["metrics"]["results"], manifest["metrics"]["checks"]
    print(f"model bundle {cfg.version} written to {cfg.bundle_uri} ({manifest['timings']['total_s']} s)")
    for name, r in results.items():
        print(f"  {name:13s} recall@10 {r['recall@10']:.4f}  ndcg@10 {r['ndcg@10']:.4f}  mrr {r['mrr']:.4f}  "
              f"coverage@10 {r['coverage@10']:.3f}")
    beats = checks["fused_beats_all"]
    print(f"  fused beats every single-modality variant, id-only and popularity on ndcg@10: "
          f"{'(none trained)' if beats is None else beats}; "
          f"ranker beats retrieval: {checks['ranker_beats_retrieval']}")
    print(json.dumps({"version": cfg.version, "results": results, "checks": checks,
                      "timings": manifest["timings"]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
