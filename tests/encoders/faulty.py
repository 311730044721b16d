"""A preprocessor that fails the way a broken C decoder does, for the tests of decoder isolation.

No real file known crashes or hangs this machine's decoders, so these tests use the real image
preprocessing except on marked bytes: ``CRASH`` aborts the process (as a segfault ends it), ``HANG``
never returns (a decoder in an endless loop), ``SPIN`` never returns either while holding the GIL (a C
decoder looping without releasing it: here the ``re`` engine backtracking, which keeps the GIL). The
isolation around it is what the tests exercise."""

from __future__ import annotations

import os
import re
import signal
import time

from tessera.encoders.image import ImagePreprocessor


class FaultyImagePreprocessor(ImagePreprocessor):
    """The real image preprocessing, except: bytes starting ``CRASH`` abort the process, ``HANG`` sleep
    for an hour, ``SPIN`` backtrack for hours in C with the GIL held (no other thread of the process runs),
    ``OOM`` SIGKILL the process the first time (with a marker path) or every time (without)."""

    def __call__(self, raw):
        if raw.startswith(b"CRASH"):
            os.abort()
        if raw.startswith(b"OOM"):  # b"OOM<marker path>\0<image>": SIGKILLed (as by the OOM killer) until the
            marker, _, raw = raw[3:].partition(b"\0")  # marker exists, once only with an empty path
            if not marker or not os.path.exists(marker):
                if marker:
                    open(marker, "wb").close()
                os.kill(os.getpid(), signal.SIGKILL)
        if raw.startswith(b"HANG"):
            time.sleep(3600)
        if raw.startswith(b"SPIN"):
            re.match(r"(a+)+$", "a" * 40 + "b")  # ~2^40 steps
        return super().__call__(raw)
