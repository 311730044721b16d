"""Sample multimodal corpus: items (text, image, audio), users with latent tastes, interactions.

Built so that recommendation quality can be measured: latent attributes are spread over the
modalities (category in text, colour/shape in images, pitch/tempo/timbre in audio), users prefer
some of them, and the ground truth goes to ``<root>/truth/``, never into the items table.
"""

from tessera.corpus.config import CorpusConfig
from tessera.corpus.generate import generate_corpus

__all__ = ["CorpusConfig", "generate_corpus"]
