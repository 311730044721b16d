"""Generate the sample multimodal corpus into object storage.

    python -m jobs.make_corpus --config configs/corpus.yaml [--force]
    ray job submit --working-dir . -- python -m jobs.make_corpus --config configs/corpus.yaml

Exit codes: 0 written or already there with the same settings; 2 a bad config, or a corpus made with
other settings already at the root.
"""

from __future__ import annotations

import argparse
import json
import sys

from tessera.config import ConfigError, load_config
from tessera.corpus import CorpusConfig, generate_corpus
from tessera.ray_utils import check_paths_for_cluster, init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", default="configs/corpus.yaml")
    parser.add_argument("--force", action="store_true", help="regenerate even if the same corpus exists")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(CorpusConfig, args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray()
    try:  # tasks write under root: a local one is refused on several nodes, a URI of another scheme anywhere
        check_paths_for_cluster({"root": cfg.root},
                                {"real_media.data_dir": cfg.real_media.data_dir if cfg.real_media.enabled else None})
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        manifest = generate_corpus(cfg, force=args.force)
    except FileExistsError as err:  # another corpus at this root
        print(f"error ({args.config}): {err}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    state = "already present (same settings), kept" if manifest.get("reused") else "written"
    print(f"corpus {state} at {cfg.root}: {c['items']} items ({c['with_text']} with text, "
          f"{c['with_image']} with image, {c['with_audio']} with audio, {c.get('real_media', 0)} real media), "
          f"{sum(c.get('bad', {}).values())} deliberately bad, {c['users']} users, {c['interactions']} interactions")
    print(json.dumps(manifest["counts"], sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
