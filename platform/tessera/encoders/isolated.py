"""Media preprocessing in a child process, so a decoder that crashes or hangs fails one item only.

Image and audio bytes from the outside world go through C decoders (libjpeg-turbo, libpng, libwebp,
giflib, libsndfile, mpg123, ...). A malformed file that makes one of them crash (a segfault, an
abort) or loop kills or wedges the process decoding it. In a serving replica that is the replica and
every request batched with the bad one; the caller's retries then replay the bad request on other
replicas, which die the same way. :class:`IsolatedDecoder` runs ``Preprocessor.map`` for one item at
a time in a child process: a crash becomes that item's ``MediaError("corrupt", ...)``, a hang past
``timeout_s`` is killed and becomes one too, and a replacement child starts at once for the next item.
A child killed by SIGKILL (what the kernel's OOM killer sends: the node's memory, most often, not the
input) gets its item once more in the new child; it fails only if that one is killed too.
Items never share a child call, so the item that brought it down is known.

The child is a plain ``python -m tessera.encoders.isolated`` subprocess (not ``multiprocessing``,
whose spawned children re-import the parent's main script). The parent sends it pickles (the
preprocessor, the raw bytes); the child answers in a plain format the parent parses without
unpickling (a JSON header: an array's dtype and shape, a media error's kind and detail, or an
exception's type and message; then the array's bytes), so a child taken over through a decoder
exploit cannot run code in the parent by what it answers. The isolation guards against crashes and
hangs; the child runs as the same user with the same environment. It exits when the parent closes
its stdin or dies: on Linux the kernel kills it (``PR_SET_PDEATHSIG``) even while a decoder holds
the GIL in a C loop; elsewhere a thread watching the parent ends it, once it gets the GIL. The death
signal follows the parent *thread* that started the child, so every child is started from one
thread of this module's that lives as long as the process (never a pool thread that may exit).

Costs: one child process per decoder (it imports the preprocessors' modules, torch included: a few
hundred MB), and a round trip per item (the raw bytes in, the model input out). Meant for untrusted
inputs (serving, and the embedding job's retries of a batch whose worker died).

Example::

    decoder = IsolatedDecoder(timeout_s=10)
    [pixels] = decoder.map(image_encoder.preprocessor, [jpeg_bytes])   # array, or MediaError
    decoder.close()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tessera.encoders.base import Preprocessor
from tessera.encoders.errors import MediaError

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")  # each frame: its length, then its bytes
MAX_REPLY_BYTES = 256 << 20  # a model input is a few MB at most
_DTYPES = frozenset({"uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"})
# exceptions a preprocessor's setup raises, re-raised as themselves; any other type as a RuntimeError
_SETUP_ERRORS = {e.__name__: e for e in (FileNotFoundError, ValueError, KeyError, TypeError, OSError, RuntimeError)}


class _Spawner:
    """One daemon thread that starts every child (see the module docstring: a child's death signal is
    tied to the thread that started it). A daemon thread, not an executor: ``concurrent.futures``
    ends its workers at interpreter exit before other threads are joined, which would kill children
    still decoding for them; this thread is never ended, it stops with the process."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="tessera-decoder-spawn", daemon=True).start()

    def _run(self) -> None:
        while True:
            args, env, done = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
            except BaseException as err:  # handed to the caller, the thread goes on
                done.set_exception(err)

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((args, env, done))
        return done.result()


_SPAWNER: _Spawner | None = None
_SPAWNER_LOCK = threading.Lock()
_PR_SET_PDEATHSIG = 1


def _forget_spawner() -> None:
    """In a forked child: the spawner thread was not copied, so the next start makes a new one."""
    global _SPAWNER, _SPAWNER_LOCK
    _SPAWNER, _SPAWNER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_spawner)


def _start_child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``Popen`` on the module's spawner thread."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = _Spawner()
        spawner = _SPAWNER
    return spawner.start(args, env)


