"""Online serving, without Ray: the pieces the Ray Serve app (``serve_apps/recommender.py``) wraps.

* :mod:`tessera.serving.version`: :class:`VersionRef` (an index and the bundle it names, resolved
  together), :class:`ItemVectors`, :class:`VersionCache` (old and new version side by side in a rollout).
* :mod:`tessera.serving.query`: :class:`QueryCore` (user tower over histories; text / image / audio
  query encoders + the item tower's projection).
* :mod:`tessera.serving.retrieve`: :class:`RetrieverCore` (sharded ScaNN, fused and per modality).
* :mod:`tessera.serving.rank`: :class:`RankerCore` (the bundle's ranker; popular items when cold).
* :mod:`tessera.serving.flow`: :class:`Flow`, encode -> retrieve -> rank for a batch of requests.
* :mod:`tessera.serving.local`: :class:`LocalStages`, the whole pipeline in one process.
* :mod:`tessera.serving.schemas`: the API's request and response models.
"""

from tessera.serving.errors import RequestError
from tessera.serving.flow import Flow
from tessera.serving.local import LocalStages
from tessera.serving.version import ItemVectors, VersionCache, VersionError, VersionRef

__all__ = ["Flow", "ItemVectors", "LocalStages", "RequestError", "VersionCache", "VersionError", "VersionRef"]
