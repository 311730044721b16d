"""Tessera: multimodal embedding and recommendation on Ray.

The library lives here; the Ray wiring (Data pipelines, Train loop, Serve deployments) imports the
single-process building blocks (encoders, models, index), never the other way round.
"""

__version__ = "0.1.0"