def _die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGKILL when the parent (its spawning thread) ends; False where there is no
    ``prctl`` (not Linux) or it failed (logged). Exits at once if the parent is already gone."""
    done = False
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        done = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        if not done:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): only the watch thread ends this child "
                           "when its parent dies", ctypes.get_errno())
    if os.getppid() != parent:  # it died before the request: no signal will come
        os._exit(0)
    return done


class DecoderUnavailable(RuntimeError):
    """The child process could not be started or set up (not the input's fault)."""


class _ChildGone(Exception):
    """The child died (or was killed) before answering; ``exit_code``: its status when it had exited by
    itself (a negative signal number), None when it was alive (it answered what our child never writes)."""

    exit_code: int | None = None


def _write_frame(stream: BinaryIO, *parts: bytes) -> None:
    stream.write(b"".join([_HEADER.pack(sum(map(len, parts))), *parts]))
    stream.flush()


# --- the parent's side ------------------------------------------------------------------------
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
        self._keys: weakref.WeakKeyDictionary[Preprocessor, bytes] = weakref.WeakKeyDictionary()
        self._modules: set[str] = set()  # the preprocessors' modules, imported by a new child at start
        self._ready: set[bytes] = set()  # preprocessors the current child has set up
        self.restarts = 0  # children replaced after a crash, a timeout or an exit between items

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first item)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, prep: Preprocessor) -> None:
        """Start the child and set ``prep`` up in it now, rather than on its first item.

        Raises:
            DecoderUnavailable: the child did not start or set up (its exit code in the message).
        """
        with self._lock:
            self._setup(self._key(prep))

    def map(self, prep: Preprocessor, raws: Sequence[Any]) -> list[np.ndarray | MediaError]:
        """``prep.map(raws)``, each item in the child; a crash or a timeout fails that item alone.

        Raises:
            DecoderUnavailable: no child could be started or set up.
            FileNotFoundError, ValueError, ...: the preprocessor's own setup errors (its configuration),
                as ``prep.map`` raises them.
        """
        key = self._key(prep)
        with self._lock:
            return [self._one(key, raw, type(prep).__name__) for raw in raws]

    def close(self) -> None:
        """Stop the child process (closing its input ends it)."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._ready.clear()
            if proc is not None:
                with contextlib.suppress(OSError):  # a child that died with bytes unread: a broken pipe
                    proc.stdin.close()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()

    # --- internals (called with the lock held) ----------------------------------------------
    def _key(self, prep: Preprocessor) -> bytes:
        """The preprocessor as the child receives it, with the weights folder this process resolved (a
        pickled preprocessor forgets a folder it downloaded: the child would download it again, and
        perhaps read other files than the ones checked here)."""
        key = self._keys.get(prep)
        if key is None:
            self._modules.add(type(prep).__module__)
            key = self._keys[prep] = pickle.dumps((prep, str(prep.weights_dir)))
        return key

    def _child(self) -> subprocess.Popen:
        """The running child, replacing one that has exited since the last item (the OOM killer, a
        signal: not the next item's fault)."""
        if self._proc is not None and self._proc.poll() is not None:
            logger.warning("the decoding process had exited (code %s) between items; starting a new one",
                           self._proc.returncode)
            self._discard(restart=False)
        if self._proc is None:
            self._proc = self._spawn()
        return self._proc

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            return _start_child([sys.executable, "-m", "tessera.encoders.isolated", str(os.getpid()),
                                 *sorted(self._modules)], env)
        except (OSError, RuntimeError) as err:  # out of processes, memory or descriptors; no thread at exit
            raise DecoderUnavailable(f"cannot start the decoding process: {err}") from err

    def _discard(self, restart: bool = True) -> None:
        """Kill the child; with ``restart``, start the next one at once, so that its imports overlap the
        wait for the next item instead of delaying it."""
        proc, self._proc = self._proc, None
        self._ready.clear()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self.restarts += 1
            try:
                with contextlib.suppress(OSError):  # bytes a dead child never read: a broken pipe
                    proc.stdin.close()
            finally:
                proc.stdout.close()
        if restart:
            try:
                self._proc = self._spawn()
            except DecoderUnavailable as err:  # the next item tries again
                logger.warning("%s", err)

    def _setup(self, key: bytes) -> None:
        proc = self._child()  # first, so that a dead child's replacement is set up here, not on an item's clock
        if key in self._ready:
            return
        try:
            reply = self._exchange(proc, ("setup", key), self.setup_timeout_s)
        except TimeoutError as err:
            raise DecoderUnavailable(f"the decoding process did not set up within {self.setup_timeout_s:g} s") from err
        except _ChildGone as err:
            raise DecoderUnavailable(f"the decoding process exited while setting up (exit code {proc.returncode})"
                                     ) from err
        _result(reply)  # raises the preprocessor's setup error, if any
        self._ready.add(key)

    def _one(self, key: bytes, raw: Any, name: str, again: bool = False) -> np.ndarray | MediaError:
        self._setup(key)
        proc = self._proc
        try:
            reply = self._exchange(proc, ("map", key, raw), self.timeout_s)
            if "array" not in reply[0] and "media_error" not in reply[0]:
                raise _ChildGone()  # our child answers an item with one of the two
            return _result(reply)
        except _ChildGone as gone:
            self._discard()
            killed = gone.exit_code == -signal.SIGKILL  # the kernel's OOM killer, most often: not the input
            if killed and not again:  # the node's memory may be back: an item is failed for good on the second
                logger.warning("%s: the decoding process was killed (SIGKILL: out of memory?) on one item; "
                               "trying it once more in a new one", name)
                return self._one(key, raw, name, again=True)
            status = "it answered what it never writes, killed" if gone.exit_code is None else \
                f"exit code {gone.exit_code}"  # proc.returncode would read -9 once _discard killed it
            logger.warning("%s: the decoding process died on one item (%s; recorded as 'corrupt'); "
                           "started a new one", name, status)
            return MediaError("corrupt", "the decoder was killed on this input twice (SIGKILL: out of memory?)"
                              if killed else "the decoder crashed on this input")
        except TimeoutError:
            self._discard()
            logger.warning("%s: one item took over %g s to decode; the decoding process was killed", name,
                           self.timeout_s)
            return MediaError("corrupt", f"decoding took over {self.timeout_s:g} s")

    def _exchange(self, proc: subprocess.Popen, message: tuple, timeout_s: float) -> tuple[dict, bytes]:
        """Send ``message`` and read the answer within ``timeout_s`` (one deadline for the whole reply).
        Raises ``_ChildGone`` / ``TimeoutError``; on any failure the child is discarded (what it might
        still write must not be read as the next item's answer)."""
        try:
            try:
                _write_frame(proc.stdin, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            except (BrokenPipeError, OSError):
                raise _ChildGone() from None
            return _read_reply(proc.stdout.fileno(), time.monotonic() + timeout_s)
        except BaseException as err:
            if isinstance(err, _ChildGone):  # how it ended, before _discard's own SIGKILL would say it
                try:
                    err.exit_code = proc.wait(timeout=1.0)  # at end of file: exiting, if not yet reaped
                except subprocess.TimeoutExpired:
                    err.exit_code = None  # alive: it answered something our child never writes
            if self._proc is proc:
                self._discard(restart=False)
            raise


def _read_reply(fd: int, deadline: float) -> tuple[dict, bytes]:
    """One reply frame from the child's stdout (read from the descriptor itself, never buffered ahead):
    ``(header, payload)``. Raises ``TimeoutError`` past ``deadline``, ``_ChildGone`` at end of file or on
    a frame our child does not write."""
    poller = select.poll()  # not select(): descriptors above 1024 are fine
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def read(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError()
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise _ChildGone()
            buf += chunk
        return bytes(buf)

    (length,) = _HEADER.unpack(read(_HEADER.size))
    if length > MAX_REPLY_BYTES:
        raise _ChildGone()
    head, _, payload = read(length).partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        raise _ChildGone() from None
    if not isinstance(header, dict):
        raise _ChildGone()
    return header, payload


def _result(reply: tuple[dict, bytes]):
    """The child's answer as the in-process call would have given it."""
    header, payload = reply
    if "error" in header:
        raise _SETUP_ERRORS.get(header["error"], RuntimeError)(str(header.get("message", "")))
    if "media_error" in header:
        try:
            return MediaError(str(header["media_error"]), str(header.get("detail", "")))
        except ValueError:  # a kind our child does not write
            raise _ChildGone() from None
    if "array" not in header:
        return None
    dtype, shape = str(header["array"]), header.get("shape")
    if dtype not in _DTYPES or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _ChildGone()  # not something our child writes: treat it as broken
    arr = np.frombuffer(payload, dtype=dtype)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise _ChildGone()
    return arr.reshape(shape).copy()  # writable, like the in-process result


# --- the child's side -------------------------------------------------------------------------
def _serve(parent: int, modules: list[str]) -> None:
    """The child's loop: answer ``setup`` / ``map`` messages until the parent closes the pipe or dies."""
    out = os.fdopen(os.dup(1), "wb")  # the protocol's stream; stray prints from libraries go to stderr
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    def watch() -> None:  # a parent killed while this child decodes: stdin's EOF would come too late
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    _die_with_parent(parent)  # the kernel's watch, which needs no GIL
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    for name in modules:  # the preprocessors' imports (torch, ...) while the parent waits for work
        importlib.import_module(name)
    preprocessors: dict[bytes, Preprocessor] = {}
    while True:
        header = inp.read(_HEADER.size)
        data = inp.read(_HEADER.unpack(header)[0]) if len(header) == _HEADER.size else b""
        if not data:
            return  # the parent closed the pipe
        message = pickle.loads(data)
        key = message[1]
        try:
            prep = preprocessors.get(key)
            if prep is None:
                prep, weights_dir = pickle.loads(key)
                prep._given_dir = Path(weights_dir)  # the parent's copy, checked there (no download here)
                prep.setup()
                preprocessors[key] = prep
            result = None if message[0] == "setup" else prep.map([message[2]])[0]
        except Exception as err:  # a setup error goes back to the caller, raised there as in-process
            _write_frame(out, json.dumps({"error": type(err).__name__, "message": str(err)}).encode() + b"\n")
            continue
        if isinstance(result, MediaError):
            _write_frame(out, json.dumps({"media_error": result.kind, "detail": result.detail}).encode() + b"\n")
        elif result is None:
            _write_frame(out, b"{}\n")
        else:
            arr = np.ascontiguousarray(result)
            arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # native order: the parent reads it so
            head = json.dumps({"array": arr.dtype.name, "shape": list(arr.shape)}).encode() + b"\n"
            _write_frame(out, head, arr.tobytes())


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2:])
