"""The versioned model bundle under ``models/<version>/``: the contract between train, index and serve.

Layout::

    models/<version>/item_tower/   config.json + weights   (ItemTower.save)
    models/<version>/user_tower/   config.json + weights   (UserTower.save)
    models/<version>/ranker/       config.json + weights   (Ranker.save)
    models/<version>/metrics.json  evaluation results
    models/<version>/_MANIFEST.json  written last: version, embedding run (its URI and manifest's
                                   encoders), modalities, item-id hashing, files with sha256, metrics

``ModelBundle.load(storage, uri)`` needs nothing but the bundle: every model rebuilds from its own
saved config. Loading checks each file against the manifest's checksums.

Example::

    bundle = ModelBundle(item_tower, user_tower, ranker, manifest={...})
    bundle.save(storage, "s3://tessera-demo/models/v1")
    again = ModelBundle.load(storage, "s3://tessera-demo/models/v1")
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tessera.models.item_tower import ItemTower
from tessera.models.ranker import Ranker
from tessera.models.user_tower import UserTower
from tessera.storage import Storage, join_uri

COMPONENTS = {"item_tower": ItemTower, "user_tower": UserTower, "ranker": Ranker}
MANIFEST = "_MANIFEST.json"
POPULARITY_FILE = "item_popularity.parquet"  # item_id, train_interactions: written by jobs.train, read by serving


class BundleCorruptError(RuntimeError):
    """A bundle file is missing or does not match the checksum in the bundle's manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class ModelBundle:
    """The three trained models plus the manifest describing where they came from.

    ``manifest`` should hold at least ``version``, ``embedding_run`` (URI of the embeddings run),
    ``encoders`` (copied from that run's manifest), ``modalities`` and ``metrics``; ``save`` adds
    ``files`` (relative path -> sha256) and ``kind``.
    """

    item_tower: ItemTower
    user_tower: UserTower
    ranker: Ranker
    manifest: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    def save(self, storage: Storage, uri: str) -> dict:
        """Write every component, then the manifest (last, so a reader never sees half a bundle)."""
        with tempfile.TemporaryDirectory(prefix="tessera-bundle-") as tmp:
            root = Path(tmp)
            files: dict[str, str] = {}
            for name in COMPONENTS:
                getattr(self, name).save(root / name)
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                rel = path.relative_to(root).as_posix()
                files[rel] = _sha256(path)
                storage.upload_file(path, join_uri(uri, rel))
        manifest = {**self.manifest, "kind": "tessera.model", "files": files}
        storage.write_json(join_uri(uri, MANIFEST), manifest)
        self.manifest = manifest
        return manifest

    @classmethod
    def load(cls, storage: Storage, uri: str, map_location: str = "cpu") -> ModelBundle:
        """Load a bundle saved by :meth:`save`, verifying every file's checksum."""
        manifest_uri = join_uri(uri, MANIFEST)
        if not storage.exists(manifest_uri):
            raise FileNotFoundError(f"no model bundle at {uri} ({MANIFEST} missing)")
        manifest = storage.read_json(manifest_uri)
        with tempfile.TemporaryDirectory(prefix="tessera-bundle-") as tmp:
            root = Path(tmp)
            for rel, digest in manifest.get("files", {}).items():
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    target.write_bytes(storage.read_bytes(join_uri(uri, rel)))
                except FileNotFoundError:
                    raise BundleCorruptError(f"model bundle {uri}: file {rel} is missing") from None
                if _sha256(target) != digest:
                    raise BundleCorruptError(f"model bundle {uri}: file {rel} does not match its checksum")
            models = {name: klass.load(root / name, map_location=map_location) for name, klass in COMPONENTS.items()}
        return cls(manifest=manifest, **models)
