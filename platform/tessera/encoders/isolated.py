"""Media preprocessing in a child process, so a decoder that crashes or hangs fails one item only.

Image and audio bytes from the outside world go through C decoders (libjpeg-turbo, libpng, libwebp,
giflib, libsndfile, mpg123, ...). A malformed file that makes one of them crash (a segfault, an
abort) or loop kills or wedges the process decoding it. In a serving replica that is the replica and
every request batched with the bad one; the caller's retries then replay the bad request on other
replicas, which die the same way. :class:`IsolatedDecoder` runs ``Preprocessor.map`` for one item at
a time in a child process: a crash becomes that item's ``MediaError("corrupt", ...)``, a hang past
``timeout_s`` is killed and becomes one too, and a fresh child takes the next item. Items never share
a child call, so the item that brought it down is known.

The child is a plain ``python -m tessera.encoders.isolated`` subprocess (not ``multiprocessing``,
whose spawned children re-import the parent's main script) speaking length-prefixed pickles over its
stdin / stdout; it exits when the parent closes its stdin or dies.

Costs: one child process per decoder (it imports the preprocessors' modules, torch included: a few
hundred MB, started on first use or by :meth:`IsolatedDecoder.start`), and a round trip per item (the
raw bytes in, the model input out). Meant for untrusted inputs one request at a time (serving); the
embedding job preprocesses in Ray tasks, whose crashes Ray retries.

Example::

    decoder = IsolatedDecoder(timeout_s=10)
    [pixels] = decoder.map(image_encoder.preprocessor, [jpeg_bytes])   # array, or MediaError
    decoder.close()
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from tessera.encoders.base import Preprocessor
from tessera.encoders.errors import MediaError

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")  # each message: its length, then its pickle


def _send(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None  # the other side is gone
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(stream: BinaryIO) -> Any:
    """The next message, or raises ``EOFError`` when the other side has closed or died."""
    header = _read_exactly(stream, _HEADER.size)
    data = None if header is None else _read_exactly(stream, _HEADER.unpack(header)[0])
    if data is None:
        raise EOFError("the other process closed the pipe")
    return pickle.loads(data)


class _ChildGone(Exception):
    """The child died (or was killed) before answering."""


class IsolatedDecoder:
    """Runs :meth:`Preprocessor.map` in a child process, one item per call (see the module docstring).

    Thread-safe: calls from several threads take turns (a crash must be pinned on one item).

    Args:
        timeout_s: an item whose preprocessing takes longer fails as ``corrupt`` and its child is killed.
        setup_timeout_s: how long a child may take to start and set a preprocessor up (imports, config
            files), before its first item.
    """

    def __init__(self, timeout_s: float = 30.0, setup_timeout_s: float = 300.0):
        if timeout_s <= 0 or setup_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got {timeout_s} and {setup_timeout_s}")
        self.timeout_s, self.setup_timeout_s = timeout_s, setup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._keys: dict[int, bytes] = {}  # id(preprocessor) -> its pickle (kept alive with it)
        self._held: dict[int, Preprocessor] = {}
        self._ready: set[bytes] = set()  # preprocessors the current child has set up
        self.restarts = 0  # children replaced after a crash, a timeout or an exit between items

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first item)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, prep: Preprocessor) -> None:
        """Start the child and set ``prep`` up in it now, rather than on its first item."""
        with self._lock:
            self._setup(self._key(prep))

    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is not None:
            # it died between items (the OOM killer, a signal): not the next item's fault
            logger.warning("the decoding process had exited (code %s) between items; starting a new one",
                           self._proc.returncode)
            self._discard()
        if self._proc is None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self._proc = subprocess.Popen([sys.executable, "-m", "tessera.encoders.isolated", str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return self._proc

    def _discard(self) -> None:
        proc, self._proc = self._proc, None
        self._ready.clear()
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()
        self.restarts += 1

    def _call(self, message: tuple, timeout_s: float) -> Any:
        """Send ``message``, return the child's answer; raises ``_ChildGone`` or ``TimeoutError`` (the
        child is discarded either way) or the exception the child's call raised."""
        proc = self._child()
        try:
            _send(proc.stdin, message)
        except (BrokenPipeError, OSError):
            self._discard()
            raise _ChildGone() from None
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        if not ready:
            self._discard()
            raise TimeoutError()
        try:
            status, value = _receive(proc.stdout)
        except EOFError:
            self._discard()
            raise _ChildGone() from None
        if status == "error":
            raise value
        return value

    def _setup(self, key: bytes) -> None:
        if key in self._ready:
            return
        try:
            self._call(("setup", key), self.setup_timeout_s)
        except (_ChildGone, TimeoutError):
            raise RuntimeError(f"the decoding process did not start within {self.setup_timeout_s:g} s") from None
        self._ready.add(key)

    def _key(self, prep: Preprocessor) -> bytes:
        key = self._keys.get(id(prep))
        if key is None:
            key = self._keys[id(prep)] = pickle.dumps(prep)
            self._held[id(prep)] = prep  # so that its id is not reused by another object
        return key

    def map(self, prep: Preprocessor, raws: Sequence[Any]) -> list[np.ndarray | MediaError]:
        """``prep.map(raws)``, each item in the child; a crash or a timeout fails that item alone.

        Errors from the preprocessor's setup (its configuration, storage) are raised, as ``prep.map``
        raises them."""
        key = self._key(prep)
        with self._lock:
            return [self._one(key, raw, type(prep).__name__) for raw in raws]

    def _one(self, key: bytes, raw: Any, name: str) -> np.ndarray | MediaError:
        self._setup(key)
        try:
            return self._call(("map", key, raw), self.timeout_s)
        except _ChildGone:
            logger.warning("%s: the decoding process died on one item (recorded as 'corrupt'); restarting it", name)
            return MediaError("corrupt", "the decoder crashed on this input")
        except TimeoutError:
            logger.warning("%s: one item took over %g s to decode; the decoding process was killed", name,
                           self.timeout_s)
            return MediaError("corrupt", f"decoding took over {self.timeout_s:g} s")

    def close(self) -> None:
        """Stop the child process (closing its input ends it)."""
        with self._lock:
            if self._proc is not None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc.stdout.close()
                self._proc = None
            self._ready.clear()


def _serve(parent: int) -> None:
    """The child's loop: answer ``setup`` / ``map`` messages until the parent closes the pipe or dies."""
    out = os.fdopen(os.dup(1), "wb")  # the protocol's stream; stray prints from libraries go to stderr
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    def watch() -> None:  # a parent killed while this child decodes: stdin's EOF would come too late
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    preprocessors: dict[bytes, Preprocessor] = {}
    while True:
        try:
            message = _receive(inp)
        except EOFError:
            return
        try:
            key = message[1]
            prep = preprocessors.get(key)
            if prep is None:
                prep = pickle.loads(key)
                prep.setup()
                preprocessors[key] = prep
            reply = ("ok", None) if message[0] == "setup" else ("ok", prep.map([message[2]])[0])
        except Exception as err:  # a setup error goes back to the caller, raised there as in-process
            reply = ("error", err)
        try:
            _send(out, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as err:  # an error that does not pickle
            _send(out, ("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({err})")))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
