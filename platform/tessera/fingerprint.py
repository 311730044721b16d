"""Which training of a model bundle an artifact was made from (torch-free: the serving Ingress imports it)."""

from __future__ import annotations

import hashlib
import json


def bundle_fingerprint(manifest: dict) -> str:
    """The sha256 of a bundle manifest's file checksums (``files``): what tells one training of a version
    from another. The version alone does not (``jobs.train --overwrite`` retrains a version in place); an
    index records this of the bundle it was built from, and serving refuses the pair once the bundle changed.
    """
    files = json.dumps(manifest.get("files") or {}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(files).hexdigest()
