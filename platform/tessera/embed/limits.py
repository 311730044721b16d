"""Decoding time limits of the embedding job, in a module of their own that imports nothing: the
media stage's config (which imports the encoders, and with them torch) and the CPU stages (which must
not import torch) both read them.

A media decode batch still running after ``DECODE_BATCH_TIMEOUT_S`` ends its worker; on the isolated
retry an item past ``DECODE_ITEM_TIMEOUT_S`` fails (``tessera.embed.stages.map_guarded``).
"""

DECODE_BATCH_TIMEOUT_S = 600.0
DECODE_ITEM_TIMEOUT_S = 60.0
