"""A preprocessor that fails the way a broken C decoder does, for the tests of decoder isolation.

No real file known crashes or hangs this machine's decoders, so these tests use the real image
preprocessing except on marked bytes: ``CRASH`` aborts the process (as a segfault ends it), ``HANG``
never returns (a decoder in an endless loop), ``SPIN`` never returns either while holding the GIL (a C
decoder looping without releasing it: here the ``re`` engine backtracking, which keeps the GIL). The
isolation around it is what the tests exercise."""

from __future__ import annotations

import os
import re
import time

from tessera.encoders.image import ImagePreprocessor


class FaultyImagePreprocessor(ImagePreprocessor):
    """The real image preprocessing, except: bytes starting ``CRASH`` abort the process, ``HANG`` sleep
    for an hour, ``SPIN`` backtrack for hours in C with the GIL held (no other thread of the process runs)."""

    def __call__(self, raw):
        if raw.startswith(b"CRASH"):
            os.abort()
        if raw.startswith(b"HANG"):
            time.sleep(3600)
        if raw.startswith(b"SPIN"):
            re.match(r"(a+)+$", "a" * 40 + "b")  # ~2^40 steps
        return super().__call__(raw)
